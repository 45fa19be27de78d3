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
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    'SwinAttnRecorder', 'AttnOutputRecorder', 'WindowAttentionSite',
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


def swin_attention_sites(backbone: nn.Module) -> List[WindowAttentionSite]:
    """A :class:`WindowAttentionSite` per ``ShiftWindowMSA``, forward
    order."""
    return [WindowAttentionSite(name, mod)
            for name, mod in find_shift_window_msa(backbone)]


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
                f'{cls} needs a Swin backbone with ShiftWindowMSA attention; '
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
                taps[what] = site.tap(what)
                if taps[what] is None:
                    raise ValueError(
                        f'{cls}: {site.name}.w_msa '
                        f'({type(site.w_msa).__name__}) has no '
                        f'`{site.TAPS[what]}` module to hook')
            self._handles.append(site.block.register_forward_pre_hook(
                self._open_hook(idx, site), with_kwargs=True))
            if 'logits' in taps:
                self._handles.append(taps['logits'].register_forward_hook(
                    self._logits_hook(idx, site)))
            if 'probs' in taps:
                self._handles.append(taps['probs'].register_forward_hook(
                    self._probs_hook(idx)))
            if 'feat' in taps:
                self._handles.append(taps['feat'].register_forward_pre_hook(
                    self._feat_hook(idx, site)))
            self._handles.append(site.block.register_forward_hook(
                self._close_hook(idx)))

    # ------------------------------------------------------------------ hooks
    def _open_hook(self, idx, site):
        """Opens the record of one call of attention ``idx``."""

        def hook(module, args, kwargs):
            if not self.enabled:
                return
            hw_shape, b_img = site.call_shape(args, kwargs)
            query = args[0] if args else kwargs['query']
            self._pending[idx] = dict(
                name=site.name, hw_shape=hw_shape,
                shift_size=site.shift_size, window_size=site.window_size,
                num_heads=site.num_heads, depth=idx + 1,
                num_blocks=self.num_blocks, b_img=b_img,
                valid_win=self._valid(site, hw_shape, query.device))

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

    def _feat_hook(self, idx, site):

        def hook(module, args):
            rec = self._pending.get(idx)
            if rec is None:
                return  # proj called outside ShiftWindowMSA.forward
            feat = self._windows(args[0], rec, 'proj input')
            if self.average_heads:
                b_img, nw, n, c = feat.shape
                heads = site.num_heads
                feat = feat.reshape(b_img, nw, n, heads, c // heads).mean(3)
            rec['feat'] = feat

        return hook

    def _logits_hook(self, idx, site):

        def hook(module, args, output):
            rec = self._pending.get(idx)
            if rec is None:
                return  # qkv called outside ShiftWindowMSA.forward
            rec['logits'] = self._windows(site.logits(output), rec,
                                          'qk logits')

        return hook

    def _probs_hook(self, idx):

        def hook(module, args, output):
            rec = self._pending.get(idx)
            if rec is None:
                return
            probs = self._windows(output, rec, 'attention')
            if self.average_heads_probs:
                probs = probs.mean(2)
            rec['probs'] = probs

        return hook

    def _close_hook(self, idx):

        def hook(module, args, output):
            rec = self._pending.pop(idx, None)
            if rec is None or not self.keep:
                return
            b_img = rec.pop('b_img')
            valid = rec.pop('valid_win')
            rec['valid'] = valid.unsqueeze(0).expand(b_img, *valid.shape)
            self.records.append(rec)

        return hook

    def _valid(self, site, hw_shape, device):
        key = (hw_shape, site.window_size, site.shift_size, str(device))
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
