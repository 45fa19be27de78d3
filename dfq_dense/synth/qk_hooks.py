"""Forward hooks that record the window-attention logits / probabilities of a
Swin backbone.

MimiQ compares the attention maps of the heads of every window attention; it
needs the *pre-softmax* logits ``(q * scale) @ k^T``.  SPDFQ aligns the
head-averaged *post-softmax* attention with a prior.  Neither tensor is the
input or output of a module of mmdet's / mmseg's ``WindowMSA`` (the product
is a bare ``@``), so :class:`AttnLogitsRecorder` registers

* a forward pre-hook on each ``ShiftWindowMSA`` that remembers ``hw_shape``
  and the image batch size (as
  :class:`~dfq_dense.synth.hooks.AttnOutputRecorder` does) and opens a record
  with the validity mask of the window tokens
  (:func:`~dfq_dense.synth.hooks.window_valid_mask`),
* a forward hook on its ``w_msa.qkv`` Linear (output ``(B_img * nW, N, 3C)``)
  that recomputes the per-head logits ``(q * w_msa.scale) @ k^T`` exactly as
  ``WindowMSA.forward`` splits ``qkv`` (``reshape(B, N, 3, heads, C/heads)``),
* optionally (``record_probs=True``) a forward hook on ``w_msa.softmax`` (the
  ``nn.Softmax`` module of ``WindowMSA``, output ``(B_img * nW, heads, N, N)``)
  that keeps the attention probabilities as the block really used them
  (relative position bias and shift mask included),
* a forward hook on the ``ShiftWindowMSA`` that closes the record and appends
  it to ``records``.

The logits deliberately leave out

* the relative position bias: it is a learnt, input-independent per-head
  constant, so it carries no gradient to the pixels, and MimiQ's
  inter-head similarity is defined on ``q k^T``;
* the shift mask of shifted windows: it adds ``-100`` to the pairs of tokens
  that come from different regions of the cyclically shifted map.  After a
  per-query min-max normalisation those ``-100`` entries would become the
  minimum and squash all real logits into a narrow band next to 1, so the
  maps would be compared on the mask pattern (identical for every head)
  rather than on their content.  The raw ``q k^T`` of every key of the
  window is used instead; only Swin's zero-padding tokens are flagged
  (``valid``).

Works for mmdet's and mmseg's ``SwinTransformer`` and for models whose
``WindowMSA`` was replaced by :class:`dfq_dense.quant.modules.QuantWindowMSA`
(which keeps ``qkv``, ``softmax``, ``num_heads`` and ``scale``; its ``qkv`` may
itself be a ``QuantLinear``: the hook then sees the quantized Linear's output,
and the logits are recomputed in floating point, i.e. without the operand
quantization of ``matmul1``).
"""
from typing import List

import torch
from torch import nn

from .hooks import _SwinAttnHooks

__all__ = ['AttnLogitsRecorder', 'qk_logits']


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


