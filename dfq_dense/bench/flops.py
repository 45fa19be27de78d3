"""Section ``flops``: the arithmetic of each stage of a real run.

Counted with :class:`torch.utils.flop_counter.FlopCounterMode` (matmuls,
convolutions, attention: two FLOPs per multiply-add; elementwise work is
not counted), on the real configs' models with random weights (counts do
not depend on the weights), one row per:

* ``synthesis``: one synthesis iteration of one image of each method (the
  :mod:`~dfq_dense.bench.synthesis_methods` iteration, V2: its adapter's
  sample step) on the backbone of each real model at its synthesis size
  (COCO models 800x1333, ADE20K models 512x512).  The timm classifiers of
  the ImageNet reproductions (:data:`CLS_MODELS`, 224x224): PSAQ-ViT and
  V2 only, run by the suite's own synthesizer and adapter
  (:func:`classifier_synthesis_flops`);
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

``--merge`` keeps the rows of the models not counted now from the section
already in ``--out`` (each with the commit it was counted at), so that
models can be added or recounted alone, e.g. the classifiers::

    OMP_NUM_THREADS=1 python tools/benchmark.py flops --merge \\
        --models deit_tiny_patch16_224 deit_small_patch16_224 \\
        deit_base_patch16_224 swin_tiny_patch4_window7_224 \\
        swin_small_patch4_window7_224 --out results/benchmarks/flops.json
"""
import gc
import os.path as osp
import time

import torch

from .common import REPO
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
#: The timm classifiers of the ImageNet reproductions
#: (``configs/reproduce/psaq-vit*_imagenet_*.py``), by timm model: a PSAQ-ViT
#: reproduction of each (its synthesizer is counted, the one-hot loss on
#: the logits included: V2's start images, without it, cost 1.5% less on
#: Swin-S) and the 224x224 they are tested and synthesize at.
CLS_MODELS = {
    'deit_tiny_patch16_224': (
        'configs/reproduce/psaq-vit_imagenet_deit-t_w8a8.py', (224, 224)),
    'deit_small_patch16_224': (
        'configs/reproduce/psaq-vit_imagenet_deit-s_w8a8.py', (224, 224)),
    'deit_base_patch16_224': (
        'configs/reproduce/psaq-vit_imagenet_deit-b_w8a8.py', (224, 224)),
    'swin_tiny_patch4_window7_224': (
        'configs/reproduce/psaq-vit_imagenet_swin-t_w8a8.py', (224, 224)),
    'swin_small_patch4_window7_224': (
        'configs/reproduce/psaq-vit_imagenet_swin-s_w8a8.py', (224, 224)),
}
#: The methods counted on the classifiers: those of their reproductions.
CLS_METHODS = ('psaq_vit', 'psaq_vit_v2')
#: The demo models: counted on request (not in the default rows).
DEMO_MODELS = {
    'mask_rcnn_demo': ('configs/demo/mask_rcnn_swin_demo_w8a8.py',
                       (192, 192)),
    'upernet_demo': ('configs/demo/upernet_swin_demo_w8a8.py', (192, 192)),
}


def _models():
    return dict(MODELS, **CLS_MODELS, **DEMO_MODELS)


def add_arguments(p):
    p.add_argument('--models', nargs='+', choices=list(_models()),
                   default=None, help='default: every real model and '
                   'classifier')
    p.add_argument('--methods', nargs='+', choices=list(METHODS),
                   default=None, help='default: all')
    p.add_argument('--size', default=None,
                   help='HxW for every row instead of the models\' own')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--merge', action='store_true',
                   help='keep the rows of the other models from the flops '
                   'section already in --out')


