"""More range calibrators (observers), same interface as ``MinMaxObserver``.

Every calibrator here is a plain object registered in ``TASK_UTILS`` with
``reset() / observe(x) / observed / sync() / compute_qparams(bits,
symmetric)`` and supports ``granularity='tensor'`` or ``'channel'`` (along
``ch_axis``). A range ``[lo, hi]`` is turned into qparams exactly like
:class:`~dfq_dense.quant.observers.MinMaxObserver` does (see
:func:`range_to_qparams`): symmetric uses ``max(|lo|, |hi|)``, asymmetric
first extends the range to contain 0.

* :class:`MovingAverageMinMaxObserver`: exponential moving average of the
  per-batch min / max. ``sync()`` averages the per-rank EMAs (all-reduce
  sum of the values and of an "observed" flag, ranks that saw nothing do not
  count). This is the mean of the ranks' EMAs, not the EMA of the
  interleaved batch sequence (which is not recoverable).
* :class:`PercentileObserver`: keeps a bounded deterministic subsample of the
  observed values; the range is the ``percentile`` / ``100 - percentile``
  quantiles (``'linear'`` interpolation, as ``numpy.percentile`` and
  ``torch.quantile``), or the ``percentile`` of ``|x|`` for symmetric.
* :class:`PercentileSearchObserver` (RepQ-ViT's activation calibration):
  tries several percentiles and keeps the one whose range gives the lowest
  quantization MSE on the sample.
* :class:`MSEObserver`: keeps a bounded sample and grid-searches the
  clipping range ``[alpha * min, alpha * max]`` (symmetric: ``alpha *
  max|x|``) for ``alpha = k / grid, k = 1..grid`` minimising the mean squared
  error between the sample and its fake-quantization.
* :class:`OMSEObserver` (for weights; Choukroun et al., 2019, "Low-bit
  Quantization of Neural Networks for Efficient Inference"): minimises
  ``||W - Q(W)||_2`` over the clipping threshold on the *whole* observed
  tensor (no subsampling by default): the same ``k / grid`` scan, then a
  golden-section refinement of ``alpha`` inside ``[(k*-1)/grid,
  (k*+1)/grid]`` around the best grid point ``k*`` (``refine_iters``
  iterations; the refined value is kept only if it is not worse).

Sample-keeping observers (Percentile / MSE / OMSE) ``sync()`` by
all-gathering every rank's samples (``mmengine.dist.all_gather_object``) and
re-subsampling the concatenation to the bound, so all ranks end with
identical samples and identical qparams.

Subsampling is deterministic: evenly spaced indices ``round(linspace(0,
n - 1, m))`` of the flattened values (per channel for ``'channel'``).
"""
import math

import torch
from mmengine import dist

from ..registry import TASK_UTILS
from .fake_quant import fake_quantize
from .observers import MinMaxObserver, range_to_qparams

__all__ = [
    'MovingAverageMinMaxObserver', 'PercentileObserver',
    'PercentileSearchObserver', 'MSEObserver', 'OMSEObserver',
    'check_percentile'
]


def check_percentile(percentile):
    """Raise ValueError unless ``0 < percentile <= 100``."""
    if isinstance(percentile, bool) or \
            not isinstance(percentile, (int, float)) or \
            not 0 < percentile <= 100:
        raise ValueError(
            f'percentile must be in (0, 100], got {percentile!r}')
    return float(percentile)


def _channels_first(x, ch_axis):
    """``x`` as ``(C, -1)`` with channels along ``ch_axis``."""
    ch_axis = ch_axis % x.dim()
    return x.transpose(0, ch_axis).reshape(x.shape[ch_axis], -1)


def _subsample(t, m):
    """Deterministic evenly spaced subsample of the last dim to ``m``."""
    n = t.shape[-1]
    if m is None or n <= m:
        return t
    idx = torch.linspace(0, n - 1, m, device=t.device).round().long()
    return t[..., idx]


def _check_granularity(obj, granularity):
    if granularity not in ('tensor', 'channel'):
        raise ValueError(f'{type(obj).__name__} granularity must be one of '
                         f"('tensor', 'channel'), got {granularity!r}")


