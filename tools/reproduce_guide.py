"""How to reproduce each published row, with its estimated time.

    python tools/reproduce_guide.py [--tflops 10] [--readme]

Prints, for every quantized row of configs/leaderboard/published.yaml, the
config that reproduces it (configs/reproduce/<id>.py), its official
checkpoint and converter model, the quoted figure and the estimated time of
the run on one GPU and on eight (from results/benchmarks/flops.json at an
assumed sustained throughput; no GPU has been measured).  ``--readme``
writes the table into README.md between <!-- reproduce-guide:start/end -->.
"""
import argparse
import os.path as osp
import sys

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def main(argv=None):
    from dfq_dense.report.budget import TFLOPS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--tflops', type=float, default=TFLOPS,
                        help='assumed sustained TFLOPS of one GPU')
    parser.add_argument('--readme', action='store_true',
                        help='write the table into README.md')
    args = parser.parse_args(argv)
    from dfq_dense.report import reproduce
    text = reproduce.markdown(reproduce.guide_rows(tflops=args.tflops),
                              args.tflops)
    print(text)
    if args.readme:
        from dfq_dense.report import replace_readme_section
        replace_readme_section('reproduce-guide', text + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
