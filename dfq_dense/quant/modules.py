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

Cached quantized weights (evaluation): weights are fixed after calibration,
so a weight layer keeps its fake-quantized weight and reuses it instead of
re-quantizing at every forward.  The rule:

* Used and (re)built only when the weight quantizer is ``'quantizing'``, the
  module is in eval mode, no gradient can reach the weight or the qparams
  (grad mode off, or none of ``weight`` / ``scale`` / ``zero_point``
  requires grad), the quantizer is a plain :class:`Quantizer` without
  forward hooks (and no global module hooks are set), and nothing is being
  scripted / traced / compiled.  Otherwise the weight is quantized afresh
  and any cached copy is dropped; in particular a teacher-student method
  training weights or qparams (``requires_grad=True``) or anything in train
  mode never sees it, and its gradients are exactly those of the reference
  path.
* A cached weight is reused only while the weight, ``scale`` and
  ``zero_point`` are the same tensor objects with the same ``_version``
  counters, data pointers, dtypes, devices, shapes and strides, and the
  quantizer's grid (bits, symmetry, granularity, channel axis) is the same:
  optimiser steps, ``copy_`` under ``no_grad`` (``load_state_dict``, the
  LayerNorm reparameterisation), re-calibration (new qparam tensors) and
  device / dtype moves all invalidate it.
* It is also dropped by ``load_state_dict``, by taking the state dict
  (collectives such as ``broadcast`` write those tensors in place without
  bumping their version), by ``.to()`` / ``.cuda()``, by ``train()``, and is
  never saved or pickled (a plain attribute, not a buffer).  In-place writes
  through ``.data`` also bypass the version counter: call
  :func:`clear_quant_caches` after such writes.

