"""Calibrators, per-token / softmax quantizers and config validation.

Every reference here is computed independently of the implementation
(numpy percentiles, brute-force loops over torch's fake-quant kernels,
hand-worked values with python ``math``).
"""
import math

import numpy as np
import pytest
import torch

from dfq_dense.quant import (MinMaxObserver, MovingAverageMinMaxObserver,
                             MSEObserver, OMSEObserver, PercentileObserver,
                             Quantizer, SoftmaxQuantizer, QuantWindowMSA,
                             validate_quantizer_cfg)
from dfq_dense.registry import TASK_UTILS, build


def _ref_qparams(lo, hi, bits, symmetric):
    """Independent python implementation of the range -> qparams rule."""
    if symmetric:
        qmin, qmax = -2 ** (bits - 1), 2 ** (bits - 1) - 1
        amax = max(abs(lo), abs(hi))
        scale = max(np.float32(amax) / np.float32((2 ** bits - 1) / 2),
                    np.float32(1e-8))
        return float(np.float32(scale)), 0, qmin, qmax
    qmin, qmax = 0, 2 ** bits - 1
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = np.float32(np.float32(hi) - np.float32(lo)) / np.float32(qmax)
    scale = max(np.float32(scale), np.float32(1e-8))
    zp = int(min(max(round(float(np.float32(-lo) / scale)), qmin), qmax))
    return float(np.float32(scale)), zp, qmin, qmax


def _fq_tensor(x, scale, zp, qmin, qmax):
    return torch.fake_quantize_per_tensor_affine(x, float(scale), int(zp),
                                                 qmin, qmax)


def _build(cfg, **kw):
    return build(TASK_UTILS, cfg, **kw)


# --------------------------------------------------------------- registry
@pytest.mark.parametrize('name', ['MovingAverageMinMaxObserver',
                                  'PercentileObserver', 'MSEObserver',
                                  'OMSEObserver'])
def test_registered(name):
    obs = _build(dict(type=name, granularity='channel', ch_axis=1))
    assert type(obs).__name__ == name
    assert obs.granularity == 'channel' and not obs.observed
    obs.observe(torch.randn(2, 3, 4))
    assert obs.observed
    scale, zp, qmin, qmax = obs.compute_qparams(4, False)
    assert scale.shape == (3, ) and zp.shape == (3, ) and \
        zp.dtype == torch.int32
    obs.sync()  # not distributed: no-op
    obs.reset()
    assert not obs.observed


# --------------------------------------------------------- moving average
def test_moving_average_tensor_hand_values():
    obs = MovingAverageMinMaxObserver(momentum=0.25)
    obs.observe(torch.tensor([-1.0, 3.0]))
    obs.observe(torch.tensor([-5.0, 7.0]))
    obs.observe(torch.tensor([]))  # ignored
    obs.observe(torch.tensor([1.0, 2.0]))
    mn = 0.75 * (0.75 * -1 + 0.25 * -5) + 0.25 * 1
    mx = 0.75 * (0.75 * 3 + 0.25 * 7) + 0.25 * 2
    assert float(obs.min_val) == pytest.approx(mn, abs=1e-6)
    assert float(obs.max_val) == pytest.approx(mx, abs=1e-6)
    scale, zp, qmin, qmax = obs.compute_qparams(8, False)
    rs, rz, _, _ = _ref_qparams(mn, mx, 8, False)
    assert float(scale) == pytest.approx(rs, rel=1e-6) and int(zp) == rz
    # Through a Quantizer: equals torch's fake-quant with those qparams.
    q = Quantizer(8, False, observer=dict(
        type='MovingAverageMinMaxObserver', momentum=0.25))
    q.enable_calibration()
    for x in ([-1.0, 3.0], [-5.0, 7.0], [1.0, 2.0]):
        q(torch.tensor(x))
    q.finish_calibration()
    assert torch.equal(q.scale, scale) and torch.equal(q.zero_point, zp)
    x = torch.linspace(-4, 5, 50)
    assert torch.equal(q(x), _fq_tensor(x, scale, zp, qmin, qmax))


