"""Losses between the full-precision teacher and the quantized student.

* :func:`feature_discrepancy`: how far the student's multi-scale features
  are from the teacher's (PSAQ-ViT V2's sample and student steps);
* :func:`headwise_structure_loss` (and :func:`headwise_structure_loss_records`
  on recorder records): MimiQ's head-wise structural attention
  distillation.

They compare two models, so they belong to the adaptation step, not to the
synthesis (whose losses, in :mod:`dfq_dense.synth`, see the teacher only).
"""
from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from ..synth.mimiq import SSIM_C2

__all__ = [
    'feature_discrepancy', 'headwise_structure_loss',
    'headwise_structure_loss_records', 'MEASURES'
]

MEASURES = ('mse', 'kl')

Feats = Union[torch.Tensor, Sequence[torch.Tensor]]


# --------------------------------------------------------------------------
# teacher-student feature discrepancy
# --------------------------------------------------------------------------
def _as_list(feats: Feats) -> List[torch.Tensor]:
    if isinstance(feats, torch.Tensor):
        return [feats]
    return list(feats)


def feature_discrepancy(t_feats: Feats,
                        s_feats: Feats,
                        measure: str = 'mse',
                        tau: float = 1.0,
                        reduction: str = 'mean',
                        eps: float = 1e-6) -> torch.Tensor:
    """Teacher-student discrepancy of multi-scale ``(B, C, H, W)`` features.

    Per stage ``k`` (teacher ``t``, student ``s``, same shape) a per-sample
    value ``d_k(b)`` is computed, then averaged over the stages (each stage
    counts the same, whatever its resolution or width):

    * ``'mse'``: both features are standardised with the *teacher's*
      per-sample, per-channel statistics over the spatial positions,
      ``mu = mean_{H,W} t``, ``sigma = sqrt(var_{H,W} t + eps)``
      (population variance), *detached*::

          d_k(b) = mean_{C,H,W} ((s - mu) / sigma - (t - mu) / sigma)^2

      Swin's stages (and FPN levels) have very different magnitudes; the
      standardisation makes every channel of every stage count alike and
      measures the student's error in units of the teacher's own spread.
      The statistics are constants (no gradient through them), so the
      measure is a plain weighted MSE in ``s`` (and in ``t``).  Identical
      features give exactly 0.
    * ``'kl'``: at every spatial position, the softmax over channels with
      temperature ``tau``, ``p = softmax(t / tau)``, ``q = softmax(s /
      tau)``, and ``KL(p || q) = sum_c p_c (log p_c - log q_c)``, averaged
      over the positions and multiplied by ``tau^2`` (Hinton's factor, which
      keeps the gradient magnitude independent of ``tau``)::

          d_k(b) = tau^2 * mean_{H,W} KL(p || q)

      The raw (un-standardised) features are used: the channel softmax is
      what a 1x1 classifier over the features would see.

    ``(B, K)`` class logits (a classifier's output) are one position of
    ``K`` channels: ``'kl'`` is then ``tau^2 * KL(softmax(t / tau) ||
    softmax(s / tau))`` over the classes, Hinton's knowledge-distillation
    loss; ``'mse'`` is refused (it standardises each channel over the
    positions of a map, and logits have a single one).

    Args:
        t_feats, s_feats: a ``(B, C, H, W)`` tensor or a list of them (one
            per stage), or ``(B, K)`` logits; the lists must match in
            length and shapes.
        measure: ``'mse'`` or ``'kl'``.
        tau: KL temperature (``'kl'`` only).
        reduction: ``'mean'`` (scalar, mean over the batch), ``'sum'``
            (sum over the batch) or ``'none'`` (``(B,)``, e.g. to pick the
            hard samples).
        eps: added to the teacher variance (``'mse'``).

    The teacher is not detached (the sample step of PSAQ-ViT V2 needs its
    gradient to the pixels); run it under ``no_grad`` when it is a target.
    """
    if measure not in MEASURES:
        raise ValueError(f'feature_discrepancy: measure must be one of '
                         f'{MEASURES}, got {measure!r}')
    if reduction not in ('mean', 'sum', 'none'):
        raise ValueError("feature_discrepancy: reduction must be 'mean', "
                         f"'sum' or 'none', got {reduction!r}")
    t_list, s_list = _as_list(t_feats), _as_list(s_feats)
    if len(t_list) != len(s_list) or not t_list:
        raise ValueError('feature_discrepancy: teacher and student need the '
                         'same, non-zero number of feature maps, got '
                         f'{len(t_list)} and {len(s_list)}')
    per_stage = []
    for k, (t, s) in enumerate(zip(t_list, s_list)):
        if t.shape != s.shape or t.dim() not in (2, 4):
            raise ValueError(
                f'feature_discrepancy: stage {k}: teacher {tuple(t.shape)} '
                f'and student {tuple(s.shape)} must be equal (B, C, H, W) '
                'maps or (B, K) logits')
        if t.dim() == 2:
            if measure == 'mse':
                raise ValueError(
                    "feature_discrepancy: measure='mse' standardises map "
                    'channels over their positions, (B, K) logits have '
                    "none; use measure='kl'")
            t, s = t[:, :, None, None], s[:, :, None, None]
        t = t if t.dtype == torch.float64 else t.float()
        s = s.to(t.dtype)
        if measure == 'mse':
            td = t.detach()
            # per-channel teacher std (the mean cancels in s - t)
            sigma = (td.var(dim=(2, 3), unbiased=False, keepdim=True) +
                     eps).sqrt()
            d = ((s - t) / sigma).pow(2).mean(dim=(1, 2, 3))
        else:
            log_p = F.log_softmax(t / tau, dim=1)
            log_q = F.log_softmax(s / tau, dim=1)
            kl = (log_p.exp() * (log_p - log_q)).sum(dim=1)  # (B, H, W)
            d = kl.mean(dim=(1, 2)) * (tau * tau)
        per_stage.append(d)
    per_sample = torch.stack(per_stage, 0).mean(0)  # (B,)
    if reduction == 'none':
        return per_sample
    if reduction == 'sum':
        return per_sample.sum()
    return per_sample.mean()


