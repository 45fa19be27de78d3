"""The headline metrics of two exported runs of the same matrix cell.

    python tools/compare_cells.py BEFORE.json AFTER.json
        [--labels BEFORE AFTER] [--readme SECTION]

BEFORE / AFTER are ``run_matrix.py --export`` files of one cell (same
definition hash), e.g. a committed demo cell and its re-run after a code
change.  ``--readme`` writes the table into README.md between
<!-- SECTION:start/end -->.
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
    parser.add_argument('before')
    parser.add_argument('after')
    parser.add_argument('--labels', nargs=2, default=('before', 'after'))
    parser.add_argument('--readme', metavar='SECTION')
    args = parser.parse_args(argv)
    from dfq_dense.report import (cell_comparison_markdown,
                                  replace_readme_section)
    try:
        with open(args.before) as f:
            before = json.load(f)
        with open(args.after) as f:
            after = json.load(f)
        text = cell_comparison_markdown(before, after, tuple(args.labels))
    except (OSError, ValueError, KeyError) as err:
        print(f'compare_cells: error: {err}', file=sys.stderr)
        return 2
    print(text, end='')
    if args.readme:
        replace_readme_section(args.readme, text)
    return 0


if __name__ == '__main__':
    sys.exit(main())
