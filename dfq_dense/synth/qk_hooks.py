"""The recorder of the window-attention logits / probabilities of a Swin
backbone (MimiQ's inter-head similarity, SPDFQ's attention priors).

:class:`AttnLogitsRecorder` is :class:`~dfq_dense.synth.hooks.SwinAttnRecorder`
recording ``'logits'`` (the per-head pre-softmax ``(q * scale) @ k^T``,
recomputed from the ``qkv`` output exactly as ``WindowMSA.forward`` splits
it) and / or ``'probs'`` (the softmax output as the block used it); see
there for what the logits leave out and why.  Works for mmdet's and mmseg's
``SwinTransformer`` and for models whose ``WindowMSA`` was replaced by
:class:`dfq_dense.quant.modules.QuantWindowMSA`.
"""
from torch import nn

from .hooks import SwinAttnRecorder, qk_logits

__all__ = ['AttnLogitsRecorder', 'qk_logits']


class AttnLogitsRecorder(SwinAttnRecorder):
    """Record per-head window-attention logits (and probabilities) of Swin.

    Records: ``logits`` (with ``record_logits``), ``probs`` (with
    ``record_probs``), ``valid`` and the metadata of
    :class:`~dfq_dense.synth.hooks.SwinAttnRecorder`.

    Args:
        backbone: mmdet/mmseg ``SwinTransformer`` (or any module containing
            ``ShiftWindowMSA`` modules).
        record_logits: hook ``w_msa.qkv`` and record the pre-softmax logits.
        record_probs: hook ``w_msa.softmax`` and record the post-softmax
            attention.
        average_heads_probs: store ``probs`` averaged over heads,
            ``(B_img, nW, N, N)`` (saves memory).
    """

    def __init__(self, backbone: nn.Module, record_logits: bool = True,
                 record_probs: bool = False,
                 average_heads_probs: bool = False):
        if not (record_logits or record_probs):
            raise ValueError('AttnLogitsRecorder: record_logits and '
                             'record_probs are both False, nothing to record')
        record = (('logits', ) if record_logits else ()) + \
            (('probs', ) if record_probs else ())
        super().__init__(backbone, record=record,
                         average_heads_probs=average_heads_probs)
        self.record_logits = bool(record_logits)
        self.record_probs = bool(record_probs)
