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

Evaluation fast path: a per-tensor quantizer that is quantizing a float32
tensor while no gradient is needed (``torch.no_grad()``, or neither ``x``
nor ``scale`` requires grad) computes the value with
:func:`~dfq_dense.quant.fake_quant.fake_quantize_per_tensor_fast`,
bit-identical to :func:`fake_quantize`.  Its constants (``1 / scale``, the
clamp bounds) are cached and reused only while ``scale`` and
``zero_point`` are the same tensor objects at the same ``_version`` and data
pointer (any assignment, in-place write, ``load_state_dict``, device move
or reparameterisation rebuilds them); they are also dropped whenever the
state dict is taken or loaded (collectives such as ``broadcast`` write
state-dict tensors without bumping their version) and are never pickled.
Whenever a gradient is needed, the reference :func:`fake_quantize` runs
(straight-through / LSQ gradients unchanged).  ``with fast_eval(False):``
switches the fast paths (and the weight cache of the weight layers) off,
e.g. to time the reference path.
"""
import contextlib
import weakref

import torch
import torch.nn as nn
from mmengine.logging import print_log

from ..registry import MODELS, TASK_UTILS, build
from .fake_quant import (fake_quantize, fake_quantize_per_tensor_fast,
                         per_tensor_qparams)
from .observers import qrange, range_to_qparams

__all__ = ['Quantizer', 'check_bits', 'track_tensor', 'same_tensor',
           'tracing', 'fast_eval', 'fast_eval_enabled']

_FAST_EVAL = [True]


@contextlib.contextmanager
def fast_eval(enabled=True):
    """Switch the evaluation fast paths (per-tensor fast fake
    quantization, cached quantized weights) on or off inside the block,
    e.g. ``with fast_eval(False):`` to time or check the reference path.
    The results are the same either way."""
    old = _FAST_EVAL[0]
    _FAST_EVAL[0] = bool(enabled)
    try:
        yield
    finally:
        _FAST_EVAL[0] = old


def fast_eval_enabled():
    """Whether the evaluation fast paths are on (see :func:`fast_eval`)."""
    return _FAST_EVAL[0]


def track_tensor(t):
    """What identifies the current contents of tensor ``t``: a weak
    reference plus its ``_version`` counter, data pointer, dtype, device,
    shape and strides; None where it cannot be tracked (inference tensors
    have no version counter)."""
    if t is None or t.is_inference():
        return None
    return (weakref.ref(t), t._version, t.data_ptr(), t.dtype, t.device,
            tuple(t.shape), t.stride())


def same_tensor(tracked, t):
    """Whether ``t`` is the tensor ``tracked`` (see :func:`track_tensor`)
    and unchanged since (in-place writes through ``.data`` or by
    collectives bypass the version counter: see the module docstring)."""
    return (tracked is not None and tracked[0]() is t
            and tracked[1:] == (t._version, t.data_ptr(), t.dtype, t.device,
                                tuple(t.shape), t.stride()))


def tracing():
    """Whether a graph is being scripted / traced / compiled (the caches
    and host-side fast paths are then bypassed)."""
    if torch.jit.is_scripting() or torch.jit.is_tracing():
        return True
    compiler = getattr(torch, 'compiler', None)
    is_compiling = getattr(compiler, 'is_compiling', None)
    return bool(is_compiling and is_compiling())

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
        # Evaluation fast-path constants: (key, PerTensorQParams) or None.
        self._qp_cache = None

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
        if self.granularity == 'tensor':
            out = self._fast_forward(x)
            if out is not None:
                return out
        return fake_quantize(
            x, self.scale, self.zero_point, self.quant_min, self.quant_max,
            ch_axis=self.ch_axis if self.granularity == 'channel' else None)

    def _fast_forward(self, x):
        """The per-tensor value without autograd, bit-identical to
        :func:`fake_quantize` (see the module docstring), or None where the
        reference path must run (a gradient is needed, not float32, ...)."""
        if not _FAST_EVAL[0] or x.dtype != torch.float32 or not x.numel():
            return None
        if torch.is_grad_enabled() and (x.requires_grad
                                        or self.scale.requires_grad):
            return None
        if tracing():
            return None
        qp = self._eval_qparams(x)
        if qp is None:
            return None
        return fake_quantize_per_tensor_fast(x, qp)

    def _eval_qparams(self, x):
        """Cached :func:`per_tensor_qparams` for ``x``'s device."""
        scale, zp = self.scale, self.zero_point
        cache = getattr(self, '_qp_cache', None)
        if cache is not None:
            (device, qmin, qmax, k_scale, k_zp), qp = cache
            if device == x.device and qmin == self.quant_min and \
                    qmax == self.quant_max and same_tensor(k_scale, scale) \
                    and same_tensor(k_zp, zp):
                return qp
        self._qp_cache = None
        k_scale, k_zp = track_tensor(scale), track_tensor(zp)
        # Plain (non-inference) tensors, so that they may be kept.
        with torch.inference_mode(False):
            qp = per_tensor_qparams(scale, zp, self.quant_min,
                                    self.quant_max, x)
        if qp is not None and k_scale is not None and k_zp is not None:
            self._qp_cache = ((x.device, self.quant_min, self.quant_max,
                               k_scale, k_zp), qp)
        return qp

    def clear_cache(self):
        """Drop the cached evaluation constants (rebuilt when needed)."""
        self._qp_cache = None

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
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self.clear_cache()  # the caller may write the tensors (see above)
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _apply(self, *args, **kwargs):
        self.clear_cache()
        return super()._apply(*args, **kwargs)

    def __getstate__(self):
        state = self.__dict__.copy()
        state['_qp_cache'] = None  # weak references do not pickle
        return state

    def _load_from_state_dict(self, state_dict, prefix, local_metadata,
                              strict, missing_keys, unexpected_keys,
                              error_msgs):
        self.clear_cache()
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
