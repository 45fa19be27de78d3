"""Tests of SPDFQ's block-wise reconstruction (dfq_dense.adapt)."""
import copy

import pytest
import torch
import torch.nn.functional as F

from dfq_dense.adapt.block_reconstruction import (BlockReconstruction,
                                                  reconstruction_units)
from dfq_dense.quant import (Quantizer, enable_calibration, fast_eval,
                             finish_calibration, quantize_model)
from dfq_dense.registry import ADAPTERS, build

from tiny_models import TinyModel

N_IMAGES = 8


def _images(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N_IMAGES, 3, 56, 56, generator=g)


@pytest.fixture(scope='module')
def setup():
    """(teacher, calibrated W4A4 student, images); copy before changing."""
    teacher = TinyModel(seed=0)
    teacher.backbone.eval()
    images = _images()
    student = copy.deepcopy(teacher)
    quantize_model(student, 4, 4, scope='backbone')
    enable_calibration(student)
    with torch.no_grad():
        student.backbone(images)
    finish_calibration(student)
    return teacher, student, images


def _clone(setup):
    teacher, student, images = setup
    return copy.deepcopy(teacher), copy.deepcopy(student), images


def _backbone_mse(teacher, student, images):
    with torch.no_grad():
        t = teacher.backbone(images)
        s = student.backbone(images)
    return sum(F.mse_loss(a, b).item() for a, b in zip(s, t)) / len(t)


def _block(model, name):
    return model.get_submodule(name)


def _scales(module):
    return {n: q.scale.detach().clone() for n, q in module.named_modules()
            if isinstance(q, Quantizer) and q.state == 'quantizing'}


# ----------------------------------------------------------------- (a)
def test_reconstruction_lowers_every_block_loss(setup):
    teacher, student, images = _clone(setup)
    before = _backbone_mse(teacher, student, images)
    t_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    adapter = BlockReconstruction(iters=15, lr=1e-3, batch_size=4,
                                  log_interval=0)
    out = adapter.run(teacher, student, images)
    assert out is images
    names = [h['block'] for h in adapter.history]
    assert names == ['backbone.patch_embed',
                     'backbone.stages.0.blocks.0',
                     'backbone.stages.0.blocks.1',
                     'backbone.stages.0.downsample',
                     'backbone.stages.1.blocks.0',
                     'backbone.stages.1.blocks.1']
    for h in adapter.history:
        assert h['loss_after'] < h['loss_before'], h
        assert h['num_scales'] > 0 and h['num_weights'] == 0
    after = _backbone_mse(teacher, student, images)
    assert after < before
    # The teacher is untouched.
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, t_state[k]), k


def test_reconstruction_loss_before_matches_calibrated_student(setup):
    """The first unit's `loss_before` is the calibrated student's error
    (the unit's own MSE on the images, by hand)."""
    teacher, student, images = _clone(setup)
    bb_t, bb_s = teacher.backbone, student.backbone
    with torch.no_grad():
        t = bb_t.patch_embed(images)[0]
        s = bb_s.patch_embed(images)[0]
    ref = F.mse_loss(s, t).item()
    adapter = BlockReconstruction(iters=1, lr=1e-3, batch_size=3,
                                  log_interval=0)
    adapter.run(teacher, student, images)
    assert adapter.history[0]['loss_before'] == pytest.approx(ref, rel=1e-5)


# ----------------------------------------------------------------- (b)
# hw_shape of the tiny model's blocks for 56x56 images.
BLOCK_HW = {'backbone.stages.0.blocks.0': (14, 14),
            'backbone.stages.0.blocks.1': (14, 14),
            'backbone.stages.1.blocks.0': (7, 7),
            'backbone.stages.1.blocks.1': (7, 7)}


