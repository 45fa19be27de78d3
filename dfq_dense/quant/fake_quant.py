"""Uniform affine fake quantization (quantize -> dequantize in float).

Conventions (the same as torch's ``fake_quantize_per_{tensor,channel}_affine``
kernels, so the results are bit-identical to them for float32 inputs):

* Scale: the input is multiplied by ``inv_scale = 1 / scale`` (computed in the
  input's dtype), not divided by ``scale``.
* Rounding: ``torch.round``, i.e. round half to even (banker's rounding, like
  C's ``nearbyint`` in the default rounding mode).
* Integer grid: ``q = clamp(round(x * inv_scale) + zero_point, quant_min,
  quant_max)``; the zero point is added after rounding (it is an integer).
* Dequantization: ``out = (q - zero_point) * scale``.
* Granularity: per tensor when ``ch_axis`` is None (``scale`` and
  ``zero_point`` are scalars / one-element tensors), else per channel along
  ``ch_axis`` (``scale`` and ``zero_point`` are 1-D with
  ``x.shape[ch_axis]`` elements).

Gradients:

* ``x``: straight-through estimator, 1 where ``round(x * inv_scale) + zp`` lies
  in ``[quant_min, quant_max]`` (bounds included) and 0 where it is clamped --
  exactly the mask torch's fake-quant backward uses.
* ``scale`` (only when it requires grad): LSQ-style, obtained by
  differentiating the formula above with a round straight-through estimator
  ``(t.round() - t).detach() + t``: ``d out / d scale`` is
  ``(q - zp) - x / scale`` inside the range and ``q - zp`` where clamped.
  (No LSQ gradient-scaling factor is applied.)
* ``zero_point`` receives no gradient.

Evaluation (no gradient needed): :func:`fake_quantize_per_tensor_fast` gives
the same bits as :func:`fake_quantize` per tensor for float32, faster (see
the comment above it); ``Quantizer`` uses it automatically.
"""
import math

import torch

__all__ = ['fake_quantize', 'round_ste', 'per_tensor_qparams',
           'fake_quantize_per_tensor_fast', 'FUSED_MAX_NUMEL',
           'GUARDED_MIN_NUMEL']


def round_ste(t):
    """Round half to even with a straight-through (identity) gradient."""
    return (t.round() - t).detach() + t


def _as_tensor(v, like):
    if not torch.is_tensor(v):
        v = torch.tensor(v)
    return v.to(device=like.device, dtype=like.dtype)


def fake_quantize(x, scale, zero_point, quant_min, quant_max, ch_axis=None):
    """Fake-quantize ``x`` (see the module docstring for the conventions).

    Args:
        x (Tensor): input (floating point).
        scale (float | Tensor): scale(s); must be > 0.
        zero_point (int | Tensor): integer zero point(s).
        quant_min (int): smallest integer of the grid.
        quant_max (int): largest integer of the grid.
        ch_axis (int | None): channel axis for per-channel quantization
            (a single-element ``zero_point`` is then used for all channels).

    Returns:
        Tensor: same shape and dtype as ``x``.
    """
    scale = _as_tensor(scale, x)
    zp = _as_tensor(zero_point, x).detach()
    if ch_axis is not None:
        ch_axis = ch_axis % x.dim()
        shape = [1] * x.dim()
        shape[ch_axis] = x.shape[ch_axis]
        if zp.numel() == 1:  # a single zero point (e.g. 0) for all
            zp = zp.reshape(1).expand(x.shape[ch_axis])
        if scale.numel() != x.shape[ch_axis] or \
                zp.numel() != x.shape[ch_axis]:
            raise ValueError(
                f'per-channel fake_quantize: scale/zero_point need '
                f'{x.shape[ch_axis]} elements (x.shape[{ch_axis}]), got '
                f'{scale.numel()} and {zp.numel()}')
        scale = scale.reshape(shape)
        zp = zp.reshape(shape)
    else:
        if scale.numel() != 1 or zp.numel() != 1:
            raise ValueError('per-tensor fake_quantize needs a single scale '
                             f'and zero point, got {scale.numel()} and '
                             f'{zp.numel()} elements')
        scale = scale.reshape(())
        zp = zp.reshape(())
    inv_scale = 1.0 / scale
    # The value (and the gradient to ``scale``) is built from a detached x;
    # the gradient to x is added below as an exact 0/1 mask, so that it is
    # exactly torch's STE (scale * inv_scale is not always exactly 1 in fp32).
    xd = x.detach()
    t = round_ste(xd * inv_scale) + zp
    q = torch.clamp(t, quant_min, quant_max)
    out = (q - zp) * scale
    if x.requires_grad:
        td = t.detach()
        mask = ((td >= quant_min) & (td <= quant_max)).to(x.dtype)
        out = out + (x - xd) * mask  # adds exactly 0 to the value
    return out


