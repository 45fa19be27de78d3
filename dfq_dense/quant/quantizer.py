"""``Quantizer``: a tensor-quantizer descriptor (observer + qparams + mode).

Modes (``Quantizer.state``):

* ``'disabled'``: identity. A fresh quantizer starts here.
* ``'calibrating'``: forward feeds ``x`` to the observer and returns ``x``
  unchanged, so calibration runs in full precision.
* ``'quantizing'``: forward returns ``fake_quantize(x, scale, zero_point)``.

Typical use: ``enable_calibration()`` -> run data -> ``finish_calibration()``
(syncs the observer across ranks, computes the qparams and switches to
``'quantizing'``); ``disable()`` / ``enable()`` toggle between identity and
quantization afterwards.
"""
import torch
import torch.nn as nn
from mmengine.logging import print_log

from ..registry import MODELS, TASK_UTILS, build
from .fake_quant import fake_quantize
from .observers import qrange, range_to_qparams

__all__ = ['Quantizer', 'check_bits']

GRANULARITIES = ('tensor', 'channel', 'token')


def check_bits(bits, name='bits'):
    """Raise ValueError unless ``bits`` is an int in 2..16."""
    if isinstance(bits, bool) or not isinstance(bits, int) or \
            not 2 <= bits <= 16:
        raise ValueError(f'{name} must be an integer in 2-16, got {bits!r}')
    return bits


def _finite(x):
    """Whether ``x`` holds no NaN / Inf: one min/max pass (NaN propagates
    through both), cheaper than ``isfinite(x).all()`` on large tensors."""
    lo, hi = torch.aminmax(x.detach())
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


