"""Section ``flops``: the arithmetic of each stage of a real run.

Counted with :class:`torch.utils.flop_counter.FlopCounterMode` (matmuls,
convolutions, attention: two FLOPs per multiply-add; elementwise work is
not counted), on the real configs' models with random weights (counts do
not depend on the weights), one row per:

* ``synthesis``: one synthesis iteration of one image of each method (the
  :mod:`~dfq_dense.bench.synthesis_methods` iteration, V2: its adapter's
  sample step) on the backbone of each real model at its synthesis size
  (COCO models 800x1333, ADE20K models 512x512);
* ``eval``: one FP evaluation forward (``test_step``, one image, every RoI
  detection kept) of each real model at its test size (the calibration
  pass runs the same forward).

With the measured seconds of the ``synthesis`` / ``fakequant`` /
``calibration`` rows these counts carry the benchmark's measurements to
the configs it did not time, and with an assumed sustained throughput they
give the GPU estimates of the README's budget (``tools/benchmark.py
budget``).  Counting runs the computation once (on the CPU: about 10 min
for the default rows)::

    OMP_NUM_THREADS=2 python tools/benchmark.py flops \\
        --out results/benchmarks/flops.json
"""
import gc
import time

import torch

from .synthesis import METHODS

NAME = 'flops'
HELP = ('FLOPs of one synthesis iteration per method and of one evaluation '
        'forward, for every real model')
DEFAULT_OUT = 'flops.json'

#: The real models: a leaf config of each (the bits do not change the FP
#: counts) and its synthesis / test size.
MODELS = {
    'mask_rcnn_swin_t': ('configs/mask_rcnn_swin_t_w8a8.py', (800, 1333)),
    'mask_rcnn_swin_t_1x': ('configs/mask_rcnn_swin_t_1x_w8a8.py',
                            (800, 1333)),
    'mask_rcnn_swin_s': ('configs/mask_rcnn_swin_s_w8a8.py', (800, 1333)),
    'cascade_mask_rcnn_swin_t': ('configs/cascade_mask_rcnn_swin_t_w8a8.py',
                                 (800, 1333)),
    'cascade_mask_rcnn_swin_s': ('configs/cascade_mask_rcnn_swin_s_w8a8.py',
                                 (800, 1333)),
    'upernet_swin_t': ('configs/upernet_swin_t_w8a8.py', (512, 512)),
    'upernet_swin_s': ('configs/upernet_swin_s_w8a8.py', (512, 512)),
    'upernet_swin_b': ('configs/upernet_swin_b_w8a8.py', (512, 512)),
}
#: The demo models: counted on request (not in the default rows).
DEMO_MODELS = {
    'mask_rcnn_demo': ('configs/demo/mask_rcnn_swin_demo_w8a8.py',
                       (192, 192)),
    'upernet_demo': ('configs/demo/upernet_swin_demo_w8a8.py', (192, 192)),
}


def add_arguments(p):
    p.add_argument('--models', nargs='+',
                   choices=list(MODELS) + list(DEMO_MODELS), default=None,
                   help='default: every real model')
    p.add_argument('--methods', nargs='+', choices=list(METHODS),
                   default=None, help='default: all')
    p.add_argument('--size', default=None,
                   help='HxW for every row instead of the models\' own')
    p.add_argument('--seed', type=int, default=0)


def count(fn):
    """FLOPs of ``fn()`` (forward and whatever backward it runs).

    Only the dispatch mode of :class:`FlopCounterMode` is entered: its
    module tracker's backward hooks break ``torch.autograd.grad`` on leaf
    tensors (V2's balanced gradients), and the per-module table is not
    needed."""
    from torch.utils import flop_counter
    counter = flop_counter.FlopCounterMode(display=False)
    counter.flop_counts.clear()
    with flop_counter._FlopCounterMode(counter):
        fn()
    return int(counter.get_total_flops())


