"""Quantized wrappers (fake quantization) of the layers of Swin models.

What is quantized:

* ``QuantLinear`` / ``QuantConv2d`` / ``QuantConvTranspose2d``: the input
  activation (asymmetric, per tensor, observer-calibrated on data) and the
  weight (symmetric, per output channel, calibrated from the weight itself
  when calibration finishes). The original module is kept inside as
  ``.module``, so the op is run with its own stride / padding / dilation /
  groups / padding mode, and empty inputs (zero RoIs, handled by mmcv's
  wrappers) are forwarded to the original module untouched.
* ``QuantMatMul``: both operands of ``a @ b`` (asymmetric, per tensor).
* ``QuantWindowMSA``: Swin window attention with ``matmul1`` (``q @ k^T``)
  and ``matmul2`` (``softmax(attn) @ v``) quantized; its ``qkv`` / ``proj``
  Linear layers are converted to ``QuantLinear`` separately by the converter.

What stays in full precision (FP32): LayerNorm, softmax, GELU, all biases
(added in FP after the quantized product), the relative position bias (and
the shift mask) added to the attention logits, the ``q * scale`` multiply
(it is folded into the quantized ``q`` operand of ``matmul1``), dropout,
residual adds, window partition/shift/padding, and any module the converter
does not handle or is told to skip.

State-dict keys: wrapped Linear/Conv weights live at ``<name>.module.weight``
(plus ``<name>.{input,weight}_quantizer.{scale,zero_point}``); loading an FP
checkpoint with ``<name>.weight`` into a converted model is accepted (the keys
are remapped). ``QuantWindowMSA`` keeps the original keys (``qkv``, ``proj``,
``relative_position_bias_table``, ``relative_position_index``).
"""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.model.weight_init import trunc_normal_

from ..registry import MODELS
from .observers import replicated_observation
from .quantizer import Quantizer, check_bits

__all__ = [
    'QuantWeightModule', 'QuantLinear', 'QuantConv2d',
    'QuantConvTranspose2d', 'QuantMatMul', 'QuantWindowMSA',
    'act_quantizer_cfg', 'weight_quantizer_cfg'
]


def act_quantizer_cfg(bits, **overrides):
    """Default activation quantizer: asymmetric, per tensor."""
    cfg = dict(bits=bits, symmetric=False, granularity='tensor', ch_axis=0,
               observer=dict(type='MinMaxObserver'))
    cfg.update(overrides)
    return cfg


def weight_quantizer_cfg(bits, ch_axis=0, **overrides):
    """Default weight quantizer: symmetric, per output channel."""
    cfg = dict(bits=bits, symmetric=True, granularity='channel',
               ch_axis=ch_axis, observer=dict(type='MinMaxObserver'))
    cfg.update(overrides)
    return cfg


class QuantWeightModule(nn.Module):
    """Base of the weight-layer wrappers.

    Args:
        module (nn.Module): the FP layer (kept as ``self.module``).
        w_bits (int): weight bits.
        a_bits (int): input-activation bits.
        input_quantizer (dict | None): overrides of the input quantizer's
            arguments (see :class:`Quantizer`).
        weight_quantizer (dict | None): overrides of the weight quantizer's
            arguments.
    """

    _weight_ch_axis = 0
    # Channel axis of the input for per-channel activation quantization.
    _input_ch_axis = 1

    def __init__(self, module, w_bits=8, a_bits=8, input_quantizer=None,
                 weight_quantizer=None):
        super().__init__()
        check_bits(w_bits, 'w_bits')
        check_bits(a_bits, 'a_bits')
        self.module = module
        input_quantizer = dict(input_quantizer or {})
        if input_quantizer.get('granularity') == 'channel':
            input_quantizer.setdefault('ch_axis', self._input_ch_axis)
        self.input_quantizer = Quantizer(
            **act_quantizer_cfg(a_bits, **input_quantizer))
        self.weight_quantizer = Quantizer(**weight_quantizer_cfg(
            w_bits, self._weight_ch_axis, **(weight_quantizer or {})))

    @property
    def weight(self):
        return self.module.weight

    @property
    def bias(self):
        return self.module.bias

    @torch.no_grad()
    def observe_weight(self):
        """Reset the weight observer and observe the current weight, once.

        The weight is the same on every rank: it is observed as replicated
        data (rank-independent sampling keys; ``sync()`` does not merge the
        ranks' identical copies).
        """
        observer = self.weight_quantizer.observer
        observer.reset()
        with replicated_observation():
            observer.observe(self.module.weight)

    def enable_calibration(self):
        self.input_quantizer.enable_calibration()
        self.weight_quantizer.enable_calibration()

    def finish_calibration(self):
        """Compute input qparams from data and weight qparams from weight."""
        self.observe_weight()
        self.input_quantizer.finish_calibration()
        self.weight_quantizer.finish_calibration()

    def quant_weight(self):
        """The (fake-quantized) weight used by the forward.

        While calibrating, the FP weight: the weight quantizer does not
        observe it at every calibration forward (observers that keep
        values would copy it each time); it is observed once, by
        :meth:`observe_weight`, when calibration finishes.
        """
        if self.weight_quantizer.state == 'calibrating':
            return self.module.weight
        return self.weight_quantizer(self.module.weight)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Accept FP checkpoints: '<prefix>weight' -> '<prefix>module.weight'.
        for key in list(state_dict.keys()):
            if not key.startswith(prefix):
                continue
            rest = key[len(prefix):]
            if '.' not in rest and rest not in self._buffers and \
                    rest not in self._parameters:
                new_key = prefix + 'module.' + rest
                if new_key not in state_dict:
                    state_dict[new_key] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


