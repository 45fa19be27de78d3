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
"""
import torch
from mmengine import dist

from ..registry import TASK_UTILS

__all__ = ['MinMaxObserver', 'qrange', 'range_to_qparams']


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
        """Make min/max identical on all ranks (no-op when not distributed).

        All ranks must call it (collective). For ``granularity='channel'``
        every rank must have observed data (the channel count is unknown
        otherwise).
        """
        if not dist.is_distributed():
            return
        if self.min_val is None:
            raise RuntimeError('MinMaxObserver.sync: per-channel observer '
                               'has observed no data on this rank')
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
