"""Fake quantization, observers and Quantizer (CPU, tiny tensors)."""
import pytest
import torch

from dfq_dense.quant import MinMaxObserver, Quantizer, fake_quantize, qrange
from dfq_dense.quant.observers import qrange as obs_qrange
from dfq_dense.registry import TASK_UTILS, build


def _qparams(bits, symmetric, n=None, gen=None):
    """Random scale(s)/zero point(s) of the grid of ``bits``."""
    qmin, qmax = qrange(bits, symmetric)
    shape = () if n is None else (n, )
    scale = (torch.rand(shape, generator=gen) * 0.2 + 0.01).float()
    if symmetric:
        zp = torch.zeros(shape, dtype=torch.int32)
    else:
        zp = torch.randint(qmin, qmax + 1, shape, generator=gen,
                           dtype=torch.int32)
    return scale, zp, qmin, qmax


def _inputs(scale, qmax, gen, shape=(3, 5, 7)):
    # Spread well beyond the representable range (both sides) and include
    # exact half-way points to exercise round-half-to-even.
    span = float(scale.max()) * (2 ** 17 if qmax > 255 else qmax) * 1.5
    x = (torch.rand(shape, generator=gen) * 2 - 1) * span
    x.view(-1)[:4] = torch.tensor([0.5, 1.5, -2.5, 2.5]) * float(scale.min())
    return x


@pytest.mark.parametrize('bits', list(range(2, 9)))
@pytest.mark.parametrize('symmetric', [True, False])
def test_fake_quantize_per_tensor_matches_torch(bits, symmetric):
    gen = torch.Generator().manual_seed(bits * 2 + symmetric)
    for _ in range(3):
        scale, zp, qmin, qmax = _qparams(bits, symmetric, gen=gen)
        x = _inputs(scale, qmax, gen)
        ref = torch.fake_quantize_per_tensor_affine(x, float(scale),
                                                    int(zp), qmin, qmax)
        ref_t = torch.fake_quantize_per_tensor_affine(
            x, scale.reshape(1), zp.reshape(1), qmin, qmax)
        out = fake_quantize(x, scale, zp, qmin, qmax)
        assert torch.equal(out, ref)
        assert torch.equal(out, ref_t)
        # Some values must be clamped, otherwise the test is too easy.
        assert (out.abs().max() < x.abs().max())


@pytest.mark.parametrize('bits', list(range(2, 9)))
@pytest.mark.parametrize('symmetric', [True, False])
@pytest.mark.parametrize('axis', [0, 1, 2])
def test_fake_quantize_per_channel_matches_torch(bits, symmetric, axis):
    gen = torch.Generator().manual_seed(100 + bits * 6 + symmetric * 3 +
                                        axis)
    shape = (3, 5, 7)
    scale, zp, qmin, qmax = _qparams(bits, symmetric, shape[axis], gen)
    x = _inputs(scale, qmax, gen, shape)
    ref = torch.fake_quantize_per_channel_affine(x, scale, zp, axis, qmin,
                                                 qmax)
    out = fake_quantize(x, scale, zp, qmin, qmax, ch_axis=axis)
    assert torch.equal(out, ref)


@pytest.mark.parametrize('per_channel', [False, True])
def test_fake_quantize_x_grad_matches_torch(per_channel):
    gen = torch.Generator().manual_seed(7)
    bits, symmetric = 4, False
    n = 5 if per_channel else None
    scale, zp, qmin, qmax = _qparams(bits, symmetric, n, gen)
    x = (torch.rand(4, 5, 6, generator=gen) * 2 - 1) * 3
    g = torch.randn(4, 5, 6, generator=gen)

    x1 = x.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    if per_channel:
        ref = torch.fake_quantize_per_channel_affine(x1, scale, zp, 1, qmin,
                                                     qmax)
        out = fake_quantize(x2, scale, zp, qmin, qmax, ch_axis=1)
    else:
        ref = torch.fake_quantize_per_tensor_affine(x1, float(scale),
                                                    int(zp), qmin, qmax)
        out = fake_quantize(x2, scale, zp, qmin, qmax)
    ref.backward(g)
    out.backward(g)
    assert torch.equal(out.detach(), ref.detach())
    assert torch.equal(x2.grad, x1.grad)
    # Both clamped (zero grad) and passed-through values exist.
    assert (x1.grad == 0).any() and (x1.grad != 0).any()