@TASK_UTILS.register_module()
class MovingAverageMinMaxObserver(MinMaxObserver):
    """EMA of the per-batch min / max.

    The first (non-empty) batch sets min/max; afterwards
    ``min = (1 - momentum) * min + momentum * batch_min`` (same for max).

    Args:
        momentum (float): in (0, 1].
        granularity, ch_axis, eps: as :class:`MinMaxObserver`.
    """

    def __init__(self, momentum=0.1, granularity='tensor', ch_axis=0,
                 eps=1e-8):
        if not 0 < momentum <= 1:
            raise ValueError(f'momentum must be in (0, 1], got {momentum!r}')
        self.momentum = float(momentum)
        super().__init__(granularity=granularity, ch_axis=ch_axis, eps=eps)

    def reset(self):
        self.min_val = None
        self.max_val = None

    @torch.no_grad()
    def observe(self, x):
        x = x.detach()
        if x.numel() == 0:
            return
        x = x.float()
        if self.granularity == 'tensor':
            cur_min, cur_max = x.min(), x.max()
        else:
            flat = _channels_first(x, self.ch_axis)
            cur_min, cur_max = flat.amin(dim=1), flat.amax(dim=1)
        if self.min_val is None:
            self.min_val, self.max_val = cur_min, cur_max
            return
        m = self.momentum
        self.min_val = (1 - m) * self.min_val.to(cur_min.device) + \
            m * cur_min
        self.max_val = (1 - m) * self.max_val.to(cur_max.device) + \
            m * cur_max

    def sync(self):
        """Average the EMAs of the ranks that observed data (collective).

        Reduced: ``sum(min * flag)``, ``sum(max * flag)`` and ``sum(flag)``
        (``flag`` = this rank observed something); per-channel observers
        need data on every rank (the channel count is unknown otherwise).
        """
        if not dist.is_distributed():
            return
        if self.min_val is None and self.granularity == 'channel':
            raise RuntimeError(f'{type(self).__name__}.sync: per-channel '
                               'observer has observed no data on this rank')
        if self.min_val is None:
            flag = torch.zeros(())
            mn = torch.zeros(())
            mx = torch.zeros(())
        else:
            flag = torch.ones((), device=self.min_val.device)
            mn, mx = self.min_val.clone(), self.max_val.clone()
        dist.all_reduce(flag, op='sum')
        dist.all_reduce(mn, op='sum')
        dist.all_reduce(mx, op='sum')
        if float(flag) == 0:
            self.min_val = self.max_val = None
            return
        self.min_val, self.max_val = mn / flag, mx / flag


class _SampleObserver:
    """Base of the observers that keep a bounded sample of the values.

    Samples are kept as a float32 ``(C, n)`` tensor (``C = 1`` for
    ``'tensor'``), subsampled to ``max_samples`` values per channel
    (``None``: keep everything).
    """

    def __init__(self, granularity='tensor', ch_axis=0, eps=1e-8,
                 max_samples=65536):
        _check_granularity(self, granularity)
        if max_samples is not None and max_samples < 1:
            raise ValueError(f'max_samples must be >= 1 or None, got '
                             f'{max_samples!r}')
        self.granularity = granularity
        self.ch_axis = ch_axis
        self.eps = eps
        self.max_samples = max_samples
        self.reset()

    def reset(self):
        self.samples = None

    @property
    def observed(self):
        return self.samples is not None and self.samples.shape[-1] > 0

    @torch.no_grad()
    def observe(self, x):
        x = x.detach()
        if x.numel() == 0:
            return
        x = x.float()
        if self.granularity == 'tensor':
            flat = x.reshape(1, -1)
        else:
            flat = _channels_first(x, self.ch_axis)
        flat = _subsample(flat, self.max_samples)
        if self.samples is None:
            self.samples = flat.clone()
        else:
            self.samples = _subsample(
                torch.cat([self.samples.to(flat.device), flat], dim=1),
                self.max_samples)

    def sync(self):
        """All-gather every rank's samples, concatenate (rank order) and
        re-subsample to ``max_samples`` (collective; no-op when not
        distributed)."""
        if not dist.is_distributed():
            return
        mine = None if self.samples is None else self.samples.cpu()
        gathered = dist.all_gather_object(mine)
        parts = [g for g in gathered if g is not None and g.shape[-1] > 0]
        if not parts:
            self.samples = None
            return
        device = self.samples.device if self.samples is not None else 'cpu'
        self.samples = _subsample(torch.cat(parts, dim=1),
                                  self.max_samples).to(device)

    def _require(self):
        if not self.observed:
            raise RuntimeError(f'{type(self).__name__}.compute_qparams: '
                               'nothing has been observed')

    def _squeeze(self, t):
        return t.reshape(()) if self.granularity == 'tensor' else t

    def __repr__(self):
        return (f'{type(self).__name__}(granularity={self.granularity!r}, '
                f'ch_axis={self.ch_axis})')


