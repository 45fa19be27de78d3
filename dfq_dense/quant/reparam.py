"""RepQ-ViT-style scale reparameterisation of post-LayerNorm activations.

Post-LayerNorm activations of a ViT have a few channels with a much larger
range than the rest, so one per-tensor scale wastes most of the grid.  A
per-channel quantizer fits them, but per-channel activation scales cannot be
folded into an integer matmul.  RepQ-ViT (Li et al., ICCV 2023) calibrates
the per-channel ``(s_c, z_c)`` and then moves the per-channel part into the
LayerNorm in front and the Linear behind, leaving a per-tensor quantizer:

    s~ = mean_c s_c,  z~ = round(mean_c z_c)
    r1 = s / s~,      r2 = z - z~                     (per channel)
    LayerNorm:  gamma <- gamma / r1,  beta <- beta / r1 + s~ * r2
    Linear:     W <- W * r1 (per input column),  b <- b - W_new @ (s~ * r2)

The LayerNorm now outputs ``y~ = y / r1 + s~ r2``; per-tensor quantization
of ``y~`` with ``(s~, z~)`` gives exactly the integers per-channel
quantization of ``y`` with ``(s_c, z_c)`` gave (``y~ / s~ + z~ = y / s_c +
z_c`` up to float rounding), and in full precision ``W_new y~ + b_new = W y
+ b``, so the FP model is unchanged.  Weights are calibrated *after* the
folding (their per-channel ranges change).

Pairs folded in a Swin block (mmdet's and mmseg's): ``norm1 -> attn.w_msa
.qkv``, ``norm2 -> ffn.layers.0.0`` (fc1), and in patch merging
``downsample.norm -> downsample.reduction``, and in timm's Swin and ViT /
DeiT blocks ``norm1 -> attn.qkv``, ``norm2 -> mlp.fc1`` (and timm's patch
merging ``norm -> reduction``); only where the Linear is a
:class:`QuantLinear` whose input quantizer is per channel and calibrated.

Zero padding: ``ShiftWindowMSA`` pads the ``norm1`` output with zero tokens
before ``qkv``.  After the folding a padded token must be ``s~ r2`` (the
image of 0), not 0, or padded keys and values change; the
:class:`QuantWindowMSA` gets that vector (``set_pad_value``) and puts it back
into the zero tokens, which keeps the folding exact at any input size.
"""
import torch
import torch.nn as nn

from .modules import QuantLinear, QuantWindowMSA
from .timm_modules import QuantTimmAttention, QuantTimmWindowAttention

__all__ = ['find_reparam_pairs', 'reparameterize_layernorms',
           'prepare_reparam_structure']

# (LayerNorm, Linear, WindowMSA or None), relative to the owning block.
_PAIRS = (
    ('norm1', 'attn.w_msa.qkv', 'attn.w_msa'),
    ('norm2', 'ffn.layers.0.0', None),
    ('norm', 'reduction', None),
    # timm's Swin and ViT / DeiT blocks (classification track)
    ('norm1', 'attn.qkv', 'attn'),
    ('norm2', 'mlp.fc1', None),
)
# The attention modules a norm1 -> qkv pair passes through: the window
# attentions get the padding vector (their block zero-pads the norm1
# output), timm's ViT attention has no padding.
_PADDED = (QuantWindowMSA, QuantTimmWindowAttention)
_ATTENTIONS = _PADDED + (QuantTimmAttention, )


def _get(module, path):
    for part in path.split('.'):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def find_reparam_pairs(model):
    """``[(linear_name, layernorm, QuantLinear, QuantWindowMSA | None)]`` for
    every LayerNorm -> QuantLinear pair with a per-channel input quantizer.
    """
    pairs = []
    for name, mod in model.named_modules():
        for ln_path, lin_path, msa_path in _PAIRS:
            ln, lin = _get(mod, ln_path), _get(mod, lin_path)
            if not isinstance(ln, nn.LayerNorm) or \
                    not isinstance(lin, QuantLinear):
                continue
            if not ln.elementwise_affine:
                continue
            if lin.input_quantizer.granularity != 'channel':
                continue
            msa = _get(mod, msa_path) if msa_path else None
            if msa_path and not isinstance(msa, _ATTENTIONS):
                continue
            if not isinstance(msa, _PADDED):
                msa = None  # nothing to restore
            prefix = name + '.' if name else ''
            pairs.append((prefix + lin_path, ln, lin, msa))
    return pairs


@torch.no_grad()
def reparameterize_layernorms(model):
    """Fold every calibrated per-channel post-LayerNorm quantizer into its
    LayerNorm and Linear (see the module docstring).

    Returns the names of the Linear layers whose input quantizer became per
    tensor.
    """
    done = []
    for lin_name, ln, lin, msa in find_reparam_pairs(model):
        q = lin.input_quantizer
        if not q.calibrated or q.scale.dim() != 1:
            continue  # observed nothing: it stays FP, nothing to fold
        s = q.scale.float()
        z = q.zero_point.float()
        s_t = s.mean()
        z_t = torch.round(z.mean()).clamp(q.quant_min, q.quant_max)
        r1 = s / s_t
        r2 = z - z_t
        shift = s_t * r2  # what y = 0 becomes
        ln.weight.copy_(ln.weight / r1.to(ln.weight))
        ln.bias.copy_(ln.bias / r1.to(ln.bias) + shift.to(ln.bias))
        fc = lin.module
        fc.weight.copy_(fc.weight * r1.to(fc.weight)[None, :])
        delta = fc.weight @ shift.to(fc.weight)
        if fc.bias is None:
            fc.bias = nn.Parameter(-delta)
        else:
            fc.bias.copy_(fc.bias - delta)
        _make_per_tensor(q)
        q.scale = s_t.reshape(()).to(q.scale.device)
        q.zero_point = z_t.to(torch.int32).reshape(()).to(
            q.zero_point.device)
        if msa is not None:
            msa.set_pad_value(shift.to(fc.weight))
        done.append(lin_name)
    return done


def _make_per_tensor(quantizer):
    quantizer.granularity = 'tensor'
    quantizer.observer = None  # its per-channel statistics are obsolete


def prepare_reparam_structure(model, linear_names):
    """Give a freshly converted model the structure a reparameterised one
    has (per-tensor input quantizers, padding buffers), so that saved
    quantization parameters load into it."""
    by_name = {name: (ln, lin, msa)
               for name, ln, lin, msa in find_reparam_pairs(model)}
    missing = [n for n in linear_names if n not in by_name]
    if missing:
        raise ValueError(
            f'reparameterised layers {missing[:3]} are not per-channel '
            'post-LayerNorm quantized layers of this model')
    for name in linear_names:
        ln, lin, msa = by_name[name]
        _make_per_tensor(lin.input_quantizer)
        lin.input_quantizer.scale = torch.tensor(1.0)
        lin.input_quantizer.zero_point = torch.tensor(0, dtype=torch.int32)
        if msa is not None:
            msa.set_pad_value(torch.zeros(lin.module.in_features))
        if lin.module.bias is None:
            lin.module.bias = nn.Parameter(
                torch.zeros(lin.module.out_features))