def test_fake_quantize_scale_grad_lsq():
    # Hand-worked LSQ gradient: x=[0.26, 10, -10], scale=0.1, grid [-8, 7].
    x = torch.tensor([0.26, 10.0, -10.0])
    scale = torch.tensor(0.1, requires_grad=True)
    out = fake_quantize(x, scale, 0, -8, 7)
    assert torch.allclose(out.detach(), torch.tensor([0.3, 0.7, -0.8]))
    out.sum().backward()
    # in range: round(x/s) - x/s = 3 - 2.6; clamped: qmax=7, qmin=-8.
    assert torch.allclose(scale.grad, torch.tensor(0.4 + 7 - 8), atol=1e-5)


def test_fake_quantize_bad_shapes():
    with pytest.raises(ValueError):
        fake_quantize(torch.zeros(2, 3), torch.ones(2), torch.zeros(2), 0,
                      255)
    with pytest.raises(ValueError):
        fake_quantize(torch.zeros(2, 3), torch.ones(2), torch.zeros(2), 0,
                      255, ch_axis=1)


def test_minmax_observer_asymmetric_hand_values():
    obs = MinMaxObserver()
    obs.observe(torch.tensor([-1.0, 0.5]))
    obs.observe(torch.tensor([3.0]))
    scale, zp, qmin, qmax = obs.compute_qparams(8, symmetric=False)
    assert (qmin, qmax) == (0, 255)
    assert torch.allclose(scale, torch.tensor(4 / 255))
    assert int(zp) == 64  # round(1 / (4/255)) = round(63.75)
    assert zp.dtype == torch.int32


def test_minmax_observer_range_includes_zero():
    obs = MinMaxObserver()
    obs.observe(torch.tensor([1.0, 2.0, 3.0]))  # all positive
    scale, zp, _, _ = obs.compute_qparams(8, symmetric=False)
    assert torch.allclose(scale, torch.tensor(3 / 255))
    assert int(zp) == 0
    obs.reset()
    obs.observe(torch.tensor([-4.0, -2.0]))  # all negative
    scale, zp, _, _ = obs.compute_qparams(4, symmetric=False)
    assert torch.allclose(scale, torch.tensor(4 / 15))
    assert int(zp) == 15


def test_minmax_observer_symmetric_and_channel():
    obs = MinMaxObserver(granularity='channel', ch_axis=1)
    x = torch.tensor([[-1.0, 0.2, 0.0], [0.5, -3.0, 0.0]])
    obs.observe(x)
    scale, zp, qmin, qmax = obs.compute_qparams(8, symmetric=True)
    assert (qmin, qmax) == (-128, 127)
    expected = torch.tensor([1.0, 3.0, 0.0]) / 127.5
    assert torch.allclose(scale[:2], expected[:2])
    assert float(scale[2]) == pytest.approx(1e-8)  # eps guard on all-zero
    assert torch.equal(zp, torch.zeros(3, dtype=torch.int32))
    # running max over calls
    obs.observe(torch.tensor([[2.0, 0.0, 0.0]]))
    scale, _, _, _ = obs.compute_qparams(2, symmetric=True)
    assert torch.allclose(scale[:2], torch.tensor([2.0, 3.0]) / 1.5)
    assert obs_qrange(2, True) == (-2, 1)


def test_minmax_observer_empty_and_unobserved():
    obs = MinMaxObserver()
    obs.observe(torch.zeros(0, 4))
    assert not obs.observed
    with pytest.raises(RuntimeError):
        obs.compute_qparams(8, False)
    obs.sync()  # not distributed: no-op
    assert not obs.observed
    with pytest.raises(ValueError):
        MinMaxObserver(granularity='row')


def test_observer_registered():
    obs = build(TASK_UTILS, dict(type='MinMaxObserver', granularity='channel',
                                 ch_axis=1))
    assert isinstance(obs, MinMaxObserver) and obs.ch_axis == 1


def test_quantizer_modes():
    q = Quantizer(bits=4, symmetric=False)
    x = torch.linspace(-1, 3, 11)
    assert q.state == 'disabled' and torch.equal(q(x), x)
    with pytest.raises(RuntimeError):
        q.enable()
    q.enable_calibration()
    y = q(x)
    assert torch.equal(y, x)  # FP during calibration
    q.finish_calibration()
    assert q.state == 'quantizing'
    assert torch.allclose(q.scale, torch.tensor(4 / 15))
    assert int(q.zero_point) == 4  # round(1 / (4/15)) = round(3.75)
    y = q(x)
    assert not torch.equal(y, x)
    assert torch.equal(y, torch.fake_quantize_per_tensor_affine(
        x, float(q.scale), 4, 0, 15))
    q.disable()
    assert torch.equal(q(x), x)
    q.enable()
    assert torch.equal(q(x), y)
    r = repr(q)
    assert 'bits=4' in r and 'granularity=tensor' in r and 'quantizing' in r