def count(fn):
    """FLOPs of ``fn()`` (forward and whatever backward it runs).

    Only the dispatch mode of :class:`FlopCounterMode` is entered: its
    module tracker's backward hooks break ``torch.autograd.grad`` on leaf
    tensors (V2's balanced gradients), and the per-module table is not
    needed.  The CPU kernel of ``scaled_dot_product_attention`` (timm's
    fused attention: DeiT) is counted with torch's formula of its CUDA
    kernels, which the counter has no entry for on the CPU."""
    from torch.utils import flop_counter
    counter = flop_counter.FlopCounterMode(display=False)
    counter.flop_counts.clear()
    aten, reg = torch.ops.aten, counter.flop_registry
    if hasattr(aten, '_scaled_dot_product_flash_attention_for_cpu'):
        reg.setdefault(aten._scaled_dot_product_flash_attention_for_cpu,
                       reg[aten._scaled_dot_product_flash_attention])
        reg.setdefault(
            aten._scaled_dot_product_flash_attention_for_cpu_backward,
            reg[aten._scaled_dot_product_flash_attention_backward])
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


def _per_iteration(run):
    """FLOPs of one iteration of ``run(iterations)``: those of two
    iterations less those of one (what a run does once around its
    iterations drops out)."""
    return count(lambda: run(2)) - count(lambda: run(1))


def classifier_synthesis_flops(config, method, hw, device, seed=0):
    """FLOPs of one synthesis iteration of one image of ``method`` on the
    timm classifier of ``config`` (random weights), run by the suite's own
    code rather than the :mod:`~dfq_dense.bench.synthesis_methods`
    iteration, which has no label term: PSAQ-ViT's one-hot loss on the
    logits (``label_head='classifier'``, the ImageNet configs') takes the
    backward through the last block's MLP and the head as well.

    * ``psaq_vit``: the config's synthesizer (``dfq.synthesizer``), one
      round;
    * ``psaq_vit_v2``: the sample step of the method fragment's
      :class:`~dfq_dense.adapt.psaq_v2.PSAQViTV2Rounds` (one round, no
      student step; the FP classifier against its fake-quantized copy on
      the logits)."""
    from mmengine.config import Config

    from .. import registry
    from ..engine import model_checks
    from .common import load_config, random_weights
    from .synthesis_methods import METHOD_CONFIGS, _freeze, make_student
    if method not in CLS_METHODS:
        raise ValueError(f'{method}: not counted on the classifiers '
                         f'({", ".join(CLS_METHODS)})')
    cfg = random_weights(load_config(config))
    torch.manual_seed(seed)
    model = model_checks.build_model(cfg).to(device)
    _freeze(model)
    quiet = dict(progress=False, log_interval=10**9)
    if method == 'psaq_vit':
        def run(iterations):
            synth = registry.build(registry.MODELS, dict(
                cfg.dfq.synthesizer, num_images=1, batch_size=1,
                synth_rounds=1, iterations=iterations, seed=seed, **quiet))
            synth.check_model(model)
            synth.generate(model, img_size=tuple(hw))
        return _per_iteration(run)
    student = torch.nn.Module()
    student.backbone = make_student(model.backbone, cfg.dfq.quantizer,
                                    device, seed)
    frag = Config.fromfile(osp.join(REPO, METHOD_CONFIGS[method]))
    comp = dict(frag.dfq_adapter.components, student_step=False)
    image = torch.randn((1, 3) + tuple(hw),
                        generator=torch.Generator().manual_seed(seed))

    def run(iterations):
        adapter = registry.build(registry.ADAPTERS, dict(
            frag.dfq_adapter, rounds=1, sample_iters=iterations,
            images_per_round=None, components=comp, seed=seed, **quiet))
        adapter.run(model, student, image)
    return _per_iteration(run)


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


def _kept(previous, models):
    """``(models, methods, rows, wall seconds)`` of the section
    ``previous`` (``--merge``) for the models not counted again, each kept
    row with the commit and time it was counted at."""
    if not previous:
        return {}, [], [], 0.
    env = previous.get('environment') or {}
    rows = [dict(r) for r in previous.get('rows', [])
            if r['model'] not in models]
    for r in rows:
        r.setdefault('counted_at', dict(commit=env.get('git_commit'),
                                        dirty=env.get('git_dirty'),
                                        time=env.get('time')))
    return ({m: info for m, info in previous.get('models', {}).items()
             if m not in models}, list(previous.get('methods', [])), rows,
            float(previous.get('wall_seconds') or 0.))


