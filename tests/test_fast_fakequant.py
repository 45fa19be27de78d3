"""Evaluation fast paths of the fake quantization: cached quantized weights
and per-tensor fast fake quantization (incl. torch's fused kernel) give
bit-identical values to the reference path, are invalidated whenever the
weights or qparams change, and are never used while a gradient is needed."""
import copy
import io
import math

import pytest
import torch
import torch.nn as nn
from mmengine.registry import init_default_scope

from dfq_dense.quant import (Quantizer, QuantWindowMSA, enable_calibration,
                             fake_quantize, finish_calibration,
                             iter_quantizers, quantize_model,
                             reparameterize_layernorms,
                             set_quantizers_enabled)
from dfq_dense.quant import fake_quant as fq
from dfq_dense.quant.modules import (QuantConv2d, QuantConvTranspose2d,
                                     QuantLinear, QuantMatMul,
                                     QuantWeightModule, clear_quant_caches)
from dfq_dense.quant.quantizer import fast_eval
from dfq_dense.engine.runner import load_config
from tiny_models import TinyModel


# ------------------------------------------------------------------ helpers
def assert_bits_equal(a, b):
    """Same shape/dtype, NaN at the same places, the same bits elsewhere
    (so +0 and -0 differ)."""
    assert a.shape == b.shape and a.dtype == b.dtype
    na, nb = torch.isnan(a), torch.isnan(b)
    assert torch.equal(na, nb)
    ia = a.detach().contiguous().view(torch.int32)[~na]
    ib = b.detach().contiguous().view(torch.int32)[~nb]
    assert torch.equal(ia, ib), (a[~na][ia != ib][:5], b[~nb][ia != ib][:5])


def assert_tree_equal(a, b):
    if torch.is_tensor(a):
        assert_bits_equal(a, b) if a.dtype == torch.float32 else \
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_tree_equal(x, y)
    else:
        raise TypeError(type(a))


GRIDS = [(0, 255), (-128, 127), (0, 15), (-8, 7), (0, 65535), (0, 3),
         (-32768, 32767)]
SCALES = [1 / 3, 0.1, 2 ** -4, 0.0173, 1e-3, 7.5, 1.0, 0.5, 2 / 3,
          3.0517578125e-05]


def _zero_points(qmin, qmax):
    return sorted({qmin, qmax, max(qmin, min(qmax, 0)), (qmin + qmax) // 2,
                   qmin + 1, qmax - 1})


def edge_inputs(scale, zp, qmin, qmax, gen, n=4096):
    """Random values over (and beyond) the grid plus exact .5 ties, the
    clamp bounds and their neighbours, signed zeros, tiny and huge
    values."""
    s = torch.tensor(scale, dtype=torch.float32)
    lo, hi = (qmin - zp) * s, (qmax - zp) * s
    span = float(hi - lo)
    parts = [
        torch.rand(n, generator=gen) * 1.4 * span + float(lo) - 0.2 * span,
        torch.randn(n, generator=gen) * span,
    ]
    k = torch.arange(qmin - zp - 3, qmax - zp + 3, dtype=torch.float32)
    if k.numel() > 20000:
        k = k[torch.randperm(k.numel(), generator=gen)[:20000]]
    inv = 1.0 / s
    parts += [(k + 0.5) * s, (k - 0.5) * s, (k + 0.5) / inv, k * s]
    # exact ties of x * inv_scale: values v with v * inv == k + 0.5
    ties = (k + 0.5) / inv
    parts.append(ties[(ties * inv) == (k + 0.5)])
    b = torch.stack([lo, hi]).float()
    parts += [b, torch.nextafter(b, b + 1), torch.nextafter(b, b - 1),
              b * 1.0000001, b * 0.9999999]
    parts.append(torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1e-30, -1e-30,
                               1e30, -1e30, 3e38, -3e38, 2.0 ** 40,
                               -(2.0 ** 40), 2.0 ** 23 + 1, -(2.0 ** 24)]))
    return torch.cat(parts)


def reference(x, scale, zp, qmin, qmax):
    with torch.no_grad():
        return fake_quantize(x, torch.tensor(scale), torch.tensor(
            zp, dtype=torch.int32), qmin, qmax)


def qparams(scale, zp, qmin, qmax, like):
    return fq.per_tensor_qparams(torch.tensor(scale), torch.tensor(
        zp, dtype=torch.int32), qmin, qmax, like)


