"""Section ``calibration``: the cost of calibrating a full-size model with
each quantizer setting.

Builds the model of ``--config`` (default ``configs/mask_rcnn_swin_s_w8a8.py``,
mmdet Mask R-CNN Swin-S; random weights, no checkpoint: the cost does not
depend on the weights) and, for every setting of
``configs/_base_/quantizers/<setting>.py``, in a fresh process (so that the
peak RSS is the setting's own): converts the model with ``quantize_for_dfq``
(the config's bits and the setting's keys, as the DFQ loop does), runs
``--images`` random images of ``--size`` one by one through the model's
``data_preprocessor`` + ``test_step`` inside ``calibration_step(i)``, with
every RoI-head detection kept (score threshold 0, as the DFQ loop does, so
the mask head is calibrated too), then ``finish_calibration(model,
reparam=...)``.  Measured: wall seconds per calibration image (each image,
their mean and median) and of ``finish_calibration``, the memory held by the
observers before the finish, the peak RSS of the process and the RSS after
the model was built; checked: every quantizer of the model got data (none
left in FP)::

    python tools/benchmark.py calibration [--config CONFIG]
        [--settings naive percentile mse repq] [--images N] [--size H W]
"""
import os.path as osp
import resource
import statistics
import sys
import time

from .common import (REPO, IsolatedError, load_config, rss_bytes,
                     run_isolated)

NAME = 'calibration'
HELP = ('calibration time per image and finish per quantizer setting '
        '(full-size model, one process per setting)')
DEFAULT_OUT = 'calibration.json'

SETTINGS = ('naive', 'percentile', 'mse', 'repq')
DEFAULT_CONFIG = osp.join(REPO, 'configs', 'mask_rcnn_swin_s_w8a8.py')


def add_arguments(p):
    p.add_argument('--config', default=DEFAULT_CONFIG)
    p.add_argument('--settings', nargs='+', default=list(SETTINGS),
                   help='quantizer settings (configs/_base_/quantizers/)')
    p.add_argument('--images', type=int, default=2,
                   help='calibration images (one per forward; the median '
                   'of their times is reported)')
    p.add_argument('--size', type=int, nargs=2, default=(800, 1333),
                   metavar=('H', 'W'))
    p.add_argument('--seed', type=int, default=0)


def check_arguments(parser, args):
    for s in args.settings:
        if not osp.isfile(setting_path(s)):
            parser.error(f'unknown setting {s!r}: no {setting_path(s)}')
    if args.images < 1:
        parser.error('--images must be >= 1')


def setting_path(name):
    return osp.join(REPO, 'configs', '_base_', 'quantizers', f'{name}.py')


def _mb(nbytes):
    return nbytes / 2 ** 20


def observer_bytes(observer):
    """Bytes of the tensors an observer holds (in its attributes, their
    dicts / lists / tuples and the plain objects among them)."""
    import torch
    total, seen = 0, set()
    stack = [observer] if observer is not None else []
    while stack:
        v = stack.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        if torch.is_tensor(v):
            total += v.numel() * v.element_size()
        elif isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, (list, tuple, set)):
            stack.extend(v)
        elif hasattr(v, '__dict__') and not isinstance(v, type):
            stack.extend(vars(v).values())
    return total


def build_model(config):
    """(model, bits dict, task) of a DFQ config, random weights."""
    import torch

    from ..engine import model_checks
    from ..engine.runner import task_of
    cfg = load_config(config)
    torch.manual_seed(0)
    model = model_checks.build_model(cfg)
    model.eval()
    q = cfg.dfq.quantizer
    return model, dict(w_bits=q.w_bits, a_bits=q.a_bits), task_of(cfg)


