"""Memory options of the synthesis loop: micro-batching
(``micro_batch_size``), activation checkpointing of the frozen backbone
(``with_cp``) and SPDFQ's crops at their own size (``crop_size='native'``).

Each option must give the images the whole batch gives at the same seed.
``with_cp`` recomputes the same operations: bit-identical.  Micro-batching
runs the backbone and the per-image terms on fewer images at a time; every
image's numbers are the same, but a BLAS picks its kernel, and so its
rounding, by the number of rows of a product (PSAQ-ViT's weighted KDE sums
and their backward, batch-folded matrix products; MimiQ's head similarity
at one image), so the first pixel gradient may differ in the last bits
(``GRAD_RTOL``; < 5e-7 measured) and the images then drift apart as they
drift for any rounding change: PSAQ-ViT's recipe (Adam with betas (0.5,
0.9) at lr 0.25, whose steps are about +-lr for every gradient above its
eps, whatever its size) is chaotic at the last bit: a one-ulp change of
the starting pixels moves its images as far as micro-batching does (1e-3
after 2 iterations, 0.3 after 8, 1.6 after 16 on the tiny model), so the
images after ``ITERS`` iterations are checked against that (``ULP_FACTOR``
times the drift of a one-ulp start) or ``IMG_ATOL``, whichever is larger.
"""
import contextlib

import pytest
import torch

from dfq_dense.engine.dfq_config import _check_setting
from dfq_dense.registry import MODELS, build
from dfq_dense.synth import AttnOutputRecorder, psaq_entropy_loss
from dfq_dense.synth.loop import (MicroBatch, checkpointed_blocks,
                                  find_swin_blocks)
from dfq_dense.synth.losses import (_kde_grid, _pse_samples, kde_chunk_of,
                                    kde_grid_points, pse_bounds)
from dfq_dense.synth.spdfq import msr_regions, native_crops

from tiny_models import TinyModel

#: relative (to the largest) difference of the first pixel gradient
GRAD_RTOL = 1e-5
#: absolute difference of the images after ITERS iterations ...
IMG_ATOL = 2e-3
#: ... or this times the drift of a one-ulp change of the starting pixels
ULP_FACTOR = 4.0
ITERS = 3
HW = (36, 44)  # Swin pads the stage-1 token grid (9 x 11) to windows


@pytest.fixture(scope='module')
def tiny_model():
    model = TinyModel()
    for m in model.modules():
        m.training = False
    return model


#: every method (and the variants whose coupling differs)
METHODS = {
    'PSAQViT': dict(type='PSAQViT', synth_rounds=2, iterations=2),
    'PSAQViT-grid-image': dict(type='PSAQViT', synth_rounds=1,
                               iterations=ITERS, grid='image'),
    'PSAQViT-tv-raw': dict(type='PSAQViT', synth_rounds=1,
                           iterations=ITERS, tv_on='raw',
                           tau_per='iteration'),
    'PSAQViTV2': dict(type='PSAQViTV2', synth_rounds=2, iterations=1),
    'MimiQ': dict(type='MimiQ', iterations=ITERS, num_classes=10),
    'MimiQ-tau': dict(type='MimiQ', iterations=ITERS, num_classes=10,
                      tv_weight=0.05, tv_tau_range=(2500., 3000.)),
    'SPDFQ': dict(type='SPDFQ', iterations=ITERS, num_classes=10),
    'SPDFQ-native': dict(type='SPDFQ', iterations=ITERS, num_classes=10,
                         crop_size='native'),
    'SPDFQ-fixed': dict(type='SPDFQ', iterations=ITERS, num_classes=10,
                        msr_count='fixed', crop_size=24),
}


def _synth(cfg, **opts):
    return build(MODELS, dict(cfg, num_images=4, batch_size=4, img_size=HW,
                              seed=5, progress=False, log_interval=1,
                              **opts))


