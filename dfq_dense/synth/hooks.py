"""Forward hooks that record the window-attention outputs of a Swin backbone.

PSAQ-ViT measures the diversity of the *patch similarity* of the attention
output ``(attn @ v)`` (heads concatenated, before ``proj``).  In a Swin
backbone (mmdet's or mmseg's ``SwinTransformer``) every block owns a
``ShiftWindowMSA`` (``stages[i].blocks[j].attn``) that pads the token grid to a
multiple of the window size (right/bottom zero padding), cyclically shifts it
for shifted blocks and partitions it into windows before calling
``w_msa`` (a ``WindowMSA``), whose ``proj`` Linear receives ``(attn @ v)`` of
shape ``(B_img * nW, N = ws * ws, C)``.

:class:`AttnOutputRecorder` registers

* a forward pre-hook on each ``ShiftWindowMSA`` that remembers ``hw_shape``
  (second argument of ``forward(query, hw_shape)``) and the image batch size,
* a forward pre-hook on its ``w_msa.proj`` that grabs the proj input,
  averages it over heads and stores it together with a validity mask that is
  ``False`` on the zero-padding tokens Swin added.

The mask is built exactly as ``ShiftWindowMSA.forward`` transforms its input:
ones ``(1, H, W, 1)`` -> ``F.pad`` right/bottom to ``(H_pad, W_pad)`` ->
``torch.roll(-shift, -shift)`` if ``shift_size > 0`` -> window partition
(windows ordered row-major inside each image, images outermost).

The ``ShiftWindowMSA`` pre-hook, the mask cache and the hook bookkeeping live
in ``_SwinAttnHooks``, the base of every Swin attention recorder
(:class:`AttnOutputRecorder`,
:class:`~dfq_dense.synth.qk_hooks.AttnLogitsRecorder`,
:class:`~dfq_dense.synth.spdfq.AttnProbRecorder`).
"""
import importlib
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn


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


class _SwinAttnHooks:
    """Hook bookkeeping shared by the Swin window-attention recorders.

    Finds the ``ShiftWindowMSA`` modules of ``backbone`` (ValueError, naming
    the recorder, when there are none) and provides what every recorder
    needs around its own hooks: the ``ShiftWindowMSA`` forward pre-hook
    (:meth:`_make_msa_hook`, which opens a pending entry per attention with
    :meth:`_open`), the cached validity masks of the window tokens
    (:meth:`_valid`), and ``records``, :meth:`clear`, :meth:`remove`, the
    context-manager protocol and ``len()`` (the number of attentions).
    Subclasses register their hooks and append their records.

    Set ``enabled = False`` to run forwards that are not recorded: the
    pre-hook then opens no entry, and the hooks inside the attention find
    none to fill.
    """

    def __init__(self, backbone: nn.Module):
        self.modules = find_shift_window_msa(backbone)
        if not self.modules:
            raise ValueError(
                f'{type(self).__name__} needs a Swin backbone with '
                f'ShiftWindowMSA attention; found {type(backbone).__name__}')
        self.enabled = True
        self.records: List[Dict] = []
        self._pending: Dict[int, object] = {}
        self._mask_cache: Dict[tuple, torch.Tensor] = {}
        self._handles = []

    # ------------------------------------------------------------------ hooks
    def _make_msa_hook(self, idx, name, msa):
        """Forward pre-hook of ``ShiftWindowMSA`` ``idx``: the hooks inside
        the attention see windows only, so ``hw_shape`` and the image batch
        size have to be taken here."""

        def hook(module, args, kwargs):
            if not self.enabled:
                return
            query = args[0] if args else kwargs['query']
            hw_shape = args[1] if len(args) > 1 else kwargs['hw_shape']
            self._pending[idx] = self._open(
                name, msa, (int(hw_shape[0]), int(hw_shape[1])), query)

        return hook

    def _open(self, name, msa, hw_shape, query):
        """The pending entry of one attention call: ``(hw_shape, B_img)``
        unless a subclass needs more."""
        return hw_shape, int(query.shape[0])

    def _pop_pending(self, idx, msa, device):
        """``(hw_shape, B_img, valid (nW, N))`` of the call of attention
        ``idx`` in progress (an entry of the default :meth:`_open`), or None
        when ``ShiftWindowMSA.forward`` did not open one (a sub-module called
        on its own, or ``enabled`` off)."""
        if idx not in self._pending:
            return None
        hw_shape, b_img = self._pending.pop(idx)
        return hw_shape, b_img, self._valid(hw_shape, msa.window_size,
                                            msa.shift_size, device)

    def _valid(self, hw_shape, window_size, shift_size, device):
        key = (hw_shape, int(window_size), int(shift_size), str(device))
        if key not in self._mask_cache:
            self._mask_cache[key] = window_valid_mask(
                hw_shape, window_size, shift_size, device)
        return self._mask_cache[key]

    # ------------------------------------------------------------------- api
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
        return len(self.modules)


class AttnOutputRecorder(_SwinAttnHooks):
    """Record heads-averaged window-attention outputs of a Swin backbone.

    Usable as a context manager (hooks removed on exit) or as a plain object
    (call :meth:`remove`).  After each forward of the backbone,
    ``self.records`` holds one dict per hooked attention, in forward order::

        {'feat':  (B_img, nW, N, head_dim) float, heads averaged,
         'valid': (B_img, nW, N) bool, False on padding tokens,
         'name': module name, 'hw_shape': (H, W), 'shift_size': int}

    Records accumulate across forwards; call :meth:`clear` before a forward.
    Set ``enabled = False`` to run forwards that are not recorded.

    Args:
        backbone: mmdet/mmseg ``SwinTransformer`` (or any module containing
            ``ShiftWindowMSA`` modules).
        average_heads: average over heads (default, as in PSAQ-ViT); if
            False ``feat`` is ``(B_img, nW, N, C)`` with heads concatenated.
    """

    def __init__(self, backbone: nn.Module, average_heads: bool = True):
        super().__init__(backbone)
        self.average_heads = average_heads
        for idx, (name, mod) in enumerate(self.modules):
            self._handles.append(mod.register_forward_pre_hook(
                self._make_msa_hook(idx, name, mod), with_kwargs=True))
            self._handles.append(mod.w_msa.proj.register_forward_pre_hook(
                self._make_proj_hook(idx, name, mod)))

    def _make_proj_hook(self, idx, name, msa):

        def hook(module, args):
            x = args[0]  # (B_img * nW, N, C)
            pending = self._pop_pending(idx, msa, x.device)
            if pending is None:
                return  # proj called outside ShiftWindowMSA.forward
            hw_shape, b_img, valid = pending  # valid: (nW, N)
            nw, n = valid.shape
            bnw, n_x, c = x.shape
            assert n_x == n and bnw == b_img * nw, (
                f'unexpected proj input {tuple(x.shape)} for hw_shape '
                f'{hw_shape}, window {msa.window_size}, batch {b_img}')
            feat = x.reshape(b_img, nw, n, c)
            if self.average_heads:
                heads = msa.w_msa.num_heads
                feat = feat.reshape(b_img, nw, n, heads, c // heads).mean(3)
            self.records.append(
                dict(feat=feat,
                     valid=valid.unsqueeze(0).expand(b_img, nw, n),
                     name=name, hw_shape=hw_shape,
                     shift_size=int(msa.shift_size)))

        return hook