def run_setting(config, setting, images, size, seed, device='cpu',
                threads=None):
    """Convert, calibrate and finish one setting; returns its measures."""
    import torch
    from mmengine.config import Config

    from ..engine.dfq_loop import (_all_detections, calibration_batch,
                                   quantize_for_dfq)
    from ..quant import (enable_calibration, finish_calibration,
                         iter_quantizers)
    from ..quant.observers import calibration_step

    if threads:
        torch.set_num_threads(int(threads))
    torch.set_grad_enabled(False)
    cuda = str(device).startswith('cuda')
    start = time.time()
    model, bits, task = build_model(config)
    build_s = time.time() - start
    q = Config.fromfile(setting_path(setting)).dfq_quantizer
    start = time.time()
    counts = quantize_for_dfq(model, dict(q, **bits))
    convert_s = time.time() - start
    model.to(device)
    rss_model = _mb(rss_bytes())
    gen = torch.Generator().manual_seed(seed)
    h, w = size
    model.eval()
    enable_calibration(model)
    per_image, rss_images = [], []
    with _all_detections(model):
        for i in range(images):
            img = torch.randn(1, 3, h, w, generator=gen).to(device)
            batch = calibration_batch(img, model.data_preprocessor, task)
            if cuda:
                torch.cuda.synchronize(device)
            start = time.time()
            with calibration_step(i):
                model.test_step(batch)
            if cuda:
                torch.cuda.synchronize(device)
            per_image.append(time.time() - start)
            rss_images.append(_mb(rss_bytes()))
    quantizers = list(iter_quantizers(model))
    obs_bytes = sum(observer_bytes(qz.observer) for _, qz in quantizers)
    obs_max = max((observer_bytes(qz.observer), name)
                  for name, qz in quantizers)
    start = time.time()
    folded = finish_calibration(model, reparam=q.get('reparam', False))
    finish_s = time.time() - start
    not_calibrated = [name for name, qz in quantizers
                      if qz.state != 'quantizing' or
                      getattr(qz, 'unobserved', False)]
    estimated = sorted({name for name, qz in quantizers
                        if getattr(qz.observer, 'estimated', None)})
    out = dict(
        setting=setting, bits=bits, counts=counts,
        quantizers=len(quantizers), not_calibrated=not_calibrated,
        percentiles_estimated=estimated, reparameterized=len(folded),
        build_seconds=build_s, convert_seconds=convert_s,
        seconds_per_image=sum(per_image) / len(per_image),
        median_seconds_per_image=statistics.median(per_image),
        image_seconds=per_image, finish_seconds=finish_s,
        observer_mb=obs_bytes / 2 ** 20,
        largest_observer=dict(name=obs_max[1], mb=obs_max[0] / 2 ** 20),
        rss_after_build_mb=rss_model, rss_after_images_mb=rss_images,
        rss_after_finish_mb=_mb(rss_bytes()),
        peak_rss_mb=resource.getrusage(
            resource.RUSAGE_SELF).ru_maxrss / 1024)
    if cuda:
        out['cuda_max_allocated_mb'] = _mb(
            torch.cuda.max_memory_allocated(device))
    return out


def markdown(result):
    """The table of a calibration section result (its ``results``; the
    median seconds per image where recorded, else their mean, which is the
    same for the one image of the committed run)."""
    results = result['results'] if isinstance(result, dict) else result
    head = ('| setting | s / image | finish s | observers MB | '
            'peak RSS MB | RSS after build MB | quantizers | '
            'not calibrated | estimated pct |')
    rows = [head, '|' + '---|' * 9]
    for r in results:
        per_image = r.get('median_seconds_per_image',
                          r['seconds_per_image'])
        rows.append(
            f"| {r['setting']} | {per_image:.1f} | "
            f"{r['finish_seconds']:.1f} | {r['observer_mb']:.1f} | "
            f"{r['peak_rss_mb']:.0f} | {r['rss_after_build_mb']:.0f} | "
            f"{r['quantizers']} | {len(r['not_calibrated'])} | "
            f"{len(r['percentiles_estimated'])} |")
    return '\n'.join(rows)


def run(args, device):
    results = []
    for setting in args.settings:
        print(f'[calibration] {setting}: {args.images} image(s) at '
              f'{args.size[0]}x{args.size[1]} on {device}', flush=True)
        try:
            r = run_isolated(run_setting, args.config, setting, args.images,
                             tuple(args.size), args.seed, str(device),
                             args.threads)
        except IsolatedError as err:
            raise RuntimeError(f'setting {setting}: {err}') from None
        print(f"[calibration] {setting}: "
              f"{r['median_seconds_per_image']:.1f} s/image, finish "
              f"{r['finish_seconds']:.1f} s, peak RSS "
              f"{r['peak_rss_mb']:.0f} MB, not calibrated "
              f"{len(r['not_calibrated'])}", flush=True)
        results.append(r)
    bad = {r['setting']: r['not_calibrated'][:3] for r in results
           if r['not_calibrated']}
    if bad:
        print(f'[calibration] quantizers left uncalibrated: {bad}',
              file=sys.stderr)
    result = dict(
        description='calibration of the full-size model per quantizer '
        'setting, each setting in its own process: seconds per image '
        '(median of the images), finish seconds, observer memory, peak RSS',
        config=osp.relpath(osp.abspath(args.config), REPO),
        images=args.images, repeats=args.images, size=list(args.size),
        seed=args.seed, results=results, uncalibrated=bad)
    return result