def _reference_block(teacher, student, name, images, input_mode, iters,
                     lr, batch_size, seed, chunk):
    """BRECQ for one block, by hand: its input (the student's, or the
    teacher's with input='fp') and the FP block's output from forward hooks
    on whole-backbone forwards, then Adam on the block's quantizer scales
    with a mean squared error, batches from consecutive random
    permutations of a generator seeded with `seed`."""
    s_blk, t_blk = _block(student, name), _block(teacher, name)
    inputs, targets = [], []
    src = t_blk if input_mode == 'fp' else s_blk
    h1 = src.register_forward_pre_hook(
        lambda m, args: inputs.append(args[0].detach().clone()))
    h2 = t_blk.register_forward_hook(
        lambda m, args, out: targets.append(out.detach().clone()))
    with torch.no_grad():
        for i in range(0, len(images), chunk):
            teacher.backbone(images[i:i + chunk])
            if input_mode == 'quantized':
                student.backbone(images[i:i + chunk])
    h1.remove()
    h2.remove()
    x_all, y_all = torch.cat(inputs), torch.cat(targets)
    assert len(x_all) == len(images) == len(y_all)
    quantizers = [q for q in s_blk.modules()
                  if isinstance(q, Quantizer) and q.state == 'quantizing']
    scales = [q.scale for q in quantizers]
    for p in student.parameters():
        p.requires_grad_(False)
    for s in scales:
        s.requires_grad_(True)
    opt = torch.optim.Adam(scales, lr=lr)
    g = torch.Generator().manual_seed(seed)
    order = []
    while len(order) < iters * batch_size:
        order.extend(torch.randperm(len(images), generator=g).tolist())
    for it in range(iters):
        idx = order[it * batch_size:(it + 1) * batch_size]
        loss = F.mse_loss(s_blk(x_all[idx], BLOCK_HW[name]), y_all[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for s in scales:
                s.clamp_(min=1e-8)
    return {n: q.scale.detach().clone() for n, q in s_blk.named_modules()
            if isinstance(q, Quantizer) and q.state == 'quantizing'}


@pytest.mark.parametrize('input_mode', ['quantized', 'fp'])
def test_matches_brute_force_reference(setup, input_mode):
    """A block after a reconstructed downsample: the adapter's scales are
    those of a hand-written BRECQ loop on that block, fed with the
    (already reconstructed) student's own input to it."""
    teacher, student0, images = _clone(setup)
    name = 'backbone.stages.1.blocks.0'
    iters, lr, bs, seed = 4, 1e-3, 3, 5
    adapted = copy.deepcopy(student0)
    adapter = BlockReconstruction(iters=iters, lr=lr, batch_size=bs,
                                  seed=seed, input=input_mode,
                                  log_interval=0)
    adapter.run(teacher, adapted, images)
    got = _scales(_block(adapted, name))
    # The reference starts from the adapted student with this block (and
    # those after it, which do not matter) as calibrated.
    ref_student = copy.deepcopy(adapted)
    _block(ref_student, name).load_state_dict(
        _block(student0, name).state_dict())
    assert not all(torch.equal(v, _scales(_block(ref_student, name))[k])
                   for k, v in got.items())
    ref = _reference_block(teacher, ref_student, name, images, input_mode,
                           iters, lr, bs, seed, chunk=bs)
    assert got.keys() == ref.keys() and len(got) > 4
    calibrated = _scales(_block(student0, name))
    moved = 0
    for k in got:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-6)
        moved += int((got[k] - calibrated[k]).abs().max() > 1e-4)
    assert moved == len(got)  # every scale learned something


# ----------------------------------------------------------------- (c)
def test_zero_iters_changes_nothing(setup):
    teacher, student, images = _clone(setup)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    adapter = BlockReconstruction(iters=0, batch_size=4)
    adapter.run(teacher, student, images)
    after = student.state_dict()
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k
    assert len(adapter.history) == 6
    for h in adapter.history:
        assert h['loss_before'] == h['loss_after'] > 0


# ----------------------------------------------------------------- (d)
def test_flags_and_modes_restored(setup):
    teacher, student, images = _clone(setup)
    # A mixture of flags and modes, as a caller might leave them.
    student.train()
    student.backbone.stages[1].eval()
    for i, p in enumerate(student.parameters()):
        p.requires_grad_(i % 3 != 0)
    blk = student.backbone.stages[0].blocks[1]
    blk.with_cp = True
    modes = {n: m.training for n, m in student.named_modules()}
    flags = {n: p.requires_grad for n, p in student.named_parameters()}
    t_modes = {n: m.training for n, m in teacher.named_modules()}
    t_flags = {n: p.requires_grad for n, p in teacher.named_parameters()}
    adapter = BlockReconstruction(iters=2, lr=1e-3, batch_size=4,
                                  params='both', log_interval=1)
    adapter.run(teacher, student, images)
    assert modes == {n: m.training for n, m in student.named_modules()}
    assert flags == {n: p.requires_grad
                     for n, p in student.named_parameters()}
    assert t_modes == {n: m.training for n, m in teacher.named_modules()}
    assert t_flags == {n: p.requires_grad
                       for n, p in teacher.named_parameters()}
    assert blk.with_cp is True
    for m in student.modules():
        if isinstance(m, Quantizer):
            assert not m.scale.requires_grad and m.scale.grad is None
    for p in student.parameters():
        assert p.grad is None
    assert all(h['num_weights'] > 0 for h in adapter.history)


def test_quantized_weight_caches_invalidated(setup):
    """Caches built before the reconstruction are not used after it: the
    cached (fast) path gives what the reference path gives."""
    teacher, student, images = _clone(setup)
    student.eval()
    with torch.no_grad():
        student.backbone(images[:2])  # builds the caches
    BlockReconstruction(iters=3, lr=1e-3, batch_size=4,
                        log_interval=0).run(teacher, student, images)
    with torch.no_grad():
        fast = student.backbone(images[:2])
        with fast_eval(False):
            slow = student.backbone(images[:2])
    for a, b in zip(fast, slow):
        assert torch.equal(a, b)


def test_options_and_units(setup):
    teacher, student, images = _clone(setup)
    units = reconstruction_units(teacher, student, patch_embed=False,
                                 downsample=False)
    assert [(u.kind, u.learn) for u in units] == [
        ('patch_embed', False), ('block', True), ('block', True),
        ('downsample', False), ('block', True), ('block', True)]
    adapter = BlockReconstruction(iters=2, lr=1e-3, batch_size=8,
                                  reconstruct_patch_embed=False,
                                  reconstruct_downsample=False,
                                  cache_device='cpu', log_interval=0)
    pe = copy.deepcopy(student.backbone.patch_embed.state_dict())
    adapter.run(teacher, student, images)
    assert [h['kind'] for h in adapter.history] == ['block'] * 4
    for k, v in student.backbone.patch_embed.state_dict().items():
        assert torch.equal(v, pe[k])
    with pytest.raises(ValueError, match='params'):
        BlockReconstruction(params='scales')
    with pytest.raises(ValueError, match='input'):
        BlockReconstruction(input='teacher')
    with pytest.raises(ValueError, match='iters'):
        BlockReconstruction(iters=-1)


def test_neck_reconstruction():
    teacher = TinyModel(seed=0, neck=True)
    teacher.eval()
    images = _images()
    student = copy.deepcopy(teacher)
    quantize_model(student, 4, 4)
    enable_calibration(student)
    with torch.no_grad():
        student.neck(student.backbone(images))
    finish_calibration(student)
    adapter = BlockReconstruction(iters=5, lr=1e-3, batch_size=4,
                                  include_neck=True, log_interval=0)
    adapter.run(teacher, student, images)
    last = adapter.history[-1]
    assert last['block'] == 'neck' and last['num_scales'] > 0
    assert last['loss_after'] < last['loss_before']


def test_mmseg_swin():
    from mmseg.models.backbones import SwinTransformer

    class Seg(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.backbone = SwinTransformer(
                embed_dims=24, depths=[2, 2], num_heads=[2, 4],
                strides=(4, 2), out_indices=(0, 1), window_size=7)

    teacher = Seg().eval()
    images = _images()
    student = copy.deepcopy(teacher)
    quantize_model(student, 4, 4)
    enable_calibration(student)
    with torch.no_grad():
        student.backbone(images)
    finish_calibration(student)
    before = _backbone_mse(teacher, student, images)
    adapter = BlockReconstruction(iters=10, lr=1e-3, batch_size=4,
                                  include_neck=True, log_interval=0)
    adapter.run(teacher, student, images)  # no neck: backbone only
    assert len(adapter.history) == 6
    assert all(h['loss_after'] < h['loss_before'] for h in adapter.history)
    assert _backbone_mse(teacher, student, images) < before


# ----------------------------------------------------------------- (e)
def test_builds_from_registry(setup):
    adapter = build(ADAPTERS, dict(type='BlockReconstruction', iters=2))
    assert isinstance(adapter, BlockReconstruction)
    assert adapter.iters == 2 and adapter.lr == 4e-5
    assert adapter.batch_size == 32 and adapter.params == 'qparams'
    assert adapter.history == [] and adapter.visualizer is None
    teacher, student, images = _clone(setup)
    assert adapter.run(teacher, student, images) is images
    assert len(adapter.history) == 6