# --------------------------------------------------------------------------
# MimiQ's head-wise structural distillation
# --------------------------------------------------------------------------
def headwise_structure_loss(t_out, s_out,
                            num_heads: Union[int, Sequence[int]],
                            c2: float = SSIM_C2,
                            valid: Optional[torch.Tensor] = None,
                            reduction: str = 'mean'):
    """MimiQ head-wise structural attention distillation loss.

    For every (window, head, channel of the head) the SSIM *structure* term
    between the teacher's and the student's attention output over the
    ``N`` tokens of the window::

        s = (2 sigma_ts + c2) / (sigma_t^2 + sigma_s^2 + c2)

    (population variances / covariance over the valid tokens).  This is
    SSIM's contrast x structure factor (with ``c3 = c2 / 2``): it ignores
    the channel means (the luminance factor), is at most 1, with equality
    iff the student's channel equals the teacher's up to a constant shift,
    and needs no square root (no infinite gradient at zero variance).
    The loss is ``1 - mean(s)`` over windows, heads and channels.  Each
    channel belongs to exactly one head, so the mean does not depend on the
    head split; ``num_heads`` checks the layout and shapes ``reduction=
    'none'``.  The teacher is not detached here (do it in the caller).

    Args:
        t_out, s_out: ``attn @ v`` outputs of teacher and student, heads
            concatenated on the last dim (the input of ``w_msa.proj``):
            ``(B * nW, N, C)`` or ``(B, nW, N, C)`` (e.g. the ``feat`` of
            :class:`~dfq_dense.synth.hooks.AttnOutputRecorder` with
            ``average_heads=False``).  Lists of such tensors (or of recorder
            records, dicts with ``feat``/``valid``) give the mean over
            layers.
        num_heads: heads (an int, or one per layer for lists).
        valid: ``(..., N)`` bool, False on padding tokens (ignored for
            records, which carry theirs).
        reduction: ``'mean'`` (the loss) or ``'none'`` (the structure term
            ``(..., heads, head_dim)``; tensors only).
    """
    if not isinstance(t_out, torch.Tensor):
        if len(t_out) != len(s_out) or len(t_out) == 0:
            raise ValueError('headwise_structure_loss: teacher and student '
                             'need the same, non-zero number of layers')
        losses = []
        for k, (t, s) in enumerate(zip(t_out, s_out)):
            v = valid
            if isinstance(t, dict):
                t, v = t['feat'], t.get('valid')
                s = s['feat'] if isinstance(s, dict) else s
            elif isinstance(valid, (list, tuple)):
                v = valid[k]
            nh = num_heads[k] if isinstance(num_heads,
                                            (list, tuple)) else num_heads
            losses.append(headwise_structure_loss(t, s, nh, c2=c2, valid=v))
        return torch.stack(losses).mean()
    if reduction not in ('mean', 'none'):
        raise ValueError(f"reduction must be 'mean' or 'none', got "
                         f'{reduction!r}')
    if t_out.shape != s_out.shape:
        raise ValueError('headwise_structure_loss: teacher '
                         f'{tuple(t_out.shape)} and student '
                         f'{tuple(s_out.shape)} differ')
    C = t_out.shape[-1]
    h = int(num_heads)
    if C % h != 0:
        raise ValueError(f'{C} channels do not split into {h} heads')
    t = t_out.reshape(*t_out.shape[:-1], h, C // h)  # (..., N, h, d)
    s = s_out.reshape(*s_out.shape[:-1], h, C // h)
    t = t if t.dtype == torch.float64 else t.float()
    s = s.to(t.dtype)
    if valid is None:
        w = torch.ones(t.shape[:-2], dtype=t.dtype, device=t.device)
    else:
        w = valid.to(device=t.device, dtype=t.dtype).expand(t.shape[:-2])
    w = w[..., None, None]  # (..., N, 1, 1)
    n = w.sum(-3, keepdim=True).clamp_min(1.)  # (..., 1, 1, 1)
    dt = (t - (t * w).sum(-3, keepdim=True) / n) * w
    ds = (s - (s * w).sum(-3, keepdim=True) / n) * w
    var_t = (dt * dt).sum(-3) / n[..., 0, :, :]
    var_s = (ds * ds).sum(-3) / n[..., 0, :, :]
    cov = (dt * ds).sum(-3) / n[..., 0, :, :]
    struct = (2 * cov + c2) / (var_t + var_s + c2)  # (..., h, d)
    if reduction == 'none':
        return struct
    return 1. - struct.mean()


def headwise_structure_loss_records(t_records: Sequence[Dict],
                                    s_records: Sequence[Dict],
                                    num_heads: Sequence[int]) -> torch.Tensor:
    """:func:`headwise_structure_loss` over the
    :class:`~dfq_dense.synth.hooks.AttnOutputRecorder`
    (``average_heads=False``) records of the teacher and the student (same
    layers, same order), mean over layers."""
    if len(t_records) != len(s_records) or len(t_records) != len(num_heads) \
            or not t_records:
        raise ValueError(
            'headwise_structure_loss_records: got '
            f'{len(t_records)} teacher and {len(s_records)} student records '
            f'for {len(num_heads)} attention layers (were both backbones run '
            'once inside their recorders?)')
    return headwise_structure_loss(t_records, s_records, list(num_heads))