@MODELS.register_module()
class QuantLinear(QuantWeightModule):
    """Fake-quantized ``nn.Linear`` (incl. ``mmcv.cnn.Linear``)."""

    _weight_ch_axis = 0
    _input_ch_axis = -1

    def forward(self, x):
        if x.numel() == 0:
            return self.module(x)
        return F.linear(self.input_quantizer(x), self.quant_weight(),
                        self.module.bias)


@MODELS.register_module()
class QuantConv2d(QuantWeightModule):
    """Fake-quantized ``nn.Conv2d`` (incl. ``mmcv.cnn.Conv2d``)."""

    _weight_ch_axis = 0

    def forward(self, x):
        if x.numel() == 0:
            return self.module(x)
        # _conv_forward applies stride/padding/dilation/groups/padding_mode.
        return self.module._conv_forward(self.input_quantizer(x),
                                         self.quant_weight(),
                                         self.module.bias)


@MODELS.register_module()
class QuantConvTranspose2d(QuantWeightModule):
    """Fake-quantized ``nn.ConvTranspose2d`` (incl. mmcv's).

    Weights are ``(in, out / groups, kh, kw)``: output channels are axis 1.
    """

    _weight_ch_axis = 1

    def forward(self, x, output_size=None):
        m = self.module
        if x.numel() == 0:
            if output_size is None:
                return m(x)
            return m(x, output_size)
        if m.padding_mode != 'zeros':
            raise ValueError('Only `zeros` padding mode is supported for '
                             'ConvTranspose2d')
        output_padding = m._output_padding(x, output_size, m.stride,
                                           m.padding, m.kernel_size, 2,
                                           m.dilation)
        return F.conv_transpose2d(self.input_quantizer(x),
                                  self.quant_weight(), m.bias, m.stride,
                                  m.padding, output_padding, m.groups,
                                  m.dilation)


@MODELS.register_module()
class QuantMatMul(nn.Module):
    """``a @ b`` with both operands fake-quantized.

    Args:
        bits (int): bits of both operands.
        quantizer_a (dict | None): overrides for operand ``a``'s quantizer.
        quantizer_b (dict | None): overrides for operand ``b``'s quantizer.
    """

    def __init__(self, bits=8, quantizer_a=None, quantizer_b=None):
        super().__init__()
        check_bits(bits, 'a_bits')
        self.quantizer_a = Quantizer(
            **act_quantizer_cfg(bits, **(quantizer_a or {})))
        self.quantizer_b = Quantizer(
            **act_quantizer_cfg(bits, **(quantizer_b or {})))

    def forward(self, a, b):
        return self.quantizer_a(a) @ self.quantizer_b(b)