# ------------------------------------------------- per-tensor fast paths
@pytest.mark.parametrize('qmin,qmax', GRIDS)
def test_fast_paths_bit_identical_edge_cases(qmin, qmax):
    gen = torch.Generator().manual_seed(qmax - qmin)
    for scale in SCALES:
        for zp in _zero_points(qmin, qmax):
            x = edge_inputs(scale, zp, qmin, qmax, gen)
            ref = reference(x, scale, zp, qmin, qmax)
            qp = qparams(scale, zp, qmin, qmax, x)
            assert qp is not None
            assert_bits_equal(fq._chain(x, qp), ref)
            out = fq._guarded_chain(x, qp)
            if out is None:  # declined: x * inv_scale overflows
                assert not torch.isfinite(x * qp.inv_scale).all()
            else:
                assert_bits_equal(out, ref)
            # the fused kernel: the same values where it is used (random
            # chunks and the special values at the end)
            perm = torch.randperm(x.numel(), generator=gen)[:20 * 256]
            for part in list(x[perm].split(256)) + [x[-64:]]:
                out = fq._fused(part, qp)
                if out is not None:
                    assert_bits_equal(
                        out, reference(part, scale, zp, qmin, qmax))
            assert_bits_equal(fq.fake_quantize_per_tensor_fast(x, qp), ref)


def test_fused_kernel_matches_fake_quantize_float32_random():
    """fake_quant's docstring: bit-identical to torch's kernel for float32
    (finite inputs), on many random tensors, scales and zero points."""
    gen = torch.Generator().manual_seed(0)
    for i in range(300):
        qmin, qmax = GRIDS[i % len(GRIDS)]
        scale = float(torch.rand((), generator=gen) * 0.2 + 1e-4)
        if i % 3 == 0:
            scale = 1.0 / float(torch.randint(1, 200, (), generator=gen))
        zp = int(torch.randint(qmin, qmax + 1, (), generator=gen))
        x = torch.randn(int(torch.randint(1, 3000, (), generator=gen)),
                        generator=gen) * scale * (qmax - qmin) / 3
        ref = reference(x, scale, zp, qmin, qmax)
        out = torch.fake_quantize_per_tensor_affine(
            x, float(torch.tensor(scale)), zp, qmin, qmax)
        assert_bits_equal(out, ref)
        qp = qparams(scale, zp, qmin, qmax, x)
        assert_bits_equal(fq.fake_quantize_per_tensor_fast(x, qp), ref)


@pytest.mark.parametrize('n', [1, 100, 256, 257, 5000,
                               fq.GUARDED_MIN_NUMEL])
