"""MimiQ (inter-head attention similarity) image synthesis for Swin backbones.

MimiQ observes that, on real images, the heads of a ViT attention layer
produce similar attention maps, and synthesises calibration images whose
heads agree: at every attention layer, for every query, the key logits of
each head (pre-softmax ``q k^T``, min-max normalised and laid out on the
spatial grid, 7x7 for a Swin window) are compared between every pair of heads
with SSIM, and ``1 - SSIM^2`` is minimised.  Its QAT part distils the
teacher's attention output into the student head by head with the structure
term of SSIM.

This module holds the pure losses (:func:`ssim_maps`,
:func:`inter_head_similarity_loss`, :func:`headwise_structure_loss`) and the
backbone-level synthesizer :class:`MimiQ` (no task heads: the classifier's
cross-entropy to random labels is replaced by the
:class:`~dfq_dense.synth.feature_targets.RandomProjectionHead` stand-in).
"""
import math
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from ..registry import MODELS
from .base import (BaseSynthesizer, clamp_to_range, get_backbone,
                   parse_components, roll_flip)
from .distill import StudentStep
from .feature_targets import RandomProjectionHead, random_hard_targets
from .losses import tv_prior_loss
from .qk_hooks import AttnLogitsRecorder

__all__ = [
    'ssim_maps', 'inter_head_similarity', 'inter_head_similarity_loss',
    'headwise_structure_loss', 'MimiQ', 'MIMIQ_TV_REF_PIXELS'
]

SSIM_C1 = 0.01**2
SSIM_C2 = 0.03**2

#: Pixels of the batch MimiQ's TV weight was tuned for (16 x 224 x 224).
MIMIQ_TV_REF_PIXELS = 16 * 224 * 224

#: Which head pairs the inter-head similarity averages over: ``'all'``, the
#: full H x H matrix with the diagonal (the released form); ``'distinct'``,
#: the pairs i < j (earlier versions of this suite).
HEAD_PAIRS = ('all', 'distinct')

Dims = Union[int, Sequence[int]]


# --------------------------------------------------------------------------
# losses
# --------------------------------------------------------------------------
def ssim_maps(a: torch.Tensor, b: torch.Tensor, c1: float = SSIM_C1,
              c2: float = SSIM_C2, dim: Dims = -1) -> torch.Tensor:
    """Global SSIM between maps, reduced over ``dim``.

    ``SSIM = ((2 mu_a mu_b + c1) (2 cov_ab + c2)) /
    ((mu_a^2 + mu_b^2 + c1) (var_a + var_b + c2))``

    with *population* statistics (divide by the number of elements) taken
    over all the entries of ``dim`` at once, i.e. the maps are flattened over
    ``dim`` and compared globally: there is no sliding Gaussian window
    (MimiQ's maps are 7x7 Swin windows, too small for the usual 11x11
    window).  The constants are the usual ``(0.01 L)^2`` and ``(0.03 L)^2``
    for a dynamic range ``L = 1`` (min-max normalised maps).  ``a`` and ``b``
    broadcast; the result has ``dim`` removed.  ``SSIM(x, x) = 1``.
    """
    mu_a = a.mean(dim, keepdim=True)
    mu_b = b.mean(dim, keepdim=True)
    da, db = a - mu_a, b - mu_b
    var_a = (da * da).mean(dim)
    var_b = (db * db).mean(dim)
    cov = (da * db).mean(dim)
    mu_a, mu_b = mu_a.squeeze(dim), mu_b.squeeze(dim)
    return ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a * mu_a + mu_b * mu_b + c1) * (var_a + var_b + c2))


