"""More range calibrators (observers), same interface as ``MinMaxObserver``.

Every calibrator here is a plain object registered in ``TASK_UTILS`` with
``reset() / observe(x) / observed / sync() / compute_qparams(bits,
symmetric)`` and supports ``granularity='tensor'`` or ``'channel'`` (along
``ch_axis``). A range ``[lo, hi]`` is turned into qparams exactly like
:class:`~dfq_dense.quant.observers.MinMaxObserver` does (see
:func:`range_to_qparams`): symmetric uses ``max(|lo|, |hi|)``, asymmetric
first extends the range to contain 0.

* :class:`MovingAverageMinMaxObserver`: exponential moving average, over
  calibration *batches*, of the per-batch min / max.
* :class:`PercentileObserver`: the ``percentile`` / ``100 - percentile``
  quantiles (``'linear'`` interpolation, as ``numpy.percentile``), or the
  ``percentile`` of ``|x|`` for symmetric.
* :class:`PercentileSearchObserver` (RepQ-ViT's activation calibration):
  tries several percentiles and keeps the one whose range gives the lowest
  quantization MSE.
* :class:`MSEObserver`: grid-searches the clipping range ``[alpha * min,
  alpha * max]`` (symmetric: ``alpha * max|x|``) for ``alpha = k / grid, k
  = 1..grid`` minimising the mean squared error between the values and
  their fake-quantization.
* :class:`OMSEObserver` (for weights; Choukroun et al., 2019, "Low-bit
  Quantization of Neural Networks for Efficient Inference"): minimises
  ``||W - Q(W)||_2`` over the clipping threshold on the *whole* observed
  tensor (``max_samples=None``): the same ``k / grid`` scan, then a
  golden-section refinement of ``alpha`` inside ``[(k*-1)/grid,
  (k*+1)/grid]`` around the best grid point ``k*`` (``refine_iters``
  iterations; the refined value is kept only if it is not worse).

Statistics of the value-keeping observers (Percentile, PercentileSearch,
MSE, OMSE), per channel for ``'channel'`` (``C = 1`` for ``'tensor'``):

* **Exact**: the number ``N`` of values observed, and the ``tail`` largest
  and smallest values (per tensor; per channel ``ceil(tail / C)`` each), so
  the min / max are always exact. A percentile (numpy's ``'linear'``
  interpolation between the order statistics around ``(N - 1) * p``) is
  *exact* whenever both order statistics lie in the tails; the default
  ``tail = 2**17`` of the percentile observers (MSE / OMSE: ``tail = 1``,
  the min / max) covers the 99.99th / 0.01th
  percentile up to ``1.3e9`` values (32 images at 800x1333 give about
  ``8e8`` values for Swin-S's largest tensor). Otherwise it is estimated
  (the same interpolation) on the uniform sample below, and the percentile
  is listed in ``observer.estimated`` (and logged at DEBUG level).
* **Sampled**: a uniform random sample of at most ``max_samples`` values
  (per channel: of positions, the same positions for all channels), drawn
  by *bottom-k random keys*: every observed value gets an independent
  uniform int64 key and the ``max_samples`` values with the smallest keys
  are kept, sorted by key (ties, practically never seen, by the first
  channel's value) so the kept sample is in a canonical order. Every value observed has the same chance to be kept,
  whatever the number, sizes and order of the batches, and ``bottom_k(
  bottom_k(A) | B) == bottom_k(A | B)``: the result does not depend on the
  batch order nor on how batches are split over processes. The keys of a
  call are seeded from its identity (global calibration batch and call
  number within it, see :func:`~dfq_dense.quant.observers.calibration_step`);
  for a large call only the kept keys are generated (a uniform subset of
  positions and the smallest order statistics of ``n`` uniform keys,
  which has the same distribution). The quantization errors of
  PercentileSearch / MSE / OMSE are means (OMSE: sums) over this sample,
  an unbiased estimate of the error over all values; with
  ``max_samples=None`` everything is kept (OMSE's default, for weights) and
  every statistic is exact.
* **Memory bound** (bounded mode): ``max_samples * (8 + 4 C)`` bytes of
  keys and values plus ``8 * tail`` bytes of tails, e.g. 1.8 MB per
  tensor-wise percentile observer with the defaults (per tensor the tails
  are kept lazily, up to 3x that between two cuts), wherever the
  calibration set goes. A new tensor costs about two comparison passes
  over its values (the tails) plus ``O(max_samples)`` for the sample.

``sync()`` (collective; no-op when not distributed or when only replicated
data, i.e. weights, was observed) all-gathers every rank's counts, keys,
samples and tails and merges them, so that with sharded calibration (each
global batch observed by exactly one rank) every observer ends exactly as
if one process had observed all batches. A batch observed on several ranks
would be counted once per rank (a warning is logged).

All sampling indices are int64; tensors of any size (above ``2**24``
elements too) are handled. The grid searches evaluate all candidates in
batched chunks of about ``2**18`` values (no Python loop over the grid
where several candidates fit in a chunk).
"""
import logging
import math