def test_nonfinite_inputs(n):
    """NaN / +-Inf: the fused kernel and the guarded chain do not give the
    reference's NaN, so they decline and the exact chain runs."""
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=gen)
    for bad in (float('nan'), float('inf'), -float('inf')):
        y = x.clone()
        y[n // 2] = bad
        qp = qparams(0.02, 3, 0, 255, y)
        ref = reference(y, 0.02, 3, 0, 255)
        assert fq._fused(y, qp) is None
        assert fq._guarded_chain(y, qp) is None
        assert_bits_equal(fq._chain(y, qp), ref)
        assert_bits_equal(fq.fake_quantize_per_tensor_fast(y, qp), ref)
    # finite x whose x * inv_scale overflows to Inf
    y = torch.tensor([3e38, -3e38, 1.0])
    qp = qparams(1e-3, 0, -128, 127, y)
    assert_bits_equal(fq.fake_quantize_per_tensor_fast(y, qp),
                      reference(y, 1e-3, 0, -128, 127))


def test_fused_kernel_other_dtypes_not_identical():
    """torch's kernel computes x * inv_scale in float for half / bfloat16
    inputs (the reference computes in the input dtype), and float64 differs
    too: the fast paths are float32 only."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4000, generator=gen)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        xd = x.to(dtype)
        ref = fake_quantize(xd, torch.tensor(0.013), torch.tensor(3), 0, 255)
        fused = torch.fake_quantize_per_tensor_affine(xd, 0.013, 3, 0, 255)
        assert not torch.equal(fused, ref)
        assert fq.per_tensor_qparams(torch.tensor(0.013), torch.tensor(3),
                                     0, 255, xd) is None
        q = _quantizer(0.013, 3)
        with torch.no_grad():
            assert torch.equal(q(xd), ref)


def test_zero_point_dtypes_and_range():
    x = torch.randn(10)
    for zp in (torch.tensor(3, dtype=torch.int32),
               torch.tensor(3, dtype=torch.int64), torch.tensor(3.0), 3):
        qp = fq.per_tensor_qparams(torch.tensor(0.1), zp, 0, 255, x)
        assert qp is not None and qp.zp_i == 3 and (qp.lo, qp.hi) == (-3, 252)
    # the kernel's tensor-qparams overload reads any integer-valued zero
    # point tensor like the Python int the fast path passes
    want = torch.fake_quantize_per_tensor_affine(x, 0.1, 3, 0, 255)
    for zp in (torch.tensor(3, dtype=torch.int32),
               torch.tensor(3, dtype=torch.int64), torch.tensor(3.0)):
        assert_bits_equal(torch.fake_quantize_per_tensor_affine(
            x, torch.tensor(0.1), zp, 0, 255), want)
    with pytest.raises(RuntimeError):  # out of [quant_min, quant_max]
        torch.fake_quantize_per_tensor_affine(x, 0.1, 300, 0, 255)
    for bad in (torch.tensor(3.5), torch.tensor(300), torch.tensor(-1),
                torch.tensor([1, 2])):
        assert fq.per_tensor_qparams(torch.tensor(0.1), bad, 0, 255,
                                     x) is None


def test_layouts_and_sizes_bit_identical():
    """Non-contiguous inputs (e.g. ``k^T``) keep the reference's strides;
    sizes straddling the path thresholds."""
    gen = torch.Generator().manual_seed(2)
    for n in (16, fq.FUSED_MAX_NUMEL, fq.FUSED_MAX_NUMEL + 1, 4096,
              fq.GUARDED_MIN_NUMEL - 1, fq.GUARDED_MIN_NUMEL):
        x = torch.randn(n, generator=gen) * 3
        for y in (x, x.reshape(-1, 4)[:, :2] if n % 4 == 0 else x[::2],
                  x.reshape(4, -1).t() if n % 4 == 0 else x):
            q = _quantizer(0.0173, 11)
            with torch.no_grad():
                out = q(y)
                with fast_eval(False):
                    ref = q(y)
            assert_bits_equal(out, ref)
            assert out.stride() == ref.stride()


def _quantizer(scale, zp, bits=8):
    q = Quantizer(bits=bits)
    q.scale = torch.tensor(float(scale))
    q.zero_point = torch.tensor(zp, dtype=torch.int32)
    q.calibrated = True
    q.enable()
    return q


def test_quantizer_constants_cache_invalidation():
    q = _quantizer(0.05, 10)
    x = torch.randn(1000) * 4
    with torch.no_grad():
        q(x)
        assert q._qp_cache is not None
        for change in (lambda: q.scale.mul_(1.5),
                       lambda: q.zero_point.add_(7),
                       lambda: setattr(q, 'scale', torch.tensor(0.01)),
                       lambda: q.load_state_dict(dict(
                           scale=torch.tensor(0.2),
                           zero_point=torch.tensor(100,
                                                   dtype=torch.int32)))):
            change()
            ref = fake_quantize(x, q.scale, q.zero_point, q.quant_min,
                                q.quant_max)
            assert_bits_equal(q(x), ref)
        q.state_dict()
        assert q._qp_cache is None


# ------------------------------------------------------- per module type
def _calibrate(model, *inputs, reparam=False):
    enable_calibration(model)
    with torch.no_grad():
        model(*inputs)
    return finish_calibration(model, reparam=reparam)


def _all_cached(model):
    layers = [m for m in model.modules() if isinstance(m, QuantWeightModule)]
    return bool(layers) and all(m._wq_cache is not None for m in layers)


def _fast_and_reference(model, *inputs):
    """(fast output twice, reference output) under no_grad; asserts that
    the weight caches were in use."""
    with torch.no_grad():
        first = model(*inputs)   # builds the caches
        second = model(*inputs)  # uses them
        assert _all_cached(model) or not any(
            isinstance(m, QuantWeightModule) for m in model.modules())
        with fast_eval(False):   # bypasses them
            ref = model(*inputs)
    return first, second, ref


def _wrapped(layer, **kw):
    model = nn.Sequential(layer)
    quantize_model(model, 8, 8, **kw)
    model.eval()
    return model


LAYERS = {
    'linear': (lambda: nn.Linear(64, 48), (8, 256, 64)),
    'linear_big': (lambda: nn.Linear(256, 32),
                   (2, fq.GUARDED_MIN_NUMEL // 256 // 2, 256)),
    'linear_tiny': (lambda: nn.Linear(16, 8), (2, 3, 16)),
    'conv2d': (lambda: nn.Conv2d(6, 10, 3, padding=1, stride=2),
               (2, 6, 20, 24)),
    'conv2d_groups': (lambda: nn.Conv2d(8, 8, 3, groups=4, dilation=2),
                      (1, 8, 16, 16)),
    'conv_transpose2d': (lambda: nn.ConvTranspose2d(6, 4, 2, stride=2),
                         (2, 6, 9, 11)),
}


@pytest.mark.parametrize('kind', sorted(LAYERS))
def test_weight_layers_bit_identical(kind):
    make, shape = LAYERS[kind]
    torch.manual_seed(0)
    model = _wrapped(make())
    wrapper = model[0]
    assert isinstance(wrapper, (QuantLinear, QuantConv2d,
                                QuantConvTranspose2d))
    _calibrate(model, torch.randn(shape))
    x = torch.randn(shape) * 1.3  # some values beyond the calibrated range
    first, second, ref = _fast_and_reference(model, x)
    assert_bits_equal(first, ref)
    assert_bits_equal(second, ref)


def test_matmul_bit_identical():
    torch.manual_seed(0)
    mm = QuantMatMul(8)
    a, b = torch.randn(4, 2, 49, 16), torch.randn(4, 2, 16, 49)
    _calibrate(mm, a, b)
    a2, b2 = torch.randn(4, 2, 49, 16) * 1.2, torch.randn(4, 2, 49, 16)
    first, second, ref = _fast_and_reference(mm, a2, b2.transpose(-2, -1))
    assert_bits_equal(first, ref)
    assert_bits_equal(second, ref)


def _window_msa():
    from mmdet.models.backbones.swin import WindowMSA
    return WindowMSA(embed_dims=32, num_heads=2, window_size=(7, 7))


@pytest.mark.parametrize('softmax', [None, dict(mode='uniform'),
                                     dict(mode='log2')])
def test_window_msa_bit_identical(softmax):
    torch.manual_seed(0)
    model = nn.Sequential(_window_msa())
    quantize_model(model, 8, 8, softmax=softmax)
    model.eval()
    assert isinstance(model[0], QuantWindowMSA)
    x = torch.randn(8, 49, 32)
    mask = torch.zeros(4, 49, 49)
    mask[1:, :, 20:] = -100.0
    _calibrate(model[0], x, mask)
    y = torch.randn(8, 49, 32)
    with torch.no_grad():
        out = model[0](y, mask)
        out2 = model[0](y, mask)
        assert _all_cached(model)
        with fast_eval(False):
            ref = model[0](y, mask)
    assert_bits_equal(out, ref)
    assert_bits_equal(out2, ref)


# ----------------------------------------------------------- end to end
def _tiny(seed=0, **quant):
    model = TinyModel(seed=seed, neck=True)
    quantize_model(model, 8, 8, **quant)
    model.eval()
    return model


def _features(model, x):
    return model.neck(model.backbone(x))


class _Feats(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return _features(self.model, x)


def test_tiny_model_end_to_end_bit_identical():
    model = _tiny()
    gen = torch.Generator().manual_seed(0)
    _calibrate(_Feats(model), torch.randn(1, 3, 64, 64, generator=gen))
    x = torch.randn(2, 3, 70, 84, generator=gen)  # padded windows
    first, second, ref = _fast_and_reference(_Feats(model), x)
    assert_tree_equal(first, ref)
    assert_tree_equal(second, ref)


DEMO = {'det': 'configs/demo/mask_rcnn_swin_demo.py',
        'seg': 'configs/demo/upernet_swin_demo.py'}


@pytest.mark.parametrize('task', ['det', 'seg'])
def test_demo_models_test_step_bit_identical(task):
    from dfq_dense.engine.dfq_loop import _all_detections, calibration_batch
    cfg = load_config(DEMO[task])
    init_default_scope(cfg.default_scope)
    if task == 'det':
        from mmdet.registry import MODELS
    else:
        from mmseg.registry import MODELS
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.eval()
    quantize_model(model, 8, 8)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(1, 3, 96, 96, generator=gen)
    enable_calibration(model)
    with torch.no_grad(), _all_detections(model):
        model.test_step(calibration_batch(images, model.data_preprocessor,
                                          task))
    finish_calibration(model)
    batch = calibration_batch(torch.randn(1, 3, 96, 96, generator=gen),
                              model.data_preprocessor, task)
    with torch.no_grad():
        outs = [model.test_step(batch) for _ in range(2)]
        with fast_eval(False):
            ref = model.test_step(batch)
    fields = ('pred_instances', ) if task == 'det' else \
        ('pred_sem_seg', 'seg_logits')
    for out in outs:
        for field in fields:
            a, b = getattr(out[0], field), getattr(ref[0], field)
            for key in b.keys():
                assert torch.equal(a.get(key), b.get(key)), (field, key)
                if a.get(key).dtype == torch.float32:
                    assert_bits_equal(a.get(key), b.get(key))


# ----------------------------------------------------------- invalidation
@pytest.fixture
def calibrated_tiny():
    model = _tiny()
    gen = torch.Generator().manual_seed(1)
    _calibrate(_Feats(model), torch.randn(1, 3, 56, 56, generator=gen))
    x = torch.randn(1, 3, 56, 56, generator=gen)
    with torch.no_grad():
        before = _features(model, x)  # caches built
    return model, x, before


def _check_fresh(model, x, before=None):
    with torch.no_grad():
        out = _features(model, x)
        with fast_eval(False):
            ref = _features(model, x)
    assert_tree_equal(out, ref)
    if before is not None:
        assert any(not torch.equal(a, b) for a, b in zip(out, before))
    return out


def test_invalidated_by_inplace_weight_change(calibrated_tiny):
    model, x, before = calibrated_tiny
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, QuantWeightModule):
                m.module.weight.mul_(1.5)
    _check_fresh(model, x, before)


def test_invalidated_by_optimizer_step(calibrated_tiny):
    model, x, before = calibrated_tiny
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    _check_fresh(model, x, before)


def test_data_writes_need_clear_quant_caches(calibrated_tiny):
    """``.data`` writes bypass the version counter (documented): the
    helper drops the caches."""
    model, x, before = calibrated_tiny
    for m in model.modules():
        if isinstance(m, QuantWeightModule):
            m.module.weight.data.mul_(0.5)
    clear_quant_caches(model)
    _check_fresh(model, x, before)


def test_invalidated_by_load_state_dict(calibrated_tiny):
    model, x, before = calibrated_tiny
    other = _tiny(seed=5)
    gen = torch.Generator().manual_seed(2)
    _calibrate(_Feats(other), torch.randn(1, 3, 56, 56, generator=gen))
    model.load_state_dict(other.state_dict())
    out = _check_fresh(model, x, before)
    with torch.no_grad():
        assert_tree_equal(out, _features(other, x))
    assert not any('_wq_cache' in k or '_qp_cache' in k
                   for k in model.state_dict())


def test_invalidated_by_recalibration(calibrated_tiny):
    model, x, before = calibrated_tiny
    gen = torch.Generator().manual_seed(3)
    _calibrate(_Feats(model), torch.randn(1, 3, 56, 56, generator=gen) * 3)
    _check_fresh(model, x, before)


def test_invalidated_by_reparameterisation():
    post_ln = {r: dict(act=dict(granularity='channel'))
               for r in ('qkv', 'fc1', 'reduction')}
    model = _tiny(overrides=post_ln)
    gen = torch.Generator().manual_seed(4)
    _calibrate(_Feats(model), torch.randn(1, 3, 56, 56, generator=gen))
    x = torch.randn(1, 3, 56, 56, generator=gen)
    with torch.no_grad():
        before = _features(model, x)
    folded = reparameterize_layernorms(model)  # weights change in place
    assert folded
    _check_fresh(model, x, before)
    # and the full flow with reparam in finish_calibration
    model = _tiny(overrides=post_ln)
    _calibrate(_Feats(model), torch.randn(1, 3, 56, 56, generator=gen),
               reparam=True)
    _check_fresh(model, x)


def test_state_switches(calibrated_tiny):
    model, x, before = calibrated_tiny
    fp = _tiny()
    set_quantizers_enabled(model, False)
    with torch.no_grad():
        out = _features(model, x)
        assert_tree_equal(out, _features(fp, x))
    assert all(m._wq_cache is None for m in model.modules()
               if isinstance(m, QuantWeightModule))
    set_quantizers_enabled(model, True)
    out = _check_fresh(model, x)
    assert_tree_equal(out, before)
    for _, q in iter_quantizers(model):  # direct state writes
        q.state = 'disabled'
    with torch.no_grad():
        assert_tree_equal(_features(model, x), _features(fp, x))


def test_device_dtype_moves(calibrated_tiny):
    model, x, before = calibrated_tiny
    model.double()
    with torch.no_grad():
        out = _features(model, x.double())
        with fast_eval(False):
            ref = _features(model, x.double())
    for a, b in zip(out, ref):
        assert torch.equal(a, b) and a.dtype == torch.float64
    model.float()
    _check_fresh(model, x)


def test_copies_and_pickling(calibrated_tiny):
    model, x, before = calibrated_tiny
    twin = copy.deepcopy(model)
    with torch.no_grad():
        assert_tree_equal(_features(twin, x), before)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert all(m._wq_cache is None for m in loaded.modules()
               if isinstance(m, QuantWeightModule))  # never pickled
    assert all(q._qp_cache is None for _, q in iter_quantizers(loaded))
    with torch.no_grad():
        assert_tree_equal(_features(loaded, x), before)


# ------------------------------------------------------------ no training
def _grads(model, x, trainable):
    for t in trainable:
        t.grad = None
    xx = x.clone().requires_grad_(True)
    out = _features(model, xx)
    sum(o.square().sum() for o in out).backward()
    return [xx.grad.clone()] + [t.grad.clone() for t in trainable]


def test_no_cache_while_training_weights_and_same_grads(calibrated_tiny):
    model, x, _ = calibrated_tiny
    weights = [m.module.weight for m in model.modules()
               if isinstance(m, QuantWeightModule)]
    scales = [q.scale for _, q in iter_quantizers(model)
              if q.enabled and q.granularity != 'token']
    for s in scales:
        s.requires_grad_(True)
    fast = _grads(model, x, weights + scales)
    assert all(m._wq_cache is None for m in model.modules()
               if isinstance(m, QuantWeightModule))
    with fast_eval(False):
        ref = _grads(model, x, weights + scales)
    for a, b in zip(fast, ref):
        assert_bits_equal(a, b)
    assert any(float(s.grad.abs().sum()) > 0 for s in scales)


def test_frozen_weights_input_grads_with_cache(calibrated_tiny):
    """Frozen weights and qparams (image synthesis through the quantized
    model): the cache is used and the input gradient is unchanged."""
    model, x, _ = calibrated_tiny
    for p in model.parameters():
        p.requires_grad_(False)
    fast = _grads(model, x, [])
    assert all(m._wq_cache is not None for m in model.modules()
               if isinstance(m, QuantWeightModule))
    with fast_eval(False):
        ref = _grads(model, x, [])
    assert_bits_equal(fast[0], ref[0])


def test_no_cache_in_train_mode(calibrated_tiny):
    model, x, before = calibrated_tiny
    model.train()
    assert all(m._wq_cache is None for m in model.modules()
               if isinstance(m, QuantWeightModule))
    with torch.no_grad():
        _features(model, x)
    assert all(m._wq_cache is None for m in model.modules()
               if isinstance(m, QuantWeightModule))
    model.eval()  # (train mode: drop path is random)
    with torch.no_grad():
        assert_tree_equal(_features(model, x), before)


def test_hooked_weight_quantizer_not_bypassed(calibrated_tiny):
    model, x, _ = calibrated_tiny
    layer = next(m for m in model.modules() if isinstance(m, QuantLinear))
    calls = []
    h = layer.weight_quantizer.register_forward_hook(
        lambda *a: calls.append(1))
    try:
        with torch.no_grad():
            _features(model, x)
            _features(model, x)
        assert len(calls) >= 2 and layer._wq_cache is None
    finally:
        h.remove()


def test_inference_mode(calibrated_tiny):
    model, x, before = calibrated_tiny
    clear_quant_caches(model)
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.inference_mode():
        out = _features(model, x)
    assert_tree_equal([o.clone() for o in out], before)
    cached = [m for m in model.modules() if isinstance(m, QuantWeightModule)]
    assert all(m._wq_cache is not None and not m._wq_cache[1].is_inference()
               for m in cached)
    # the kept cache holds plain tensors: usable with autograd afterwards
    xx = x.clone().requires_grad_(True)
    outs = _features(model, xx)
    sum(o.sum() for o in outs).backward()
    assert xx.grad is not None and math.isfinite(float(xx.grad.sum()))


def test_fast_eval_off_bypasses_and_keeps_valid_cache(calibrated_tiny):
    model, x, before = calibrated_tiny
    with fast_eval(False), torch.no_grad():
        assert_tree_equal(_features(model, x), before)
        assert _all_cached(model)  # bypassed, not dropped
        for m in model.modules():  # changed while bypassed
            if isinstance(m, QuantWeightModule):
                m.module.weight.add_(0.01)
    _check_fresh(model, x, before)
