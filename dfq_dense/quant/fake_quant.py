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
"""
import torch

__all__ = ['fake_quantize', 'round_ste']


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
