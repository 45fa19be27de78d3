"""Quantizers for post-softmax attention probabilities (values in [0, 1]).

``SoftmaxQuantizer(bits, mode)`` is a :class:`Quantizer` (so the converter's
``enable_calibration`` / ``finish_calibration`` / ``set_quantizers_enabled``
and ``quant_state_dict`` handle it), starting ``'disabled'`` like every
quantizer. With ``b = bits`` and ``qmax = 2^b - 1``:

* ``'uniform'``: asymmetric uniform grid, zero point 0, integers
  ``0..qmax``. With ``observer=None`` (default) the range is the fixed
  ``[0, 1]``: ``scale = 1 / qmax`` and no calibration is needed. With an
  observer config the scale is calibrated on data exactly like an
  asymmetric :class:`Quantizer` (for inputs >= 0 the range is ``[0,
  max]``, so the zero point is 0).
* ``'log2'``: ``q = clamp(round(-log2 x), 0, qmax)``, ``x_hat = 2^-q``.
  Zero convention: the code is computed before clamping; where
  ``round(-log2 x) > qmax`` (i.e. ``x < 2^-(qmax + 1/2)``, the rounding
  midpoint in the log domain, including ``x = 0``) the output is exactly 0.
  Inputs ``x <= 0`` give 0 and inputs ``> 1`` give 1 (``q`` clamped to 0).
* ``'log_sqrt2'`` (RepQ-ViT style, powers of sqrt(2)):
  ``q = clamp(round(-2 log2 x), 0, qmax)``, ``x_hat = 2^(-q / 2)``; zero
  handling as for ``'log2'``: output 0 where ``round(-2 log2 x) > qmax``
  (``x < 2^-((qmax + 1/2) / 2)``) or ``x <= 0``.

Rounding is ``torch.round`` (half to even) everywhere.

Gradients (round straight-through estimator): uniform mode uses
:func:`fake_quantize`'s STE (1 inside the range, 0 where clamped). The log
modes apply the STE to the rounding in the log domain, so ``d x_hat / d x =
x_hat / x`` where ``x`` is in range (``x <= 1`` and not mapped to 0), and 0
where the output is clamped (``x > 1``) or mapped to 0.
"""
import torch

from ..registry import MODELS
from .fake_quant import fake_quantize, round_ste
from .quantizer import Quantizer, _finite

__all__ = ['SoftmaxQuantizer', 'SOFTMAX_MODES', 'LOG_MODES',
           'log2_quantize', 'log_sqrt2_quantize']

SOFTMAX_MODES = ('uniform', 'log2', 'log_sqrt2')
LOG_MODES = ('log2', 'log_sqrt2')


def _log_quantize(x, bits, base_mult):
    """``x_hat = 2^(-q / base_mult)``, ``q = clamp(round(-base_mult *
    log2 x), 0, 2^bits - 1)``; 0 where the unclamped code exceeds the
    grid or ``x <= 0``."""
    qmax = 2 ** bits - 1
    pos = x > 0
    x_safe = torch.where(pos, x, torch.ones_like(x))
    t = round_ste(-base_mult * torch.log2(x_safe))
    zero = (~pos) | (t.detach() > qmax)
    q = t.clamp(min=0)  # clamp(max=qmax) is not needed: those are zeroed
    out = torch.exp2(-q / base_mult)
    return torch.where(zero, torch.zeros_like(out), out)


def log2_quantize(x, bits):
    """Log2 fake quantization (see the module docstring)."""
    return _log_quantize(x, bits, 1.0)


def log_sqrt2_quantize(x, bits):
    """Log-sqrt(2) fake quantization (see the module docstring)."""
    return _log_quantize(x, bits, 2.0)


@MODELS.register_module()
class SoftmaxQuantizer(Quantizer):
    """Quantizer of post-softmax values (see the module docstring).

    Args:
        bits (int): 2..16.
        mode (str): ``'uniform'``, ``'log2'`` or ``'log_sqrt2'``.
        observer (dict | None): only for ``'uniform'``: calibrate the scale
            with this observer instead of the fixed ``1 / (2^b - 1)``.
    """

    def __init__(self, bits=8, mode='uniform', observer=None):
        if mode not in SOFTMAX_MODES:
            raise ValueError(f'SoftmaxQuantizer mode must be one of '
                             f'{SOFTMAX_MODES}, got {mode!r}')
        if observer is not None and mode != 'uniform':
            raise ValueError(f'SoftmaxQuantizer: an observer is only used '
                             f"with mode='uniform', got mode={mode!r}")
        super().__init__(bits=bits, symmetric=False, granularity='tensor',
                         observer=observer or dict(type='MinMaxObserver'))
        self.mode = mode
        self.needs_calibration = mode == 'uniform' and observer is not None
        if not self.needs_calibration:
            self.calibrated = True
            if mode == 'uniform':
                self.scale = torch.tensor(1.0 / float(2 ** bits - 1))
            # zero_point stays 0; log modes do not use scale / zero_point.

    def finish_calibration(self, name=None, sync=True):
        if self.needs_calibration:
            return super().finish_calibration(name, sync)
        # A fixed grid needs no data, but the attention must have run.
        self.unobserved = self.seen == 0
        self.state = 'quantizing'

    def forward(self, x):
        if self.state == 'calibrating':
            if x.numel():
                self.seen += 1
            if x.numel() and not _finite(x):
                self.nonfinite = True
                return x
            if self.needs_calibration:
                self.observer.observe(x)
            return x
        if self.state == 'disabled':
            return x
        if self.mode == 'log2':
            return log2_quantize(x, self.bits)
        if self.mode == 'log_sqrt2':
            return log_sqrt2_quantize(x, self.bits)
        out = self._fast_forward(x)  # evaluation: bit-identical, no autograd
        if out is not None:
            return out
        return fake_quantize(x, self.scale, self.zero_point, self.quant_min,
                             self.quant_max)

    def extra_repr(self):
        return (f'bits={self.bits}, mode={self.mode}, '
                f'calibrated_scale={self.needs_calibration}, '
                f'state={self.state}')

