"""Data-free quantize a detector or segmentor, then test it.

Shaped like mmdet's / mmseg's ``tools/test.py``:

    python tools/dfq_test.py CONFIG [CHECKPOINT] [--work-dir DIR]
        [--cfg-options k=v ...] [--launcher none|pytorch|slurm] [--eval-fp]
        [--load-quantized QUANT_PARAMS]

The config inherits an mmdet:: or mmseg:: model config and adds a ``dfq``
key (method + bit setting, see configs/_base_/).  Writes
``<work_dir>/dfq_results.json`` and ``<work_dir>/quant_params.pth`` (the
scales, zero points and changed tensors of the quantized model; both
atomically) and prints a short table.  ``--load-quantized`` rebuilds the
quantized model from such a file: no synthesis, no calibration.
Multi-GPU: ``torchrun --nproc_per_node=N tools/dfq_test.py ... --launcher
pytorch`` (mmengine's launcher; slurm likewise).
"""
import argparse
import os
import os.path as osp
import sys

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def parse_args(argv=None):
    from mmengine.config import DictAction
    parser = argparse.ArgumentParser(
        description='Data-free quantize and test an mmdet/mmseg model')
    parser.add_argument('config', help='DFQ config file path')
    parser.add_argument('checkpoint', nargs='?', default=None,
                        help='checkpoint file (default: the config load_from)')
    parser.add_argument('--work-dir', help='directory for logs, synthetic '
                        'images and dfq_results.json')
    parser.add_argument('--eval-fp', action='store_true',
                        help='also evaluate the full-precision model')
    parser.add_argument(
        '--load-quantized', metavar='QUANT_PARAMS',
        help='reuse the quant_params.pth of an earlier run (same config and '
        'checkpoint) instead of synthesising and calibrating')
    parser.add_argument(
        '--data-root', metavar='DIR',
        help='dataset folder to test on (and the real-image baseline\'s '
        'training images): sets the data_root of the config\'s dataloaders '
        'and the ann_file of its evaluators (overriding data_root through '
        '--cfg-options has no effect: the config reads it when parsed)')
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override config settings, e.g. dfq.quantizer.w_bits=4')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm'],
                        default='none', help='job launcher')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args



def run(args):
    """``args`` of :func:`parse_args` -> :func:`dfq_dense.engine.api.run_dfq`
    (the results record, on rank 0)."""
    from dfq_dense.engine.api import run_dfq
    return run_dfq(args.config, checkpoint=args.checkpoint,
                   work_dir=args.work_dir, cfg_options=args.cfg_options,
                   eval_fp=args.eval_fp, load_quantized=args.load_quantized,
                   data_root=args.data_root, launcher=args.launcher)


def main(argv=None):
    """Run; an input error gives one line on stderr and exit code 2, a run
    that cannot give meaningful numbers one line and exit code 3."""
    import warnings

    from dfq_dense.engine.api import error_line

    # mmengine imports pkg_resources (setuptools < 82 is pinned for it):
    # its deprecation note would precede every message on stderr.
    warnings.filterwarnings('ignore', message='pkg_resources is deprecated',
                            category=UserWarning)
    args = parse_args(argv)
    try:
        run(args)
    except Exception as err:  # noqa: BLE001  (mapped or re-raised)
        mapped = error_line(err)
        if mapped is None:
            raise
        code, line = mapped
        print(f'dfq_test: error: {" ".join(line.split())}', file=sys.stderr)
        return code
    return 0


if __name__ == '__main__':
    sys.exit(main())
