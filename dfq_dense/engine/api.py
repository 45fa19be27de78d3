"""Running one DFQ job from Python: what ``tools/dfq_test.py`` does.

The results record (``dfq_results.json``) is built here, inside the
package, so that the table and matrix code (``dfq_dense.report``) runs a
cell without importing a script from ``tools/``.
"""
import os.path as osp
import platform
import time


def versions():
    import mmcv
    import mmdet
    import mmengine
    import mmseg
    import timm
    import torch

    from .. import __version__ as dfq_dense_version
    # timm: the classification track's models and eval transforms
    return dict(torch=torch.__version__, mmcv=mmcv.__version__,
                mmengine=mmengine.__version__, mmdet=mmdet.__version__,
                mmseg=mmseg.__version__, timm=timm.__version__,
                dfq_dense=dfq_dense_version,
                python=platform.python_version())


def metric_table(results):
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


def init_distributed(cfg, launcher):
    """Initialise the process group through mmengine's ``init_dist``
    before the Runner is built (the Runner then finds it initialised).

    On a machine without a GPU the backend is gloo and the model wrapper
    gets no device ids: mmengine's launcher code pins a CUDA device
    unconditionally (``torch.cuda.set_device(local_rank)``; Slurm's also
    takes the rank modulo ``torch.cuda.device_count()``), so while
    ``init_dist`` runs on a machine without a GPU those two calls see one
    device and pin nothing.
    """
    import torch
    from mmengine.dist import init_dist
    env_cfg = cfg.setdefault('env_cfg', {})
    dist_cfg = dict(env_cfg.get('dist_cfg') or {})
    if torch.cuda.is_available():
        init_dist(launcher, **dist_cfg)
        return
    dist_cfg['backend'] = 'gloo'
    env_cfg['dist_cfg'] = dist_cfg
    cfg.model_wrapper_cfg = dict(type='MMDistributedDataParallel',
                                 device_ids=None, broadcast_buffers=False)
    saved = torch.cuda.set_device, torch.cuda.device_count
    torch.cuda.set_device = lambda device: None
    torch.cuda.device_count = lambda: 1
    try:
        init_dist(launcher, **dist_cfg)
    finally:
        torch.cuda.set_device, torch.cuda.device_count = saved


def run_dfq(config, checkpoint=None, work_dir=None, cfg_options=None,
            eval_fp=False, load_quantized=None, data_root=None,
            launcher='none'):
    """One data-free quantization run of ``config`` (what
    ``tools/dfq_test.py`` does): checks every input first (one-line
    :class:`DFQInputError` / :class:`DFQConfigError`, nothing written),
    then synthesizes, quantizes, calibrates, (adapts) and tests through
    mmengine's Runner, writes ``<work_dir>/dfq_results.json`` atomically,
    prints a short table and returns the results record (rank 0; None on
    the other ranks)."""
    import torch
    from mmengine.dist import barrier, is_distributed

    from ..demo import sha256sum
    from .dfq_config import parse_dfq_config
    from .model_checks import check_model_inputs
    from .runner import (DFQInputError, check_dataset,
                                         check_work_dir, load_config,
                                         resolve_checkpoint,
                                         resolve_load_images, set_data_root,
                                         task_of, work_dir_of)
    from ..quant.io import QuantParamsError, read_quant_params
    from ..utils.checkpoint import CheckpointReadError

    # Input checks: each stops with one line before the Runner exists, so a
    # bad input leaves nothing behind in the work dir.
    cfg = load_config(config, cfg_options)
    task = task_of(cfg)
    if data_root is not None:
        set_data_root(cfg, data_root)
    if load_quantized and cfg.get('dfq') is not None:
        cfg.dfq.load_quantized = load_quantized
    dfq = parse_dfq_config(cfg.get('dfq'))
    if eval_fp:
        cfg.dfq.eval_fp = True
    check_work_dir(work_dir_of(cfg, work_dir, config))
    check_dataset(cfg)
    if not (checkpoint or cfg.get('load_from')) and \
            cfg.get('official_checkpoint'):
        raise DFQInputError(
            f'no checkpoint: this model has only the official Swin '
            f'checkpoint {cfg.official_checkpoint}; download it, convert it '
            f'with tools/convert_checkpoint.py OFFICIAL.pth OUT.pth --check '
            f'{config}, and pass OUT.pth as CHECKPOINT')
    if task == 'cls':
        # A timm classifier loads its weights itself (strictly, from
        # model.checkpoint or timm's cache): CHECKPOINT becomes
        # model.checkpoint, the Runner loads nothing.
        if checkpoint:
            cfg.model.checkpoint = resolve_checkpoint(checkpoint)
        elif cfg.model.get('checkpoint'):
            cfg.model.checkpoint = resolve_checkpoint(cfg.model.checkpoint)
        cfg.load_from = None
        checkpoint = None
    else:
        checkpoint = resolve_checkpoint(checkpoint or cfg.get('load_from'))
    images = image_size = None
    if dfq.load_images:
        # A folder of an earlier run means its synthetic_images.pth.
        path, images, saved = resolve_load_images(dfq.load_images,
                                                  with_saved=True)
        dfq.load_images = cfg.dfq.load_images = path
        # Images of another task: the same backbone family, resized to
        # this run's synthesis size (engine/image_reuse.py).
        from .image_reuse import (ImageReuseError, check_image_source,
                                  image_provenance)
        try:
            origin = check_image_source(saved, path, image_provenance(cfg))
        except ImageReuseError as err:
            raise DFQInputError(str(err)) from None
        del saved
        if origin['cross_task']:
            from .model_checks import synthesizer_cfg
            image_size = synthesizer_cfg(cfg, dfq)['img_size']
    if dfq.load_quantized:
        try:
            read_quant_params(dfq.load_quantized)
        except (QuantParamsError, CheckpointReadError,
                FileNotFoundError) as err:
            raise DFQInputError(f'--load-quantized: {err}') from None
    # Builds the model once: the data source against the model, the image
    # size against the backbone, the checkpoint strictly against the model.
    weights = check_model_inputs(cfg, dfq, checkpoint, images=images,
                                 image_size=image_size)
    del images
    if task == 'cls':
        # the file found (a cached one) is the one the Runner's build loads
        if weights is not None:
            cfg.model.checkpoint = weights
        checkpoint = weights

    cfg.launcher = launcher
    cfg.load_from = None if task == 'cls' else checkpoint
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs',
                                osp.splitext(osp.basename(config))[0])
    cfg.test_cfg = dict(type='dfq_dense.DFQTestLoop')
    # dfq_dense first, then the config's own (a user's method package).
    imports = (cfg.get('custom_imports') or {}).get('imports') or []
    imports = [imports] if isinstance(imports, str) else list(imports)
    cfg.custom_imports = dict(
        imports=['dfq_dense'] + [m for m in imports if m != 'dfq_dense'],
        allow_failed_imports=False)
    # What the loop keys the resumable synthesis on, computed once here.
    cfg.dfq_run = dict(checkpoint=checkpoint,
                       checkpoint_sha256=None if checkpoint is None
                       else sha256sum(checkpoint))
    if launcher == 'none':
        return _test_and_record(cfg, dfq, task, config)
    init_distributed(cfg, launcher)
    try:
        results = _test_and_record(cfg, dfq, task, config)
        # The other ranks wait for rank 0's results file (a run is over
        # when its record is written) ...
        barrier()
        return results
    finally:
        # ... and every rank, failed or not, tears its process group down
        # before it exits: a rank leaving with gloo's group alive while
        # another still talks to it can abort in C++ ("terminate called
        # without an active exception", exit -6), and torchrun then kills
        # the run.
        if is_distributed():
            torch.distributed.destroy_process_group()


