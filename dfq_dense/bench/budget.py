"""Section ``budget``: the run budget of every real config.

Measures nothing: :mod:`dfq_dense.report.budget` composes the results of
the other sections (``--results``, default ``results/benchmarks``) with
each real config's schedule into the estimated wall time of a whole run on
one GPU and on eight and its synthesis memory (see that module)::

    python tools/benchmark.py budget [--tflops 10]
"""
import os.path as osp

from ..report import budget
from .common import REPO

NAME = 'budget'
HELP = ('wall time (estimated on GPUs from FLOPs) and memory of a whole run '
        'of each real config, from the committed benchmark results')
DEFAULT_OUT = 'budget.json'


def add_arguments(p):
    p.add_argument('--results', default=osp.join(REPO, 'results',
                                                 'benchmarks'),
                   help='folder of the benchmark JSON files')
    p.add_argument('--tflops', type=float, default=budget.TFLOPS,
                   help='assumed sustained TFLOPS of one GPU')


def run(args, device=None):
    try:
        return budget.budget(args.results, args.tflops)
    except FileNotFoundError as err:
        raise SystemExit(f'benchmark budget: {err}') from None


def markdown(result):
    return budget.markdown(result)