def test_moving_average_channel_and_quantizer():
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(4, 3, 5, generator=gen) for _ in range(3)]
    q = Quantizer(6, symmetric=True, granularity='channel', ch_axis=1,
                  observer=dict(type='MovingAverageMinMaxObserver',
                                momentum=0.5))
    q.enable_calibration()
    for x in xs:
        q(x)
    q.finish_calibration()
    ref_min = ref_max = None
    for x in xs:
        f = x.transpose(0, 1).reshape(3, -1)
        if ref_min is None:
            ref_min, ref_max = f.min(1).values, f.max(1).values
        else:
            ref_min = 0.5 * ref_min + 0.5 * f.min(1).values
            ref_max = 0.5 * ref_max + 0.5 * f.max(1).values
    amax = torch.maximum(ref_min.abs(), ref_max.abs())
    assert torch.allclose(q.scale, amax / 31.5, rtol=1e-6)
    x = xs[0] * 2
    ref = torch.fake_quantize_per_channel_affine(x, q.scale, q.zero_point, 1,
                                                 -32, 31)
    assert torch.equal(q(x), ref)
    # The EMA range is narrower than the running min/max one.
    mm = MinMaxObserver('channel', 1)
    for x in xs:
        mm.observe(x)
    assert (q.scale <= mm.compute_qparams(6, True)[0] + 1e-7).all()
    assert (q.scale < mm.compute_qparams(6, True)[0]).any()


def test_moving_average_bad_momentum():
    with pytest.raises(ValueError, match='momentum'):
        MovingAverageMinMaxObserver(momentum=0)


# -------------------------------------------------------------- percentile
@pytest.mark.parametrize('p', [99.0, 90.0, 100.0, 37.5])
@pytest.mark.parametrize('symmetric', [False, True])
def test_percentile_tensor_vs_numpy(p, symmetric):
    gen = torch.Generator().manual_seed(int(p * 10) + symmetric)
    xs = [torch.randn(7, 13, generator=gen) * 3 + 0.5 for _ in range(2)]
    obs = PercentileObserver(percentile=p)
    for x in xs:
        obs.observe(x)
    data = torch.cat([x.reshape(-1) for x in xs]).double().numpy()
    lo, hi = obs.compute_range(symmetric)
    if symmetric:
        ref_hi = np.percentile(np.abs(data), p)
        ref_lo = -ref_hi
    else:
        ref_hi = np.percentile(data, p)
        ref_lo = np.percentile(data, 100 - p)
    assert float(hi) == pytest.approx(float(np.float32(ref_hi)), rel=1e-6)
    assert float(lo) == pytest.approx(float(np.float32(ref_lo)), rel=1e-6)
    scale, zp, qmin, qmax = obs.compute_qparams(4, symmetric)
    rs, rz, rqmin, rqmax = _ref_qparams(ref_lo, ref_hi, 4, symmetric)
    assert (qmin, qmax) == (rqmin, rqmax)
    assert float(scale) == pytest.approx(rs, rel=1e-6) and int(zp) == rz
    if p == 100.0:  # same as MinMax
        mm = MinMaxObserver()
        for x in xs:
            mm.observe(x)
        ms, mz, _, _ = mm.compute_qparams(4, symmetric)
        assert torch.equal(scale, ms) and torch.equal(zp, mz)
    # The quantizer built on it equals torch's reference fake-quant.
    q = Quantizer(4, symmetric, observer=dict(type='PercentileObserver',
                                              percentile=p))
    q.enable_calibration()
    for x in xs:
        q(x)
    q.finish_calibration()
    assert torch.equal(q.scale, scale)
    x = xs[1] * 1.5
    assert torch.equal(q(x), _fq_tensor(x, q.scale, q.zero_point, qmin,
                                        qmax))


def test_percentile_channel_vs_numpy():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 4, 6, generator=gen)
    x[:, 2] *= 10
    obs = PercentileObserver(percentile=95.0, granularity='channel',
                             ch_axis=1)
    obs.observe(x)
    lo, hi = obs.compute_range(False)
    arr = x.double().numpy()
    for c in range(4):
        vals = arr[:, c].reshape(-1)
        assert float(hi[c]) == pytest.approx(np.percentile(vals, 95),
                                             rel=1e-6)
        assert float(lo[c]) == pytest.approx(np.percentile(vals, 5),
                                             rel=1e-6)
    scale, zp, qmin, qmax = obs.compute_qparams(8, False)
    ref = torch.fake_quantize_per_channel_affine(x, scale, zp, 1, qmin, qmax)
    q = Quantizer(8, False, 'channel', 1,
                  observer=dict(type='PercentileObserver', percentile=95.0))
    q.enable_calibration()
    q(x)
    q.finish_calibration()
    assert torch.equal(q(x), ref)


