"""Range observers that turn observed statistics into quantization params.

An observer is a plain Python object (not an ``nn.Module``), so it adds
nothing to a model's ``state_dict``; only the resulting ``scale`` and
``zero_point`` (buffers of :class:`~dfq_dense.quant.quantizer.Quantizer`) are
saved.

Quantization parameters of :class:`MinMaxObserver`:

* symmetric (weights): ``scale = max|x| / ((2^b - 1) / 2)``, ``zero_point = 0``,
  integers in ``[-2^(b-1), 2^(b-1) - 1]``.
* asymmetric (activations): the observed range is first extended to contain
  0 (``min <= 0 <= max``). Otherwise, for an all-positive range (e.g. after
  GELU/softmax with min > 0) the ideal zero point ``-min / scale`` would be
  negative, i.e. outside the integer grid ``[0, 2^b - 1]``; clamping it would
  shift the whole grid and clip the top of the range (and symmetrically for
  an all-negative range). Including 0 also makes 0 (padding, masked values)
  exactly representable. Then ``scale = (max - min) / (2^b - 1)`` and
  ``zero_point = clamp(round(-min / scale), 0, 2^b - 1)``.
* ``scale`` is never below ``eps`` (1e-8), so a constant-zero tensor gives a
  valid (tiny) scale instead of a division by zero.

Calibration steps
-----------------

Observers that sample or average over batches (see
:mod:`~dfq_dense.quant.calibrators`) identify every ``observe`` call by
``(step, stream, call)``:

* inside :func:`calibration_step` (what the DFQ loop wraps around each
  calibration forward), ``step`` is the *global* batch index and ``call``
  counts the observer's own calls inside that step (e.g. the RPN conv runs
  once per FPN level); ``stream = 0``. The identity, hence the random
  sample drawn from that call, depends only on the batch, not on the rank
  that ran it or on the order of the batches.
* inside :func:`replicated_observation` (data every rank holds identically,
  i.e. layer weights): a per-observer counter, ``stream = 1``; the state
  is the same on every rank and ``sync()`` leaves it alone.
* otherwise (unit tests, direct calls): every call is its own step of a
  per-observer counter, ``stream = 2 + rank``.
"""
from contextlib import contextmanager

import torch
from mmengine import dist

from ..registry import TASK_UTILS

__all__ = ['MinMaxObserver', 'qrange', 'range_to_qparams',
           'calibration_step', 'current_calibration_step',
           'replicated_observation', 'ObservationClock']

_CONTEXT = dict(step=None, replicated=False)

STEP_STREAM, REPLICATED_STREAM, AUTO_STREAM = 0, 1, 2


@contextmanager
def calibration_step(index):
    """Mark the observations made inside as belonging to calibration batch
    ``index`` (the *global* batch index, an int >= 0)::

        with calibration_step(b):
            model.test_step(batch_b)

    Observers key what they keep by the batch: the random sample a batch
    contributes is seeded from ``(index, call number within the batch)``
    and the moving average is taken over batches in index order, so the
    statistics do not depend on which rank ran the batch nor on the order
    of the batches. In a distributed run every global batch must be
    observed by exactly one rank (sharded calibration); ``sync()`` then
    merges the ranks into the state one process observing every batch
    would have. Contexts nest (the innermost wins).
    """
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f'calibration_step index must be an int >= 0, got '
                         f'{index!r}')
    previous = _CONTEXT['step']
    _CONTEXT['step'] = int(index)
    try:
        yield
    finally:
        _CONTEXT['step'] = previous


def current_calibration_step():
    """The index of the enclosing :func:`calibration_step`, or None."""
    return _CONTEXT['step']


@contextmanager
def replicated_observation():
    """Observations made inside see the same data on every rank (layer
    weights): their random keys do not depend on the rank, and an observer
    that only observed such data skips the merge in ``sync()`` (merging
    identical copies would count them once per rank)."""
    previous = _CONTEXT['replicated']
    _CONTEXT['replicated'] = True
    try:
        yield
    finally:
        _CONTEXT['replicated'] = previous


def _mix64(x):
    """splitmix64 finaliser (64-bit avalanche)."""
    x &= 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