def _test_and_record(cfg, dfq, task, config):
    """Runs the checked ``cfg`` through mmengine's Runner; rank 0 writes
    and returns the results record, the other ranks return None."""
    import torch
    from mmengine.dist import get_rank, get_world_size
    from mmengine.runner import Runner

    from ..utils.fileio import write_json_atomic

    start = time.time()
    runner = Runner.from_cfg(cfg)
    metrics = runner.test()
    report = runner.test_loop.report
    if get_rank() != 0:
        return None
    results = dict(
        task=task,
        config=config,
        run_id=report['run_id'],
        checkpoint=dict(
            path=cfg.dfq_run['checkpoint'],
            sha256=cfg.dfq_run['checkpoint_sha256']),
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
        quantization=dict(report['quantization'],
                          output_change=report['output_change']),
        seconds=dict(
            synthesis=round(report['synthesis_seconds'], 2),
            calibration=round(report['calibration_seconds'], 2),
            adaptation=round(report.get('adapt_seconds', 0.0), 2),
            evaluation=round(report['eval_seconds'], 2),
            fp_evaluation=round(report.get('fp_eval_seconds', 0.0), 2),
            total=round(time.time() - start, 2)),
        world_size=get_world_size(),
        threads=torch.get_num_threads(),
        versions=versions())
    for key in ('images_from', 'images_source', 'quant_params',
                'quant_params_from',
                'reparameterized', 'synthesis_key', 'resumed_batches',
                'adaptation'):
        if key in report:
            results[key] = report[key]
    write_json_atomic(osp.join(cfg.work_dir, 'dfq_results.json'), results)
    print(metric_table(results))
    return results


def error_line(err):
    """``(exit code, one-line message)`` of an error the tool reports
    without a traceback, or None.

    2: bad input (config, paths, files, settings) or an unwritable /
    full disk; 3: a run that cannot give meaningful numbers
    (``DFQRunError``: NaN images or activations, quantizers that saw no
    data, quantization without effect).
    """
    import errno

    from ..demo import DemoCheckpointError
    from .dfq_config import DFQConfigError
    from .dfq_loop import DFQRunError
    from .runner import DFQInputError
    from ..quant.io import QuantParamsError
    from ..utils.checkpoint import (CheckpointMismatchError,
                                            CheckpointReadError,
                                            UnsafeCheckpointError)
    if isinstance(err, DFQRunError):
        return 3, str(err)
    if isinstance(err, (DFQConfigError, DFQInputError, UnsafeCheckpointError,
                        CheckpointReadError, CheckpointMismatchError,
                        DemoCheckpointError, QuantParamsError)):
        return 2, str(err)
    if isinstance(err, OSError):
        if err.errno is None:  # raised by dfq_dense with its own message
            return 2, str(err)
        path = f' {err.filename}' if err.filename else ''
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            # The writers of dfq_dense.utils.fileio remove their temporary
            # file and name the destination.
            return 2, (f'no space left on device while writing{path}: free '
                       'some space or pass another --work-dir (nothing '
                       'half-written was left behind)')
        if err.filename:  # a file system error on a named path
            return 2, f'cannot access{path}: {err.strerror or err}'
    return None