# ---------------------------------------------------------------------------
# Value-only per-tensor fast paths (evaluation: no gradient is needed).
#
# Each gives exactly (bit for bit, incl. the sign of zero and NaN where the
# reference gives NaN) what :func:`fake_quantize` gives for a float32 input
# with a per-tensor integer zero point in ``[quant_min, quant_max]``:
#
# * ``(r - t) + t`` with ``r = round(t)`` is what ``round_ste`` computes;
#   it equals ``r`` for finite ``t`` (Sterbenz) except that it turns -0 into
#   +0, and it is NaN for ``t = +-inf``.
# * ``clamp(r + zp, qmin, qmax) - zp == clamp(r, qmin - zp, qmax - zp)``:
#   exact for ``|r| < 2^23`` (integers, |zp| <= 65535); above, both clamp to
#   the same bound.
#
# Paths, chosen per tensor size on the CPU (measured with one thread on the
# AMD EPYC of the development machine, float32, torch 2.14, best of 7,
# microseconds per call; "chain" = exact op chain (two allocations),
# "guarded" = in-place chain after an aminmax finiteness check (one
# allocation), "fused" = torch.fake_quantize_per_tensor_affine incl. its
# finiteness check, "reference" = fake_quantize under no_grad):
#
#     numel      reference   chain   guarded   fused
#     256           15.8       4.7      6.6      4.1
#     384           15.5       4.8      6.5      4.7
#     1024          15.9       5.0      6.8     10.1
#     65536           55        22       27      570
#     262144         195       100      102     2140
#     393216           -       153      150        -
#     524288           -      1600      201        -
#     4194304       5400     14800     1870    35000
#
# torch's fused kernel is a scalar loop here (~8.5 ns per element, it also
# writes the gradient mask), so it only wins on tiny tensors, where the
# per-op overhead of the chain dominates: crossover ~300 elements.  The
# guarded chain matches the chain up to 2^18 elements and wins above,
# by far from ~2^19 where every extra large temporary is a fresh mmap
# (page faults at first touch).  Off the CPU only the chain is used (no host
# synchronisation).
# ---------------------------------------------------------------------------

#: Largest tensor (elements) for torch's fused kernel (CPU, float32).
FUSED_MAX_NUMEL = 256
#: Smallest tensor (elements) for the guarded in-place chain (CPU).
GUARDED_MIN_NUMEL = 1 << 18
# |x * inv_scale| bound below which the fused kernel's integer conversion is
# certainly exact (it converts to int64; NaN/Inf are not bit-identical).
_FUSED_ABS_LIMIT = float(2 ** 30)


class PerTensorQParams:
    """Constants of the per-tensor fast paths for one ``(scale, zero_point,
    dtype, device)`` (see :func:`per_tensor_qparams`)."""

    __slots__ = ('scale', 'inv_scale', 'lo', 'hi', 'scale_f', 'inv_f',
                 'zp_i', 'quant_min', 'quant_max', 'fused_ok')

    def __init__(self, scale, inv_scale, lo, hi, scale_f, inv_f, zp_i,
                 quant_min, quant_max, fused_ok):
        self.scale = scale
        self.inv_scale = inv_scale
        self.lo = lo
        self.hi = hi
        self.scale_f = scale_f
        self.inv_f = inv_f
        self.zp_i = zp_i
        self.quant_min = quant_min
        self.quant_max = quant_max
        self.fused_ok = fused_ok


