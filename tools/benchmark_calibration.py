"""Cost of calibrating a full-size model with each quantizer setting.

    python tools/benchmark_calibration.py [--config CONFIG]
        [--settings naive percentile mse repq] [--images N] [--size H W]
        [--out work_dirs/benchmarks/calibration.json]

Builds the model of ``--config`` (default ``configs/mask_rcnn_swin_s_w8a8.py``,
mmdet Mask R-CNN Swin-S; random weights, no checkpoint: the cost does not
depend on the weights) and, for every setting of
``configs/_base_/quantizers/<setting>.py``, in a fresh process (so that the
peak RSS is the setting's own): converts the model with ``quantize_model``
(the config's bits and the setting's keys, as the DFQ loop does), runs
``--images`` random images of ``--size`` one by one through the model's
``data_preprocessor`` + ``test_step`` inside ``calibration_step(i)``, with
every RoI-head detection kept (score threshold 0, as the DFQ loop does, so
the mask head is calibrated too), then ``finish_calibration(model,
reparam=...)``. Measured: wall seconds per calibration image and of
``finish_calibration``, the memory held by the observers before the finish,
the peak RSS of the process (``resource.getrusage``) and the RSS after the
model was built; checked: every quantizer of the model got data (none left
in FP). Writes a JSON file (with the CPU model, torch threads, torch / mmdet
versions and the git commit) and prints a Markdown table.
"""
import argparse
import json
import multiprocessing as mp
import os
import os.path as osp
import platform
import resource
import sys
import time

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SETTINGS = ('naive', 'percentile', 'mse', 'repq')
DEFAULT_CONFIG = osp.join(ROOT, 'configs', 'mask_rcnn_swin_s_w8a8.py')


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--config', default=DEFAULT_CONFIG)
    p.add_argument('--settings', nargs='+', default=list(SETTINGS),
                   help='quantizer settings (configs/_base_/quantizers/)')
    p.add_argument('--images', type=int, default=2,
                   help='calibration images (one per forward)')
    p.add_argument('--size', type=int, nargs=2, default=(800, 1333),
                   metavar=('H', 'W'))
    p.add_argument('--out', default=osp.join(ROOT, 'work_dirs', 'benchmarks',
                                             'calibration.json'))
    p.add_argument('--seed', type=int, default=0)
    args = p.parse_args(argv)
    for s in args.settings:
        if not osp.isfile(_setting_path(s)):
            p.error(f'unknown setting {s!r}: no {_setting_path(s)}')
    if args.images < 1:
        p.error('--images must be >= 1')
    return args


def _setting_path(name):
    return osp.join(ROOT, 'configs', '_base_', 'quantizers', f'{name}.py')


def _rss_mb():
    """Current resident set size (MB)."""
    with open('/proc/self/statm') as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf('SC_PAGE_SIZE') / 2 ** 20


def _peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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
    from mmengine.config import Config

    from dfq_dense.engine import model_checks
    from dfq_dense.engine.runner import task_of
    cfg = Config.fromfile(config)
    torch.manual_seed(0)
    model = model_checks.build_model(cfg)
    model.eval()
    q = cfg.dfq.quantizer
    return model, dict(w_bits=q.w_bits, a_bits=q.a_bits), task_of(cfg)


