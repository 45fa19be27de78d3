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
from .observers import qrange

__all__ = ['Quantizer', 'check_bits']

GRANULARITIES = ('tensor', 'channel')


def check_bits(bits, name='bits'):
    """Raise ValueError unless ``bits`` is an int in 2..16."""
    if isinstance(bits, bool) or not isinstance(bits, int) or \
            not 2 <= bits <= 16:
        raise ValueError(f'{name} must be an integer in 2-16, got {bits!r}')
    return bits


@MODELS.register_module()
class Quantizer(nn.Module):
    """Fake-quantizes a tensor with observer-calibrated parameters.

    Args:
        bits (int): bit width, 2..16 (16 is *not* special-cased).
        symmetric (bool): symmetric signed grid (weights) or asymmetric
            unsigned grid (activations).
        granularity (str): ``'tensor'`` or ``'channel'``.
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
        self.observer = build(
            TASK_UTILS, observer,
            default_args=dict(granularity=granularity, ch_axis=ch_axis))
        self.register_buffer('scale', torch.tensor(1.0))
        self.register_buffer('zero_point',
                             torch.tensor(0, dtype=torch.int32))
        self.state = 'disabled'
        self.calibrated = False

    # ----------------------------------------------------------------- modes
    def enable_calibration(self):
        """Reset the observer and observe (FP pass-through) from now on."""
        self.observer.reset()
        self.state = 'calibrating'

    def finish_calibration(self, name=None):
        """Sync the observer, compute qparams and start quantizing.

        If nothing was observed (the tensor never reached this quantizer),
        the quantizer is left disabled (FP) and a warning is logged.
        """
        self.observer.sync()
        if not self.observer.observed:
            print_log(f'Quantizer {name or ""} observed no data; it stays '
                      'disabled (full precision).', logger='current',
                      level=30)
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
            self.observer.observe(x)
            return x
        if self.state == 'disabled':
            return x
        return fake_quantize(
            x, self.scale, self.zero_point, self.quant_min, self.quant_max,
            ch_axis=self.ch_axis if self.granularity == 'channel' else None)

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