import torch
from mmengine import dist
from mmengine.logging import print_log

from ..registry import TASK_UTILS
from .observers import (MinMaxObserver, ObservationClock, qrange,
                        range_to_qparams)

__all__ = [
    'MovingAverageMinMaxObserver', 'PercentileObserver',
    'PercentileSearchObserver', 'MSEObserver', 'OMSEObserver',
    'check_percentile', 'bottom_k_keys'
]

KEY_BOUND = 2 ** 63 - 1  # keys are uniform integers in [0, KEY_BOUND)
DEFAULT_TAIL = 2 ** 17
# Values fake-quantized at once by a grid search: chunks that stay in the
# CPU caches are faster than one huge batch.
_GRID_BUDGET = 1 << 18


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


def _check_granularity(obj, granularity):
    if granularity not in ('tensor', 'channel'):
        raise ValueError(f'{type(obj).__name__} granularity must be one of '
                         f"('tensor', 'channel'), got {granularity!r}")


# ------------------------------------------------------------- sampling
def bottom_k_keys(n, k, generator):
    """The ``min(n, k)`` smallest of ``n`` i.i.d. uniform int64 keys.

    Returns ``(keys, positions)``, both int64, keys ascending; ``k=None``
    keeps all ``n``. For ``n > 4k`` only the kept keys are generated: a
    uniform random ``k``-subset of the positions (distinct draws with
    replacement, then a random ``k`` of them) in random order, paired with
    the ``k`` smallest order statistics of ``n`` uniforms (Renyi's
    representation ``U_(i) = 1 - exp(-sum_{j<=i} E_j / (n - j + 1))``,
    ``E_j`` standard exponential) -- the joint law of the bottom-k of ``n``
    i.i.d. keys, at ``O(k)`` cost.
    """
    if k is None or n <= 4 * k:
        keys = torch.randint(0, KEY_BOUND, (n, ), generator=generator,
                             dtype=torch.int64)
        if k is not None and n > k:
            keys, pos = keys.topk(k, largest=False, sorted=True)
        else:
            keys, pos = keys.sort()
        return keys, pos
    m = k + k // 4 + 64
    pos = torch.randint(0, n, (m, ), generator=generator,
                        dtype=torch.int64).unique()
    while pos.numel() < k:
        more = torch.randint(0, n, (m, ), generator=generator,
                             dtype=torch.int64)
        pos = torch.cat([pos, more]).unique()
    pos = pos[torch.randperm(pos.numel(), generator=generator)[:k]]
    e = torch.empty(k, dtype=torch.float64).exponential_(
        generator=generator)
    rate = float(n) - torch.arange(k, dtype=torch.float64)
    u = -torch.expm1(-torch.cumsum(e / rate, 0))
    keys = (u * float(2 ** 63)).floor().clamp(max=float(2 ** 63 - 4096))
    return keys.to(torch.int64), pos


def _canonical(keys, values):
    """Sort by key, ties by the first row's value (a canonical order)."""
    order = torch.argsort(values[0], stable=True)
    order = order[torch.argsort(keys[order], stable=True)]
    return keys[order], values[:, order]


def _merge_samples(parts, k):
    """Bottom-``k`` (canonical order) of the union of ``[(keys, values)]``.
    """
    parts = [p for p in parts if p[0] is not None and p[0].numel()]
    if not parts:
        return None, None
    keys = torch.cat([p[0] for p in parts])
    values = torch.cat([p[1] for p in parts], dim=1)
    keys, values = _canonical(keys, values)
    if k is not None and keys.numel() > k:
        keys, values = keys[:k], values[:, :k]
    return keys, values


def _merge_sorted(a, b, descending):
    """Merge two sorted 1-D tensors (same order) in O(len(a) + len(b))."""
    if descending:
        pos = torch.searchsorted(-a, -b)
    else:
        pos = torch.searchsorted(a, b)
    idx_b = pos + torch.arange(b.numel())
    out = a.new_empty(a.numel() + b.numel())
    from_b = torch.zeros(out.numel(), dtype=torch.bool)
    from_b[idx_b] = True
    out[idx_b] = b
    out[~from_b] = a
    return out, idx_b, from_b