def run_setting(config, setting, images, size, seed):
    """Convert, calibrate and finish one setting; returns its measures."""
    import torch
    from mmengine.config import Config

    from dfq_dense.engine.dfq_loop import (_all_detections,
                                           calibration_batch,
                                           quantize_for_dfq)
    from dfq_dense.quant import (enable_calibration, finish_calibration,
                                 iter_quantizers)
    from dfq_dense.quant.observers import calibration_step

    torch.set_grad_enabled(False)
    start = time.time()
    model, bits, task = build_model(config)
    build_s = time.time() - start
    rss_model = _rss_mb()
    q = Config.fromfile(_setting_path(setting)).dfq_quantizer
    start = time.time()
    counts = quantize_for_dfq(model, dict(q, **bits))
    convert_s = time.time() - start
    gen = torch.Generator().manual_seed(seed)
    h, w = size
    model.eval()
    enable_calibration(model)
    per_image, rss_images = [], []
    with _all_detections(model):
        for i in range(images):
            img = torch.randn(1, 3, h, w, generator=gen)
            batch = calibration_batch(img, model.data_preprocessor, task)
            start = time.time()
            with calibration_step(i):
                model.test_step(batch)
            per_image.append(time.time() - start)
            rss_images.append(_rss_mb())
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
    return dict(
        setting=setting, bits=bits, counts=counts,
        quantizers=len(quantizers), not_calibrated=not_calibrated,
        percentiles_estimated=estimated, reparameterized=len(folded),
        build_seconds=build_s, convert_seconds=convert_s,
        seconds_per_image=sum(per_image) / len(per_image),
        image_seconds=per_image, finish_seconds=finish_s,
        observer_mb=obs_bytes / 2 ** 20,
        largest_observer=dict(name=obs_max[1], mb=obs_max[0] / 2 ** 20),
        rss_after_build_mb=rss_model, rss_after_images_mb=rss_images,
        rss_after_finish_mb=_rss_mb(), peak_rss_mb=_peak_rss_mb())


def _child(conn, *args):
    try:
        conn.send(('ok', run_setting(*args)))
    except BaseException as err:  # report, do not hang the parent
        import traceback
        conn.send(('error', f'{err!r}\n{traceback.format_exc()}'))
    finally:
        conn.close()


def run_isolated(*args):
    """``run_setting`` in a fresh process (own peak RSS)."""
    ctx = mp.get_context('spawn')
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, ) + args)
    proc.start()
    child.close()
    try:
        status, value = parent.recv()
    except EOFError:
        status, value = 'error', f'process died (exit code {proc.exitcode})'
    proc.join()
    if status != 'ok':
        raise RuntimeError(f'setting {args[1]}: {value}')
    return value


def environment():
    import mmdet
    import torch

    from dfq_dense.utils.environment import cpu_model, git_state
    commit, dirty = git_state(ROOT)
    return dict(device=f'CPU: {cpu_model()}', cpu_count=os.cpu_count(),
                torch_threads=torch.get_num_threads(),
                omp_num_threads=os.environ.get('OMP_NUM_THREADS'),
                torch=torch.__version__, mmdet=mmdet.__version__,
                python=platform.python_version(), git_commit=commit,
                git_dirty=dirty)


def markdown(results):
    head = ('| setting | s / image | finish s | observers MB | '
            'peak RSS MB | RSS after build MB | quantizers | '
            'not calibrated | estimated pct |')
    rows = [head, '|' + '---|' * 9]
    for r in results:
        rows.append(
            f"| {r['setting']} | {r['seconds_per_image']:.1f} | "
            f"{r['finish_seconds']:.1f} | {r['observer_mb']:.1f} | "
            f"{r['peak_rss_mb']:.0f} | {r['rss_after_build_mb']:.0f} | "
            f"{r['quantizers']} | {len(r['not_calibrated'])} | "
            f"{len(r['percentiles_estimated'])} |")
    return '\n'.join(rows)


def main(argv=None):
    args = parse_args(argv)
    env = environment()
    results = []
    for setting in args.settings:
        print(f'[benchmark] {setting}: {args.images} image(s) at '
              f'{args.size[0]}x{args.size[1]}', flush=True)
        r = run_isolated(args.config, setting, args.images,
                         tuple(args.size), args.seed)
        print(f"[benchmark] {setting}: {r['seconds_per_image']:.1f} s/image,"
              f" finish {r['finish_seconds']:.1f} s, peak RSS "
              f"{r['peak_rss_mb']:.0f} MB, not calibrated "
              f"{len(r['not_calibrated'])}", flush=True)
        results.append(r)
    out = dict(config=osp.relpath(osp.abspath(args.config), ROOT),
               images=args.images, size=list(args.size), seed=args.seed,
               environment=env, results=results)
    os.makedirs(osp.dirname(osp.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as f:
        json.dump(out, f, indent=2)
    print(markdown(results))
    print(f'[benchmark] wrote {args.out}')
    bad = {r['setting']: r['not_calibrated'][:3] for r in results
           if r['not_calibrated']}
    if bad:
        print(f'[benchmark] quantizers left uncalibrated: {bad}',
              file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