def test_percentile_bounded_deterministic_sample():
    x = torch.arange(1000, dtype=torch.float32)
    a = PercentileObserver(99.0, max_samples=100)
    b = PercentileObserver(99.0, max_samples=100)
    for _ in range(3):
        a.observe(x)
        b.observe(x)
    assert a.samples.shape == (1, 100) and a.keys.shape == (100, )
    assert torch.equal(a.samples, b.samples) and torch.equal(a.keys, b.keys)
    assert (a.keys[1:] > a.keys[:-1]).all()  # canonical order: by key
    # the sample is drawn from the data; min / max / tails stay exact
    assert set(a.samples.reshape(-1).tolist()) <= set(range(1000))
    assert [float(v) for v in a.min_max()] == [0.0, 999.0]
    assert a.count == 3000
    lo, hi = a.compute_range(False)
    data = np.concatenate([np.arange(1000.0)] * 3)
    assert float(hi) == np.float32(np.percentile(data, 99.0))
    assert float(lo) == np.float32(np.percentile(data, 1.0))
    assert a.estimated == []


@pytest.mark.parametrize('bad', [0, -1, 100.5, 1000])
def test_percentile_out_of_range(bad):
    with pytest.raises(ValueError,
                       match=r'percentile must be in \(0, 100\], got'):
        PercentileObserver(percentile=bad)


# --------------------------------------------------------------------- MSE
def _brute_force(x2d, bits, symmetric, alphas, reduce):
    """Per-row best (scale, zp) over ``alphas`` with torch's kernels."""
    out = []
    for row in x2d:
        mn, mx = float(row.min()), float(row.max())
        best = None
        for a in alphas:
            lo = float(np.float32(mn) * np.float32(a))
            hi = float(np.float32(mx) * np.float32(a))
            s, z, qmin, qmax = _ref_qparams(lo, hi, bits, symmetric)
            xq = _fq_tensor(row, s, z, qmin, qmax)
            d = (xq.double() - row.double()).pow(2)
            err = float(d.mean() if reduce == 'mean' else d.sum())
            if best is None or err < best[0]:
                best = (err, s, z, a)
        out.append(best)
    return out


@pytest.mark.parametrize('symmetric', [False, True])
def test_mse_tensor_vs_brute_force(symmetric):
    gen = torch.Generator().manual_seed(11 + symmetric)
    x = torch.randn(200, generator=gen)
    x[:3] = torch.tensor([9.0, -7.0, 6.0])  # outliers: clipping pays off
    obs = MSEObserver(grid=40)
    obs.observe(x[:120])
    obs.observe(x[120:])
    scale, zp, qmin, qmax = obs.compute_qparams(3, symmetric)
    err, rs, rz, ra = _brute_force(x[None], 3, symmetric,
                                   [k / 40 for k in range(1, 41)],
                                   'mean')[0]
    assert ra < 1.0  # the search clipped something
    assert float(scale) == pytest.approx(rs, rel=1e-6) and int(zp) == rz
    assert scale.dim() == 0
    xq = _fq_tensor(x, scale, zp, qmin, qmax)
    assert float((xq.double() - x.double()).pow(2).mean()) == \
        pytest.approx(err, rel=1e-9)
    # better than min/max
    mm = MinMaxObserver()
    mm.observe(x)
    s2, z2, _, _ = mm.compute_qparams(3, symmetric)
    assert err < float((_fq_tensor(x, s2, z2, qmin, qmax) - x).pow(2).mean())


def test_mse_channel_vs_brute_force():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, 10, generator=gen)
    x[0, 1, 0] = 8.0
    obs = MSEObserver(grid=25, granularity='channel', ch_axis=1)
    obs.observe(x)
    scale, zp, qmin, qmax = obs.compute_qparams(4, False)
    rows = x.transpose(0, 1).reshape(4, -1)
    ref = _brute_force(rows, 4, False, [k / 25 for k in range(1, 26)],
                       'mean')
    for c in range(4):
        assert float(scale[c]) == pytest.approx(ref[c][1], rel=1e-6)
        assert int(zp[c]) == ref[c][2]
    q = Quantizer(4, False, 'channel', 1,
                  observer=dict(type='MSEObserver', grid=25))
    q.enable_calibration()
    q(x)
    q.finish_calibration()
    assert torch.equal(q(x), torch.fake_quantize_per_channel_affine(
        x, scale, zp, 1, qmin, qmax))


