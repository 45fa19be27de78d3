"""Leaderboard of a collected experiment matrix against published figures.

    python tools/leaderboard.py COLLECTED.json
        [--published configs/leaderboard/published.yaml] --out DIR

COLLECTED.json is what ``tools/run_matrix.py GRID --collect`` writes.
Writes DIR/leaderboard.md, leaderboard.csv and leaderboard.json: per model
and bit setting each method's mean and std over the seeds (and the draws),
the suite's FP figure, the within-spread flags, the published figures with
their own FP reference and the deltas, and the calibration-size curves.
The rules and units are written into every output.
"""
import argparse
import json
import os.path as osp
import sys

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('collected', help='run_matrix.py --collect output, '
                        'or a folder of run_matrix.py --export cells')
    parser.add_argument('--published', default=None,
                        help='published results registry (default: '
                        'configs/leaderboard/published.yaml)')
    parser.add_argument('--out', required=True, help='output folder')
    parser.add_argument('--earlier', metavar='JSON',
                        help='with --readme: an earlier method-table record '
                        '(results/demo/earlier/) written beside the board '
                        'into README section SECTION-earlier')
    parser.add_argument('--readme', metavar='SECTION',
                        help='also write the compact table into README.md '
                        'between <!-- SECTION:start/end --> (the demo '
                        'leaderboard: demo-leaderboard)')
    args = parser.parse_args(argv)

    from dfq_dense.report import leaderboard
    from dfq_dense.zoo.published import (PublishedRegistryError,
                                         load_published)
    try:
        if osp.isdir(args.collected):
            from dfq_dense.report.matrix import load_exported
            collected = load_exported(args.collected)
        else:
            with open(args.collected) as f:
                collected = json.load(f)
        if not isinstance(collected, dict) or 'cells' not in collected:
            raise ValueError('not a run_matrix.py --collect file')
        entries = load_published(args.published)
        board = leaderboard.build(collected, entries)
        paths = leaderboard.write(board, args.out)
        if args.readme:
            from dfq_dense.report import replace_readme_section
            replace_readme_section(args.readme,
                                   leaderboard.compact_markdown(board))
            if args.earlier:
                with open(args.earlier) as f:
                    earlier = json.load(f)
                replace_readme_section(
                    args.readme + '-earlier',
                    leaderboard.comparison_markdown(board, earlier))
    except (OSError, ValueError, PublishedRegistryError) as err:
        print(f'leaderboard: error: {args.collected}: '
              f'{" ".join(str(err).split())}', file=sys.stderr)
        return 2
    print('\n'.join(paths))
    return 0


if __name__ == '__main__':
    sys.exit(main())
