"""Forward hooks that record what the methods read inside the window
attention of a Swin backbone.

Every method reads a different tensor of the same attention call:

* PSAQ-ViT (its patch-similarity entropy) and MimiQ's distillation read the
  attention output ``attn @ v`` (heads concatenated, the input of ``proj``):
  record ``'feat'``;
* MimiQ's inter-head similarity reads the per-head logits ``(q * scale) @
  k^T``: record ``'logits'``;
* SPDFQ's attention-prior alignment reads the post-softmax attention:
  record ``'probs'``.

None of them is the input or output of the attention module itself, so one
recorder, :class:`SwinAttnRecorder`, hooks every attention call once: it
opens an entry when ``ShiftWindowMSA.forward`` starts (the hooks inside the
attention see windows only, so ``hw_shape`` and the image batch size are
taken there), lets one hook per requested tensor fill it, and closes it when
the call returns.  :class:`AttnOutputRecorder`,
:class:`~dfq_dense.synth.qk_hooks.AttnLogitsRecorder` and
:class:`~dfq_dense.synth.spdfq.AttnProbRecorder` are the recorder with the
arguments each method passes.

What is specific to mmdet's / mmseg's Swin (``stages[i].blocks[j].attn`` is
a ``ShiftWindowMSA`` that pads the token grid right/bottom to multiples of
the window size, cyclically shifts it for shifted blocks, partitions it into
windows and calls ``w_msa``, a ``WindowMSA`` or its quantized replacement
:class:`dfq_dense.quant.modules.QuantWindowMSA`) lives in
:class:`WindowAttentionSite` alone: which modules to hook, how to read the
call's arguments, how ``qkv`` splits into ``q, k, v``, and which window
tokens are padding.  Another attention (e.g. timm's) needs another site
class, not another recorder.

The validity mask of the window tokens is built exactly as
``ShiftWindowMSA.forward`` transforms its input: ones ``(1, H, W, 1)`` ->
``F.pad`` right/bottom to ``(H_pad, W_pad)`` -> ``torch.roll(-shift,
-shift)`` if ``shift_size > 0`` -> window partition (windows ordered
row-major inside each image, images outermost).
"""
import importlib
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    'SwinAttnRecorder', 'AttnOutputRecorder', 'WindowAttentionSite',
    'TimmWindowAttentionSite', 'TimmAttentionSite', 'timm_window_valid_mask',
    'swin_attention_sites', 'find_shift_window_msa', 'window_valid_mask',
    'split_qkv', 'qk_logits', 'RECORDABLE'
]

#: What a recorder can record at every attention call (see
#: :class:`SwinAttnRecorder`).
RECORDABLE = ('feat', 'logits', 'probs')


def _shift_window_msa_types() -> Tuple[type, ...]:
    types = []
    for pkg in ('mmdet', 'mmseg'):
        try:
            swin = importlib.import_module(f'{pkg}.models.backbones.swin')
            types.append(swin.ShiftWindowMSA)
        except Exception:  # pragma: no cover - package missing
            pass
    return tuple(types)


def find_shift_window_msa(backbone: nn.Module) -> List[Tuple[str, nn.Module]]:
    """All ``ShiftWindowMSA`` modules of ``backbone`` in forward order."""
    types = _shift_window_msa_types()
    found = []
    for name, mod in backbone.named_modules():
        if types and isinstance(mod, types):
            found.append((name, mod))
        elif not types and type(mod).__name__ == 'ShiftWindowMSA':
            found.append((name, mod))  # pragma: no cover
    return found


def window_valid_mask(hw_shape: Tuple[int, int], window_size: int,
                      shift_size: int = 0,
                      device: Optional[torch.device] = None) -> torch.Tensor:
    """Validity of the tokens of every window of one image, ``(nW, ws*ws)``.

    ``True`` for real tokens, ``False`` for the zero padding that
    ``ShiftWindowMSA`` appends (right and bottom) to reach multiples of the
    window size; the padding follows the cyclic shift of shifted blocks.
    """
    H, W = int(hw_shape[0]), int(hw_shape[1])
    ws = int(window_size)
    mask = torch.ones((1, H, W, 1), device=device)
    pad_r = (ws - W % ws) % ws
    pad_b = (ws - H % ws) % ws
    mask = F.pad(mask, (0, 0, 0, pad_r, 0, pad_b))
    Hp, Wp = mask.shape[1], mask.shape[2]
    if shift_size > 0:
        mask = torch.roll(mask, shifts=(-shift_size, -shift_size), dims=(1, 2))
    # window partition: (1, Hp/ws, ws, Wp/ws, ws, 1) -> (nW, ws, ws, 1)
    mask = mask.view(1, Hp // ws, ws, Wp // ws, ws, 1)
    mask = mask.permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws)
    return mask > 0.5