def inter_head_similarity(logits: torch.Tensor,
                          valid: Optional[torch.Tensor] = None,
                          c1: float = SSIM_C1, c2: float = SSIM_C2,
                          eps: float = 1e-8,
                          pairs: str = 'all') -> torch.Tensor:
    """MimiQ inter-head similarity loss of one attention layer.

    For every (image, window, query, head) the logits over the *valid* keys
    are min-max normalised to [0, 1] (``(l - min) / max(max - min, eps)``);
    the normalised key maps of the heads are compared pairwise with
    :func:`ssim_maps` (global SSIM over the valid keys of the window, i.e.
    the 7x7 map flattened); the loss is ``1 - SSIM^2`` averaged over the
    head pairs and over all valid queries of all windows and images (each
    valid query counts once).  Padding keys take no part in the min/max nor
    in the SSIM statistics; padding queries are left out of the mean.

    ``pairs='all'`` (default) averages over the full ``H x H`` matrix of
    ordered pairs, the diagonal included, as the released MimiQ code does
    (the diagonal terms are ``1 - 1 = 0``, so this is ``(H - 1) / H`` times
    the ``'distinct'`` value); ``pairs='distinct'`` averages over the
    ``H (H - 1) / 2`` pairs ``i < j`` (earlier versions of this suite).

    Args:
        logits: ``(B, nW, heads, N, N)`` (query on dim -2, key on dim -1),
            e.g. :class:`~dfq_dense.synth.qk_hooks.AttnLogitsRecorder`'s
            ``logits``.
        valid: ``(B, nW, N)`` bool, False for padding tokens; None = all.

    Returns:
        scalar in ``[0, 1]``; 0 when all heads are identical.  0 (with a
        graph) for a single head.
    """
    if pairs not in HEAD_PAIRS:
        raise ValueError(f'pairs must be one of {HEAD_PAIRS}, got {pairs!r}')
    if logits.dim() != 5:
        raise ValueError('inter_head_similarity expects logits of shape '
                         f'(B, nW, heads, N, N), got {tuple(logits.shape)}')
    B, nW, h, N, _ = logits.shape
    x = logits if logits.dtype in (torch.float32, torch.float64) \
        else logits.float()
    if h < 2:
        return x.sum() * 0.
    if valid is None:
        valid = torch.ones((B, nW, N), dtype=torch.bool, device=x.device)
    valid = valid.to(device=x.device, dtype=torch.bool).expand(B, nW, N)
    kv = valid[:, :, None, None, :]  # keys, (B, nW, 1, 1, N)
    # min-max over the valid keys of each (image, window, head, query)
    lo = x.masked_fill(~kv, float('inf')).amin(-1, keepdim=True)
    hi = x.masked_fill(~kv, float('-inf')).amax(-1, keepdim=True)
    lo = torch.where(torch.isfinite(lo), lo, torch.zeros_like(lo))
    hi = torch.where(torch.isfinite(hi), hi, torch.zeros_like(hi))
    x = ((x - lo) / (hi - lo).clamp_min(eps)).masked_fill(~kv, 0.)
    # population statistics over the valid keys
    kw = kv.to(x.dtype)
    n_keys = kw.sum(-1, keepdim=True).clamp_min(1.)  # (B, nW, 1, 1, 1)
    mu = x.sum(-1, keepdim=True) / n_keys  # (B, nW, h, N, 1)
    d = (x - mu) * kw
    var = (d * d).sum(-1) / n_keys[..., 0]  # (B, nW, h, N)
    cov = torch.einsum('bwiqk,bwjqk->bwqij', d, d) / n_keys  # (B,nW,N,h,h)
    mu = mu[..., 0].transpose(2, 3)  # (B, nW, N, h)
    var = var.transpose(2, 3)
    if pairs == 'all':  # every ordered pair (i, j), the diagonal included
        i, j = (t.reshape(-1) for t in torch.meshgrid(
            torch.arange(h, device=x.device),
            torch.arange(h, device=x.device), indexing='ij'))
    else:
        i, j = torch.triu_indices(h, h, 1, device=x.device)
    mu_i, mu_j = mu[..., i], mu[..., j]  # (B, nW, N, P)
    ssim = ((2 * mu_i * mu_j + c1) * (2 * cov[..., i, j] + c2)) / (
        (mu_i * mu_i + mu_j * mu_j + c1) * (var[..., i] + var[..., j] + c2))
    per_query = (1. - ssim * ssim).mean(-1)  # (B, nW, N)
    qw = valid.to(x.dtype)
    return (per_query * qw).sum() / qw.sum().clamp_min(1.)