def test_quantizer_16_bits_still_quantizes():
    q = Quantizer(bits=16, symmetric=False)
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    q.enable_calibration()
    q(x)
    q.finish_calibration()
    y = q(x)
    assert not torch.equal(y, x)  # not special-cased to identity
    assert (y - x).abs().max() <= float(q.scale) / 2 + 1e-6


@pytest.mark.parametrize('bits', [1, 17, 0, 8.0, '8', True, None])
def test_quantizer_invalid_bits(bits):
    with pytest.raises(ValueError, match='bits must be an integer in 2-16'):
        Quantizer(bits=bits)


def test_quantizer_per_channel_state_dict_roundtrip():
    q = Quantizer(bits=8, symmetric=True, granularity='channel', ch_axis=0)
    w = torch.randn(6, 3)
    q.enable_calibration()
    q(w)
    q.finish_calibration()
    q2 = Quantizer(bits=8, symmetric=True, granularity='channel', ch_axis=0)
    q2.load_state_dict(q.state_dict())
    assert torch.equal(q2.scale, q.scale) and q2.scale.shape == (6, )
    q2.enable()
    assert torch.equal(q2(w), q(w))


def test_observer_sync_all_reduces_min_and_max(monkeypatch):
    """Simulated 2-rank run: the other rank saw [-2, 1] / per-channel data."""
    from dfq_dense.quant import observers as obs_mod
    other = {}
    calls = []

    def fake_all_reduce(t, op='sum', group=None):
        if t.dtype == torch.int64:
            # per-channel observers first agree on the channel count
            assert op == 'max'
            calls.append('count')
            return
        calls.append(op)
        peer = other[len([c for c in calls if c != 'count']) % 2]
        # 1st call: min, 2nd call: max
        if op == 'min':
            t.copy_(torch.minimum(t, peer))
        elif op == 'max':
            t.copy_(torch.maximum(t, peer))
        else:
            raise AssertionError(op)

    monkeypatch.setattr(obs_mod.dist, 'is_distributed', lambda: True)
    monkeypatch.setattr(obs_mod.dist, 'all_reduce', fake_all_reduce)

    q = Quantizer(bits=8, symmetric=False)
    q.enable_calibration()
    q(torch.tensor([-1.0, 3.0]))
    other[1], other[0] = torch.tensor(-2.0), torch.tensor(1.0)
    q.finish_calibration()
    assert calls == ['min', 'max']
    assert torch.allclose(q.scale, torch.tensor(5 / 255))  # [-2, 3]
    assert int(q.zero_point) == 102  # round(2 / (5/255))

    # a rank that saw no data takes part with neutral +-inf sentinels
    calls.clear()
    q.enable_calibration()
    other[1], other[0] = torch.tensor(-1.0), torch.tensor(4.0)
    q.finish_calibration()
    assert calls == ['min', 'max'] and q.state == 'quantizing'
    assert torch.allclose(q.scale, torch.tensor(5 / 255))

    calls.clear()
    w = Quantizer(bits=4, symmetric=True, granularity='channel')
    w.enable_calibration()
    w(torch.tensor([[1.0, -1.0], [0.5, 0.25]]))
    other[1], other[0] = torch.tensor([0.0, -3.0]), torch.tensor([2.0, 0.0])
    w.finish_calibration()
    assert calls == ['count', 'min', 'max']
    assert torch.allclose(w.scale, torch.tensor([2.0, 3.0]) / 7.5)

    # a per-channel observer on a rank that had no calibration batch
    calls.clear()
    a = Quantizer(bits=8, symmetric=False, granularity='channel', ch_axis=1)
    a.enable_calibration()
    a.observer.sync = type(a.observer).sync.__get__(a.observer)

    def count_is_two(t, op='sum', group=None):
        if t.dtype == torch.int64:
            t.fill_(2)  # the other rank saw 2 channels
            return
        calls.append(op)
        t.copy_(torch.tensor([-1.0, -2.0]) if op == 'min'
                else torch.tensor([1.0, 2.0]))

    monkeypatch.setattr(obs_mod.dist, 'all_reduce', count_is_two)
    a.finish_calibration()
    assert calls == ['min', 'max'] and a.state == 'quantizing'
    assert torch.allclose(a.scale, torch.tensor([2.0, 4.0]) / 255)
