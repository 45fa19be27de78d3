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
import platform
import sys
import time

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
        '--cfg-options', nargs='+', action=DictAction,
        help='override config settings, e.g. dfq.quantizer.w_bits=4')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm'],
                        default='none', help='job launcher')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def _versions():
    import mmcv
    import mmdet
    import mmengine
    import mmseg
    import torch

    import dfq_dense
    return dict(torch=torch.__version__, mmcv=mmcv.__version__,
                mmengine=mmengine.__version__, mmdet=mmdet.__version__,
                mmseg=mmseg.__version__, dfq_dense=dfq_dense.__version__,
                python=platform.python_version())


def _metric_table(results):
    rows = [('metric', 'quantized', 'FP')]
    fp = results.get('fp_metrics') or {}
    for key, value in results['metrics'].items():
        ref = fp.get(key)
        rows.append((key, f'{value:.4f}',
                     '' if ref is None else f'{ref:.4f}'))
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ['  '.join(c.ljust(w) for c, w in zip(r, width)) for r in rows]
    head = (f"{results['method']} W{results['w_bits']}A{results['a_bits']} "
            f"on {results['num_images']} images "
            f"{results['image_size'][0]}x{results['image_size'][1]}: "
            f"synthesis {results['seconds']['synthesis']:.1f}s, "
            f"calibration {results['seconds']['calibration']:.1f}s, "
            f"evaluation {results['seconds']['evaluation']:.1f}s")
    return '\n'.join([head] + lines)


def _primary(metrics):
    """The numeric metrics (numpy scalars included) as plain floats."""
    out = {}
    for key, value in metrics.items():
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            pass
    return out


def run(args):
    from mmengine.dist import get_rank
    from mmengine.runner import Runner

    from dfq_dense.demo import sha256sum
    from dfq_dense.engine.dfq_config import parse_dfq_config
    from dfq_dense.engine.runner import (check_dataset, load_config,
                                         resolve_checkpoint, task_of)
    from dfq_dense.utils.fileio import write_json_atomic

    cfg = load_config(args.config, args.cfg_options)
    task = task_of(cfg)
    if args.load_quantized and cfg.get('dfq') is not None:
        cfg.dfq.load_quantized = args.load_quantized
    dfq = parse_dfq_config(cfg.get('dfq'))
    if args.eval_fp:
        cfg.dfq.eval_fp = True
    check_dataset(cfg)
    checkpoint = resolve_checkpoint(args.checkpoint or cfg.get('load_from'))
    if dfq.load_images and not osp.isfile(dfq.load_images):
        from dfq_dense.engine.runner import DFQInputError
        raise DFQInputError(
            f'dfq.load_images not found: {dfq.load_images} (point it at the '
            'synthetic/synthetic_images.pth of an earlier run)')
    if dfq.load_quantized and not osp.isfile(dfq.load_quantized):
        from dfq_dense.engine.runner import DFQInputError
        raise DFQInputError(
            f'--load-quantized file not found: {dfq.load_quantized} (point '
            'it at the quant_params.pth of an earlier run)')

    cfg.launcher = args.launcher
    cfg.load_from = checkpoint
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs',
                                osp.splitext(osp.basename(args.config))[0])
    cfg.test_cfg = dict(type='dfq_dense.DFQTestLoop')
    cfg.custom_imports = dict(imports=['dfq_dense'],
                              allow_failed_imports=False)

    start = time.time()
    runner = Runner.from_cfg(cfg)
    metrics = runner.test()
    report = runner.test_loop.report
    if get_rank() != 0:
        return
    results = dict(
        task=task,
        config=args.config,
        checkpoint=dict(
            path=checkpoint,
            sha256=sha256sum(checkpoint)),
        method=report['method'],
        w_bits=dfq.quantizer.w_bits,
        a_bits=dfq.quantizer.a_bits,
        quantizer=dict(dfq.quantizer),
        synthesizer=report['synthesizer'],
        num_images=report['num_images'],
        image_size=report['image_size'],
        seed=report['synthesizer'].get('seed', 0),
        metrics=_primary(metrics),
        fp_metrics=_primary(report['fp_metrics'])
        if 'fp_metrics' in report else None,
        quantized_modules=report['quantized_modules'],
        seconds=dict(
            synthesis=round(report['synthesis_seconds'], 2),
            calibration=round(report['calibration_seconds'], 2),
            adaptation=round(report.get('adapt_seconds', 0.0), 2),
            evaluation=round(report['eval_seconds'], 2),
            fp_evaluation=round(report.get('fp_eval_seconds', 0.0), 2),
            total=round(time.time() - start, 2)),
        versions=_versions())
    for key in ('images_from', 'quant_params', 'quant_params_from',
                'reparameterized'):
        if key in report:
            results[key] = report[key]
    write_json_atomic(osp.join(cfg.work_dir, 'dfq_results.json'), results)
    print(_metric_table(results))
    return results


def main(argv=None):
    args = parse_args(argv)
    # Imported here so that --help works without the stack.
    from dfq_dense.engine.dfq_config import DFQConfigError
    from dfq_dense.engine.runner import DFQInputError
    from dfq_dense.utils.checkpoint import UnsafeCheckpointError
    try:
        run(args)
    except (DFQConfigError, DFQInputError, UnsafeCheckpointError,
            FileNotFoundError) as err:
        print(f'dfq_test: error: {err}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