def per_tensor_qparams(scale, zero_point, quant_min, quant_max, like):
    """Fast-path constants for fake-quantizing tensors like ``like``, or None
    where the fast paths are not bit-identical to :func:`fake_quantize`
    (not float32, not a single scale / zero point, a zero point that is not
    an integer in ``[quant_min, quant_max]``, a range beyond 16 bits).

    Reads the zero point on the host (one synchronisation on a GPU): cache
    the result (``Quantizer`` does, keyed on the qparams' versions).
    """
    if like.dtype != torch.float32:
        return None
    if not (-65536 <= quant_min <= quant_max <= 65535):
        return None
    scale = _as_tensor(scale, like).detach()
    zp = zero_point if torch.is_tensor(zero_point) else \
        torch.tensor(zero_point)
    if scale.numel() != 1 or zp.numel() != 1:
        return None
    zp_v = zp.detach().reshape(()).item()
    if zp_v != int(zp_v) or not quant_min <= zp_v <= quant_max:
        return None
    zp_i = int(zp_v)
    scale = scale.reshape(())
    inv = 1.0 / scale  # the same op as fake_quantize
    scale_f, inv_f = float(scale), float(inv)
    fused_ok = (like.device.type == 'cpu' and scale_f > 0.0
                and math.isfinite(scale_f) and math.isfinite(inv_f))
    return PerTensorQParams(scale, inv, float(quant_min - zp_i),
                            float(quant_max - zp_i), scale_f, inv_f, zp_i,
                            int(quant_min), int(quant_max), fused_ok)


def _chain(x, qp):
    """Exact for every input (NaN / Inf included), no host sync."""
    t = x * qp.inv_scale
    r = torch.round(t)
    r.sub_(t).add_(t)  # round_ste's value: -0 -> +0, +-inf -> NaN
    r.clamp_(qp.lo, qp.hi)
    return r.mul_(qp.scale)


def _guarded_chain(x, qp):
    """In place after checking ``x * inv_scale`` is finite, else None."""
    t = x * qp.inv_scale
    lo, hi = torch.aminmax(t)
    if not (math.isfinite(lo.item()) and math.isfinite(hi.item())):
        return None
    t.round_()
    t.clamp_(qp.lo, qp.hi)
    t.add_(0.0)  # -0 -> +0, as round_ste
    return t.mul_(qp.scale)


def _fused(x, qp):
    """torch's kernel where it is bit-identical (finite, moderate
    ``x * inv_scale``), else None."""
    lo, hi = torch.aminmax(x)
    lo, hi = lo.item(), hi.item()
    if not (math.isfinite(lo) and math.isfinite(hi)) or \
            max(-lo, hi) * qp.inv_f >= _FUSED_ABS_LIMIT:
        return None
    return torch.fake_quantize_per_tensor_affine(
        x, qp.scale_f, qp.zp_i, qp.quant_min, qp.quant_max)


def fake_quantize_per_tensor_fast(x, qp):
    """Value-only per-tensor fake quantization with the constants ``qp`` of
    :func:`per_tensor_qparams`: bit-identical to :func:`fake_quantize`, no
    autograd (call it only where no gradient is needed), the fastest path
    for ``x``'s size and device."""
    if x.device.type == 'cpu':
        n = x.numel()
        out = None
        if n <= FUSED_MAX_NUMEL:
            if qp.fused_ok and x.is_contiguous():
                out = _fused(x, qp)
        elif n >= GUARDED_MIN_NUMEL:
            out = _guarded_chain(x, qp)
        if out is not None:
            return out
    return _chain(x, qp)