def _layers(logits, valid):
    """Normalise the inputs of the layer-wise losses to [(tensor, valid)]."""
    if isinstance(logits, torch.Tensor):
        return [(logits, valid)]
    if isinstance(logits, dict):
        return [(logits['logits'], logits.get('valid'))]
    out = []
    for k, item in enumerate(logits):
        if isinstance(item, dict):
            out.append((item['logits'], item.get('valid')))
        else:
            v = valid[k] if isinstance(valid, (list, tuple)) else valid
            out.append((item, v))
    return out


def inter_head_similarity_loss(logits, valid=None, c1: float = SSIM_C1,
                               c2: float = SSIM_C2, eps: float = 1e-8,
                               return_per_layer: bool = False,
                               pairs: str = 'all'):
    """MimiQ inter-head attention similarity loss, mean over layers.

    Args:
        logits: one ``(B, nW, heads, N, N)`` tensor, a list of them (one per
            layer), or a list of
            :class:`~dfq_dense.synth.qk_hooks.AttnLogitsRecorder` records
            (dicts with ``logits`` and ``valid``).
        valid: ``(B, nW, N)`` bool mask (or a list, one per layer) when
            ``logits`` are tensors; ignored for records.
        return_per_layer: also return the ``(L,)`` detached per-layer losses.
        pairs: ``'all'`` (H x H, diagonal included, released form) or
            ``'distinct'`` (i < j).

    See :func:`inter_head_similarity` for the per-layer definition.
    """
    layers = _layers(logits, valid)
    if len(layers) == 0:
        raise ValueError('inter_head_similarity_loss got no logits: was the '
                         'backbone run inside an AttnLogitsRecorder?')
    per_layer = torch.stack([
        inter_head_similarity(lg, v, c1=c1, c2=c2, eps=eps, pairs=pairs)
        for lg, v in layers
    ])
    loss = per_layer.mean()
    if return_per_layer:
        return loss, per_layer.detach()
    return loss


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


