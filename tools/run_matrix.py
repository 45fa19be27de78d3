"""Run a grid of data-free quantization runs (an experiment matrix).

    python tools/run_matrix.py GRID.py (--run | --print | --list)
        [--shard i/n] [--work-dir DIR] [--collect OUT.json]

GRID.py is a small mmengine config (configs/matrix/demo.py is an example;
its keys: configs, methods, bits, quantizer, seeds, num_images, options,
work_dir, eval_fp, share_images).  Every cell (config x method x seed x
num_images x bits) is one tools/dfq_test.py run in its own work dir,
``<work_dir>/<config>-<method>-<bits>-s<seed>-n<images>-<hash>``, the hash
covering the cell's full definition (written to cell.json there).

--run     runs the cells one after another in this process; finished cells
          are skipped, a killed cell re-runs (its synthesis resumes), and
          the cells of a synthesis group (same config, method, seed and
          images; only the bits differ) reuse the first one's images
          (dfq.load_images);
--print   prints the dfq_test commands (finished ones commented out);
--list    prints the cells (index, group, shard-independent name, state);
--shard   i/n: only the synthesis groups g with g % n == i (Slurm: see
          tools/slurm_matrix.sh);
--collect OUT.json gathers every finished cell's dfq_results.json and
          definition (of the whole grid, whatever --shard) into one file
          for tools/leaderboard.py.
A bad grid stops with one line (exit 2).
"""
import argparse
import os.path as osp
import sys

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('grid', help='grid file (an mmengine config)')
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument('--run', action='store_true',
                      help='run the cells in this process, one by one')
    mode.add_argument('--print', action='store_true',
                      help='print the dfq_test shell commands')
    mode.add_argument('--list', action='store_true',
                      help='list the cells and whether they are finished')
    parser.add_argument('--shard', metavar='i/n',
                        help='only shard i of n (0-based)')
    parser.add_argument('--work-dir', help='overrides the grid\'s work_dir')
    parser.add_argument('--export', metavar='DIR',
                        help='write every finished cell as DIR/<cell>.json '
                        '(what results/ commits; tools/leaderboard.py '
                        'reads the folder)')
    parser.add_argument('--collect', metavar='OUT.json',
                        help='gather the finished cells into one JSON')
    parser.add_argument('--python', default='python',
                        help='interpreter named in --print (default python)')
    args = parser.parse_args(argv)
    if not (args.run or args.print or args.list or args.collect or
            args.export):
        parser.error('give --run, --print, --list, --collect or --export')
    return args


def _run_argv(argv):
    """One tools/dfq_test.py run in this process; its exit code."""
    import dfq_test
    return dfq_test.main(argv)


def main(argv=None):
    import warnings
    warnings.filterwarnings('ignore', message='pkg_resources is deprecated',
                            category=UserWarning)
    args = parse_args(argv)
    from dfq_dense.report import matrix
    from dfq_dense.utils.fileio import write_json_atomic
    try:
        grid = matrix.load_grid(args.grid, args.work_dir)
        cells = matrix.expand(grid)
        matrix.check_grid_options(grid, cells)
        shard = matrix.parse_shard(args.shard) if args.shard else None
    except matrix.GridError as err:
        print(f'run_matrix: error: {" ".join(str(err).split())}',
              file=sys.stderr)
        return 2
    mine = matrix.shard_cells(cells, shard)
    code = 0
    if args.list:
        for cell in mine:
            state = 'finished' if matrix.is_finished(cell) else 'to run'
            print(f'{cell["index"]:4d} g{cell["group_index"]:<4d} '
                  f'{cell["name"]}  {state}')
    elif args.print:
        print('\n'.join(matrix.print_commands(grid, mine, args.python)))
    elif args.run:
        tools = osp.join(ROOT, 'tools')
        if tools not in sys.path:
            sys.path.insert(0, tools)
        summary = matrix.run_cells(grid, mine, _run_argv,
                                   log=lambda s: print(s, flush=True))
        print(f'[run_matrix] {len(mine)} cell(s): {len(summary["ran"])} '
              f'ran, {len(summary["skipped"])} already finished, '
              f'{len(summary["failed"])} failed', flush=True)
        for name in summary['failed']:
            print(f'[run_matrix] failed: {name}', flush=True)
        code = 1 if summary['failed'] else 0
    if args.collect:
        out = matrix.collect(grid, cells)
        write_json_atomic(args.collect, out)
        print(f'[run_matrix] collected {len(out["cells"])} of '
              f'{out["num_cells"]} cell(s) into {args.collect}'
              + (f' ({len(out["missing"])} not finished)'
                 if out['missing'] else ''))
    if args.export:
        out = matrix.collect(grid, cells)
        paths = matrix.export(out, args.export)
        print(f'[run_matrix] exported {len(paths)} of {out["num_cells"]} '
              f'cell(s) into {args.export}')
    return code


if __name__ == '__main__':
    sys.exit(main())