def run(args, device, checkpoint=None, previous=None):
    """Count the rows; with ``--merge`` the rows of the other models of
    ``previous`` (the section in the output file) are kept."""
    from .synthesis import parse_size
    from .synthesis_methods import build_parts
    models = args.models or list(MODELS) + list(CLS_MODELS)
    methods = args.methods or list(METHODS)
    kept_models, kept_methods, kept, kept_s = _kept(
        previous if args.merge else None, models)
    start = time.time()
    rows = []

    def result():
        info = dict(kept_models, **{
            m: dict(config=_models()[m][0], size=list(_models()[m][1]))
            for m in models})
        return dict(description='FLOPs (FlopCounterMode: 2 per '
                    'multiply-add; elementwise work not counted) of one '
                    'synthesis iteration of one image per method and of one '
                    'FP evaluation forward, per real model (the detectors '
                    'and segmentors; the ImageNet reproductions\' timm '
                    'classifiers, PSAQ-ViT and V2 only), random weights',
                    models=info,
                    methods=kept_methods + [m for m in methods
                                            if m not in kept_methods],
                    seed=args.seed,
                    rows=[r for m in info for r in kept + rows
                          if r['model'] == m],
                    wall_seconds=kept_s + time.time() - start)

    def add(row):
        rows.append(row)
        print(f'[flops] {row["kind"]} {row["model"]} {row.get("method", "")}'
              f': {row["flops"] / 1e9:.1f} GFLOP', flush=True)
        if checkpoint is not None:
            checkpoint(result())

    for name in models:
        config, hw = _models()[name]
        if args.size:
            hw = tuple(parse_size(args.size))
        add(dict(kind='eval', model=name, config=config, size=list(hw),
                 flops=eval_flops(config, hw, device, args.seed)))
        gc.collect()
        if name in CLS_MODELS:
            # the classifiers' reproductions are PSAQ-ViT's (MimiQ's and
            # SPDFQ's iterations here are those of a dense backbone: random
            # projection head, crops at their own size)
            for m in (m for m in methods if m in CLS_METHODS):
                add(dict(kind='synthesis', model=name, config=config,
                         method=m, method_name=METHODS[m], size=list(hw),
                         flops=classifier_synthesis_flops(
                             config, m, hw, device, args.seed)))
                gc.collect()
            continue
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


def _gflop(flops):
    """GFLOP, one decimal below 100 (the classifiers' rows)."""
    g = flops / 1e9
    return f'{g:.0f}' if g >= 100 else f'{g:.1f}'


def markdown(result):
    from .common import describe_environment, markdown_table
    env = result.get('environment')
    earlier = {}  # rows kept by --merge: (commit, dirty) -> models
    for r in result['rows']:
        at = r.get('counted_at')
        if at:
            earlier.setdefault((at.get('commit') or '?', bool(at.get(
                'dirty'))), set()).add(r['model'])
    head = ('Counted with torch\'s FlopCounterMode (2 FLOPs per '
            'multiply-add; elementwise work not counted), one image, random '
            'weights' + (f'; {describe_environment(env)}' if env else '') +
            ''.join(f'; the rows of {len(ms)} models counted earlier, at '
                    f'commit {c[:10]}{" (dirty)" if d else ""}'
                    for (c, d), ms in earlier.items()) + '.\n\n')
    table = []
    methods = result['methods']
    for name in result['models']:
        rows = [r for r in result['rows'] if r['model'] == name]
        ev = next((r for r in rows if r['kind'] == 'eval'), None)
        syn = {r['method']: r for r in rows if r['kind'] == 'synthesis'}
        size = result['models'][name]['size']
        table.append([name, f'{size[0]}x{size[1]}',
                      _gflop(ev['flops']) if ev else '-'] +
                     [_gflop(syn[m]['flops']) if m in syn else '-'
                      for m in methods])
    return head + markdown_table(
        ['model', 'size', 'eval forward GFLOP'] +
        [f'{METHODS[m]} iteration GFLOP' for m in methods], table)