# -------------------------------------------------------------------- OMSE
def test_omse_grid_vs_brute_force_per_channel():
    gen = torch.Generator().manual_seed(21)
    w = torch.randn(4, 3, 3, 3, generator=gen) * 0.1
    w[2, 0, 0, 0] = 1.0
    obs = OMSEObserver(grid=30, refine_iters=0)  # per channel, axis 0
    obs.observe(w)
    scale, zp, qmin, qmax = obs.compute_qparams(4, True)
    ref = _brute_force(w.reshape(4, -1), 4, True,
                       [k / 30 for k in range(1, 31)], 'sum')
    for c in range(4):
        assert float(scale[c]) == pytest.approx(ref[c][1], rel=1e-6)
    assert (zp == 0).all()
    assert any(r[3] < 1.0 for r in ref)  # some channel was clipped
    wq = torch.fake_quantize_per_channel_affine(w, scale, zp, 0, qmin, qmax)
    q = Quantizer(4, True, 'channel', 0,
                  observer=dict(type='OMSEObserver', grid=30,
                                refine_iters=0))
    q.enable_calibration()
    q.observer.observe(w)
    q.finish_calibration()
    assert torch.equal(q(w), wq)


def test_omse_refinement_not_worse():
    gen = torch.Generator().manual_seed(22)
    w = torch.randn(3, 50, generator=gen)
    w[1, 0] = 6.0
    coarse = OMSEObserver(grid=10, refine_iters=0)
    fine = OMSEObserver(grid=10, refine_iters=25)
    coarse.observe(w)
    fine.observe(w)
    _, e0 = coarse.search(3, True)
    _, e1 = fine.search(3, True)
    assert (e1 <= e0).all() and (e1 < e0).any()
    # independently measured errors agree with the reported ones
    s, z, qmin, qmax = fine.compute_qparams(3, True)
    wq = torch.fake_quantize_per_channel_affine(w, s, z, 0, qmin, qmax)
    err = (wq.double() - w.double()).pow(2).sum(1)
    assert torch.allclose(err, e1, rtol=1e-9)
    # tensor granularity also works
    t = OMSEObserver(grid=10, granularity='tensor')
    t.observe(w)
    assert t.compute_qparams(3, True)[0].dim() == 0


# ---------------------------------------------------------------- per-token
@pytest.mark.parametrize('symmetric', [False, True])
def test_token_quantizer_matches_torch(symmetric):
    gen = torch.Generator().manual_seed(31)
    x = torch.randn(2, 5, 6, generator=gen) * torch.arange(
        1, 11, dtype=torch.float32).reshape(2, 5, 1)
    x[0, 0] = x[0, 0].abs() + 0.1  # an all-positive token
    q = Quantizer(4, symmetric, granularity='token')
    assert q.calibrated and q.observer is None
    assert torch.equal(q(x), x)  # disabled at first
    q.enable_calibration()
    assert torch.equal(q(x), x)
    q.finish_calibration()
    assert q.enabled
    rows = x.reshape(-1, 6)
    scales, zps = [], []
    for r in rows:
        s, z, qmin, qmax = _ref_qparams(float(r.min()), float(r.max()), 4,
                                        symmetric)
        scales.append(s)
        zps.append(z)
    scales = torch.tensor(scales, dtype=torch.float32)
    zps = torch.tensor(zps, dtype=torch.int32)
    ref = torch.fake_quantize_per_channel_affine(rows, scales, zps, 0, qmin,
                                                 qmax).reshape(x.shape)
    out = q(x)
    assert torch.equal(out, ref)
    assert not torch.equal(out, x)
    # per token differs from per tensor
    assert not torch.equal(out, _fq_tensor(x, scales.max(), 0, qmin, qmax))
    # STE gradient = torch's (qparams are not differentiated)
    xg = x.clone().requires_grad_()
    rg = rows.clone().requires_grad_()
    gout = torch.randn(x.shape, generator=gen)
    q(xg).backward(gout)
    torch.fake_quantize_per_channel_affine(rg, scales, zps, 0, qmin,
                                           qmax).backward(gout.reshape(-1, 6))
    assert torch.equal(xg.grad, rg.grad.reshape(x.shape))


# ----------------------------------------------------------------- softmax
def test_softmax_uniform_fixed_scale():
    q = SoftmaxQuantizer(4, mode='uniform')
    q.enable()
    x = torch.tensor([0.0, 0.03, 0.5, 1.0, 0.77, 1.2])
    ref = torch.fake_quantize_per_tensor_affine(x, 1 / 15, 0, 0, 15)
    assert float(q.scale) == np.float32(1 / 15) and int(q.zero_point) == 0
    assert torch.equal(q(x), ref)
    assert float(q(x)[-1]) == pytest.approx(1.0)  # 1.2 clamped to 1