@TASK_UTILS.register_module()
class PercentileObserver(_SampleObserver):
    """Percentile range of the observed (subsampled) values.

    Asymmetric: ``[q(100 - p), q(p)]``; symmetric: ``q_{|x|}(p)``; quantiles
    with linear interpolation (``numpy.percentile`` default), computed in
    float64. ``percentile=100`` gives the sample's min/max.

    Args:
        percentile (float): in (0, 100].
        max_samples (int | None): bound of the kept sample (per channel).
    """

    def __init__(self, percentile=99.99, granularity='tensor', ch_axis=0,
                 eps=1e-8, max_samples=65536):
        self.percentile = check_percentile(percentile)
        super().__init__(granularity, ch_axis, eps, max_samples)

    def compute_range(self, symmetric):
        """``(lo, hi)`` float32 (0-dim or 1-D)."""
        self._require()
        s = self.samples.double()
        p = self.percentile / 100.0
        if symmetric:
            hi = torch.quantile(s.abs(), p, dim=1, interpolation='linear')
            lo = -hi
        else:
            hi = torch.quantile(s, p, dim=1, interpolation='linear')
            lo = torch.quantile(s, (100.0 - self.percentile) / 100.0, dim=1,
                                interpolation='linear')
        return self._squeeze(lo.float()), self._squeeze(hi.float())

    @torch.no_grad()
    def compute_qparams(self, bits, symmetric):
        lo, hi = self.compute_range(symmetric)
        return range_to_qparams(lo, hi, bits, symmetric, self.eps)


@TASK_UTILS.register_module()
class PercentileSearchObserver(PercentileObserver):
    """The percentile (from ``candidates``) whose range minimises the mean
    squared quantization error of the kept sample (float64), per channel
    for ``'channel'``; the first candidate wins a tie.  RepQ-ViT searches
    {99.9, 99.99, 99.999} (its default here) and 100 (min/max).

    Args:
        candidates (Sequence[float]): percentiles in (0, 100].
        max_samples (int | None): bound of the kept sample (per channel).
    """

    def __init__(self, candidates=(99.9, 99.99, 99.999, 100.0),
                 granularity='tensor', ch_axis=0, eps=1e-8,
                 max_samples=65536):
        if not candidates:
            raise ValueError('candidates must not be empty')
        self.candidates = [check_percentile(p) for p in candidates]
        super().__init__(self.candidates[0], granularity, ch_axis, eps,
                         max_samples)

    @torch.no_grad()
    def compute_qparams(self, bits, symmetric):
        self._require()
        s = self.samples
        best = None
        for p in self.candidates:
            self.percentile = p
            lo, hi = self.compute_range(symmetric)
            scale, zp, qmin, qmax = range_to_qparams(lo, hi, bits, symmetric,
                                                     self.eps)
            xq = fake_quantize(s, scale.reshape(-1), zp.reshape(-1), qmin,
                               qmax, ch_axis=0)
            err = (xq.double() - s.double()).pow(2).mean(dim=1)
            if best is None:
                best = [err, scale.reshape(-1), zp.reshape(-1)]
            else:
                better = err < best[0]
                best[0] = torch.where(better, err, best[0])
                best[1] = torch.where(better, scale.reshape(-1), best[1])
                best[2] = torch.where(better, zp.reshape(-1), best[2])
        self.percentile = self.candidates[0]
        return self._squeeze(best[1]), self._squeeze(best[2]), qmin, qmax


@TASK_UTILS.register_module()
class MSEObserver(_SampleObserver):
    """Grid search of the clipping range minimising the quantization MSE.

    Candidates: ``alpha_k = k / grid`` for ``k = 1..grid`` (so ``alpha = 1``
    is the plain min/max range). For each candidate the range ``[alpha *
    min, alpha * max]`` (min/max of the kept sample, per channel for
    ``'channel'``; symmetric: ``alpha * max|x|``) is turned into qparams by
    :func:`range_to_qparams`, the sample is fake-quantized and the mean
    squared error (float64) is measured. The first (smallest) ``alpha``
    with the minimal error wins; channels are searched independently.

    Args:
        grid (int): number of candidates.
        max_samples (int | None): bound of the kept sample (per channel).
    """

    def __init__(self, grid=100, granularity='tensor', ch_axis=0, eps=1e-8,
                 max_samples=65536):
        if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
            raise ValueError(f'grid must be a positive int, got {grid!r}')
        self.grid = grid
        super().__init__(granularity, ch_axis, eps, max_samples)

    def _errors(self, alphas, bits, symmetric):
        """Per-channel error for each alpha: ``(len(alphas), C)`` float64.
        Returns also the (lo, hi) bases."""
        s = self.samples
        mn, mx = s.amin(dim=1), s.amax(dim=1)
        sd = s.double()
        errs = []
        for a in alphas:
            scale, zp, qmin, qmax = range_to_qparams(
                mn * a, mx * a, bits, symmetric, self.eps)
            xq = fake_quantize(s, scale, zp, qmin, qmax, ch_axis=0)
            errs.append(self._loss(xq.double() - sd))
        return torch.stack(errs), mn, mx

    @staticmethod
    def _loss(diff):
        return diff.pow(2).mean(dim=1)

    def _alphas(self):
        return [k / self.grid for k in range(1, self.grid + 1)]

    def search(self, bits, symmetric):
        """Best ``alpha`` per channel (float32, ``(C,)``) and its error."""
        self._require()
        alphas = self._alphas()
        errs, _, _ = self._errors(alphas, bits, symmetric)
        best = errs.argmin(dim=0)  # first minimum
        alpha = torch.tensor(alphas, dtype=torch.float32,
                             device=errs.device)[best]
        return alpha, errs.gather(0, best[None])[0]

    @torch.no_grad()
    def compute_qparams(self, bits, symmetric):
        alpha, _ = self.search(bits, symmetric)
        s = self.samples
        mn, mx = s.amin(dim=1), s.amax(dim=1)
        scale, zp, qmin, qmax = range_to_qparams(mn * alpha, mx * alpha, bits,
                                                 symmetric, self.eps)
        return self._squeeze(scale), self._squeeze(zp), qmin, qmax


