"""Section ``fakequant``: the fake-quantized evaluation forward against FP.

The fake-quantized (W8A8, naive setting) evaluation forward,
``model.test_step`` on a prepared batch, against the FP model on the same
image, timed interleaved (FP, quantized, FP, quantized, ...), the median of
``--repeats`` each.  The quantized model is calibrated first on
``--calib-images`` random images the way the DFQ loop does
(``quantize_for_dfq`` / ``enable_calibration`` / ``test_step`` /
``finish_calibration``).  ``--no-fast`` also times the quantized forward
with the evaluation fast paths off (the old path: every weight re-quantized
at every forward, reference fake quantization), in the same interleaved
loop, and checks that both give identical outputs.  Mask R-CNN keeps every
RoI detection (score threshold 0, as in calibration), so its mask head runs
on ``max_per_img`` boxes as with a trained model.

Examples::

    OMP_NUM_THREADS=1 python tools/benchmark.py fakequant --no-fast \\
        --models mask_rcnn_demo upernet_demo
    OMP_NUM_THREADS=1 python tools/benchmark.py fakequant --no-fast \\
        --full-size-repeats 3
"""
import gc
import os.path as osp
import statistics
import time

from .common import REPO, load_config, markdown_table, random_weights

NAME = 'fakequant'
HELP = 'fake-quant W8A8 evaluation forward vs FP'
DEFAULT_OUT = 'fakequant.json'

FAKEQUANT_MODELS = {
    # name: config, (h, w), checkpoint (None: random weights), target ratio
    'mask_rcnn_swin_s': dict(config='configs/mask_rcnn_swin_s_w8a8.py',
                             size=(800, 1333), checkpoint=None,
                             target=1.15, full_size=True),
    'upernet_swin_s': dict(config='configs/upernet_swin_s_w8a8.py',
                           size=(512, 512), checkpoint=None, target=1.15,
                           full_size=True),
    'mask_rcnn_demo': dict(
        config='configs/demo/mask_rcnn_swin_demo_w8a8.py', size=(192, 192),
        checkpoint='dfq_dense/demo/checkpoints/mask_rcnn_swin_demo.pth',
        target=1.25, full_size=False),
    'upernet_demo': dict(
        config='configs/demo/upernet_swin_demo_w8a8.py', size=(192, 192),
        checkpoint='dfq_dense/demo/checkpoints/upernet_swin_demo.pth',
        target=1.25, full_size=False),
}


def build_model(config, checkpoint, seed):
    """(model, cfg, task): the config's model, eval mode, random weights
    from ``seed`` or ``checkpoint`` loaded with mmengine."""
    import torch

    from ..engine import model_checks
    from ..engine.runner import task_of
    cfg = random_weights(load_config(config))
    torch.manual_seed(seed)
    model = model_checks.build_model(cfg)
    if checkpoint:
        from mmengine.runner import load_checkpoint
        load_checkpoint(model, osp.join(REPO, checkpoint),
                        map_location='cpu', logger='silent')
    model.eval()
    return model, cfg, task_of(cfg)


def calibrate_like_dfq(model, cfg, task, images):
    """The DFQ loop's calibration: one ``test_step`` per image inside
    ``calibration_step``, every RoI detection kept, then
    ``finish_calibration``."""
    import torch

    from dfq_dense.engine.dfq_loop import _all_detections, calibration_batch
    from dfq_dense.quant import enable_calibration, finish_calibration
    from dfq_dense.quant.observers import calibration_step
    model.eval()
    enable_calibration(model)
    with torch.no_grad(), _all_detections(model):
        for b in range(len(images)):
            with calibration_step(b):
                model.test_step(calibration_batch(
                    images[b:b + 1], model.data_preprocessor, task))
    return finish_calibration(
        model, reparam=cfg.dfq.quantizer.get('reparam', False))


def _output_tensors(outs):
    """The prediction tensors of ``test_step`` outputs (for identity
    checks)."""
    tensors = []
    for sample in outs:
        for field in ('pred_instances', 'pred_sem_seg', 'seg_logits'):
            data = getattr(sample, field, None)
            if data is None:
                continue
            for key in sorted(data.keys()):
                value = data.get(key)
                if hasattr(value, 'cpu'):
                    tensors.append((f'{field}.{key}', value.cpu()))
    return tensors


def _identical(a, b):
    import torch
    ta, tb = _output_tensors(a), _output_tensors(b)
    return len(ta) == len(tb) and all(
        ka == kb and va.shape == vb.shape and torch.equal(va, vb)
        for (ka, va), (kb, vb) in zip(ta, tb))


