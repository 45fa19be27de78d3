"""Calibration statistics over many batches (CPU, independent references).

Every reference is numpy on the concatenation of all observed values; the
statistical tolerances are derived in the comments (binomial /
order-statistic bounds at 5 standard deviations, with fixed seeds so the
tests are deterministic).
"""
import math

import numpy as np
import pytest
import torch

from dfq_dense.quant import (MinMaxObserver, MovingAverageMinMaxObserver,
                             MSEObserver, OMSEObserver, PercentileObserver,
                             PercentileSearchObserver, QuantLinear,
                             enable_calibration, fake_quantize,
                             finish_calibration)
from dfq_dense.quant.calibrators import KEY_BOUND, _grid_errors, \
    bottom_k_keys
from dfq_dense.quant.observers import (calibration_step,
                                       current_calibration_step,
                                       range_to_qparams)


def _batches(seed=0, channels=None, mult=1):
    """9 batches of different distributions, sizes (times ``mult``) and
    shapes (float32).

    With ``channels``: every batch is ``(n, channels)`` (channels last),
    each channel with its own scale.
    """
    rng = np.random.default_rng(seed)
    makers = [
        lambda n: rng.normal(0, 1, n),                      # normal
        lambda n: rng.normal(5, 2, n),                      # shifted
        lambda n: rng.standard_t(5, n),                     # heavy tail
        lambda n: rng.uniform(-3, 1, n),                    # uniform
        lambda n: rng.laplace(0.5, 1.5, n),                 # laplace
        lambda n: rng.exponential(2.0, n),                  # one-sided
        lambda n: np.where(rng.random(n) < 0.01, 8.0, 1.0) *
        rng.normal(0, 1, n),                                # outliers
        lambda n: rng.lognormal(0, 1, n),                   # skewed
        lambda n: rng.normal(-2, 0.1, n),                   # tiny batch
    ]
    sizes = [3000 * mult, 1500 * mult, 4000 * mult, 700 * mult,
             2500 * mult, 1200 * mult, 5000 * mult, 900 * mult, 7]
    out = []
    for make, n in zip(makers, sizes):
        if channels is None:
            v = make(n).astype(np.float32)
            shape = (n, ) if n % 2 else (2, n // 2)
            out.append(torch.from_numpy(v.reshape(shape)))
        else:
            scale = rng.uniform(0.2, 3.0, channels)
            v = (make(n * channels).reshape(n, channels) * scale)
            out.append(torch.from_numpy(v.astype(np.float32)))
    return out


def _observe(obs, batches, order=None):
    order = range(len(batches)) if order is None else order
    for b in order:
        with calibration_step(b):
            obs.observe(batches[b])
    return obs


def _all(batches):
    return np.concatenate([b.reshape(-1).double().numpy() for b in batches])


def _qparams_equal(a, b):
    return torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and \
        a[2:] == b[2:]


# ----------------------------------------------------------- step context
def test_calibration_step_context():
    assert current_calibration_step() is None
    with calibration_step(3):
        assert current_calibration_step() == 3
        with calibration_step(7):
            assert current_calibration_step() == 7
        assert current_calibration_step() == 3
    assert current_calibration_step() is None
    for bad in (-1, 1.5, True, '2'):
        with pytest.raises(ValueError, match='int >= 0'):
            with calibration_step(bad):
                pass


# ------------------------------------------------------------ bottom-k
@pytest.mark.parametrize('n,k', [(3000, 1000), (100000, 1000),
                                 (2 ** 24 + 3, 500)])
def test_bottom_k_keys_law(n, k):
    """Both code paths (all keys drawn for n <= 4k, only the kept ones
    above) give the k smallest of n uniform keys: distinct positions in
    [0, n), ascending keys, and the k-th key / 2^63 ~ Beta(k, n + 1 - k)
    (mean k / (n + 1), sd about sqrt(k) / n): averaged over 20 seeds it is
    within 5 sd / sqrt(20) of the mean."""
    kth = []
    for seed in range(20):
        keys, pos = bottom_k_keys(n, k, torch.Generator().manual_seed(seed))
        assert keys.dtype == pos.dtype == torch.int64
        assert keys.shape == pos.shape == (k, )
        assert (keys[1:] >= keys[:-1]).all() and int(keys[0]) >= 0
        assert int(pos.min()) >= 0 and int(pos.max()) < n
        assert pos.unique().numel() == k
        kth.append(float(keys[-1]) / 2 ** 63)
    mean = k / (n + 1)
    sd = math.sqrt(k * (n + 1 - k) / ((n + 1) ** 2 * (n + 2)))
    assert abs(np.mean(kth) - mean) < 5 * sd / math.sqrt(20)
    assert KEY_BOUND == 2 ** 63 - 1


def test_bottom_k_positions_uniform():
    """Inclusion frequency of every position decile over 400 draws of 50
    of 1000 (only-kept-keys path): binomial, 400 * 50 / 10 = 2000 per
    decile, sd = sqrt(20000 * 0.1 * 0.9) = 42."""
    counts = np.zeros(10)
    for seed in range(400):
        _, pos = bottom_k_keys(1000, 50, torch.Generator().manual_seed(seed))
        counts += np.bincount(pos.numpy() // 100, minlength=10)
    assert np.abs(counts - 2000).max() < 5 * 42


@pytest.mark.parametrize('granularity', ['tensor', 'channel'])
def test_incremental_state_equals_direct_bottom_k_and_tails(granularity):
    """After 9 batches (two calls each), the kept sample is the bottom-k of
    the keys of *all* calls (regenerated here from the call identities)
    and the tails are the extremes of all values: the incremental merges
    (filters, sorted merges) lose nothing."""
    from dfq_dense.quant.observers import STEP_STREAM, ObservationClock
    batches = _batches(11, channels=3)
    if granularity == 'tensor':
        batches = [b.round(decimals=1) for b in batches]  # many ties
    m, tail = 300, 240
    obs = PercentileObserver(max_samples=m, tail=tail,
                             granularity=granularity, ch_axis=-1)
    keys, values = [], []
    for b, x in enumerate(batches):
        with calibration_step(b):
            for call, part in enumerate((x[:len(x) // 2],
                                         x[len(x) // 2:])):
                if not part.numel():
                    continue
                obs.observe(part)
                flat = part.reshape(1, -1) if granularity == 'tensor' \
                    else part.t()
                gen = ObservationClock.generator((b, STEP_STREAM, call))
                k, pos = bottom_k_keys(flat.shape[1], m, gen)
                keys.append(k)
                values.append(flat[:, pos])
    keys, values = torch.cat(keys), torch.cat(values, dim=1)
    order = torch.argsort(keys)
    assert torch.equal(obs.keys, keys[order][:m])
    assert torch.equal(obs.samples, values[:, order][:, :m])
    flat_all = torch.cat([x.reshape(1, -1) if granularity == 'tensor'
                          else x.t() for x in batches], dim=1)
    t = tail if granularity == 'tensor' else tail // 3
    assert torch.equal(obs.top, flat_all.sort(dim=1, descending=True)
                       .values[:, :t])
    assert torch.equal(obs.bottom, flat_all.sort(dim=1).values[:, :t])


def test_lazy_tails_exact_after_every_update():
    """The per-tensor tails (a lazily cut buffer) equal the sorted
    extremes of everything seen after every update: rows smaller and much
    larger than t, ties, shifts that push many values past the bound."""
    from dfq_dense.quant.calibrators import _Tail
    gen = torch.Generator().manual_seed(12)
    t = 50
    for largest in (True, False):
        tail, lazy, seen = _Tail(t, largest), _Tail(t, largest), []
        uncut = 0
        for i, n in enumerate([7, 30, 80, 3, 1000, 5, 400, 60, 2000, 1]):
            row = (torch.randn(n, generator=gen) * (1 + i % 3) +
                   (i - 4)).round(decimals=1)
            sample = row[torch.randperm(n, generator=gen)[:300]]
            tail.update(row, sample)
            lazy.update(row, sample)  # read only at the end
            assert lazy.buf.numel() <= 3 * t
            uncut += not lazy.is_sorted
            seen.append(row)
            everything = torch.cat(seen)
            ref = everything.sort(descending=largest).values[:t]
            assert torch.equal(tail.values()[0], ref), (largest, i)
        assert lazy.thr is not None and uncut >= 3
        assert torch.equal(lazy.values(), tail.values())


# ---------------------------------------------------------------- min/max
@pytest.mark.parametrize('cls', [MinMaxObserver, PercentileObserver,
                                 MSEObserver])
def test_minmax_exact(cls):
    batches = _batches(1)
    data = _all(batches)
    obs = _observe(cls() if cls is MinMaxObserver else cls(max_samples=64),
                   batches)
    if cls is MinMaxObserver:
        mn, mx = obs.min_val, obs.max_val
    else:
        mn, mx = obs.min_max()
        assert obs.count == data.size
    assert float(mn) == data.min() and float(mx) == data.max()


# ------------------------------------------------------------- percentile
@pytest.mark.parametrize('p', [99.99, 99.5, 100.0])
@pytest.mark.parametrize('symmetric', [False, True])
def test_percentile_exact_from_tails(p, symmetric):
    """19 kB of values, a 256-value sample and 300-value tails: the
    99.5th percentile needs the top (N - 1) * 0.005 = 94 values, inside
    the tails, so the result equals numpy's on all values exactly."""
    batches = _batches(2)
    data = _all(batches)
    obs = _observe(PercentileObserver(p, max_samples=256, tail=300),
                   batches)
    assert obs.samples.shape == (1, 256) and obs.count == data.size
    lo, hi = obs.compute_range(symmetric)
    assert obs.estimated == []
    if symmetric:
        ref_hi = np.percentile(np.abs(data), p)
        ref_lo = -ref_hi
    else:
        ref_hi, ref_lo = np.percentile(data, p), np.percentile(data, 100 - p)
    assert float(hi) == np.float32(ref_hi)
    assert float(lo) == np.float32(ref_lo)


def test_percentile_estimated_from_uniform_sample():
    """The 90th / 10th percentiles are outside 300-value tails: they come
    from the uniform sample of m = 4096 of N = 18807 values. The fraction
    of all values below the sample quantile is within p +- 5 sd, sd =
    sqrt(p (1 - p) / m) = 0.0047 (binomial; sampling without replacement
    only lowers it)."""
    batches = _batches(3)
    data = np.sort(_all(batches))
    obs = _observe(PercentileObserver(90.0, max_samples=4096, tail=300),
                   batches)
    lo, hi = obs.compute_range(False)
    assert obs.estimated == [90.0]
    sd = math.sqrt(0.9 * 0.1 / 4096)
    for value, p in ((float(hi), 0.9), (float(lo), 0.1)):
        frac = np.searchsorted(data, value) / data.size
        assert abs(frac - p) < 5 * sd, (value, frac, p)
    # far from the exact value of numpy, but not equal (it is a sample)
    assert float(hi) != np.float32(np.percentile(data, 90.0))


def test_batch_shares_of_the_sample():
    """12 equal batches with disjoint value ranges (batch b in [b, b+1)),
    sample of m = 512 (kept keys drawn only) or 4096 (all keys drawn):
    each batch has m / 12 values in the sample, hypergeometric with sd <=
    sqrt(m / 12 * 11 / 12); we check 5 sd, for the first and the last
    batch as for all others (a scheme that halves the weight of earlier
    batches at each batch would leave the first one < 1 %)."""
    gen = torch.Generator().manual_seed(5)
    batches = [torch.rand(5000, generator=gen) + b for b in range(12)]
    for m in (512, 4096):
        obs = _observe(PercentileObserver(max_samples=m), batches)
        share = np.bincount(obs.samples[0].floor().long().numpy(),
                            minlength=12)
        assert share.sum() == m
        sd = math.sqrt(m / 12 * 11 / 12)
        assert np.abs(share - m / 12).max() < 5 * sd, share


def _observer_zoo():
    return [
        MinMaxObserver(), MovingAverageMinMaxObserver(momentum=0.3),
        PercentileObserver(99.0, max_samples=512, tail=64),
        PercentileSearchObserver(max_samples=512, tail=64),
        MSEObserver(grid=20, max_samples=512),
        OMSEObserver(grid=20, refine_iters=4, granularity='tensor'),
        OMSEObserver(grid=20, refine_iters=4, granularity='tensor',
                     max_samples=512),
    ]


def test_batch_order_does_not_matter():
    """Identical qparams (torch.equal) whatever order the batches are
    observed in, every observer type."""
    batches = _batches(4)
    perm = [5, 0, 8, 3, 7, 1, 6, 2, 4]
    for a, b in zip(_observer_zoo(), _observer_zoo()):
        _observe(a, batches)
        _observe(b, batches, perm)
        for symmetric in (False, True):
            assert _qparams_equal(a.compute_qparams(8, symmetric),
                                  b.compute_qparams(8, symmetric)), a


def test_moving_average_over_batches():
    """EMA over batch indices; calls inside one batch are merged."""
    xs = [torch.tensor([-1.0, 3.0]), torch.tensor([-5.0, 7.0]),
          torch.tensor([1.0, 2.0])]
    obs = MovingAverageMinMaxObserver(momentum=0.25)
    with calibration_step(2):
        obs.observe(xs[2])
    with calibration_step(0):
        obs.observe(xs[0][:1])
        obs.observe(xs[0][1:])  # second call of batch 0: merged
    with calibration_step(1):
        obs.observe(xs[1])
    mn = 0.75 * (0.75 * -1 + 0.25 * -5) + 0.25 * 1
    mx = 0.75 * (0.75 * 3 + 0.25 * 7) + 0.25 * 2
    assert float(obs.min_val) == pytest.approx(mn, abs=1e-6)
    assert float(obs.max_val) == pytest.approx(mx, abs=1e-6)
    assert len(obs.records) == 3


# ------------------------------------------------------- grid searches
def _sq_errors(data, lo, hi, bits, symmetric):
    """Squared errors of fake-quantizing every value with the range
    (torch's kernel, float64)."""
    s, z, qmin, qmax = range_to_qparams(torch.tensor(lo), torch.tensor(hi),
                                        bits, symmetric)
    x = torch.from_numpy(data.astype(np.float32))
    xq = torch.fake_quantize_per_tensor_affine(x, float(s), int(z), qmin,
                                               qmax)
    return (xq.double() - x.double()).pow(2).numpy()


def _check_near_optimum(E, got, m):
    """``E``: squared errors ``(candidates, N)`` on all values; ``got``:
    the candidate chosen on a uniform sample of ``m`` values.

    The chosen candidate has the smallest *sample* mean, so the sample
    mean of ``D = E[got] - E[opt]`` is <= 0 while its mean over all values
    is the excess ``delta >= 0``; the sample mean has sd <= sd(D) /
    sqrt(m) (without replacement: smaller). So ``delta <= 5 sd(D) /
    sqrt(m)`` unless a 5-sd deviation happened for one of the candidates
    (union bound: < #candidates * 3e-7). Returns the optimum and the
    fraction of candidates worse than it by more than their tolerance
    (callers check it is large: the tolerance is informative).
    """
    errs = E.mean(axis=1)
    opt = int(errs.argmin())
    tol = 5 * (E[got] - E[opt]).std() / math.sqrt(m)
    assert errs[got] - errs[opt] <= tol, (got, opt, errs[got] - errs[opt])
    worse = np.mean([errs[k] - errs[opt] > 5 * (E[k] - E[opt]).std() /
                     math.sqrt(m) for k in range(len(errs))])
    return opt, worse


@pytest.mark.parametrize('symmetric', [False, True])
def test_mse_range_near_optimum_on_all_values(symmetric):
    """MSE grid search on a sample of m = 8192 of 75 k values (heavy tails
    included) against the brute-force optimum on all values."""
    batches = _batches(6, mult=4)
    data = _all(batches)
    m, bits, grid = 8192, 4, 50
    obs = _observe(MSEObserver(grid=grid, max_samples=m), batches)
    alpha, _ = obs.search(bits, symmetric)
    mn, mx = np.float32(data.min()), np.float32(data.max())
    E = np.stack([_sq_errors(data, mn * np.float32(k / grid),
                             mx * np.float32(k / grid), bits, symmetric)
                  for k in range(1, grid + 1)])
    k_opt, worse = _check_near_optimum(
        E, int(round(float(alpha) * grid)) - 1, m)
    assert worse > 0.5
    assert k_opt < grid - 1  # clipping pays off on these batches
    # keeping everything finds the brute-force optimum exactly
    full = _observe(MSEObserver(grid=grid, max_samples=None), batches)
    assert int(round(float(full.search(bits, symmetric)[0]) * grid)) - 1 \
        == k_opt
    s, z, _, _ = full.compute_qparams(bits, symmetric)
    rs, rz, _, _ = range_to_qparams(
        torch.tensor(mn * np.float32((k_opt + 1) / grid)),
        torch.tensor(mx * np.float32((k_opt + 1) / grid)), bits, symmetric)
    assert torch.equal(s, rs) and torch.equal(z, rz)


def test_percentile_search_near_optimum_on_all_values():
    """Same bound for RepQ-ViT's percentile search: candidate ranges are
    exact (numpy's percentiles on all values, from the tails), the errors
    are estimated on the sample."""
    batches = _batches(7, mult=4)
    data = _all(batches)
    m, bits = 8192, 4
    cands = (80.0, 90.0, 99.0, 99.9, 100.0)
    obs = _observe(PercentileSearchObserver(cands, max_samples=m,
                                            tail=2 ** 12), batches)
    scale, zp, _, _ = obs.compute_qparams(bits, False)
    assert obs.estimated == [80.0, 90.0]  # outside the tails
    E, qp = [], []
    for p in cands:
        lo, hi = np.percentile(data, 100 - p), np.percentile(data, p)
        qp.append(range_to_qparams(torch.tensor(lo), torch.tensor(hi), bits,
                                   False)[:2])
        E.append(_sq_errors(data, lo, hi, bits, False))
    # the chosen qparams are those of one candidate (exact ranges: 99+)
    got = [i for i, (s, z) in enumerate(qp)
           if torch.equal(s.float(), scale) and torch.equal(z, zp)]
    assert got, (scale, qp)
    _, worse = _check_near_optimum(np.stack(E), got[0], m)
    assert worse >= 0.4  # 2 of the 5 candidates


def test_grid_errors_equal_a_loop_of_fake_quantize():
    """The batched search computes, bit for bit, what one fake_quantize
    per candidate gives (first minimum wins)."""
    gen = torch.Generator().manual_seed(8)
    s = torch.randn(5, 300, generator=gen) * torch.rand(5, 1, generator=gen)
    mn, mx = s.amin(1), s.amax(1)
    alphas = torch.arange(1, 41, dtype=torch.float32)[:, None] / 40
    for symmetric in (False, True):
        errs, scale, zp = _grid_errors(s, mn * alphas, mx * alphas, 3,
                                       symmetric, 1e-8)
        for g in range(40):
            sc, z, qmin, qmax = range_to_qparams(mn * alphas[g],
                                                 mx * alphas[g], 3,
                                                 symmetric)
            xq = fake_quantize(s, sc, z, qmin, qmax, ch_axis=0)
            ref = (xq.double() - s.double()).pow(2).mean(dim=1)
            assert torch.equal(errs[g], ref)
            assert torch.equal(scale[g], sc) and torch.equal(zp[g], z)


# ------------------------------------------------------------ per channel
def test_per_channel_percentile_and_mse():
    """Channels last (a Linear input), 6 channels: per-channel tails of
    ceil(2400 / 6) = 400 values hold the 99.5th percentile of 75207
    values per channel (needs 376): exact; the MSE search per channel is
    within the sampling bound of each channel's optimum."""
    batches = _batches(9, channels=6, mult=4)
    data = np.concatenate([b.double().numpy() for b in batches])
    obs = _observe(PercentileObserver(99.5, 'channel', ch_axis=-1,
                                      max_samples=512, tail=2400), batches)
    assert obs.top.shape == (6, 400) and obs.samples.shape == (6, 512)
    lo, hi = obs.compute_range(False)
    assert obs.estimated == []
    for c in range(6):
        assert float(hi[c]) == np.float32(np.percentile(data[:, c], 99.5))
        assert float(lo[c]) == np.float32(np.percentile(data[:, c], 0.5))
    m, grid, bits = 8192, 30, 4
    mse = _observe(MSEObserver(grid, 'channel', ch_axis=-1, max_samples=m),
                   batches)
    alpha, _ = mse.search(bits, False)
    scale, zp, _, _ = mse.compute_qparams(bits, False)
    assert scale.shape == zp.shape == (6, )
    worse = []
    for c in range(6):
        col = data[:, c]
        mn, mx = np.float32(col.min()), np.float32(col.max())
        E = np.stack([_sq_errors(col, mn * np.float32(k / grid),
                                 mx * np.float32(k / grid), bits, False)
                      for k in range(1, grid + 1)])
        worse.append(_check_near_optimum(
            E, int(round(float(alpha[c]) * grid)) - 1, m)[1])
    assert np.mean(worse) > 0.4, worse
    # order independence per channel too
    again = _observe(MSEObserver(grid, 'channel', ch_axis=-1, max_samples=m),
                     batches, order=list(range(8, -1, -1)))
    assert _qparams_equal(again.compute_qparams(bits, False),
                          (scale, zp) + mse.compute_qparams(bits, False)[2:])


# ------------------------------------------------------------ > 2**24
def test_tensor_above_2_pow_24():
    """2**24 + 3 values (float32 linspace indices would overflow): no
    crash, count and percentiles exact, the last element reachable."""
    n = 2 ** 24 + 3
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(n, generator=gen)
    x[-1] = 50.0  # unique max at the very end
    data = x.double().numpy()
    obs = PercentileObserver(99.99)
    obs.observe(x)
    assert obs.count == n and obs.samples.shape == (1, 65536)
    lo, hi = obs.compute_range(False)
    assert obs.estimated == []
    assert float(hi) == np.float32(np.percentile(data, 99.99))
    assert float(lo) == np.float32(np.percentile(data, 0.01))
    assert float(obs.min_max()[1]) == 50.0
    mse = MSEObserver(grid=20)
    mse.observe(x)
    scale, _, _, _ = mse.compute_qparams(8, False)
    assert mse.count == n and 0 < float(scale) < 51 / 255
    per_ch = PercentileObserver(99.99, 'channel', ch_axis=0)
    per_ch.observe(x[:n - 1].reshape(2, -1))
    lo, hi = per_ch.compute_range(False)
    half = data[:n - 1].reshape(2, -1)
    for c in range(2):
        assert float(hi[c]) == np.float32(np.percentile(half[c], 99.99))


# --------------------------------------------------------- weights
def test_weights_not_observed_during_calibration_forwards():
    """OMSE keeps the whole weight: observed at every forward it would
    grow by a copy per forward. It is observed once, at finish, and gives
    the qparams of observing the weight once; the calibration forwards
    run with the FP weight."""
    torch.manual_seed(0)
    fc = torch.nn.Linear(16, 8)
    q = QuantLinear(fc, w_bits=4, a_bits=8,
                    weight_quantizer=dict(observer=dict(type='OMSEObserver')),
                    input_quantizer=dict(observer=dict(type='MSEObserver')))
    enable_calibration(q)
    wobs = q.weight_quantizer.observer
    x = torch.randn(5, 16)
    with torch.no_grad():
        for b in range(4):
            with calibration_step(b):
                assert torch.equal(q(x * (b + 1)), fc(x * (b + 1)))
            assert wobs.count == 0 and not wobs._chunks
    assert q.input_quantizer.observer.count == 4 * 5 * 16
    finish_calibration(q)
    assert wobs.count == 16 and len(wobs._chunks) == 1
    ref = OMSEObserver()
    ref.observe(fc.weight.detach())
    scale, zp, _, _ = ref.compute_qparams(4, True)
    assert torch.equal(q.weight_quantizer.scale, scale)
    assert torch.equal(q.weight_quantizer.zero_point, zp)
    # MinMax weights: the plain per-channel max|w| / 7.5, as before
    q2 = QuantLinear(torch.nn.Linear(16, 8), w_bits=4, a_bits=8)
    enable_calibration(q2)
    with torch.no_grad():
        q2(x)
    finish_calibration(q2)
    assert torch.allclose(q2.weight_quantizer.scale,
                          q2.weight.detach().abs().amax(1) / 7.5)