def _run(model, cfg, ulp=False, **opts):
    """Images, the first iteration's pixel gradient and logs (``ulp``: the
    starting pixels moved by one ulp)."""
    s = _synth(cfg, **opts)
    got = {}
    init = s._init_pixels

    def init_pixels(*args, **kwargs):
        x, mean, std = init(*args, **kwargs)
        if ulp:
            with torch.no_grad():
                x.mul_(1 + 2.0**-23)
        got['x'] = x
        return x, mean, std

    def timer(name):
        if name == 'step' and 'grad' not in got:
            got['grad'] = got['x'].grad.clone()
        return contextlib.nullcontext()

    s._init_pixels = init_pixels
    s.phase_timer = timer
    images = s.generate(model)
    return images, got['grad'], s.history


@pytest.fixture(scope='module')
def references(tiny_model):
    """Per method: the whole batch's images, first gradient and logs, and
    the drift of its images from a one-ulp change of the start."""
    out = {}
    for name, cfg in METHODS.items():
        x, g, log = _run(tiny_model, cfg)
        drift = (_run(tiny_model, cfg, ulp=True)[0] - x).abs().max()
        out[name] = (x, g, log, drift)
    return out


@pytest.mark.parametrize('mb', [1, 2, 3])
@pytest.mark.parametrize('name', list(METHODS))
def test_micro_batching_gives_the_batch_images(tiny_model, references, name,
                                               mb):
    ref_x, ref_g, ref_log, drift = references[name]
    x, g, log = _run(tiny_model, METHODS[name], micro_batch_size=mb)
    # the first gradient: the whole batch's to the last bits
    scale = ref_g.abs().max()
    assert (g - ref_g).abs().max() <= GRAD_RTOL * scale, name
    # the logged terms are the batch's (each micro-batch adds its share)
    for key, value in ref_log[0].items():
        assert log[0][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    assert (x - ref_x).abs().max() <= max(IMG_ATOL, ULP_FACTOR * drift), \
        name


@pytest.mark.parametrize('name', list(METHODS))
def test_with_cp_is_bit_identical(tiny_model, references, name):
    x, g, log = _run(tiny_model, METHODS[name], with_cp=True)
    assert torch.equal(x, references[name][0])
    assert torch.equal(g, references[name][1])
    # together with micro-batching: the micro-batched images
    x2, _, _ = _run(tiny_model, METHODS[name], with_cp=True,
                    micro_batch_size=2)
    x3, _, _ = _run(tiny_model, METHODS[name], micro_batch_size=2)
    assert torch.equal(x2, x3)


def test_micro_batch_size_at_or_above_the_batch_is_the_default(tiny_model,
                                                               references):
    x, _, _ = _run(tiny_model, METHODS['PSAQViT'], micro_batch_size=4)
    assert torch.equal(x, references['PSAQViT'][0])
    x, _, _ = _run(tiny_model, METHODS['MimiQ'], micro_batch_size=9)
    assert torch.equal(x, references['MimiQ'][0])


def test_micro_batches_of_a_pass(tiny_model):
    """4 images in micro-batches of 3: forwards of 3 and 1 images; the
    PSAQ-ViT grid pre-pass forwards them once more without gradient."""
    sizes = []
    handle = tiny_model.backbone.register_forward_pre_hook(
        lambda mod, args: sizes.append(
            (int(args[0].shape[0]), torch.is_grad_enabled())))
    try:
        _synth(dict(METHODS['PSAQViT'], synth_rounds=1, iterations=1),
               micro_batch_size=3).generate(tiny_model)
        assert sizes == [(3, False), (1, False), (3, True), (1, True)]
        sizes.clear()
        _synth(dict(METHODS['MimiQ'], iterations=1),
               micro_batch_size=3).generate(tiny_model)
        assert sizes == [(3, True), (1, True)]
    finally:
        handle.remove()


# ------------------------------------------------ PSAQ-ViT's batch grid
def test_pse_grid_of_micro_batches_is_the_batch_grid(tiny_model):
    bb = tiny_model.backbone
    x = torch.randn(4, 3, *HW, generator=torch.Generator().manual_seed(2))
    with AttnOutputRecorder(bb) as rec, torch.no_grad():
        bb(x)
        full = list(rec.records)
        grids = [_kde_grid(*_pse_samples(r['feat'], r['valid'], True, False,
                                         None, None), 10, 'batch')
                 for r in full]
        loss = psaq_entropy_loss(full)
        bounds, parts = None, []
        for i in (0, 3):
            rec.clear()
            bb(x[i:i + 3])
            b = pse_bounds(rec.records)
            bounds = b if bounds is None else [
                (torch.minimum(lo0, lo1), torch.maximum(hi0, hi1))
                for (lo0, hi0), (lo1, hi1) in zip(bounds, b)]
            parts.append(list(rec.records))
        points = [kde_grid_points(lo, hi, 10) for lo, hi in bounds]
        for p, q in zip(points, grids):
            assert torch.equal(p, q)
        shares = [psaq_entropy_loss(
            r, points=points, total=4,
            chunk=kde_chunk_of('auto', len(r[0]['feat']), 4, x.device))
            for r in parts]
    assert sum(shares).item() == pytest.approx(loss.item(), rel=1e-6)
    with pytest.raises(ValueError, match='grids for'):
        psaq_entropy_loss(full, points=points[:1])


def test_kde_chunk_of_keeps_the_step():
    from dfq_dense.synth.losses import _chunk_len
    for chunk in (1000, 'auto'):
        step = _chunk_len(chunk, 8, 10**6, torch.device('cpu'))
        for rows in (1, 3, 8):
            c = kde_chunk_of(chunk, rows, 8, torch.device('cpu'))
            assert _chunk_len(c, rows, 10**6, torch.device('cpu')) == step
    assert kde_chunk_of(None, 2, 8, 'cpu') is None


# ------------------------------------------------- activation checkpointing
def test_checkpointed_blocks_keep_the_recorders_gradients(tiny_model):
    bb = tiny_model.backbone
    blocks = find_swin_blocks(bb)
    assert len(blocks) == 4
    x = torch.randn(2, 3, *HW, generator=torch.Generator().manual_seed(4))
    x.requires_grad_(True)
    grads, values = [], []
    for cp in (False, True):
        with AttnOutputRecorder(bb) as rec, checkpointed_blocks(bb, cp):
            if cp:
                assert all('forward' in b.__dict__ for b in blocks)
            bb(x)
            feats = [r['feat'] for r in rec.records]
            # the recorded tensors carry a graph to the pixels
            assert all(f.requires_grad and f.grad_fn is not None
                       for f in feats)
            loss = sum((f ** 2).mean() for f in feats)
            rec.enabled, rec.keep = True, False  # as the loop's backward
            loss.backward()
            # the recompute ran the hooks and dropped their records
            assert len(rec.records) == 4
        grads.append(x.grad.clone())
        values.append(loss.detach())
        x.grad = None
    assert grads[0].abs().sum() > 0
    assert torch.equal(grads[0], grads[1]) and torch.equal(*values)
    # the blocks' own forwards (and mmdet's flags) are back
    assert all('forward' not in b.__dict__ and b.with_cp is False
               for b in blocks)
    # no grad: no checkpoint (nothing to keep)
    with checkpointed_blocks(bb), torch.no_grad():
        bb(x)
    with pytest.raises(ValueError, match='no SwinBlock'):
        with checkpointed_blocks(torch.nn.Linear(2, 2)):
            pass


def _saved_bytes(model, cfg, **opts):
    """The largest number of bytes autograd keeps for backward in one pass
    of one iteration (unique storages, the frozen weights left out, the
    block inputs that a checkpoint keeps added)."""
    params = {t.untyped_storage().data_ptr() for t in
              list(model.parameters()) + list(model.buffers())}
    state = dict(live={}, blocks=0, passes=[])

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            state['live'][storage.data_ptr()] = storage
        return t

    def timer(name):
        if name == 'augment':
            state['live'], state['blocks'] = {}, 0
        elif name == 'backward':
            state['passes'].append(state['blocks'] + sum(
                s.nbytes() for s in state['live'].values()))
            state['live'] = {}
        return contextlib.nullcontext()

    def block_input(mod, args):
        if torch.is_grad_enabled() and args[0].requires_grad:
            state['blocks'] += args[0].numel() * args[0].element_size()

    handles = []
    if opts.get('with_cp'):
        handles = [b.register_forward_pre_hook(block_input)
                   for b in find_swin_blocks(model.backbone)]
    s = _synth(dict(cfg, iterations=1), **opts)
    if 'synth_rounds' in cfg:
        s.synth_rounds = 1
    s.phase_timer = timer
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            s.generate(model)
    finally:
        for h in handles:
            h.remove()
    return max(state['passes'])


@pytest.mark.parametrize('name', ['PSAQViT', 'MimiQ', 'SPDFQ'])
def test_options_save_activation_memory(tiny_model, name):
    """Bytes saved for backward in one iteration (a memory count, not a
    timing): checkpointing keeps the block inputs and what the losses
    need, micro-batches of one image about a quarter of the batch's."""
    cfg = METHODS[name]
    full = _saved_bytes(tiny_model, cfg)
    cp = _saved_bytes(tiny_model, cfg, with_cp=True)
    mb = _saved_bytes(tiny_model, cfg, micro_batch_size=1)
    both = _saved_bytes(tiny_model, cfg, micro_batch_size=1, with_cp=True)
    assert cp < 0.8 * full, (cp, full)
    assert mb < 0.4 * full, (mb, full)
    assert both < 0.8 * mb, (both, mb)


# ------------------------------------------------------ SPDFQ native crops
def test_native_crops_regions_and_gradients():
    H, W = 20, 26
    x = torch.randn(3, 3, H, W, requires_grad=True)
    boxes = msr_regions(3, (H, W), 4, torch.Generator().manual_seed(0),
                        count='random')
    groups, order = native_crops(x, boxes)
    assert sorted(order) == list(range(len(boxes)))
    crops = [c for g in groups for c in g.unbind(0)]
    for crop, i in zip(crops, order):
        b, y0, y1, x0, x1 = boxes[i].tolist()
        assert torch.equal(crop, x[b, :, y0:y1, x0:x1])  # no resampling
        grad, = torch.autograd.grad(crop.sum(), x)
        inside = torch.zeros_like(grad, dtype=torch.bool)
        inside[b, :, y0:y1, x0:x1] = True
        assert (grad[inside] == 1).all() and (grad[~inside] == 0).all()
    # one group per size, sizes in order of first occurrence
    sizes = [tuple(g.shape[-2:]) for g in groups]
    assert len(set(sizes)) == len(sizes)
    # equal cells (no jitter of the cut lines): one batch
    boxes = msr_regions(2, (H, W), 4, split_jitter=0.0)
    groups, order = native_crops(x, boxes)
    assert len(groups) == 1 and groups[0].shape == (8, 3, 10, 13)
    assert order == list(range(8))


def test_spdfq_native_crops_forward_at_their_size(tiny_model):
    shapes = []
    handle = tiny_model.backbone.register_forward_pre_hook(
        lambda mod, args: shapes.append(tuple(args[0].shape)))
    try:
        s = _synth(dict(METHODS['SPDFQ-native'], iterations=1))
        s.generate(tiny_model)
    finally:
        handle.remove()
    assert shapes[0] == (4, 3) + HW  # the images
    crops = shapes[1:]
    assert crops and all(c[-2] < HW[0] and c[-1] < HW[1] for c in crops)
    # all crops of an image together: at most the image's pixels
    assert sum(c[0] * c[-2] * c[-1] for c in crops) <= 4 * HW[0] * HW[1]
    # the paper's form: every crop resized to the input size
    shapes.clear()
    handle = tiny_model.backbone.register_forward_pre_hook(
        lambda mod, args: shapes.append(tuple(args[0].shape)))
    try:
        _synth(dict(METHODS['SPDFQ'], iterations=1)).generate(tiny_model)
    finally:
        handle.remove()
    assert len(shapes) == 2 and shapes[1][1:] == (3, ) + HW


# ------------------------------------------------------------- settings
def test_settings_are_checked():
    with pytest.raises(ValueError, match='micro_batch_size'):
        _synth(METHODS['MimiQ'], micro_batch_size=0)
    with pytest.raises(ValueError, match='with_cp'):
        _synth(METHODS['SPDFQ'], with_cp=1)
    with pytest.raises(ValueError, match='max_samples'):
        _synth(METHODS['PSAQViT'], micro_batch_size=2, max_samples=100)
    with pytest.raises(ValueError, match='crop_size'):
        _synth(METHODS['SPDFQ'], crop_size='half')
    assert _check_setting('micro_batch_size', None, True) is None
    assert _check_setting('micro_batch_size', 2, True) is None
    assert 'integer >= 1' in _check_setting('micro_batch_size', 0, True)
    assert _check_setting('with_cp', True, True) is None
    assert 'True or False' in _check_setting('with_cp', 'yes', True)
    assert _check_setting('crop_size', 'native', True) is None
    assert "'native'" in _check_setting('crop_size', 'half', True)
    assert MicroBatch(2, 4, 8).index == slice(2, 4)


# ------------------------------------------------ PSAQ-ViT V2's sample step
@pytest.fixture(scope='module')
def v2_setup(tiny_model):
    """V1 images and a 4-bit student calibrated on them."""
    import copy

    from dfq_dense.adapt import extract_features
    from dfq_dense.quant import (enable_calibration, finish_calibration,
                                 quantize_model)
    x0 = _synth(dict(METHODS['PSAQViTV2'])).generate(tiny_model)
    student = copy.deepcopy(tiny_model)
    quantize_model(student, 4, 4, scope='backbone')
    enable_calibration(student)
    with torch.no_grad():
        extract_features(student, x0)
    finish_calibration(student)
    for m in student.modules():
        m.training = False
    return x0, student


def _sample_step(teacher, v2_setup, **kw):
    from dfq_dense.registry import ADAPTERS
    x0, student = v2_setup
    cfg = dict(type='PSAQViTV2Rounds', batch_size=4, rounds=1, seed=1,
               sample_iters=2, progress=False, log_interval=1,
               components=dict(student_step=False))
    cfg.update(kw)
    adapter = build(ADAPTERS, cfg)
    x1 = adapter.run(teacher, student, x0.clone())
    sample = [h for h in adapter.history if h.get('phase') == 'sample']
    return x1, sample


V2_VARIANTS = {
    'grad_norm': dict(),
    'plain_sum': dict(balance=None),
    'augmented': dict(sample_augment=True),
}


@pytest.mark.parametrize('variant', list(V2_VARIANTS))
def test_v2_sample_step_memory_options(tiny_model, v2_setup, variant):
    kw = V2_VARIANTS[variant]
    ref, ref_log = _sample_step(tiny_model, v2_setup, **kw)
    x, log = _sample_step(tiny_model, v2_setup, with_cp=True, **kw)
    assert torch.equal(x, ref)
    for mb in (1, 3):
        x, log = _sample_step(tiny_model, v2_setup, micro_batch_size=mb,
                              **kw)
        assert (x - ref).abs().max() <= IMG_ATOL, (variant, mb)
        for key in ('loss', 'loss_entropy', 'loss_disc', 'loss_tv',
                    'mean_entropy'):
            assert log[0][key] == pytest.approx(ref_log[0][key], rel=1e-5,
                                                abs=1e-7), key
        for key in ref_log[0]:
            if key.startswith('gnorm_'):
                assert log[0][key] == pytest.approx(ref_log[0][key],
                                                    rel=1e-5), key
    with pytest.raises(ValueError, match='micro_batch_size'):
        _sample_step(tiny_model, v2_setup, micro_batch_size=0)


def test_synthesis_key_ignores_with_cp_only():
    """A killed run may resume with activation checkpointing switched on
    (bit-identical images); another micro-batch size starts over."""
    from dfq_dense.engine.dfq_loop import synthesis_key
    cfg = dict(type='PSAQViT', num_images=8, seed=0)
    key = synthesis_key(cfg, 'a' * 64, dict(type='SwinTransformer'))
    assert synthesis_key(dict(cfg, with_cp=True), 'a' * 64,
                         dict(type='SwinTransformer')) == key
    assert synthesis_key(dict(cfg, micro_batch_size=2), 'a' * 64,
                         dict(type='SwinTransformer')) != key
