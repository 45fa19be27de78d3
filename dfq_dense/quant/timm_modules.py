"""Quantized replacements of timm's attention modules (classification track).

timm's Swin ``WindowAttention`` (``timm.models.swin_transformer``) and its
ViT / DeiT ``Attention`` (``timm.layers.attention``, re-exported by
``timm.models.vision_transformer``) compute the attention with
``F.scaled_dot_product_attention`` whenever ``fused_attn`` is set (the
default for ViT), which hides ``q @ k^T`` and ``attn @ v`` in one kernel.
The quantized modules below always compute the explicit form of timm's
non-fused branch, with the two matmuls as :class:`QuantMatMul` and the
post-softmax attention as the first operand of ``matmul2``, exactly as
:class:`~dfq_dense.quant.modules.QuantWindowMSA` does for mmdet's and
mmseg's ``WindowMSA`` (same names ``qkv``, ``proj``, ``matmul1``,
``matmul2``, so the same roles and quantizer settings apply):

* ``matmul1``: ``(q * scale) @ k^T`` (``q``, ``k`` per head);
* then the relative position bias (Swin), the shift mask (Swin, shifted
  windows) or timm's ``attn_mask`` / causal mask (ViT), softmax, dropout;
* ``matmul2``: ``attn @ v``.

Both keep timm's modules and parameters (``qkv``, ``proj``, the bias table,
``q_norm`` / ``k_norm``, ``norm``, ``gate``...), so their state-dict keys
are timm's; only the quantizers are added.  The surrounding
``SwinTransformerBlock`` / ``PatchMerging`` / ``Mlp`` / ViT ``Block`` keep
their own forward: their ``nn.Linear`` layers (``mlp.fc1``, ``mlp.fc2``,
``downsample.reduction``, ``head``) are converted like any Linear.
"""
import torch.nn as nn

from ..registry import MODELS
from .modules import WindowAttentionParts, attention_matmuls

__all__ = ['QuantTimmWindowAttention', 'QuantTimmAttention',
           'timm_attention_wrappers']


@MODELS.register_module()
class QuantTimmWindowAttention(WindowAttentionParts, nn.Module):
    """Quantized timm Swin ``WindowAttention`` (explicit attention).

    Args:
        module: ``timm.models.swin_transformer.WindowAttention``.
        a_bits, matmul1, matmul2, softmax_quant: as
            :class:`~dfq_dense.quant.modules.QuantWindowMSA`.

    ``forward(x, mask=None)``: ``x`` ``(num_windows * B, N, C)``, ``mask``
    ``(num_windows, N, N)`` (0 / -100), as timm's.
    """

    def __init__(self, module, a_bits=8, matmul1=None, matmul2=None,
                 softmax_quant=None):
        super().__init__()
        self.dim = module.dim
        self.window_size = module.window_size
        self.window_area = module.window_area
        self.num_heads = module.num_heads
        self.scale = module.scale
        self._adopt_window_attention(module, a_bits, matmul1, matmul2,
                                     softmax_quant)

    def _get_rel_pos_bias(self):
        bias = self.relative_position_bias_table[
            self.relative_position_index.view(-1)].view(
                self.window_area, self.window_area, -1)
        return bias.permute(2, 0, 1).contiguous().unsqueeze(0)

    def forward(self, x, mask=None):
        B_, N, C = x.shape
        if self.pad_value is not None:
            x = self._restore_padding(x)
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads,
                                  -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q = q * self.scale
        attn = self.matmul1(q, k.transpose(-2, -1))
        attn = attn + self._get_rel_pos_bias()
        if mask is not None:
            num_win = mask.shape[0]
            attn = attn.view(-1, num_win, self.num_heads, N, N) + \
                mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, N, N)
        attn = self.softmax(attn)
        attn = self.attn_drop(attn)
        x = self.matmul2(attn, v)
        x = x.transpose(1, 2).reshape(B_, N, -1)
        x = self.proj(x)
        x = self.proj_drop(x)
        return x


@MODELS.register_module()
class QuantTimmAttention(nn.Module):
    """Quantized timm ViT / DeiT ``Attention`` (explicit attention; the CLS
    and any other prefix token attend and are attended as in timm).

    ``softmax`` is an ``nn.Softmax(dim=-1)`` module here (timm calls
    ``Tensor.softmax``): the same values, and a module the attention
    recorders can hook.  ``records_as = 'timm_vit_attention'`` tells the
    recorders (``dfq_dense.synth``, which does not import ``quant``) to
    treat it as timm's ``Attention``.
    """

    records_as = 'timm_vit_attention'

    def __init__(self, module, a_bits=8, matmul1=None, matmul2=None,
                 softmax_quant=None):
        super().__init__()
        self.num_heads = module.num_heads
        self.head_dim = module.head_dim
        self.attn_dim = getattr(module, 'attn_dim',
                                module.num_heads * module.head_dim)
        self.scale = module.scale
        self.qkv = module.qkv
        self.q_norm = module.q_norm
        self.k_norm = module.k_norm
        self.attn_drop = module.attn_drop
        self.norm = getattr(module, 'norm', None) or nn.Identity()
        self.gate = getattr(module, 'gate', None)
        self.proj = module.proj
        self.proj_drop = module.proj_drop
        self.softmax = nn.Softmax(dim=-1)
        attention_matmuls(self, a_bits, matmul1, matmul2, softmax_quant)

    def forward(self, x, attn_mask=None, is_causal=False):
        from timm.layers.attention import resolve_self_attn_mask
        B, N, C = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads,
                                  self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        q = q * self.scale
        attn = self.matmul1(q, k.transpose(-2, -1))
        bias = resolve_self_attn_mask(N, attn, attn_mask, is_causal)
        if bias is not None:
            attn = attn + bias
        attn = self.softmax(attn)
        attn = self.attn_drop(attn)
        x = self.matmul2(attn, v)
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        x = self.proj(x)
        x = self.proj_drop(x)
        return x


def timm_attention_wrappers():
    """``{timm class: (forward it must have, quantized wrapper)}``; empty
    without timm.  Only the exact forward is converted: a subclass with
    another forward (another attention) stays as it is."""
    out = {}
    try:
        from timm.models.swin_transformer import WindowAttention
        out[WindowAttention] = (WindowAttention.forward,
                                QuantTimmWindowAttention)
    except ImportError:  # pragma: no cover
        pass
    try:
        from timm.layers.attention import Attention
        out[Attention] = (Attention.forward, QuantTimmAttention)
    except ImportError:  # pragma: no cover
        pass
    return out