def _merge_canonical(keys, values, new_keys, new_values, k):
    """Bottom-``k`` of two canonical samples (keys ascending): an O(k)
    merge; a key present in both (practically never) falls back to the
    full canonical sort."""
    pos = torch.searchsorted(keys, new_keys)
    inside = pos < keys.numel()
    if bool((keys[pos[inside]] == new_keys[inside]).any()):
        return _merge_samples([(keys, values), (new_keys, new_values)], k)
    merged_keys, idx_b, from_b = _merge_sorted(keys, new_keys, False)
    merged = values.new_empty(values.shape[0], merged_keys.numel())
    merged[:, idx_b] = new_values
    merged[:, ~from_b] = values
    if k is not None and merged_keys.numel() > k:
        merged_keys, merged = merged_keys[:k], merged[:, :k]
    return merged_keys, merged


def _merge_tails(parts, t, largest):
    """The ``t`` largest (descending) / smallest (ascending) values per row
    of the union of ``(C, *)`` tensors."""
    parts = [p for p in parts if p is not None and p.numel()]
    if not parts:
        return None
    cat = torch.cat(parts, dim=1)
    return cat.topk(min(t, cat.shape[1]), dim=1, largest=largest,
                    sorted=True).values


def _first_candidates(row, t, largest, sample):
    """A superset of the ``t`` extreme values of ``row`` (1-D, more than
    ``t`` values) and a bound ``thr`` with the ``t``-th extreme of ``row``
    at or beyond it. A threshold read from the call's uniform ``sample``
    pre-selects about ``1.25 t`` candidates (checked: at least ``t``), else
    one ``topk``."""
    n = row.numel()
    sample = sample.reshape(-1)
    m = sample.numel()
    j = math.ceil(1.25 * m * t / n) + 16
    if m >= 256 and j < m // 2:
        thr = float(sample.topk(j, largest=largest).values[-1])
        cand = row[row >= thr] if largest else row[row <= thr]
        if cand.numel() >= t:
            return cand, thr
    cand = row.topk(t, largest=largest, sorted=False).values
    return cand, float(cand.min() if largest else cand.max())


class _Tail:
    """The ``t`` largest (``largest``) or smallest values seen, per tensor.

    Kept lazily: ``buf`` (CPU) holds a superset of them (at most ``3 t``
    values) and ``thr`` a bound of the ``t``-th extreme, so a new tensor
    costs one comparison pass: only values beyond ``thr`` are appended; the
    buffer is cut back to the exact ``t`` extremes (one top-k, which also
    tightens ``thr``) when it exceeds ``2 t`` values or is read.
    """

    def __init__(self, t, largest):
        self.t = t
        self.largest = largest
        self.buf = None
        self.thr = None
        self.is_sorted = False

    def update(self, row, sample):
        t = self.t
        size = 0 if self.buf is None else self.buf.numel()
        if self.thr is not None:
            cand = row[row > self.thr] if self.largest else \
                row[row < self.thr]
            if cand.numel() == 0:
                return
        elif size + row.numel() <= 2 * t or row.numel() <= t:
            cand = row.clone()  # all of it (never a view of row)
        else:
            cand, self.thr = _first_candidates(row, t, self.largest, sample)
        if cand.numel() > t:
            cand = cand.topk(t, largest=self.largest, sorted=False).values
        cand = cand.cpu()
        self.buf = cand if self.buf is None else torch.cat([self.buf, cand])
        self.is_sorted = False
        if self.buf.numel() > 2 * t:
            self._compact()

    def _compact(self):
        k = min(self.t, self.buf.numel())
        self.buf = self.buf.topk(k, largest=self.largest, sorted=True).values
        self.is_sorted = True
        if k == self.t:
            self.thr = float(self.buf[-1])

    def values(self):
        """The exact extremes, sorted (descending for the largest), as a
        ``(1, min(t, count))`` tensor."""
        if self.buf is None:
            return None
        if not self.is_sorted:
            self._compact()
        return self.buf[None]

    def load(self, values):
        """Set from sorted extremes ``(1, k)``."""
        self.buf = values[0]
        self.is_sorted = True
        self.thr = float(self.buf[-1]) if self.buf.numel() == self.t \
            else None


def _update_tail(old, flat, t, largest, sample):
    """The extremes of ``old`` (a :class:`_Tail` when per tensor with
    ``t > 1``, else a sorted ``(C, t)`` CPU tensor) updated with ``flat``
    ``(C, n)``."""
    C, n = flat.shape
    if C == 1 and t > 1:
        old = old if old is not None else _Tail(t, largest)
        old.update(flat[0], sample)
        return old
    if t == 1:
        new = (flat.amax(1) if largest else flat.amin(1))[:, None]
    else:
        new = flat.topk(min(t, n), dim=1, largest=largest,
                        sorted=True).values
    new = new.cpu()
    if old is None:
        return new
    return _merge_tails([old, new], t, largest)


def _tail_values(tail):
    return tail.values() if isinstance(tail, _Tail) else tail