@MODELS.register_module()
class QuantWindowMSA(nn.Module):
    """Quantized replacement of Swin's ``WindowMSA`` (mmdet's and mmseg's).

    Shares ``qkv``, ``proj``, ``relative_position_bias_table``,
    ``relative_position_index``, ``softmax``, dropouts and hyper-parameters
    with ``module`` (so the state-dict keys are unchanged) and adds
    ``matmul1`` (``q @ k^T``) and ``matmul2`` (``attn @ v``, ``attn`` after
    softmax and dropout).

    Args:
        module (WindowMSA): the FP module.
        a_bits (int): bits of the matmul operands.
        matmul1 (dict | None): ``QuantMatMul`` arguments (``bits``,
            ``quantizer_a`` / ``quantizer_b``); ``bits`` defaults to
            ``a_bits``.
        matmul2 (dict | None): same for ``matmul2``.
        softmax_quant (dict | None): quantizer of the first operand of
            ``matmul2``, the post-softmax attention.  None (default, the
            "naive" strategy of PSAQ-ViT, whose softmax output stays FP):
            not quantized, ``matmul2.quantizer_a`` is an ``nn.Identity``.
            A dict builds a
            :class:`~dfq_dense.quant.softmax_quant.SoftmaxQuantizer`
            (``mode``: ``'uniform'`` / ``'log2'`` / ``'log_sqrt2'``;
            ``bits`` defaults to ``a_bits``; optional ``observer`` for
            ``'uniform'``).
    """

    def __init__(self, module, a_bits=8, matmul1=None, matmul2=None,
                 softmax_quant=None):
        super().__init__()
        self.embed_dims = module.embed_dims
        self.window_size = module.window_size
        self.num_heads = module.num_heads
        self.scale = module.scale
        self.init_cfg = copy.deepcopy(getattr(module, 'init_cfg', None))
        self.relative_position_bias_table = \
            module.relative_position_bias_table
        index = module.relative_position_index
        persistent = 'relative_position_index' not in \
            module._non_persistent_buffers_set
        self.register_buffer('relative_position_index', index,
                             persistent=persistent)
        self.qkv = module.qkv
        self.attn_drop = module.attn_drop
        self.proj = module.proj
        self.proj_drop = module.proj_drop
        self.softmax = module.softmax
        self.matmul1 = QuantMatMul(**dict(dict(bits=a_bits),
                                          **(matmul1 or {})))
        self.matmul2 = QuantMatMul(**dict(dict(bits=a_bits),
                                          **(matmul2 or {})))
        # Set by the LayerNorm reparameterisation (see reparam.py).
        self.register_buffer('pad_value', None)
        if softmax_quant is None:
            self.matmul2.quantizer_a = nn.Identity()
        else:
            from .softmax_quant import SoftmaxQuantizer
            sq = dict(softmax_quant)
            sq.pop('type', None)
            sq.setdefault('bits', a_bits)
            self.matmul2.quantizer_a = SoftmaxQuantizer(**sq)

    def init_weights(self):
        trunc_normal_(self.relative_position_bias_table, std=0.02)

    def set_pad_value(self, value):
        """What a zero-padding token must be after the LayerNorm in front of
        ``qkv`` was reparameterised (``y -> y / r1 + s * r2``): the image of
        0, so padded windows give the same ``qkv`` output as before."""
        self.pad_value = value

    def _restore_padding(self, x):
        # ShiftWindowMSA pads the LayerNorm output with zero tokens; a real
        # token is never exactly the zero vector.
        pad = (x == 0).all(dim=-1, keepdim=True)
        if not bool(pad.any()):
            return x
        return torch.where(pad, self.pad_value.to(x), x)

    def forward(self, x, mask=None):
        """Same as ``WindowMSA.forward`` with the two matmuls quantized.

        Args:
            x (Tensor): (num_windows*B, N, C).
            mask (Tensor | None): (num_windows, N, N), values in (-inf, 0].
        """
        B, N, C = x.shape
        if self.pad_value is not None:
            x = self._restore_padding(x)
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads,
                                  C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]

        q = q * self.scale
        attn = self.matmul1(q, k.transpose(-2, -1))

        relative_position_bias = self.relative_position_bias_table[
            self.relative_position_index.view(-1)].view(
                self.window_size[0] * self.window_size[1],
                self.window_size[0] * self.window_size[1], -1)
        relative_position_bias = relative_position_bias.permute(
            2, 0, 1).contiguous()
        attn = attn + relative_position_bias.unsqueeze(0)

        if mask is not None:
            nW = mask.shape[0]
            attn = attn.view(B // nW, nW, self.num_heads, N,
                             N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, N, N)
        attn = self.softmax(attn)

        attn = self.attn_drop(attn)

        x = self.matmul2(attn, v).transpose(1, 2).reshape(B, N, C)
        x = self.proj(x)
        x = self.proj_drop(x)
        return x