class AttnLogitsRecorder(_SwinAttnHooks):
    """Record per-head window-attention logits (and probabilities) of Swin.

    Usable as a context manager (hooks removed on exit) or as a plain object
    (call :meth:`remove`).  After each forward of the backbone,
    ``self.records`` holds one dict per hooked attention, in forward order::

        {'logits': (B_img, nW, heads, N, N) float, (q * scale) @ k^T
                   (only with record_logits=True),
         'probs':  (B_img, nW, heads, N, N) float, softmax output
                   (only with record_probs=True),
         'valid':  (B_img, nW, N) bool, False on padding tokens,
         'name': module name, 'hw_shape': (H, W), 'shift_size': int,
         'num_heads': int, 'window_size': int}

    In ``logits[..., i, j]`` ``i`` is the query and ``j`` the key; ``N`` is
    ``window_size ** 2`` and windows are ordered row-major inside each image
    (images outermost), as in ``ShiftWindowMSA``.  The tensors keep their
    autograd graph.  Records accumulate across forwards; call :meth:`clear`
    before a forward.  Set ``enabled = False`` to run forwards that are not
    recorded.

    Args:
        backbone: mmdet/mmseg ``SwinTransformer`` (or any module containing
            ``ShiftWindowMSA`` modules).
        record_logits: hook ``w_msa.qkv`` and record the pre-softmax logits.
        record_probs: hook ``w_msa.softmax`` and record the post-softmax
            attention.
        average_heads_probs: store ``probs`` averaged over heads,
            ``(B_img, nW, N, N)`` (what SPDFQ aligns; saves memory).
    """

    def __init__(self, backbone: nn.Module, record_logits: bool = True,
                 record_probs: bool = False,
                 average_heads_probs: bool = False):
        if not (record_logits or record_probs):
            raise ValueError('AttnLogitsRecorder: record_logits and '
                             'record_probs are both False, nothing to record')
        super().__init__(backbone)
        self.record_logits = bool(record_logits)
        self.record_probs = bool(record_probs)
        self.average_heads_probs = bool(average_heads_probs)
        for idx, (name, mod) in enumerate(self.modules):
            w_msa = mod.w_msa
            for attr in ('num_heads', 'scale') + (
                    ('qkv', ) if record_logits else ()) + (
                        ('softmax', ) if record_probs else ()):
                if not hasattr(w_msa, attr):
                    raise ValueError(
                        f'AttnLogitsRecorder: {name}.w_msa '
                        f'({type(w_msa).__name__}) has no `{attr}`')
            self._handles.append(mod.register_forward_pre_hook(
                self._make_msa_hook(idx, name, mod), with_kwargs=True))
            if record_logits:
                self._handles.append(w_msa.qkv.register_forward_hook(
                    self._make_qkv_hook(idx, w_msa)))
            if record_probs:
                self._handles.append(w_msa.softmax.register_forward_hook(
                    self._make_softmax_hook(idx, w_msa)))
            self._handles.append(mod.register_forward_hook(
                self._make_close_hook(idx)))

    # ------------------------------------------------------------------ hooks
    def _open(self, name, msa, hw_shape, query):
        """The record itself is the pending entry: the qkv and softmax hooks
        fill it, the close hook appends it."""
        valid = self._valid(hw_shape, msa.window_size, msa.shift_size,
                            query.device)  # (nW, N)
        return dict(
            name=name, hw_shape=hw_shape, shift_size=int(msa.shift_size),
            num_heads=int(msa.w_msa.num_heads),
            window_size=int(msa.window_size), b_img=int(query.shape[0]),
            valid_win=valid)

    def _reshape(self, t, rec, what):
        """``(B_img * nW, ...)`` -> ``(B_img, nW, ...)`` with a shape check."""
        b_img = rec['b_img']
        nw, n = rec['valid_win'].shape
        assert t.shape[0] == b_img * nw and t.shape[-1] == n, (
            f'unexpected {what} {tuple(t.shape)} for hw_shape '
            f'{rec["hw_shape"]}, window {rec["window_size"]}, batch {b_img}')
        return t.reshape(b_img, nw, *t.shape[1:])

    def _make_qkv_hook(self, idx, w_msa):

        def hook(module, args, output):
            rec = self._pending.get(idx)
            if rec is None:
                return  # qkv called outside ShiftWindowMSA.forward
            logits = qk_logits(output, int(w_msa.num_heads), w_msa.scale)
            rec['logits'] = self._reshape(logits, rec, 'qk logits')

        return hook

    def _make_softmax_hook(self, idx, w_msa):

        def hook(module, args, output):
            rec = self._pending.get(idx)
            if rec is None:
                return
            probs = self._reshape(output, rec, 'attention')
            if self.average_heads_probs:
                probs = probs.mean(2)
            rec['probs'] = probs

        return hook

    def _make_close_hook(self, idx):

        def hook(module, args, output):
            rec = self._pending.pop(idx, None)
            if rec is None:
                return
            b_img = rec.pop('b_img')
            valid = rec.pop('valid_win')
            rec['valid'] = valid.unsqueeze(0).expand(b_img, *valid.shape)
            self.records.append(rec)

        return hook

    # ------------------------------------------------------------------- api
    def logits(self) -> List[torch.Tensor]:
        """The recorded ``logits`` tensors, in forward order."""
        return [r['logits'] for r in self.records]

    def probs(self) -> List[torch.Tensor]:
        """The recorded ``probs`` tensors, in forward order."""
        return [r['probs'] for r in self.records]