The cached weight is computed by the quantizer itself, so its values are
bit-identical to the uncached path.  It costs one extra copy of the weights
in memory.
"""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.model.weight_init import trunc_normal_
from torch.nn.modules import module as _module_mod

from ..registry import MODELS
from .observers import replicated_observation
from .quantizer import (Quantizer, check_bits, fast_eval_enabled,
                        same_tensor, track_tensor, tracing)

__all__ = [
    'QuantWeightModule', 'QuantLinear', 'QuantConv2d',
    'QuantConvTranspose2d', 'QuantMatMul', 'QuantWindowMSA',
    'act_quantizer_cfg', 'weight_quantizer_cfg', 'clear_quant_caches'
]


def clear_quant_caches(model):
    """Drop every cached quantized weight and quantizer constant under
    ``model`` (needed only after in-place writes that bypass the version
    counter, e.g. through ``.data``; see the module docstring)."""
    for m in model.modules():
        if isinstance(m, (QuantWeightModule, Quantizer)):
            m.clear_cache()



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
        # Cached quantized weight: (key, tensor) or None (module docstring).
        self._wq_cache = None

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
        wq, w = self.weight_quantizer, self.module.weight
        if not fast_eval_enabled():
            return wq(w)  # switched off for a while: bypass, keep the cache
        if not self._weight_cache_allowed(wq, w):
            self._wq_cache = None
            return wq(w)
        grid = (wq.bits, wq.symmetric, wq.granularity, wq.ch_axis,
                wq.quant_min, wq.quant_max)
        cache = getattr(self, '_wq_cache', None)
        if cache is not None:
            (k_w, k_scale, k_zp, k_grid), cached = cache
            if k_grid == grid and same_tensor(k_w, w) and \
                    same_tensor(k_scale, wq.scale) and \
                    same_tensor(k_zp, wq.zero_point):
                return cached
        self._wq_cache = None
        tracked = (track_tensor(w), track_tensor(wq.scale),
                   track_tensor(wq.zero_point))
        if any(t is None for t in tracked):  # inference tensors
            return wq(w)
        # A plain tensor outside any graph (it may be kept across modes).
        with torch.inference_mode(False), torch.no_grad():
            out = wq(w)
        self._wq_cache = (tracked + (grid, ), out)
        return out

    def _weight_cache_allowed(self, wq, w):
        """Whether the cached weight may be used / built now (see the
        module docstring)."""
        if wq.state != 'quantizing' or self.training or \
                type(wq).forward is not Quantizer.forward or \
                wq._forward_hooks or wq._forward_pre_hooks or \
                _module_mod._global_forward_hooks or \
                _module_mod._global_forward_pre_hooks or tracing():
            return False
        return not (torch.is_grad_enabled() and (
            w.requires_grad or wq.scale.requires_grad
            or wq.zero_point.requires_grad))

    def clear_cache(self):
        """Drop the cached quantized weight (rebuilt when needed)."""
        self._wq_cache = None

    def train(self, mode=True):
        self.clear_cache()
        return super().train(mode)

    def _apply(self, *args, **kwargs):
        self.clear_cache()
        return super()._apply(*args, **kwargs)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self.clear_cache()  # the caller may write the tensors in place
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def __getstate__(self):
        state = self.__dict__.copy()
        state['_wq_cache'] = None  # weak references do not pickle
        return state

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self.clear_cache()
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


def attention_matmuls(owner, a_bits, matmul1, matmul2, softmax_quant):
    """``owner.matmul1`` (``q k^T``) and ``owner.matmul2`` (``attn @ v``)
    of a quantized attention: ``a_bits`` unless ``matmul1`` / ``matmul2``
    say otherwise; ``softmax_quant`` None leaves the post-softmax
    attention FP, else it is quantized by a
    :class:`~dfq_dense.quant.softmax_quant.SoftmaxQuantizer`."""
    owner.matmul1 = QuantMatMul(**dict(dict(bits=a_bits), **(matmul1 or {})))
    owner.matmul2 = QuantMatMul(**dict(dict(bits=a_bits), **(matmul2 or {})))
    if softmax_quant is None:
        owner.matmul2.quantizer_a = nn.Identity()
    else:
        from .softmax_quant import SoftmaxQuantizer
        sq = dict(softmax_quant)
        sq.pop('type', None)
        sq.setdefault('bits', a_bits)
        owner.matmul2.quantizer_a = SoftmaxQuantizer(**sq)


class WindowAttentionParts:
    """What the quantized window attentions (mmdet's / mmseg's
    :class:`QuantWindowMSA`, timm's
    :class:`~dfq_dense.quant.timm_modules.QuantTimmWindowAttention`) share:
    the FP module's parameters and layers taken over as they are (the
    state-dict keys unchanged), the two quantized matmuls, and the padding
    value of the LayerNorm reparameterisation."""

    def _adopt_window_attention(self, module, a_bits, matmul1, matmul2,
                                softmax_quant):
        self.relative_position_bias_table = \
            module.relative_position_bias_table
        persistent = 'relative_position_index' not in \
            module._non_persistent_buffers_set
        self.register_buffer('relative_position_index',
                             module.relative_position_index,
                             persistent=persistent)
        self.qkv = module.qkv
        self.attn_drop = module.attn_drop
        self.proj = module.proj
        self.proj_drop = module.proj_drop
        self.softmax = module.softmax
        attention_matmuls(self, a_bits, matmul1, matmul2, softmax_quant)
        # Set by the LayerNorm reparameterisation (see reparam.py).
        self.register_buffer('pad_value', None)

    def set_pad_value(self, value):
        """What a zero-padding token must be after the LayerNorm in front of
        ``qkv`` was reparameterised (``y -> y / r1 + s * r2``): the image of
        0, so padded windows give the same ``qkv`` output as before."""
        self.pad_value = value

    def _restore_padding(self, x):
        # The Swin blocks (mmdet's, mmseg's, timm's) pad the LayerNorm
        # output with zero tokens; a real token is never exactly the zero
        # vector.
        pad = (x == 0).all(dim=-1, keepdim=True)
        if not bool(pad.any()):
            return x
        return torch.where(pad, self.pad_value.to(x), x)


@MODELS.register_module()
class QuantWindowMSA(WindowAttentionParts, nn.Module):
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
        self._adopt_window_attention(module, a_bits, matmul1, matmul2,
                                     softmax_quant)

    def init_weights(self):
        trunc_normal_(self.relative_position_bias_table, std=0.02)

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