def synthesis_flops(config, method, hw, device, seed=0, parts=None):
    """FLOPs of one synthesis iteration of one image of ``method`` on the
    backbone of ``config`` at ``hw``."""
    from .synthesis_methods import ITERATIONS, build_parts, method_settings
    if parts is None:
        parts = build_parts(config, seed, device,
                            student=method == 'psaq_vit_v2')
    it = ITERATIONS[method](parts, method_settings(method), 1, tuple(hw),
                            device, seed)
    try:
        return count(lambda: it.plain(torch.Generator().manual_seed(seed)))
    finally:
        it.close()


def eval_flops(config, hw, device, seed=0):
    """FLOPs of one FP ``test_step`` of ``config``'s model on one image of
    ``hw`` (every RoI detection kept)."""
    from dfq_dense.engine.dfq_loop import _all_detections, calibration_batch

    from .fakequant import build_model
    model, _, task = build_model(config, None, seed)
    model.to(device)
    image = torch.randn((1, 3) + tuple(hw),
                        generator=torch.Generator().manual_seed(seed))
    batch = calibration_batch(image, model.data_preprocessor, task)
    with torch.no_grad(), _all_detections(model):
        return count(lambda: model.test_step(batch))


def run(args, device, checkpoint=None):
    from .synthesis import parse_size
    from .synthesis_methods import build_parts
    models = args.models or list(MODELS)
    methods = args.methods or list(METHODS)
    start = time.time()
    rows = []

    def result():
        return dict(description='FLOPs (FlopCounterMode: 2 per '
                    'multiply-add; elementwise work not counted) of one '
                    'synthesis iteration of one image per method and of one '
                    'FP evaluation forward, per real model, random weights',
                    models={m: dict(config=c, size=list(hw)) for m, (c, hw)
                            in ((m, dict(MODELS, **DEMO_MODELS)[m])
                                for m in models)},
                    methods=methods, seed=args.seed, rows=list(rows),
                    wall_seconds=time.time() - start)

    def add(row):
        rows.append(row)
        print(f'[flops] {row["kind"]} {row["model"]} {row.get("method", "")}'
              f': {row["flops"] / 1e9:.1f} GFLOP', flush=True)
        if checkpoint is not None:
            checkpoint(result())

    for name in models:
        config, hw = MODELS[name] if name in MODELS else DEMO_MODELS[name]
        if args.size:
            hw = tuple(parse_size(args.size))
        add(dict(kind='eval', model=name, config=config, size=list(hw),
                 flops=eval_flops(config, hw, device, args.seed)))
        gc.collect()
        parts = None
        for m in methods:
            if parts is None or (m == 'psaq_vit_v2' and
                                 'student' not in parts):
                parts = build_parts(config, args.seed, device,
                                    student=m == 'psaq_vit_v2')
            add(dict(kind='synthesis', model=name, config=config,
                     method=m, method_name=METHODS[m], size=list(hw),
                     flops=synthesis_flops(config, m, hw, device,
                                           args.seed, parts)))
        del parts
        gc.collect()
    return result()


def markdown(result):
    from .common import describe_environment, markdown_table
    env = result.get('environment')
    head = ('Counted with torch\'s FlopCounterMode (2 FLOPs per '
            'multiply-add; elementwise work not counted), one image, random '
            'weights' + (f'; {describe_environment(env)}' if env else '') +
            '.\n\n')
    table = []
    methods = result['methods']
    for name in result['models']:
        rows = [r for r in result['rows'] if r['model'] == name]
        ev = next((r for r in rows if r['kind'] == 'eval'), None)
        syn = {r['method']: r for r in rows if r['kind'] == 'synthesis'}
        size = result['models'][name]['size']
        table.append([name, f'{size[0]}x{size[1]}',
                      f'{ev["flops"] / 1e9:.0f}' if ev else '-'] +
                     [f'{syn[m]["flops"] / 1e9:.0f}' if m in syn else '-'
                      for m in methods])
    return head + markdown_table(
        ['model', 'size', 'eval forward GFLOP'] +
        [f'{METHODS[m]} iteration GFLOP' for m in methods], table)