# --------------------------------------------------------------------------
# synthesizer
# --------------------------------------------------------------------------
@MODELS.register_module()
class MimiQ(BaseSynthesizer):
    """MimiQ data-free synthesis at the backbone level of a Swin model.

    Per batch: ``x ~ N(0, 1)`` ``(n, 3, H, W)`` (normalised space, clamped to
    the valid range), AdamW on the pixels with a cosine schedule from ``lr``
    to ``min_lr``; each iteration augments the batch (see :meth:`augment`),
    runs ``backbone(x_aug)`` under an
    :class:`~dfq_dense.synth.qk_hooks.AttnLogitsRecorder` and minimises::

        head_sim_weight * inter_head_similarity_loss(logits of all blocks)
      + ce_weight * CE(RandomProjectionHead(backbone(x_aug)), random labels)
      + TV term on the un-augmented x

    then clamps ``x`` to the valid normalised range.  The random labels are
    drawn per batch (uniform over ``num_classes``) and the projection head
    from ``seed``; everything random comes from the CPU generator of
    :meth:`generate` (the per-pixel noise from a device generator seeded from
    it), so a seed gives the same images on a given device.

    TV term.  MimiQ uses ``2.5e-5 * TV(x)`` (plain TV, no target) for a batch
    of 16 images of 224x224, with TV the sum of the Frobenius norms of the
    four finite differences (:func:`~dfq_dense.synth.losses.total_variation`,
    the same TV that PSAQ-ViT's :func:`~dfq_dense.synth.losses.tv_prior_loss`
    uses).  It is computed as ``tv_prior_loss(x, weight=w, tau=0)`` (target
    0: a pure smoothness penalty) on the un-jittered ``x``, as PSAQViT does
    (a roll would add a wrap-around seam), with the weight rescaled like
    ``tv_prior_loss`` rescales its target:
    ``w = tv_weight * sqrt(tv_ref_pixels / (B * H * W))``.  TV grows like
    ``sqrt(B H W)`` while the other terms are means, so this keeps the
    relative weight of the TV term at dense resolutions what it was for the
    16x224x224 batch the 2.5e-5 was tuned for.  Giving ``tv_tau_range``
    switches to PSAQ-ViT's form instead: ``tv_prior_loss(x, tv_weight,
    tv_tau_range, ref_pixels=tv_ref_pixels)`` (random target; use
    ``tv_weight=0.05``, ``tv_ref_pixels=TAU_REF_PIXELS``, as in PSAQViT).
    ``loss_tv`` is logged weighted, as in PSAQViT.

    Args (beyond :class:`BaseSynthesizer`):
        lr, min_lr: cosine schedule of AdamW (0.1 -> 1e-3, MimiQ).
        betas, weight_decay: AdamW settings ((0.9, 0.999), PyTorch's
            default betas, and 1e-6, MimiQ's synthesis setting; earlier
            versions used PyTorch's default weight decay 0.01).
        jitter: max random roll in pixels; an int, or ``(early, late)``
            max rolls, ``late`` used from ``jitter_switch * iterations`` on
            (MimiQ: 8 px then 16 px, read here as the first and second half
            of the iterations).
        flip: random horizontal flip (p=0.5; not in MimiQ's list, common to
            the DeepInversion family and to PSAQViT).
        noise_std: std of Gaussian noise added to the augmented batch
            (normalised units).
        color_jitter: per image and channel, gain ``U(1-c, 1+c)`` and offset
            ``U(-c, c)`` (normalised units) on the augmented batch.  MimiQ
            uses noise and colour jitter without stating magnitudes; 0.1 and
            0.1 are this implementation's choice (0 switches them off).
        components: which loss terms are on, e.g.
            ``dict(head_similarity=True, pseudo_label=True, tv=False)``
            (missing names keep their default, on), or a list of the names
            that are on.  Unknown names raise ValueError; switching all off
            too.
        head_sim_weight, ce_weight: weights of the head-similarity and
            pseudo-label terms (1.0, 1.0).
        tv_weight, tv_ref_pixels, tv_tau_range: TV term (see above).
        num_classes, logit_scale: the
            :class:`~dfq_dense.synth.feature_targets.RandomProjectionHead`.
        ssim_c1, ssim_c2: SSIM constants (0.01^2, 0.03^2).
        head_pairs: head pairs of the similarity (see
            :func:`inter_head_similarity`): ``'all'`` (H x H with the
            diagonal, as released, default) or ``'distinct'`` (i < j, the
            behaviour of earlier versions).
        student_step: the distillation after calibration (component
            ``distill``, on by default), a
            :class:`~dfq_dense.synth.distill.StudentStep` config: MimiQ's
            head-wise structural attention distillation (``loss='mimiq'``:
            10 x (1 - structure term) per head on the attn @ v outputs +
            the feature discrepancy of the backbone outputs, standing in for
            MimiQ's KL on class logits), SGD Nesterov (momentum 0.9, lr 1e-6,
            weight decay 1e-4, MimiQ's QAT settings) on the student's
            backbone weights through the straight-through fake quantizers.
            Keys given here override those defaults (e.g. ``iters``,
            ``lr``).  With ``distill`` off MimiQ is synthesis only.
    """

    COMPONENTS = ('head_similarity', 'pseudo_label', 'tv', 'distill')

    def __init__(self,
                 num_images: int = 16,
                 batch_size: int = 16,
                 img_size=None,
                 iterations: int = 2000,
                 seed: int = 0,
                 lr: float = 0.1,
                 min_lr: float = 1e-3,
                 betas: Tuple[float, float] = (0.9, 0.999),
                 weight_decay: float = 1e-6,
                 jitter: Union[int, Sequence[int]] = (8, 16),
                 jitter_switch: float = 0.5,
                 flip: bool = True,
                 noise_std: float = 0.1,
                 color_jitter: float = 0.1,
                 components: Optional[Dict[str, bool]] = None,
                 head_sim_weight: float = 1.0,
                 ce_weight: float = 1.0,
                 tv_weight: float = 2.5e-5,
                 tv_ref_pixels: int = MIMIQ_TV_REF_PIXELS,
                 tv_tau_range: Optional[Tuple[float, float]] = None,
                 num_classes: int = 100,
                 logit_scale: float = 1.0,
                 ssim_c1: float = SSIM_C1,
                 ssim_c2: float = SSIM_C2,
                 head_pairs: str = 'all',
                 student_step: Optional[dict] = None,
                 log_interval: int = 50,
                 progress: bool = True,
                 device=None):
        super().__init__(num_images=num_images, batch_size=batch_size,
                         img_size=img_size, iterations=iterations, seed=seed,
                         log_interval=log_interval, progress=progress,
                         device=device)
        # 'distill' changes the student, not the images: alone it leaves
        # nothing to synthesise with
        self.components = parse_components(
            'MimiQ', self.COMPONENTS, components,
            counted=('head_similarity', 'pseudo_label', 'tv'))
        self.lr = float(lr)
        self.min_lr = float(min_lr)
        self.betas = tuple(betas)
        self.weight_decay = float(weight_decay)
        if isinstance(jitter, int):
            jitter = (jitter, jitter)
        if len(jitter) != 2 or min(jitter) < 0:
            raise ValueError('jitter must be an int or (early, late) '
                             f'non-negative ints, got {jitter}')
        self.jitter = (int(jitter[0]), int(jitter[1]))
        self.jitter_switch = float(jitter_switch)
        self.flip = bool(flip)
        self.noise_std = float(noise_std)
        self.color_jitter = float(color_jitter)
        self.head_sim_weight = float(head_sim_weight)
        self.ce_weight = float(ce_weight)
        self.tv_weight = float(tv_weight)
        self.tv_ref_pixels = int(tv_ref_pixels)
        self.tv_tau_range = (None if tv_tau_range is None else
                             tuple(float(t) for t in tv_tau_range))
        self.num_classes = int(num_classes)
        self.ssim_c1 = float(ssim_c1)
        self.ssim_c2 = float(ssim_c2)
        if head_pairs not in HEAD_PAIRS:
            raise ValueError(f'MimiQ: head_pairs must be one of '
                             f'{HEAD_PAIRS}, got {head_pairs!r}')
        self.head_pairs = head_pairs
        self.head = RandomProjectionHead(num_classes=num_classes,
                                         logit_scale=logit_scale, seed=seed)
        self.student_step = StudentStep.build(
            student_step, loss='mimiq', optimizer='sgd', lr=1e-6,
            momentum=0.9, nesterov=True, weight_decay=1e-4, iters=50,
            seed=seed, name='MimiQ.distill')

    @property
    def teacher_student(self) -> bool:
        """The DFQ loop hands the calibrated student to :meth:`adapt`."""
        return self.components['distill']

    def adapt(self, teacher, student, images, calibrate=None):
        """Head-wise attention distillation of the calibrated ``student``
        from the FP ``teacher`` on the synthetic ``images`` (in place);
        returns the images unchanged.  ``calibrate`` is not used: the
        quantization parameters stay those of the calibration."""
        if not self.components['distill']:
            return images
        self.student_step.visualizer = self.visualizer
        self.student_step.run(teacher, student, images)
        return images

    def check_model(self, model):
        """MimiQ hooks Swin window attention: fail early without it."""
        super().check_model(model)
        AttnLogitsRecorder(get_backbone(model)).remove()

    # ------------------------------------------------------------- schedule
    def lr_at(self, it: int) -> float:
        """Cosine from ``lr`` (iteration 0) to ``min_lr`` (the last one)."""
        T = max(1, self.iterations - 1)
        t = min(max(it, 0), T) / T
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (
            1 + math.cos(math.pi * t))

    def jitter_at(self, it: int) -> int:
        """Max roll (pixels) of iteration ``it``."""
        early, late = self.jitter
        return early if it < self.jitter_switch * self.iterations else late

    def augment(self, x: torch.Tensor, generator: torch.Generator,
                it: int = 0,
                noise_generator: Optional[torch.Generator] = None
                ) -> torch.Tensor:
        """Roll jitter, horizontal flip, colour jitter, noise
        (differentiable; random draws from ``generator``, the noise from
        ``noise_generator``, a generator on ``x``'s device)."""
        x = roll_flip(x, generator, self.jitter_at(it), self.flip)
        n = x.shape[0]
        if self.color_jitter > 0:
            c = self.color_jitter
            gain = 1 + c * (2 * torch.rand((n, 3, 1, 1), generator=generator)
                            - 1)
            off = c * (2 * torch.rand((n, 3, 1, 1), generator=generator) - 1)
            x = x * gain.to(x) + off.to(x)
        if self.noise_std > 0:
            noise = torch.randn(x.shape, generator=noise_generator,
                                device=x.device, dtype=x.dtype)
            x = x + self.noise_std * noise
        return x

    def tv_loss(self, x: torch.Tensor,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """The (weighted) TV term of ``x`` (see the class doc)."""
        if self.tv_tau_range is not None:
            return tv_prior_loss(x, weight=self.tv_weight,
                                 tau_range=self.tv_tau_range,
                                 ref_pixels=self.tv_ref_pixels,
                                 generator=generator)
        B, _, H, W = x.shape
        w = self.tv_weight * math.sqrt(self.tv_ref_pixels / float(B * H * W))
        return tv_prior_loss(x, weight=w, tau=0.)

    def _bar_steps(self) -> int:
        return max(1, self.iterations)

    # ------------------------------------------------------------ synthesis
    def synthesize_batch(self, backbone, n, hw, device, generator,
                         batch_idx=0, bar=None):
        comp = self.components
        x, mean, std = self._init_pixels(n, hw, device, generator)
        targets = random_hard_targets(n, self.num_classes,
                                      generator).to(device)
        noise_gen = None
        if self.noise_std > 0:
            noise_gen = torch.Generator(device=device).manual_seed(
                int(torch.randint(2**62, (), generator=generator)))
        opt = torch.optim.AdamW([x], lr=self.lr, betas=self.betas,
                                weight_decay=self.weight_decay)
        rec = AttnLogitsRecorder(backbone) if comp['head_similarity'] \
            else None
        zero = torch.zeros((), device=device)
        try:
            for it in range(self.iterations):
                for group in opt.param_groups:
                    group['lr'] = self.lr_at(it)
                opt.zero_grad(set_to_none=True)
                x_aug = self.augment(x, generator, it, noise_gen)
                if rec is not None:
                    rec.clear()
                feats = backbone(x_aug)
                loss = zero
                loss_hs = loss_ce = loss_tv = zero
                if rec is not None:
                    loss_hs = inter_head_similarity_loss(
                        rec.records, c1=self.ssim_c1, c2=self.ssim_c2,
                        pairs=self.head_pairs)
                    rec.clear()
                    loss = loss + self.head_sim_weight * loss_hs
                if comp['pseudo_label']:
                    if isinstance(feats, torch.Tensor):
                        feats = (feats, )
                    loss_ce = F.cross_entropy(self.head(feats), targets)
                    loss = loss + self.ce_weight * loss_ce
                del feats
                if comp['tv']:
                    loss_tv = self.tv_loss(x, generator)
                    loss = loss + loss_tv
                loss.backward()
                opt.step()
                with torch.no_grad():
                    x.copy_(clamp_to_range(x, mean, std))
                self._bar_update(bar)
                if self._log_due(it, self.iterations):
                    self._log(batch_idx, it, opt.param_groups[0]['lr'], loss,
                              loss_hs, loss_ce, loss_tv)
        finally:
            if rec is not None:
                rec.remove()
        return x.detach()

    def _log(self, batch_idx, it, lr, loss, loss_hs, loss_ce, loss_tv):
        self.log_terms(dict(batch=batch_idx, iter=it + 1, lr=lr,
                            loss=loss.item(), loss_head_sim=loss_hs.item(),
                            loss_ce=loss_ce.item(), loss_tv=loss_tv.item()))