def bench_model(name, spec, args, device, repeats):
    import copy

    import torch

    from dfq_dense.engine.dfq_loop import (_all_detections,
                                           calibration_batch,
                                           quantize_for_dfq)
    from dfq_dense.quant.quantizer import fast_eval

    t0 = time.time()
    fp, cfg, task = build_model(spec['config'], spec['checkpoint'],
                                args.seed)
    quant = copy.deepcopy(fp)
    counts = quantize_for_dfq(quant, cfg.dfq.quantizer)
    fp.to(device)
    quant.to(device)
    h, w = spec['size']
    gen = torch.Generator().manual_seed(args.seed)
    calib = torch.randn(args.calib_images, 3, h, w, generator=gen)
    t1 = time.time()
    calibrate_like_dfq(quant, cfg, task, calib.to(device))
    calib_s = time.time() - t1
    image = torch.randn(1, 3, h, w, generator=gen)
    batch = calibration_batch(image, fp.data_preprocessor, task)

    def sync():
        if str(device).startswith('cuda'):
            torch.cuda.synchronize(device)

    def timed(model, fast=True):
        with torch.no_grad(), fast_eval(fast), _all_detections(model):
            sync()
            start = time.perf_counter()
            out = model.test_step(batch)
            sync()
            return time.perf_counter() - start, out

    runs = [('fp', fp, True), ('quant', quant, True)]
    if args.no_fast:
        runs.append(('quant_old', quant, False))
    outputs = {}
    for _ in range(args.warmup):  # weight caches are built here
        for key, model, fast in runs:
            outputs[key] = timed(model, fast)[1]
    times = {key: [] for key, _, _ in runs}
    for _ in range(repeats):
        for key, model, fast in runs:  # interleaved
            seconds, outputs[key] = timed(model, fast)
            times[key].append(seconds)

    med = {k: statistics.median(v) for k, v in times.items()}
    row = dict(
        model=name, config=spec['config'], checkpoint=spec['checkpoint'],
        task=task, image_size=[h, w], device=str(device),
        repeats=repeats, warmup=args.warmup,
        calib_images=args.calib_images, calibration_seconds=calib_s,
        setup_seconds=time.time() - t0 - calib_s - sum(
            sum(v) for v in times.values()),
        quantized_modules=counts, seconds=times, median_seconds=med,
        ratio=med['quant'] / med['fp'],
        ratio_paired_median=statistics.median(
            q / f for q, f in zip(times['quant'], times['fp'])),
        target=spec['target'], full_size=spec['full_size'])
    row['meets_target'] = row['ratio'] <= spec['target']
    if args.no_fast:
        row['ratio_old'] = med['quant_old'] / med['fp']
        row['ratio_old_paired_median'] = statistics.median(
            q / f for q, f in zip(times['quant_old'], times['fp']))
        row['speedup'] = med['quant_old'] / med['quant']
        row['identical_to_old'] = _identical(outputs['quant'],
                                             outputs['quant_old'])
    del fp, quant, outputs
    gc.collect()
    return row


def add_arguments(parser):
    parser.add_argument('--models', nargs='+',
                        choices=sorted(FAKEQUANT_MODELS),
                        default=['mask_rcnn_demo', 'upernet_demo',
                                 'upernet_swin_s', 'mask_rcnn_swin_s'],
                        help='models to time (default: all)')
    parser.add_argument('--repeats', type=int, default=5,
                        help='timed forwards per path (median)')
    parser.add_argument('--full-size-repeats', type=int, default=None,
                        help='repeats for the full-size models on the CPU '
                        '(default: --repeats)')
    parser.add_argument('--warmup', type=int, default=1,
                        help='untimed forwards per path first')
    parser.add_argument('--calib-images', type=int, default=1,
                        help='random calibration images (1-2 suffice)')
    parser.add_argument('--no-fast', action='store_true',
                        help='also time the old path (evaluation fast paths '
                        'off) in the same interleaved loop: old and new '
                        'ratio in one table, outputs checked identical')
    parser.add_argument('--seed', type=int, default=0)


def markdown_rows(rows):
    """The table of a fakequant section (its JSON ``rows``); the old-path
    columns appear when the rows were measured with ``--no-fast``."""
    with_old = all('ratio_old' in r for r in rows)
    header = ['model', 'size', 'FP s', 'quant s', 'ratio']
    if with_old:
        header += ['old quant s', 'old ratio', 'speed-up', 'identical']
    header += ['target', 'met']
    table = []
    for r in rows:
        cells = [r['model'], 'x'.join(map(str, r['image_size'])),
                 f'{r["median_seconds"]["fp"]:.3f}',
                 f'{r["median_seconds"]["quant"]:.3f}', f'{r["ratio"]:.3f}']
        if with_old:
            cells += [f'{r["median_seconds"]["quant_old"]:.3f}',
                      f'{r["ratio_old"]:.3f}', f'{r["speedup"]:.2f}x',
                      'yes' if r['identical_to_old'] else 'NO']
        cells += [f'<= {r["target"]}', 'yes' if r['meets_target'] else
                  f'no (+{r["ratio"] - r["target"]:.3f})']
        table.append(cells)
    return markdown_table(header, table)


def run(args, device):
    rows = []
    for name in args.models:
        spec = FAKEQUANT_MODELS[name]
        repeats = args.repeats
        if spec['full_size'] and args.full_size_repeats and \
                str(device) == 'cpu':
            repeats = args.full_size_repeats
        print(f'[fakequant] {name} {spec["size"][0]}x{spec["size"][1]} on '
              f'{device}, {repeats} repeats ...', flush=True)
        row = bench_model(name, spec, args, device, repeats)
        rows.append(row)
        print(f'[fakequant] {name}: FP {row["median_seconds"]["fp"]:.3f} s,'
              f' quantized {row["median_seconds"]["quant"]:.3f} s, ratio '
              f'{row["ratio"]:.3f}' + (
                  f' (old {row["ratio_old"]:.3f})' if args.no_fast else ''),
              flush=True)
    result = dict(description='fake-quant W8A8 evaluation forward '
                  '(test_step) / FP forward, median seconds; ratio = '
                  'median quantized / median FP', rows=rows)
    return result


def markdown(result):
    """The table of a fakequant section result (its ``rows``)."""
    return markdown_rows(result['rows'])