@TASK_UTILS.register_module()
class OMSEObserver(MSEObserver):
    """OMSE clipping for weights: minimise ``||W - Q(W)||_2``.

    Same candidate scan as :class:`MSEObserver` (``alpha = k / grid``,
    ``k = 1..grid``, error = sum of squares, i.e. the squared L2 norm, per
    channel or per tensor) on the whole observed tensor (``max_samples=None``
    by default), followed (``refine_iters > 0``) by a golden-section search
    of ``alpha`` in ``[(k*-1)/grid, min((k*+1)/grid, 1)]`` around the best
    grid point ``k*`` for each channel; a refined ``alpha`` replaces the
    grid one only where its error is strictly lower.

    Args:
        grid (int): number of grid candidates.
        refine_iters (int): golden-section iterations (0: grid only).
        max_samples (int | None): bound of the kept sample (per channel).
    """

    def __init__(self, grid=100, refine_iters=20, granularity='channel',
                 ch_axis=0, eps=1e-8, max_samples=None):
        if refine_iters < 0:
            raise ValueError(f'refine_iters must be >= 0, got '
                             f'{refine_iters!r}')
        self.refine_iters = int(refine_iters)
        super().__init__(grid, granularity, ch_axis, eps, max_samples)

    @staticmethod
    def _loss(diff):
        return diff.pow(2).sum(dim=1)

    def _err_at(self, alpha, bits, symmetric):
        """Per-channel error for per-channel ``alpha`` (``(C,)``)."""
        s = self.samples
        mn, mx = s.amin(dim=1), s.amax(dim=1)
        scale, zp, qmin, qmax = range_to_qparams(mn * alpha, mx * alpha,
                                                 bits, symmetric, self.eps)
        xq = fake_quantize(s, scale, zp, qmin, qmax, ch_axis=0)
        return self._loss(xq.double() - s.double())

    def search(self, bits, symmetric):
        alpha, err = super().search(bits, symmetric)
        if self.refine_iters == 0:
            return alpha, err
        step = 1.0 / self.grid
        lo = (alpha - step).clamp(min=step * 1e-3)
        hi = (alpha + step).clamp(max=1.0)
        g = (math.sqrt(5) - 1) / 2
        c = hi - g * (hi - lo)
        d = lo + g * (hi - lo)
        fc = self._err_at(c, bits, symmetric)
        fd = self._err_at(d, bits, symmetric)
        for _ in range(self.refine_iters):
            left = fc <= fd  # minimum in [lo, d]
            hi = torch.where(left, d, hi)
            lo = torch.where(left, lo, c)
            new_c = hi - g * (hi - lo)
            new_d = lo + g * (hi - lo)
            # keep the surviving interior point, evaluate the new one
            c_next = torch.where(left, new_c, d)
            d_next = torch.where(left, c, new_d)
            f_new = self._err_at(torch.where(left, new_c, new_d), bits,
                                 symmetric)
            fc_next = torch.where(left, f_new, fd)
            fd_next = torch.where(left, fc, f_new)
            c, d, fc, fd = c_next, d_next, fc_next, fd_next
        cand = torch.where(fc <= fd, c, d)
        fcand = torch.minimum(fc, fd)
        better = fcand < err
        return torch.where(better, cand, alpha), torch.where(
            better, fcand, err)