# ------------------------------------------------------------ quantiles
def _linear_index(n, q):
    """numpy's ``'linear'`` quantile: ``(prev, next, gamma)`` around the
    virtual index ``(n - 1) * q`` (same float64 arithmetic)."""
    vi = (n - 1) * q
    if vi >= n - 1:
        return n - 1, n - 1, vi - (n - 1)
    if vi < 0:
        return 0, 0, vi
    prev = math.floor(vi)
    return prev, prev + 1, vi - prev


def _lerp(a, b, g):
    """numpy's ``_lerp`` (float64)."""
    diff = b - a
    if g >= 0.5:
        return b - diff * (1 - g)
    return a + diff * g


def _abs_tail(top, bottom, count):
    """The ``min(T, count)`` largest ``|x|`` (descending) from the tails:
    each of them is a non-negative value of ``top`` or a negative value of
    ``bottom``."""
    cand = torch.cat([torch.where(top >= 0, top, -1.0),
                      torch.where(bottom < 0, -bottom, -1.0)], dim=1)
    k = min(top.shape[1], count)
    return cand.topk(k, dim=1, sorted=True).values


# ---------------------------------------------------------- grid search
def _grid_errors(s, lo, hi, bits, symmetric, eps, reduce='mean', sd=None):
    """Quantization errors of ``s`` ``(C, m)`` for each candidate range.

    ``lo`` / ``hi``: ``(G, C)``; ``sd``: ``s`` in float64 if at hand.
    Returns ``(errors (G, C) float64, scale, zero_point)``; the
    fake-quantization is bit-identical to
    :func:`~dfq_dense.quant.fake_quant.fake_quantize` (per channel), the
    squared differences are reduced in float64 (``'mean'`` or ``'sum'``,
    one row of ``m`` values at a time).
    Candidates are evaluated in batched chunks of about ``_GRID_BUDGET``
    values (whole rows; several channels and candidates per chunk where
    they fit), in two scratch buffers reused by every chunk. Symmetric
    zero points are 0, so they are not added / subtracted (that could
    only turn a ``-0.0`` into ``+0.0``, which squares to the same error).
    """
    scale, zp, qmin, qmax = range_to_qparams(lo, hi, bits, symmetric, eps)
    scale = scale.to(s.device)
    zp = zp.to(s.device)
    sd = s.double() if sd is None else sd
    G, C = scale.shape
    m = s.shape[1]
    c_step = C if C * m <= _GRID_BUDGET else max(1, _GRID_BUDGET // max(1, m))
    g_step = min(G, max(1, _GRID_BUDGET // max(1, c_step * m)))
    size = g_step * min(c_step, C) * m
    qbuf = s.new_empty(size)
    dbuf = sd.new_empty(size)
    out = torch.empty(G, C, dtype=torch.float64, device=s.device)
    for c0 in range(0, C, c_step):
        s_c, sd_c = s[c0:c0 + c_step], sd[c0:c0 + c_step]
        for g0 in range(0, G, g_step):
            sc = scale[g0:g0 + g_step, c0:c0 + c_step, None]
            shape = (sc.shape[0], sc.shape[1], m)
            n = shape[0] * shape[1] * m
            q = qbuf[:n].view(shape)
            torch.mul(s_c, 1.0 / sc, out=q)
            q.round_()
            if symmetric:
                q.clamp_(qmin, qmax)
            else:
                z = zp[g0:g0 + g_step, c0:c0 + c_step, None].to(s.dtype)
                q.add_(z).clamp_(qmin, qmax).sub_(z)
            q.mul_(sc)
            d = dbuf[:n].view(shape)
            d.copy_(q)
            d.sub_(sd_c)
            d.mul_(d)
            out[g0:g0 + g_step, c0:c0 + c_step] = \
                d.mean(dim=-1) if reduce == 'mean' else d.sum(dim=-1)
    return out, scale, zp


# ------------------------------------------------------- moving average
@TASK_UTILS.register_module()
class MovingAverageMinMaxObserver(MinMaxObserver):
    """EMA over calibration batches of the per-batch min / max.

    The min / max of every batch are recorded, keyed by the global batch
    index (:func:`~dfq_dense.quant.observers.calibration_step`; outside it
    every call is its own batch); several calls inside one batch (e.g. the
    RPN conv on 5 FPN levels) are merged by min / max. At compute time,
    in batch-index order: the first batch sets min / max, then ``min = (1 -
    momentum) * min + momentum * batch_min`` (same for max). The result
    does not depend on the order the batches ran in nor on the ranks they
    ran on; ``sync()`` all-gathers the per-batch records.

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
        self._clock = ObservationClock()
        self.records = {}  # (step, stream) -> (min, max), CPU float32
        self._ema = None

    @property
    def replicated(self):
        return self._clock.replicated

    @property
    def observed(self):
        return bool(self.records)

    @torch.no_grad()
    def observe(self, x):
        x = x.detach()
        if x.numel() == 0:
            return
        step, stream, _ = self._clock.tick()
        x = x.float()
        if self.granularity == 'tensor':
            cur_min, cur_max = x.min(), x.max()
        else:
            flat = _channels_first(x, self.ch_axis)
            cur_min, cur_max = flat.amin(dim=1), flat.amax(dim=1)
        self._record((step, stream), cur_min.cpu(), cur_max.cpu())

    def _record(self, key, mn, mx):
        old = self.records.get(key)
        if old is not None:
            mn, mx = torch.minimum(old[0], mn), torch.maximum(old[1], mx)
        self.records[key] = (mn, mx)
        self._ema = None

    def _compute(self):
        if self._ema is None and self.records:
            m = self.momentum
            mn = mx = None
            for key in sorted(self.records):
                cur_min, cur_max = self.records[key]
                if mn is None:
                    mn, mx = cur_min, cur_max
                else:
                    mn = (1 - m) * mn + m * cur_min
                    mx = (1 - m) * mx + m * cur_max
            self._ema = (mn, mx)
        return self._ema or (None, None)

    @property
    def min_val(self):
        return self._compute()[0]

    @property
    def max_val(self):
        return self._compute()[1]

    def sync(self):
        """All-gather the per-batch records of all ranks and merge them
        (collective; no-op when not distributed). A batch recorded on
        several ranks is merged by min / max."""
        if not dist.is_distributed() or self.replicated:
            return
        gathered = dist.all_gather_object(dict(self.records))
        self.records = {}
        for records in gathered:
            for key, (mn, mx) in records.items():
                self._record(key, mn, mx)


# ------------------------------------------------------- value keeping
class _SampleObserver:
    """Base of the observers that keep values (see the module docstring).

    State (CPU, bounded mode): ``count`` (values per channel seen),
    ``keys`` ``(m,)`` int64 ascending and ``samples`` ``(C, m)`` float32
    (the uniform sample, ``m <= max_samples``), ``top`` ``(C, t)``
    descending and ``bottom`` ``(C, t)`` ascending (the exact tails).
    ``max_samples=None`` keeps every observed tensor instead (on its
    device), concatenated in call-identity order.
    """

    DEFAULT_TAIL = 1

    def __init__(self, granularity='tensor', ch_axis=0, eps=1e-8,
                 max_samples=65536, tail=None):
        _check_granularity(self, granularity)
        if max_samples is not None and (isinstance(max_samples, bool) or
                                        int(max_samples) != max_samples or
                                        max_samples < 1):
            raise ValueError(f'max_samples must be an int >= 1 or None, got '
                             f'{max_samples!r}')
        tail = self.DEFAULT_TAIL if tail is None else tail
        if isinstance(tail, bool) or int(tail) != tail or tail < 1:
            raise ValueError(f'tail must be an int >= 1, got {tail!r}')
        self.granularity = granularity
        self.ch_axis = ch_axis
        self.eps = eps
        self.max_samples = None if max_samples is None else int(max_samples)
        self.tail = int(tail)
        self.reset()

    def reset(self):
        self._clock = ObservationClock()
        self.count = 0
        self.keys = None
        self._samples = None
        self._top = None
        self._bottom = None
        self._chunks = {}
        self._cache = {}
        self.estimated = []

    @property
    def observed(self):
        return self.count > 0

    @property
    def replicated(self):
        return self._clock.replicated

    @property
    def samples(self):
        """The kept values ``(C, m)`` (everything when unbounded)."""
        if self.max_samples is not None:
            return self._samples
        if not self._chunks:
            return None
        if len(self._chunks) == 1:
            return next(iter(self._chunks.values()))
        if 'all' not in self._cache:
            self._cache['all'] = torch.cat(
                [self._chunks[i] for i in sorted(self._chunks)], dim=1)
        return self._cache['all']

    def tail_len(self, channels):
        """Tail length per channel for ``channels`` channels."""
        return max(1, math.ceil(self.tail / channels))

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
        ident = self._clock.tick()
        self._cache = {}
        C, n = flat.shape
        self.count += n
        if self.max_samples is None:
            self._chunks[ident] = flat.clone()
            return
        keys, pos = bottom_k_keys(n, self.max_samples,
                                  ObservationClock.generator(ident))
        values = flat[:, pos.to(flat.device)].cpu()
        if self.keys is not None and self.keys.numel() >= self.max_samples:
            # Keys above the current k-th smallest cannot enter.
            keep = keys <= self.keys[-1]
            keys, new = keys[keep], values[:, keep]
        else:
            new = values
        if keys.numel():
            if bool((keys[1:] == keys[:-1]).any()):  # practically never
                keys, new = _canonical(keys, new)
            if self.keys is None:
                self.keys, self._samples = keys, new
            else:
                self.keys, self._samples = _merge_canonical(
                    self.keys, self._samples, keys, new, self.max_samples)
        t = self.tail_len(C)
        self._top = _update_tail(self._top, flat, t, True, values)
        self._bottom = _update_tail(self._bottom, flat, t, False, values)

    @property
    def top(self):
        """The exact largest values ``(C, t)``, descending."""
        return _tail_values(self._top)

    @property
    def bottom(self):
        """The exact smallest values ``(C, t)``, ascending."""
        return _tail_values(self._bottom)

    # ----------------------------------------------------------- sync
    def _export(self):
        return dict(count=self.count, keys=self.keys, samples=self._samples,
                    top=self.top, bottom=self.bottom,
                    chunks={i: c.cpu() for i, c in self._chunks.items()},
                    steps=sorted(self._clock.steps))

    def sync(self):
        """All-gather every rank's statistics and merge them (collective;
        no-op when not distributed or when only replicated data was
        observed): counts add up, samples are the bottom-k of the union,
        tails the extremes of the union, so the result equals one process
        observing every rank's batches."""
        if not dist.is_distributed() or self.replicated:
            return
        states = dist.all_gather_object(self._export())
        seen, twice = set(), set()
        for st in states:
            twice |= seen & set(st['steps'])
            seen |= set(st['steps'])
        if twice:
            print_log(f'{type(self).__name__}.sync: calibration batches '
                      f'{sorted(twice)[:5]} were observed on several ranks; '
                      'their values count once per rank', logger='current',
                      level=logging.WARNING)
        device = next(iter(self._chunks.values())).device \
            if self._chunks else 'cpu'
        self._cache = {}
        self.count = sum(st['count'] for st in states)
        self._clock.steps = seen
        if self.max_samples is None:
            chunks = {}
            for st in states:
                chunks.update(st['chunks'])
            self._chunks = {i: c.to(device) for i, c in chunks.items()}
            self.count = sum(c.shape[1] for c in chunks.values())
            return
        self.keys, self._samples = _merge_samples(
            [(st['keys'], st['samples']) for st in states], self.max_samples)
        if self.count:
            t = self.tail_len(self._samples.shape[0])
            top = _merge_tails([st['top'] for st in states], t, True)
            bottom = _merge_tails([st['bottom'] for st in states], t, False)
            if top.shape[0] == 1 and t > 1:
                self._top, self._bottom = _Tail(t, True), _Tail(t, False)
                self._top.load(top)
                self._bottom.load(bottom)
            else:
                self._top, self._bottom = top, bottom

    # ------------------------------------------------------ statistics
    def _require(self):
        if not self.observed:
            raise RuntimeError(f'{type(self).__name__}.compute_qparams: '
                               'nothing has been observed')

    def _tails(self):
        """``(top, bottom)``: complete (sorted everything) if unbounded."""
        if self.max_samples is not None:
            return self.top, self.bottom
        if 'tails' not in self._cache:
            s = self.samples
            top = s.sort(dim=1, descending=True).values
            self._cache['tails'] = (top, top.flip(1))
        return self._cache['tails']

    def min_max(self):
        """Exact per-channel ``(min, max)`` of everything observed
        (float32, ``(C,)``)."""
        self._require()
        if self.max_samples is None:
            s = self.samples
            return s.amin(dim=1), s.amax(dim=1)
        return self.bottom[:, 0], self.top[:, 0]

    def _float64(self):
        """The kept values in float64 (cached until the next change or
        the end of ``compute_qparams``)."""
        if 'float64' not in self._cache:
            self._cache['float64'] = self.samples.double()
        return self._cache['float64']

    def _sorted_sample(self, absolute):
        key = ('sorted', absolute)
        if key not in self._cache:
            s = self._float64()
            self._cache[key] = (s.abs() if absolute else s).sort(dim=1).values
        return self._cache[key]

    def quantile(self, q, absolute=False):
        """The ``q``-quantile (``0 <= q <= 1``, numpy's ``'linear'``) of
        every observed value (of ``|x|`` if ``absolute``), per channel.

        Returns ``(value (C,) float64, exact)``: exact when both order
        statistics around ``(N - 1) q`` are in the tails (or everything is
        kept); otherwise the same quantile of the uniform sample.
        """
        self._require()
        n = self.count
        top, bottom = self._tails()
        if absolute:
            top = self._cache.get('abs_tail')
            if top is None:
                top = _abs_tail(*self._tails(), n)
                self._cache['abs_tail'] = top
            bottom = None
        prev, nxt, gamma = _linear_index(n, q)

        def order_stat(j):
            if n - 1 - j < top.shape[1]:
                return top[:, n - 1 - j].double()
            if bottom is not None and j < bottom.shape[1]:
                return bottom[:, j].double()
            return None

        a = order_stat(prev)
        b = a if gamma == 0 else order_stat(nxt)
        if a is not None and b is not None:
            return _lerp(a, b, gamma), True
        s = self._sorted_sample(absolute)
        m = s.shape[1]
        prev, nxt, gamma = _linear_index(m, q)
        return _lerp(s[:, prev], s[:, nxt], gamma), m == n

    def _squeeze(self, t):
        return t.reshape(()) if self.granularity == 'tensor' else t

    def __repr__(self):
        return (f'{type(self).__name__}(granularity={self.granularity!r}, '
                f'ch_axis={self.ch_axis}, max_samples={self.max_samples}, '
                f'tail={self.tail})')


@TASK_UTILS.register_module()
class PercentileObserver(_SampleObserver):
    """Percentile range of every observed value.

    Asymmetric: ``[q(100 - p), q(p)]``; symmetric: ``q_{|x|}(p)``; quantiles
    with linear interpolation (``numpy.percentile`` default), float64,
    exact from the tails when they hold the order statistics (always for
    ``p >= 100 - 100 * (tail - 1) / N``), else estimated on the uniform
    sample (listed in ``estimated``). ``percentile=100`` gives the exact
    min/max.

    Args:
        percentile (float): in (0, 100].
        max_samples (int | None): bound of the uniform sample (per channel).
        tail (int): extreme values kept exactly on each side (per tensor;
            ``ceil(tail / C)`` per channel).
    """

    DEFAULT_TAIL = DEFAULT_TAIL

    def __init__(self, percentile=99.99, granularity='tensor', ch_axis=0,
                 eps=1e-8, max_samples=65536, tail=None):
        self.percentile = check_percentile(percentile)
        super().__init__(granularity, ch_axis, eps, max_samples, tail)

    def _range(self, percentile, symmetric):
        """``(lo, hi)`` float32 ``(C,)`` of one percentile."""
        if symmetric:
            hi, exact = self.quantile(percentile / 100.0, absolute=True)
            lo = -hi
        else:
            hi, ex_hi = self.quantile(percentile / 100.0)
            lo, ex_lo = self.quantile((100.0 - percentile) / 100.0)
            exact = ex_hi and ex_lo
        if not exact:
            self.estimated.append(percentile)
            print_log(f'{type(self).__name__}: percentile {percentile} '
                      f'estimated on a uniform sample of '
                      f'{self.samples.shape[1]} of {self.count} values',
                      logger='current', level=logging.DEBUG)
        return lo.float(), hi.float()

    def compute_range(self, symmetric):
        """``(lo, hi)`` float32 (0-dim or 1-D)."""
        self._require()
        self.estimated = []
        lo, hi = self._range(self.percentile, symmetric)
        return self._squeeze(lo), self._squeeze(hi)

    @torch.no_grad()
    def compute_qparams(self, bits, symmetric):
        lo, hi = self.compute_range(symmetric)
        self._cache = {}  # sorted copies
        return range_to_qparams(lo, hi, bits, symmetric, self.eps)


@TASK_UTILS.register_module()
class PercentileSearchObserver(PercentileObserver):
    """The percentile (from ``candidates``) whose range minimises the mean
    squared quantization error (float64) of the uniform sample (of
    everything when everything is kept), per channel for ``'channel'``;
    the first candidate wins a tie. RepQ-ViT searches {99.9, 99.99,
    99.999} (its default here) and 100 (min/max). The candidate ranges are
    the quantiles of :class:`PercentileObserver`.

    Args:
        candidates (Sequence[float]): percentiles in (0, 100].
        max_samples (int | None): bound of the uniform sample (per channel).
        tail (int): as :class:`PercentileObserver`.
    """

    def __init__(self, candidates=(99.9, 99.99, 99.999, 100.0),
                 granularity='tensor', ch_axis=0, eps=1e-8,
                 max_samples=65536, tail=None):
        if not candidates:
            raise ValueError('candidates must not be empty')
        self.candidates = [check_percentile(p) for p in candidates]
        super().__init__(self.candidates[0], granularity, ch_axis, eps,
                         max_samples, tail)

    @torch.no_grad()
    def compute_qparams(self, bits, symmetric):
        self._require()
        self.estimated = []
        ranges = [self._range(p, symmetric) for p in self.candidates]
        lo = torch.stack([r[0] for r in ranges])
        hi = torch.stack([r[1] for r in ranges])
        errs, scale, zp = _grid_errors(self.samples, lo, hi, bits, symmetric,
                                       self.eps, sd=self._float64())
        best = errs.argmin(dim=0, keepdim=True)  # first minimum
        qmin, qmax = qrange(bits, symmetric)
        self._cache = {}
        return (self._squeeze(scale.gather(0, best)[0]),
                self._squeeze(zp.gather(0, best)[0]), qmin, qmax)


@TASK_UTILS.register_module()
class MSEObserver(_SampleObserver):
    """Grid search of the clipping range minimising the quantization MSE.

    Candidates: ``alpha_k = k / grid`` for ``k = 1..grid`` (so ``alpha = 1``
    is the plain min/max range). For each candidate the range ``[alpha *
    min, alpha * max]`` (the exact min/max of everything observed, per
    channel for ``'channel'``; symmetric: ``alpha * max|x|``) is turned
    into qparams by :func:`range_to_qparams`, the uniform sample (or
    everything, when kept) is fake-quantized and the mean squared error
    (float64) is measured, all candidates at once. The first (smallest)
    ``alpha`` with the minimal error wins; channels are searched
    independently.

    Args:
        grid (int): number of candidates.
        max_samples (int | None): bound of the uniform sample (per channel).
        tail (int): extreme values kept exactly (default 1: min / max).
    """

    _reduce = 'mean'

    def __init__(self, grid=100, granularity='tensor', ch_axis=0, eps=1e-8,
                 max_samples=65536, tail=None):
        if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
            raise ValueError(f'grid must be a positive int, got {grid!r}')
        self.grid = grid
        super().__init__(granularity, ch_axis, eps, max_samples, tail)

    def _alphas(self):
        return [k / self.grid for k in range(1, self.grid + 1)]

    def _errors_at(self, alphas, bits, symmetric):
        """Errors ``(G, C)`` of the ranges ``alphas * [min, max]``
        (``alphas``: ``(G, C)`` or ``(G, 1)`` float32)."""
        mn, mx = self.min_max()
        alphas = alphas.to(mn.device)
        errs, _, _ = _grid_errors(self.samples, mn[None] * alphas,
                                  mx[None] * alphas, bits, symmetric,
                                  self.eps, self._reduce, self._float64())
        return errs

    def search(self, bits, symmetric):
        """Best ``alpha`` per channel (float32, ``(C,)``) and its error."""
        self._require()
        alphas = torch.tensor(self._alphas(), dtype=torch.float32)
        errs = self._errors_at(alphas[:, None], bits, symmetric)
        best = errs.argmin(dim=0)  # first minimum
        return alphas.to(best.device)[best], errs.gather(0, best[None])[0]

    @torch.no_grad()
    def compute_qparams(self, bits, symmetric):
        alpha, _ = self.search(bits, symmetric)
        mn, mx = self.min_max()
        alpha = alpha.to(mn.device)
        scale, zp, qmin, qmax = range_to_qparams(mn * alpha, mx * alpha, bits,
                                                 symmetric, self.eps)
        self._cache = {}  # float64 copy of the values
        return self._squeeze(scale), self._squeeze(zp), qmin, qmax


@TASK_UTILS.register_module()
class OMSEObserver(MSEObserver):
    """OMSE clipping for weights: minimise ``||W - Q(W)||_2``.

    Same candidate scan as :class:`MSEObserver` (``alpha = k / grid``,
    ``k = 1..grid``, error = sum of squares, i.e. the squared L2 norm, per
    channel or per tensor) on the whole observed tensor (``max_samples=None``
    by default: exact), followed (``refine_iters > 0``) by a golden-section
    search of ``alpha`` in ``[(k*-1)/grid, min((k*+1)/grid, 1)]`` around the
    best grid point ``k*`` for each channel; a refined ``alpha`` replaces
    the grid one only where its error is strictly lower. With a bound, the
    sums run over the uniform sample (proportional to an unbiased estimate
    of the full sum).

    Args:
        grid (int): number of grid candidates.
        refine_iters (int): golden-section iterations (0: grid only).
        max_samples (int | None): bound of the kept sample (per channel).
        tail (int): extreme values kept exactly (default 1: min / max).
    """

    _reduce = 'sum'

    def __init__(self, grid=100, refine_iters=20, granularity='channel',
                 ch_axis=0, eps=1e-8, max_samples=None, tail=None):
        if refine_iters < 0:
            raise ValueError(f'refine_iters must be >= 0, got '
                             f'{refine_iters!r}')
        self.refine_iters = int(refine_iters)
        super().__init__(grid, granularity, ch_axis, eps, max_samples, tail)

    def _err_at(self, alpha, bits, symmetric):
        """Per-channel error for per-channel ``alpha`` (``(C,)``)."""
        return self._errors_at(alpha[None], bits, symmetric)[0]

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