def test_softmax_uniform_calibrated():
    q = SoftmaxQuantizer(8, mode='uniform',
                         observer=dict(type='MinMaxObserver'))
    q.enable_calibration()
    x = torch.softmax(torch.randn(3, 7), -1)
    assert torch.equal(q(x), x)
    q.finish_calibration()
    assert float(q.scale) == pytest.approx(float(x.max()) / 255, rel=1e-6)
    assert int(q.zero_point) == 0
    assert torch.equal(q(x), torch.fake_quantize_per_tensor_affine(
        x, float(q.scale), 0, 0, 255))


def test_softmax_log2_hand_values():
    q = SoftmaxQuantizer(3, mode='log2')  # codes 0..7: levels 2^0..2^-7
    q.finish_calibration()
    assert q.enabled
    x = torch.tensor([0.25, 0.3, 1.0, 0.7, 2.0, 0.0, -0.1, 2 ** -7,
                      2 ** -7.4, 2 ** -7.6, 0.5 * (2 ** -3 + 2 ** -4)])
    exp = [0.25, 0.25, 1.0, 0.5, 1.0, 0.0, 0.0, 2 ** -7, 2 ** -7, 0.0]
    # 0.09375: -log2 = 3.415 -> rounds to 3 -> 0.125
    exp.append(0.125)
    assert q(x).tolist() == exp
    # gradient: x_hat / x in range, 0 when clamped (x > 1) or zeroed
    xg = x.clone().requires_grad_()
    q(xg).sum().backward()
    g = xg.grad
    assert g[0] == pytest.approx(1.0) and g[1] == pytest.approx(0.25 / 0.3)
    assert g[4] == 0 and g[5] == 0 and g[9] == 0


def test_softmax_log_sqrt2_hand_values():
    q = SoftmaxQuantizer(4, mode='log_sqrt2')  # codes 0..15
    q.enable()
    x = torch.tensor([0.3, 0.25, 0.5, 0.6, 1.0, 0.0, 2 ** -7.5, 2 ** -7.8])
    # 0.3: -2 log2 0.3 = 3.474 -> 3 -> 2^-1.5
    q3 = round(-2 * math.log2(0.3))
    q6 = round(-2 * math.log2(0.6))
    exp = [2 ** (-q3 / 2), 0.25, 0.5, 2 ** (-q6 / 2), 1.0, 0.0,
           2 ** -7.5, 0.0]
    assert q3 == 3 and q6 == 1
    out = q(x)
    assert torch.allclose(out, torch.tensor(exp), rtol=1e-6, atol=0)
    assert out[5] == 0 and out[7] == 0 and out[1] == 0.25
    # log2 and log_sqrt2 differ on 0.3
    l2 = SoftmaxQuantizer(4, 'log2')
    l2.enable()
    assert float(l2(x)[0]) == 0.25 and float(out[0]) != 0.25


def test_softmax_bad_mode():
    with pytest.raises(ValueError, match='mode'):
        SoftmaxQuantizer(8, mode='log10')