def split_qkv(qkv: torch.Tensor, num_heads: int
              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``q, k, v`` (each ``(B, heads, N, head_dim)``) from the output of
    ``WindowMSA.qkv`` ``(B, N, 3C)``, split as ``WindowMSA.forward`` does
    (``reshape(B, N, 3, heads, C / heads)``)."""
    B, N, C3 = qkv.shape
    C = C3 // 3
    qkv = qkv.reshape(B, N, 3, num_heads, C // num_heads).permute(2, 0, 3, 1,
                                                                  4)
    return qkv[0], qkv[1], qkv[2]


def qk_logits(qkv: torch.Tensor, num_heads: int,
              scale: float) -> torch.Tensor:
    """``(q * scale) @ k^T`` per head from the ``qkv`` Linear output.

    Args:
        qkv: ``(B, N, 3C)``, the output of ``WindowMSA.qkv``.
        num_heads: heads of the attention.
        scale: ``WindowMSA.scale`` (``head_dim ** -0.5`` unless overridden).

    Returns:
        ``(B, heads, N, N)``: query index on dim -2, key index on dim -1.
    """
    B, N, C3 = qkv.shape
    C = C3 // 3
    qkv = qkv.reshape(B, N, 3, num_heads, C // num_heads).permute(2, 0, 3, 1,
                                                                  4)
    q, k = qkv[0], qkv[1]
    return (q * scale) @ k.transpose(-2, -1)


class WindowAttentionSite:
    """One Swin window attention as the recorders see it.

    The only place that knows the layout of mmdet's / mmseg's
    ``ShiftWindowMSA`` (``self.block``) and of its ``w_msa`` (``WindowMSA``
    or :class:`~dfq_dense.quant.modules.QuantWindowMSA`, which keeps
    ``qkv``, ``softmax``, ``proj``, ``num_heads`` and ``scale``):

    * ``block``: its forward is one attention call; a pre-hook there reads
      :meth:`call_shape`, a hook closes the record;
    * ``qkv`` (output ``(B_img * nW, N, 3C)``), ``softmax`` (output
      ``(B_img * nW, heads, N, N)``) and ``proj`` (input ``(B_img * nW, N,
      C)``, ``attn @ v``) are the modules whose tensors are recorded;
    * :meth:`logits` splits the ``qkv`` output as the forward does;
    * :meth:`valid` flags the padding tokens of every window.

    ``qkv`` may be a quantized Linear: its hook then sees the quantized
    output, and the logits are recomputed in floating point, i.e. without
    the operand quantization of ``matmul1``.
    """

    #: attribute of ``w_msa`` holding the module tapped for each record
    TAPS = dict(feat='proj', logits='qkv', probs='softmax')

    def __init__(self, name: str, block: nn.Module):
        self.name = name
        self.block = block
        self.w_msa = block.w_msa
        self.window_size = int(block.window_size)
        self.shift_size = int(block.shift_size)

    @property
    def num_heads(self) -> int:
        return int(self.w_msa.num_heads)

    def tap(self, what: str) -> Optional[nn.Module]:
        """The module whose tensor gives record ``what`` (None if absent)."""
        mod = getattr(self.w_msa, self.TAPS[what], None)
        return mod if isinstance(mod, nn.Module) else None

    @staticmethod
    def call_shape(args, kwargs) -> Tuple[Tuple[int, int], int]:
        """``(hw_shape, image batch size)`` of ``ShiftWindowMSA.forward(
        query, hw_shape)``."""
        query = args[0] if args else kwargs['query']
        hw_shape = args[1] if len(args) > 1 else kwargs['hw_shape']
        return (int(hw_shape[0]), int(hw_shape[1])), int(query.shape[0])

    def logits(self, qkv_out: torch.Tensor) -> torch.Tensor:
        """Per-head ``(q * scale) @ k^T`` from the ``qkv`` output,
        ``(B_img * nW, heads, N, N)``."""
        return qk_logits(qkv_out, self.num_heads, self.w_msa.scale)

    def valid(self, hw_shape, device) -> torch.Tensor:
        """``(nW, N)`` bool, False on ``ShiftWindowMSA``'s zero padding."""
        return window_valid_mask(hw_shape, self.window_size, self.shift_size,
                                 device)

    #: tokens in front of the patch tokens (a CLS token) of every window
    prefix_tokens = 0

    @property
    def call_module(self) -> nn.Module:
        """The module whose forward is one attention call: the record of
        a call is opened by a pre-hook and closed by a hook on it."""
        return self.block

    def context_hooks(self):
        """``[(module, pre_hook)]`` registered before the record's hooks
        (``pre_hook(module, args, kwargs)``), for what a site reads
        outside :attr:`call_module`; none here."""
        return []

    def hooks(self, what: str):
        """``[(module, kind, read)]`` giving record ``what``: ``kind``
        ``'pre'`` (a forward pre-hook, ``read(rec, args, kwargs, None)``)
        or ``'out'`` (a forward hook, ``read(rec, args, None, output)``);
        ``read`` returns the ``(B_img * nW, ...)`` tensor of the record,
        or None when it only kept something in ``rec`` for a later hook.
        Empty when the attention lacks the module."""
        mod = self.tap(what)
        if mod is None:
            return []
        if what == 'feat':
            return [(mod, 'pre', lambda rec, args, kw, out: args[0])]
        if what == 'logits':
            return [(mod, 'out',
                     lambda rec, args, kw, out: self.logits(out))]
        return [(mod, 'out', lambda rec, args, kw, out: out)]


def _timm_classes():
    """timm's Swin block, Swin window attention and ViT attention classes
    (None each without timm)."""
    try:
        from timm.layers.attention import Attention
        from timm.models.swin_transformer import (SwinTransformerBlock,
                                                  WindowAttention)
    except ImportError:  # pragma: no cover
        return None, None, None
    return SwinTransformerBlock, WindowAttention, Attention


def timm_window_valid_mask(hw_shape, window_size, shift_size=(0, 0),
                           device=None) -> torch.Tensor:
    """Validity of the window tokens of one image in timm's Swin block,
    ``(nW, wh * ww)``: ones ``(1, H, W, 1)`` -> ``torch.roll(-shift)`` ->
    ``F.pad`` right/bottom to multiples of the window (timm pads *after*
    the shift, mmdet before) -> window partition (row-major)."""
    H, W = int(hw_shape[0]), int(hw_shape[1])
    wh, ww = (int(v) for v in window_size)
    mask = torch.ones((1, H, W, 1), device=device)
    if any(shift_size):
        mask = torch.roll(mask, shifts=(-int(shift_size[0]),
                                        -int(shift_size[1])), dims=(1, 2))
    mask = F.pad(mask, (0, 0, 0, (ww - W % ww) % ww, 0, (wh - H % wh) % wh))
    Hp, Wp = mask.shape[1], mask.shape[2]
    mask = mask.view(1, Hp // wh, wh, Wp // ww, ww, 1)
    mask = mask.permute(0, 1, 3, 2, 4, 5).reshape(-1, wh * ww)
    return mask > 0.5


class TimmWindowAttentionSite(WindowAttentionSite):
    """One window attention of timm's Swin (classification track).

    ``block`` is a ``timm.models.swin_transformer.SwinTransformerBlock``
    (its forward, ``x`` ``(B, H, W, C)``, holds one attention call: shift,
    pad, partition, ``block.attn``), ``w_msa`` its ``attn`` (timm's
    ``WindowAttention`` or
    :class:`~dfq_dense.quant.timm_modules.QuantTimmWindowAttention`).  A
    record is opened and closed around the ``attn`` call (the grid ``(H,
    W)`` kept by a pre-hook on the block), so that the recompute of an
    activation-checkpointed block runs the record's hooks again.
    The logits are split from the ``qkv`` output as timm does; ``probs``
    are the softmax output when the attention runs its explicit branch
    (the quantized module, or timm's with ``fused_attn`` False) and
    otherwise (timm's fused ``scaled_dot_product_attention``) recomputed
    from the ``qkv`` output, the relative position bias and the shift mask
    of the call, ``softmax(q k^T * scale + bias + mask)``: what the fused
    kernel computes.
    """

    def __init__(self, name: str, block: nn.Module):
        self.name = name
        self.block = block
        self.w_msa = block.attn
        ws, ss = tuple(block.window_size), tuple(block.shift_size)
        self.window_hw, self.shift_hw = ws, ss
        # int for square windows (what the records and block_specs give)
        self.window_size = ws[0] if ws[0] == ws[1] else ws
        self.shift_size = ss[0] if ss[0] == ss[1] else ss

    @property
    def call_module(self) -> nn.Module:
        """The attention module ``attn`` (not the block): an activation
        checkpoint of the block (:func:`~dfq_dense.synth.loop
        .checkpointed_blocks`) recomputes what is inside the block but not
        the block's own hooks, so the record is opened and closed around
        the ``attn`` call, whose hooks the recompute runs again."""
        return self.w_msa

    def context_hooks(self):
        """A pre-hook on the block keeps its token grid ``(H, W)`` (the
        ``attn`` call sees windows only) for the ``attn`` calls of its
        forward and of its recompute."""

        def keep_grid(module, args, kwargs):
            x = args[0] if args else kwargs['x']
            self._grid = (int(x.shape[1]), int(x.shape[2]))

        return [(self.block, keep_grid)]

    def call_shape(self, args, kwargs):
        """``(hw_shape, image batch size)`` of an ``attn`` call: the grid
        the block's pre-hook kept, the windows ``(B_img * nW, N, C)`` of
        the call divided by the windows per image."""
        x = args[0] if args else kwargs['x']
        hw = getattr(self, '_grid', None)
        if hw is None:  # attn called outside its block: the block's grid
            hw = tuple(int(v) for v in self.block.input_resolution)
        nw = math.prod(-(-int(s) // int(w))
                       for s, w in zip(hw, self.window_hw))
        return hw, int(x.shape[0]) // nw

    def valid(self, hw_shape, device):
        return timm_window_valid_mask(hw_shape, self.window_hw,
                                      self.shift_hw, device)

    def _explicit(self) -> bool:
        return not getattr(self.w_msa, 'fused_attn', False)

    def rel_pos_bias(self) -> torch.Tensor:
        """``(1, heads, N, N)``, as ``WindowAttention._get_rel_pos_bias``."""
        m = self.w_msa
        n = m.window_area
        bias = m.relative_position_bias_table[
            m.relative_position_index.view(-1)].view(n, n, -1)
        return bias.permute(2, 0, 1).contiguous().unsqueeze(0)

    def hooks(self, what):
        if what != 'probs' or self._explicit():
            return super().hooks(what)
        qkv = self.tap('logits')
        if qkv is None:
            return []

        def keep_mask(rec, args, kw, out):
            rec['_mask'] = kw.get('mask', args[1] if len(args) > 1 else None)

        def probs(rec, args, kw, out):
            attn = self.logits(out) + self.rel_pos_bias()
            mask = rec.pop('_mask', None)
            if mask is not None:
                nw, n = mask.shape[0], attn.shape[-1]
                attn = attn.view(-1, nw, self.num_heads, n, n) + \
                    mask.unsqueeze(1).unsqueeze(0)
                attn = attn.view(-1, self.num_heads, n, n)
            return attn.softmax(-1)

        return [(self.w_msa, 'pre', keep_mask), (qkv, 'out', probs)]


class TimmAttentionSite(WindowAttentionSite):
    """One global attention of timm's ViT / DeiT, seen as a single window
    of all ``N`` tokens (CLS and other prefix tokens first).

    ``block`` and ``w_msa`` are both the attention module (timm's
    ``Attention`` or :class:`~dfq_dense.quant.timm_modules
    .QuantTimmAttention`): its forward, ``x`` ``(B, N, C)``, is one call.
    ``prefix_tokens`` (the model's ``num_prefix_tokens``: 1 for DeiT's CLS,
    2 with a distillation token) go into the records, so that PSAQ-ViT's
    patch similarity can use the patch tokens only, as the official code
    does (see :func:`~dfq_dense.synth.losses.patch_tokens`); ``valid`` is
    True everywhere (no padding).  ``hw_shape`` is the patch grid
    (``grid``, from the model's patch embedding) when it matches the
    tokens, else ``(1, patches)``.  The logits apply timm's ``q_norm`` /
    ``k_norm``; ``probs`` are the quantized module's softmax output, else
    recomputed from the ``qkv`` output (timm calls ``Tensor.softmax`` or a
    fused kernel: no module to hook) with the call's ``attn_mask``.
    """

    def __init__(self, name: str, attn: nn.Module, prefix_tokens: int = 0,
                 grid=None):
        self.name = name
        self.block = attn
        self.w_msa = attn
        self.prefix_tokens = int(prefix_tokens)
        self.grid = tuple(int(g) for g in grid) if grid else None
        self.window_size = None  # set per call: all tokens
        self.shift_size = 0

    def call_shape(self, args, kwargs):
        x = args[0] if args else kwargs['x']
        n = int(x.shape[1]) - self.prefix_tokens
        hw = self.grid if self.grid and self.grid[0] * self.grid[1] == n \
            else (1, n)
        return hw, int(x.shape[0])

    def valid(self, hw_shape, device):
        n = int(hw_shape[0]) * int(hw_shape[1]) + self.prefix_tokens
        return torch.ones((1, n), dtype=torch.bool, device=device)

    def logits(self, qkv_out):
        m = self.w_msa
        B, N, _ = qkv_out.shape
        qkv = qkv_out.reshape(B, N, 3, m.num_heads, m.head_dim).permute(
            2, 0, 3, 1, 4)
        q, k = m.q_norm(qkv[0]), m.k_norm(qkv[1])
        return (q * m.scale) @ k.transpose(-2, -1)

    def hooks(self, what):
        if what != 'probs' or isinstance(self.tap('probs'), nn.Softmax):
            return super().hooks(what)
        from timm.layers.attention import resolve_self_attn_mask
        qkv = self.tap('logits')

        def keep_mask(rec, args, kw, out):
            rec['_mask'] = (kw.get('attn_mask', args[1] if len(args) > 1
                                   else None), kw.get('is_causal', False))

        def probs(rec, args, kw, out):
            attn = self.logits(out)
            mask, causal = rec.pop('_mask', (None, False))
            bias = resolve_self_attn_mask(attn.shape[-1], attn, mask, causal)
            return (attn if bias is None else attn + bias).softmax(-1)

        return [(self.w_msa, 'pre', keep_mask), (qkv, 'out', probs)]


def swin_attention_sites(backbone: nn.Module) -> List[WindowAttentionSite]:
    """The attention sites of ``backbone``, forward order: a
    :class:`WindowAttentionSite` per ``ShiftWindowMSA`` (mmdet / mmseg
    Swin), a :class:`TimmWindowAttentionSite` per timm
    ``SwinTransformerBlock`` and a :class:`TimmAttentionSite` per timm ViT /
    DeiT ``Attention`` (or their quantized replacements)."""
    sites = [WindowAttentionSite(name, mod)
             for name, mod in find_shift_window_msa(backbone)]
    swin_block, window_attn, vit_attn = _timm_classes()
    if swin_block is None:
        return sites
    prefix = int(getattr(backbone, 'num_prefix_tokens', 0) or 0)
    embed = getattr(backbone, 'patch_embed', None)
    grid = getattr(embed, 'grid_size', None)
    for name, mod in backbone.named_modules():
        if isinstance(mod, swin_block):
            sites.append(TimmWindowAttentionSite(name, mod))
        elif (isinstance(mod, vit_attn) and
              type(mod).forward is vit_attn.forward) or \
                getattr(mod, 'records_as', None) == 'timm_vit_attention':
            # timm's Attention, or a module standing in for it (the
            # quantized one says so: synth/ does not import quant/)
            sites.append(TimmAttentionSite(name, mod, prefix, grid))
    return sites


class SwinAttnRecorder:
    """Record, at every window attention of a Swin backbone, what a method
    reads there.

    Usable as a context manager (hooks removed on exit) or as a plain object
    (call :meth:`remove`).  After each forward of the backbone,
    ``self.records`` holds one dict per attention call, in forward order::

        {'feat':   (B_img, nW, N, head_dim) attn @ v, heads averaged
                   (average_heads=True) or (B_img, nW, N, C) concatenated,
         'logits': (B_img, nW, heads, N, N) (q * scale) @ k^T,
         'probs':  (B_img, nW, heads, N, N) softmax output (rows sum to 1),
                   or (B_img, nW, N, N) averaged over the heads
                   (average_heads_probs=True),
         'valid':  (B_img, nW, N) bool, False on Swin's padding tokens,
         'prefix_tokens': tokens before the patch tokens of every window
                   (1 for DeiT's CLS token, 0 for Swin),
         'name': module name, 'hw_shape': (H, W), 'shift_size': int,
         'window_size': int, 'num_heads': int,
         'depth': l in 1..L (the attention's index over all stages),
         'num_blocks': L}

    with only the tensors named in ``record``.  In ``logits[..., i, j]``
    ``i`` is the query and ``j`` the key; ``N`` is ``window_size ** 2``.
    The tensors keep their autograd graph.  Records accumulate across
    forwards; call :meth:`clear` before a forward.  Set ``enabled = False``
    to run forwards that are not recorded.  Set ``keep = False`` to run the
    hooks without keeping what they record: the recompute of an
    activation-checkpointed block (during backward) must run exactly the
    operations its forward ran, hooks included, but its records are not
    wanted (see :func:`~dfq_dense.synth.loop.checkpointed_blocks`).

    The logits deliberately leave out the relative position bias (a learnt,
    input-independent per-head constant: no gradient to the pixels) and the
    ``-100`` shift mask of shifted windows (after MimiQ's per-query min-max
    normalisation it would squash the real logits into a narrow band); only
    Swin's zero-padding tokens are flagged (``valid``).  ``probs`` are the
    attention as the block really used it (bias and shift mask included).

    Args:
        backbone: mmdet/mmseg ``SwinTransformer`` (or any module containing
            ``ShiftWindowMSA`` modules).
        record: names from :data:`RECORDABLE`.
        average_heads: average ``feat`` over the heads (PSAQ-ViT).
        average_heads_probs: average ``probs`` over the heads.

    Raises:
        ValueError: no ``ShiftWindowMSA`` in ``backbone``, nothing (or an
            unknown name) to record, or an attention without the module a
            record is taken from.
    """

    def __init__(self, backbone: nn.Module, record: Sequence[str] = ('feat', ),
                 average_heads: bool = True,
                 average_heads_probs: bool = False):
        cls = type(self).__name__
        self.sites = swin_attention_sites(backbone)
        if not self.sites:
            raise ValueError(
                f'{cls} needs a Swin backbone with ShiftWindowMSA attention '
                '(mmdet / mmseg) or a timm Swin / ViT / DeiT classifier; '
                f'found {type(backbone).__name__}')
        record = tuple(record)
        unknown = [r for r in record if r not in RECORDABLE]
        if unknown or not record:
            raise ValueError(f'{cls}: nothing to record' if not record else
                             f'{cls}: cannot record {unknown}; recordable: '
                             f'{RECORDABLE}')
        self.record = record
        self.average_heads = bool(average_heads)
        self.average_heads_probs = bool(average_heads_probs)
        # (name, ShiftWindowMSA) in forward order
        self.modules = [(s.name, s.block) for s in self.sites]
        self.num_blocks = len(self.sites)
        self.enabled = True
        self.keep = True
        self.records: List[Dict] = []
        self._pending: Dict[int, Dict] = {}
        self._mask_cache: Dict[tuple, torch.Tensor] = {}
        self._handles = []
        for idx, site in enumerate(self.sites):
            taps = {}
            for what in record:
                taps[what] = site.hooks(what)
                if not taps[what]:
                    raise ValueError(
                        f'{cls}: {site.name}.w_msa '
                        f'({type(site.w_msa).__name__}) has no '
                        f'`{site.TAPS[what]}` module to hook')
            for module, pre_hook in site.context_hooks():
                self._handles.append(module.register_forward_pre_hook(
                    pre_hook, with_kwargs=True))
            self._handles.append(site.call_module.register_forward_pre_hook(
                self._open_hook(idx, site), with_kwargs=True))
            # registered in the order the existing Swin hooks always were
            for what in ('logits', 'probs', 'feat'):
                for module, kind, read in taps.get(what, ()):
                    self._handles.append(self._register(
                        module, kind, self._read_hook(idx, site, what,
                                                      read)))
            self._handles.append(site.call_module.register_forward_hook(
                self._close_hook(idx)))

    # ------------------------------------------------------------------ hooks
    def _open_hook(self, idx, site):
        """Opens the record of one call of attention ``idx``."""

        def hook(module, args, kwargs):
            if not self.enabled:
                return
            hw_shape, b_img = site.call_shape(args, kwargs)
            first = args[0] if args else next(iter(kwargs.values()))
            valid = self._valid(site, hw_shape, first.device)
            self._pending[idx] = dict(
                name=site.name, hw_shape=hw_shape,
                shift_size=site.shift_size,
                window_size=site.window_size if site.window_size is not None
                else valid.shape[-1],
                num_heads=site.num_heads, depth=idx + 1,
                num_blocks=self.num_blocks, b_img=b_img,
                prefix_tokens=site.prefix_tokens, valid_win=valid)

        return hook

    def _windows(self, t, rec, what):
        """``(B_img * nW, ...)`` -> ``(B_img, nW, ...)`` with a shape check
        (the last dim is a token dim of the window)."""
        b_img = rec['b_img']
        nw, n = rec['valid_win'].shape
        assert t.shape[0] == b_img * nw and t.shape[-2] == n, (
            f'unexpected {what} {tuple(t.shape)} for hw_shape '
            f'{rec["hw_shape"]}, window {rec["window_size"]}, batch {b_img}')
        return t.reshape(b_img, nw, *t.shape[1:])

    @staticmethod
    def _register(module, kind, hook):
        if kind == 'pre':
            return module.register_forward_pre_hook(
                lambda m, args, kwargs: hook(args, kwargs, None),
                with_kwargs=True)
        return module.register_forward_hook(
            lambda m, args, output: hook(args, {}, output))

    def _read_hook(self, idx, site, what, read):
        """A hook that puts what ``read`` returns into the open record of
        attention ``idx`` as ``what`` (windowed, heads averaged as asked).
        Nothing happens outside an attention call (e.g. ``proj`` or
        ``qkv`` called on their own)."""
        label = dict(feat='proj input', logits='qk logits',
                     probs='attention')[what]

        def hook(args, kwargs, output):
            rec = self._pending.get(idx)
            if rec is None:
                return
            value = read(rec, args, kwargs, output)
            if value is None:
                return
            value = self._windows(value, rec, label)
            if what == 'feat' and self.average_heads:
                b_img, nw, n, c = value.shape
                heads = site.num_heads
                value = value.reshape(b_img, nw, n, heads,
                                      c // heads).mean(3)
            elif what == 'probs' and self.average_heads_probs:
                value = value.mean(2)
            rec[what] = value

        return hook

    def _close_hook(self, idx):

        def hook(module, args, output):
            rec = self._pending.pop(idx, None)
            if rec is None or not self.keep:
                return
            b_img = rec.pop('b_img')
            valid = rec.pop('valid_win')
            for key in [k for k in rec if k.startswith('_')]:
                del rec[key]  # what a site kept between its hooks
            rec['valid'] = valid.unsqueeze(0).expand(b_img, *valid.shape)
            self.records.append(rec)

        return hook

    def _valid(self, site, hw_shape, device):
        key = (type(site), hw_shape, site.window_size, site.shift_size,
               site.prefix_tokens, str(device))
        if key not in self._mask_cache:
            self._mask_cache[key] = site.valid(hw_shape, device)
        return self._mask_cache[key]

    # ------------------------------------------------------------------- api
    def block_specs(self) -> List[Tuple[int, int]]:
        """``(num_heads, window_size)`` of every attention, forward order."""
        return [(s.num_heads, s.window_size) for s in self.sites]

    def logits(self) -> List[torch.Tensor]:
        """The recorded ``logits`` tensors, in forward order."""
        return [r['logits'] for r in self.records]

    def probs(self) -> List[torch.Tensor]:
        """The recorded ``probs`` tensors, in forward order."""
        return [r['probs'] for r in self.records]

    def clear(self):
        """Drop the records (call before every forward)."""
        self.records = []
        self._pending = {}

    def remove(self):
        """Remove all hooks and drop the records."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False

    def __len__(self):
        return len(self.sites)


#: The former name of the shared hook bookkeeping.
_SwinAttnHooks = SwinAttnRecorder


class AttnOutputRecorder(SwinAttnRecorder):
    """:class:`SwinAttnRecorder` of the attention outputs (``feat``), what
    PSAQ-ViT's patch similarity and MimiQ's distillation read.

    Args:
        backbone: mmdet/mmseg ``SwinTransformer``.
        average_heads: average over heads (default, as in PSAQ-ViT); if
            False ``feat`` is ``(B_img, nW, N, C)`` with heads concatenated.
    """

    def __init__(self, backbone: nn.Module, average_heads: bool = True):
        super().__init__(backbone, record=('feat', ),
                         average_heads=average_heads)