@MODELS.register_module()
class Quantizer(nn.Module):
    """Fake-quantizes a tensor with observer-calibrated parameters.

    Args:
        bits (int): bit width, 2..16 (16 is *not* special-cased).
        symmetric (bool): symmetric signed grid (weights) or asymmetric
            unsigned grid (activations).
        granularity (str): ``'tensor'``, ``'channel'`` or ``'token'``.
            ``'token'`` is dynamic per-token activation quantization: at
            every forward the qparams are computed from the current tensor
            with min/max over the last dim (one scale / zero point per
            token, i.e. per index of all the other dims; the same formulas
            as :class:`MinMaxObserver`). Nothing is calibrated: ``observer``
            is ignored (``self.observer`` is None), the quantizer counts as
            calibrated from the start and ``finish_calibration()`` just
            switches it to ``'quantizing'``. The ``scale`` / ``zero_point``
            buffers are unused. The qparams are detached (gradient to ``x``
            only, straight-through as in :func:`fake_quantize`).
        ch_axis (int): channel axis for ``granularity='channel'``.
        observer (dict): observer config, built from ``TASK_UTILS``.
    """

    STATES = ('disabled', 'calibrating', 'quantizing')

    def __init__(self, bits=8, symmetric=False, granularity='tensor',
                 ch_axis=0, observer=dict(type='MinMaxObserver')):
        super().__init__()
        self.bits = check_bits(bits, 'Quantizer bits')
        if granularity not in GRANULARITIES:
            raise ValueError(f'Quantizer granularity must be one of '
                             f'{GRANULARITIES}, got {granularity!r}')
        self.symmetric = bool(symmetric)
        self.granularity = granularity
        self.ch_axis = ch_axis
        self.quant_min, self.quant_max = qrange(self.bits, self.symmetric)
        if granularity == 'token':
            self.observer = None
        else:
            self.observer = build(
                TASK_UTILS, observer,
                default_args=dict(granularity=granularity, ch_axis=ch_axis))
        self.register_buffer('scale', torch.tensor(1.0))
        self.register_buffer('zero_point',
                             torch.tensor(0, dtype=torch.int32))
        self.state = 'disabled'
        self.calibrated = granularity == 'token'
        # Calibration bookkeeping, read by the quantization report:
        # ``nonfinite``: a calibration input held NaN/Inf; ``unobserved``:
        # calibration finished without any data reaching this quantizer.
        self.nonfinite = False
        self.unobserved = False
        self.seen = 0  # non-empty tensors seen while calibrating

    # ----------------------------------------------------------------- modes
    def enable_calibration(self):
        """Reset the observer and observe (FP pass-through) from now on."""
        if self.observer is not None:
            self.observer.reset()
        self.nonfinite = False
        self.unobserved = False
        self.seen = 0
        self.state = 'calibrating'

    def finish_calibration(self, name=None, sync=True):
        """Sync the observer, compute qparams and start quantizing.

        If nothing was observed (the tensor never reached this quantizer),
        the quantizer is left disabled (FP), ``unobserved`` is set and a
        warning is logged; the DFQ loop refuses such a run unless told to
        allow it.  ``sync=False`` skips the all-reduce (weights: every rank
        holds the same tensor, merging copies would count it twice).
        """
        if self.observer is None:
            # Per-token (dynamic) quantizers, and ones whose qparams were
            # fixed by a LayerNorm reparameterisation: nothing to compute.
            self.state = 'quantizing' if self.calibrated else 'disabled'
            return
        if sync:
            self.observer.sync()
        if not self.observer.observed:
            print_log(f'Quantizer {name or ""} observed no data; it stays '
                      'disabled (full precision).', logger='current',
                      level=30)
            self.unobserved = True
            self.state = 'disabled'
            return
        scale, zero_point, qmin, qmax = self.observer.compute_qparams(
            self.bits, self.symmetric)
        assert (qmin, qmax) == (self.quant_min, self.quant_max)
        self.scale = scale.to(self.scale.device)
        self.zero_point = zero_point.to(self.zero_point.device)
        self.calibrated = True
        self.state = 'quantizing'

    def disable(self):
        """Pass tensors through unchanged."""
        self.state = 'disabled'

    def enable(self):
        """Quantize (requires calibrated or loaded qparams)."""
        if not self.calibrated:
            raise RuntimeError('Quantizer.enable(): not calibrated; run '
                               'enable_calibration()/finish_calibration() '
                               'or load qparams first')
        self.state = 'quantizing'

    @property
    def enabled(self):
        return self.state == 'quantizing'

    # --------------------------------------------------------------- forward
    def forward(self, x):
        if self.state == 'calibrating':
            if x.numel():
                self.seen += 1
            if self.observer is not None:
                if x.numel() and not _finite(x):
                    # Recorded, not observed: the DFQ loop stops the run
                    # naming this quantizer (NaN would poison the range).
                    self.nonfinite = True
                    return x
                self.observer.observe(x)
            return x
        if self.state == 'disabled':
            return x
        if self.granularity == 'token':
            return self._forward_token(x)
        return fake_quantize(
            x, self.scale, self.zero_point, self.quant_min, self.quant_max,
            ch_axis=self.ch_axis if self.granularity == 'channel' else None)

    def token_qparams(self, x):
        """Per-token ``(scale, zero_point)`` of ``x`` (1-D, one per row of
        ``x.reshape(-1, x.shape[-1])``), MinMaxObserver's formulas."""
        flat = x.detach().float().reshape(-1, x.shape[-1])
        scale, zp, _, _ = range_to_qparams(flat.amin(dim=1),
                                           flat.amax(dim=1), self.bits,
                                           self.symmetric)
        return scale, zp

    def _forward_token(self, x):
        if x.numel() == 0:
            return x
        scale, zp = self.token_qparams(x)
        out = fake_quantize(x.reshape(-1, x.shape[-1]), scale.to(x.dtype),
                            zp, self.quant_min, self.quant_max, ch_axis=0)
        return out.reshape(x.shape)

    # ------------------------------------------------------------ state dict
    def _load_from_state_dict(self, state_dict, prefix, local_metadata,
                              strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Per-channel qparams have a size known only after calibration:
        # adopt the saved shapes.
        loaded = False
        for name in ('scale', 'zero_point'):
            key = prefix + name
            if key in state_dict:
                cur = getattr(self, name)
                setattr(self, name, torch.empty_like(
                    cur, device=cur.device).resize_(state_dict[key].shape))
                loaded = True
        super()._load_from_state_dict(state_dict, prefix, local_metadata,
                                      strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if loaded:
            self.calibrated = True

    def extra_repr(self):
        s = (f'bits={self.bits}, symmetric={self.symmetric}, '
             f'granularity={self.granularity}')
        if self.granularity == 'channel':
            s += f', ch_axis={self.ch_axis}'
        return s + f', state={self.state}'