# ------------------------------------------------------------ window MSA
class _FakeMSA(torch.nn.Module):
    """Minimal stand-in with WindowMSA's attributes."""

    def __init__(self, dims=8, heads=2, ws=(2, 2)):
        super().__init__()
        self.embed_dims, self.num_heads, self.window_size = dims, heads, ws
        self.scale = (dims // heads) ** -0.5
        n = (2 * ws[0] - 1) * (2 * ws[1] - 1)
        self.relative_position_bias_table = torch.nn.Parameter(
            torch.randn(n, heads) * 0.02)
        coords = torch.stack(torch.meshgrid(
            torch.arange(ws[0]), torch.arange(ws[1]), indexing='ij')).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
        rel[:, :, 0] += ws[0] - 1
        rel[:, :, 1] += ws[1] - 1
        rel[:, :, 0] *= 2 * ws[1] - 1
        self.register_buffer('relative_position_index', rel.sum(-1))
        self.qkv = torch.nn.Linear(dims, dims * 3)
        self.proj = torch.nn.Linear(dims, dims)
        self.attn_drop = torch.nn.Identity()
        self.proj_drop = torch.nn.Identity()
        self.softmax = torch.nn.Softmax(dim=-1)


def test_window_msa_softmax_quant_option():
    torch.manual_seed(0)
    fp = _FakeMSA()
    x = torch.randn(3, 4, 8)
    default = QuantWindowMSA(fp, a_bits=8)
    assert isinstance(default.matmul2.quantizer_a, torch.nn.Identity)
    m = QuantWindowMSA(fp, a_bits=8, softmax_quant=dict(mode='log2'))
    sq = m.matmul2.quantizer_a
    assert isinstance(sq, SoftmaxQuantizer) and sq.mode == 'log2' and \
        sq.bits == 8
    with torch.no_grad():
        ref = m(x)  # all quantizers disabled: FP
        calls = []
        sq.register_forward_hook(lambda mod, i, o: calls.append(o))
        sq.enable()
        out = m(x)
    assert len(calls) == 1
    # only the softmax operand is quantized, and with log2 levels
    levels = calls[0][calls[0] > 0]
    assert torch.equal(torch.log2(levels), torch.log2(levels).round())
    # independent forward with attn replaced by 2^-round(-log2 attn)
    with torch.no_grad():
        B, N, C = x.shape
        qkv = fp.qkv(x).reshape(B, N, 3, 2, C // 2).permute(2, 0, 3, 1, 4)
        qq, kk, vv = qkv[0] * fp.scale, qkv[1], qkv[2]
        bias = fp.relative_position_bias_table[
            fp.relative_position_index.view(-1)].view(N, N, -1).permute(
                2, 0, 1)
        attn = torch.softmax(qq @ kk.transpose(-2, -1) + bias[None], -1)
        assert float(attn.min()) > 2 ** -200  # no zeros expected at 8 bits
        attn_q = torch.exp2(-torch.round(-torch.log2(attn)))
        exp = fp.proj((attn_q @ vv).transpose(1, 2).reshape(B, N, C))
        assert (attn_q - attn).abs().le((2 ** 0.5 - 1) * attn + 1e-7).all()
    assert torch.allclose(out, exp, rtol=1e-5, atol=1e-6)
    assert not torch.equal(out, ref)
    # close to FP: log2 rounding moves each probability by < 41 %
    rel = float((out - ref).norm() / ref.norm())
    print('log2 attention relative error', rel)
    assert 0 < rel < 0.5
    # The softmax quantizer adds its own scale / zero point to the FP default.
    assert set(m.state_dict()) - set(default.state_dict()) == {
        'matmul2.quantizer_a.scale', 'matmul2.quantizer_a.zero_point'}


# --------------------------------------------------------------- validate
def test_validate_ok():
    validate_quantizer_cfg(dict(bits=8, granularity='channel',
                                observer=dict(type='MSEObserver')),
                           'weight')
    validate_quantizer_cfg(dict(type='SoftmaxQuantizer', bits=4,
                                mode='log_sqrt2'), 'softmax')
    validate_quantizer_cfg(dict(bits=8, granularity='token'), 'matmul')
    validate_quantizer_cfg(dict(bits=8, observer=dict(
        type='dfq_dense.PercentileObserver', percentile=100)))


@pytest.mark.parametrize('cfg,operand,msg', [
    (dict(bits=8, granularity='channel'), 'matmul', 'no channel axis'),
    (dict(bits=8, granularity='channel'), 'softmax', 'no channel axis'),
    (dict(type='SoftmaxQuantizer', mode='log2'), 'activation',
     'only valid for the post-softmax'),
    (dict(type='SoftmaxQuantizer', mode='log_sqrt2'), 'matmul',
     'only valid for the post-softmax'),
    (dict(bits=8, observer=dict(type='PercentileObserver', percentile=0)),
     None, r'percentile must be in \(0, 100\], got 0'),
    (dict(bits=8, observer=dict(type='PercentileObserver',
                                percentile=101)), 'activation',
     r'percentile must be in \(0, 100\]'),
    (dict(bits=8, observer=dict(type='NoSuchObserver')), None,
     'unknown observer type'),
    (dict(bits=1), None, 'bits must be an integer in 2-16'),
    (dict(bits=17), 'weight', 'bits must be an integer in 2-16'),
    (dict(type='SoftmaxQuantizer', bits=32, mode='log2'), 'softmax',
     'bits must be an integer in 2-16'),
    (dict(bits=8, granularity='token'), 'weight', 'not weights'),
    (dict(bits=8, granularity='row'), None, 'unknown granularity'),
])
def test_validate_errors(cfg, operand, msg):
    with pytest.raises(ValueError, match=msg):
        validate_quantizer_cfg(cfg, operand)
