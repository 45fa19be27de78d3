"""The benchmark harness of the suite: one command, one section each.

    python tools/benchmark.py SECTION ...   (a section below, or all)

Sections (the logic lives in ``dfq_dense/bench/<section>.py``):

``synthesis``
    one synthesis iteration per method x backbone x size x batch, split
    into the backbone forward, each prior loss, the backward and the
    optimizer step, with peak memory (``results/benchmarks/synthesis.json``).
``fit``
    one iteration of each method at its configured batch at 800x1333 with
    the memory options for 16 GB, time by phase and peak memory
    (``results/benchmarks/fit.json``).
``flops``
    FLOPs of one synthesis iteration per method and of one evaluation
    forward, for every real model (``results/benchmarks/flops.json``).
``calibration``
    calibration time per image and finish per quantizer setting, full-size
    Swin-S Mask R-CNN, one process per setting
    (``results/benchmarks/calibration.json``).
``pse``
    the exact patch-similarity entropy as a share of a PSAQ-ViT iteration
    (``results/benchmarks/pse.json``).
``fakequant``
    fake-quant W8A8 evaluation forward against FP
    (``results/benchmarks/fakequant*.json``).
``budget``
    measures nothing: the wall time (estimated on GPUs from the FLOPs) and
    memory of a whole run of each real config, from the results of the
    sections above (``--results``, default ``results/benchmarks``).
``all``
    every section with its defaults, one after the other (``budget`` from
    the files just written).

Every section writes ``sections.<name>`` of a JSON file (default
``work_dirs/benchmarks/<name>.json``; ``--out`` to choose, other sections
in the file are kept) with the environment (device: CPU model and threads
or the GPU's name; torch / mmcv / mmdet / mmseg versions; git commit) and
prints its Markdown table.  Without a section name, ``fakequant`` runs.
"""
import argparse
import inspect
import os
import os.path as osp
import sys

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from dfq_dense.bench import (budget, calibration, fakequant,  # noqa: E402
                             fit, flops, pse, synthesis)
from dfq_dense.bench.common import (describe_environment,  # noqa: E402
                                    environment, load_section, write_result)

SECTIONS = {m.NAME: m
            for m in (synthesis, fit, flops, calibration, pse, fakequant,
                      budget)}
# the renderer of the README's fakequant tables, under its former name
fakequant_markdown = fakequant.markdown_rows


def _common_arguments(p, default_out):
    p.add_argument('--device', default=None,
                   help='cpu / cuda[:i] (default: cuda when available)')
    p.add_argument('--threads', type=int, default=None,
                   help='torch threads (default: OMP_NUM_THREADS)')
    p.add_argument('--out', default=None, help=default_out)


def build_parser():
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n\n')[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest='section', required=True)
    for name, mod in SECTIONS.items():
        p = sub.add_parser(name, help=mod.HELP, description=(
            mod.__doc__ or '').split('\n\n')[0],
            formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        _common_arguments(p, f'JSON file (default: work_dirs/benchmarks/'
                          f'{mod.DEFAULT_OUT}; other sections in it are '
                          'kept)')
    p = sub.add_parser('all', help='every section with its defaults')
    _common_arguments(p, 'folder of the JSON files (default: '
                      'work_dirs/benchmarks)')
    return parser


def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith('-') and argv[0] not in ('-h',
                                                               '--help'):
        argv.insert(0, 'fakequant')  # the default section
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.section in SECTIONS:
        check = getattr(SECTIONS[args.section], 'check_arguments', None)
        if check is not None:
            check(parser, args)
        if getattr(args, 'repeats', 1) is not None and \
                getattr(args, 'repeats', 1) < 1:
            parser.error('--repeats must be >= 1')
    return args


def section_defaults(name, common):
    """The parsed defaults of section ``name`` with the common options."""
    args = build_parser().parse_args([name])
    for key, value in common.items():
        setattr(args, key, value)
    return args


def run_section(name, args, device, out):
    mod = SECTIONS[name]
    env = environment(device)
    kwargs = {}
    params = inspect.signature(mod.run).parameters
    if 'checkpoint' in params:  # written after every row of a long run
        kwargs['checkpoint'] = lambda partial: write_result(
            out, name, partial, env)
    if 'previous' in params and osp.exists(out):
        try:
            kwargs['previous'] = load_section(out, name)
        except (OSError, ValueError, KeyError):
            pass
    result = mod.run(args, device, **kwargs)
    path = write_result(out, name, result, env)
    line = describe_environment(env)
    table = mod.markdown(dict(result, environment=env))
    print(f'\n{name}:\n' if table.startswith(line) else
          f'\n{name}: {line}\n')
    print(table)
    print(f'\nwritten: {path}')
    return result


def main(argv=None):
    args = parse_args(argv)
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    elif os.environ.get('OMP_NUM_THREADS'):
        torch.set_num_threads(int(os.environ['OMP_NUM_THREADS']))
    device = torch.device(args.device or (
        'cuda' if torch.cuda.is_available() else 'cpu'))
    folder = osp.join(REPO, 'work_dirs', 'benchmarks')
    if args.section == 'all':
        folder = args.out or folder
        failed = 0
        for name, mod in SECTIONS.items():
            sargs = section_defaults(name, dict(
                device=args.device, threads=args.threads, out=None))
            if name == 'budget':  # from the files just written
                sargs.results = folder
            result = run_section(name, sargs, device,
                                 osp.join(folder, mod.DEFAULT_OUT))
            failed += bool(result.get('failed') or
                           result.get('uncalibrated'))
        return 1 if failed else 0
    out = args.out or osp.join(folder, SECTIONS[args.section].DEFAULT_OUT)
    result = run_section(args.section, args, device, out)
    return 1 if result.get('failed') or result.get('uncalibrated') else 0


if __name__ == '__main__':
    sys.exit(main())