class ObservationClock:
    """Per-observer identity of the ``observe`` calls (module docstring).

    Attributes:
        replicated (bool | None): None before any call; True while every
            call was made inside :func:`replicated_observation`.
        steps (set[int]): the calibration steps observed.
    """

    def __init__(self):
        self.reset()

    def reset(self):
        self._auto = 0
        self._calls = {}
        self.steps = set()
        self.replicated = None

    def tick(self):
        """``(step, stream, call)`` of a new observe call."""
        rep = _CONTEXT['replicated']
        self.replicated = rep if self.replicated is None else \
            (self.replicated and rep)
        step = None if rep else _CONTEXT['step']
        if step is None:
            ident = (self._auto, REPLICATED_STREAM if rep else
                     AUTO_STREAM + dist.get_rank(), 0)
            self._auto += 1
            return ident
        call = self._calls.get(step, 0)
        self._calls[step] = call + 1
        self.steps.add(step)
        return (step, STEP_STREAM, call)

    @staticmethod
    def seed(ident):
        """Deterministic 63-bit seed of an identity."""
        h = 0x9E3779B97F4A7C15
        for v in ident:
            h = _mix64(h ^ (int(v) & 0xFFFFFFFFFFFFFFFF))
            h = (h + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        return _mix64(h) & 0x7FFFFFFFFFFFFFFF

    @classmethod
    def generator(cls, ident):
        """A CPU ``torch.Generator`` seeded from ``ident``."""
        return torch.Generator().manual_seed(cls.seed(ident))


def qrange(bits, symmetric):
    """Integer grid ``(quant_min, quant_max)`` for ``bits``."""
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


def range_to_qparams(min_val, max_val, bits, symmetric, eps=1e-8):
    """``(scale, zero_point, qmin, qmax)`` of the range ``[min_val, max_val]``
    (tensors, 0-dim or 1-D), with the conventions of the module docstring."""
    qmin, qmax = qrange(bits, symmetric)
    min_val = min_val.float()
    max_val = max_val.float()
    if symmetric:
        amax = torch.maximum(min_val.abs(), max_val.abs())
        scale = (amax / ((2 ** bits - 1) / 2)).clamp(min=eps)
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
    else:
        min_val = min_val.clamp(max=0)
        max_val = max_val.clamp(min=0)
        scale = ((max_val - min_val) / float(2 ** bits - 1)).clamp(min=eps)
        zero_point = torch.round(-min_val / scale).clamp(qmin, qmax).to(
            torch.int32)
    return scale, zero_point, qmin, qmax


@TASK_UTILS.register_module()
class MinMaxObserver:
    """Running min/max over every :meth:`observe` call.

    Args:
        granularity (str): ``'tensor'`` or ``'channel'``.
        ch_axis (int): channel axis for ``granularity='channel'``.
        eps (float): smallest allowed scale.
    """

    GRANULARITIES = ('tensor', 'channel')

    def __init__(self, granularity='tensor', ch_axis=0, eps=1e-8):
        if granularity not in self.GRANULARITIES:
            raise ValueError(f'MinMaxObserver granularity must be one of '
                             f'{self.GRANULARITIES}, got {granularity!r}')
        self.granularity = granularity
        self.ch_axis = ch_axis
        self.eps = eps
        self.reset()

    def reset(self):
        """Forget everything observed so far."""
        self.replicated = None
        if self.granularity == 'tensor':
            # +inf / -inf sentinels: a rank that saw nothing still takes
            # part in sync() with a neutral element.
            self.min_val = torch.tensor(float('inf'))
            self.max_val = torch.tensor(float('-inf'))
        else:
            # Per-channel size is only known once data is seen.
            self.min_val = None
            self.max_val = None

    @property
    def observed(self):
        """Whether any (non-empty) data has been observed."""
        if self.min_val is None:
            return False
        return bool(torch.isfinite(self.min_val).all()
                    and torch.isfinite(self.max_val).all())

    @torch.no_grad()
    def observe(self, x):
        """Update the running min/max with ``x`` (empty tensors ignored)."""
        x = x.detach()
        if x.numel() == 0:
            return
        rep = _CONTEXT['replicated']
        self.replicated = rep if self.replicated is None else \
            (self.replicated and rep)
        x = x.float()
        if self.granularity == 'tensor':
            cur_min, cur_max = x.min(), x.max()
        else:
            flat = x.transpose(0, self.ch_axis % x.dim()).reshape(
                x.shape[self.ch_axis], -1)
            cur_min, cur_max = flat.amin(dim=1), flat.amax(dim=1)
        if self.min_val is None:
            self.min_val, self.max_val = cur_min, cur_max
        else:
            self.min_val = torch.minimum(self.min_val.to(cur_min.device),
                                         cur_min)
            self.max_val = torch.maximum(self.max_val.to(cur_max.device),
                                         cur_max)

    def sync(self):
        """Make min/max identical on all ranks (no-op when not distributed
        or when only replicated data, i.e. weights, was observed).

        All ranks must call it (collective): all-reduce of min and max
        (exact and order-independent). A rank that saw nothing takes part
        with +-inf sentinels; for ``granularity='channel'`` the ranks first
        agree on the channel count (all-reduce max), since with sharded
        calibration a rank may have had no batch at all.
        """
        if not dist.is_distributed() or self.replicated:
            return
        if self.granularity == 'channel':
            n = torch.tensor(0 if self.min_val is None else
                             self.min_val.numel())
            dist.all_reduce(n, op='max')
            if int(n) == 0:
                return  # no rank saw anything
            if self.min_val is None:
                self.min_val = torch.full((int(n), ), float('inf'))
                self.max_val = torch.full((int(n), ), float('-inf'))
        min_val = self.min_val.clone()
        max_val = self.max_val.clone()
        dist.all_reduce(min_val, op='min')
        dist.all_reduce(max_val, op='max')
        self.min_val, self.max_val = min_val, max_val

    @torch.no_grad()
    def compute_qparams(self, bits, symmetric):
        """Return ``(scale, zero_point, quant_min, quant_max)``.

        ``scale`` is a float32 tensor, ``zero_point`` an int32 tensor; both
        0-dim for per-tensor and 1-D for per-channel observers.
        """
        if not self.observed:
            raise RuntimeError(f'{type(self).__name__}.compute_qparams: '
                               'nothing has been observed')
        return range_to_qparams(self.min_val, self.max_val, bits, symmetric,
                                self.eps)

    def __repr__(self):
        return (f'{type(self).__name__}(granularity={self.granularity!r}, '
                f'ch_axis={self.ch_axis})')
