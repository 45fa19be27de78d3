"""MimiQ (inter-head attention similarity) image synthesis for Swin backbones.

MimiQ observes that, on real images, the heads of a ViT attention layer
produce similar attention maps, and synthesises calibration images whose
heads agree: at every attention layer, for every query, the key logits of
each head (pre-softmax ``q k^T``, min-max normalised and laid out on the
spatial grid, 7x7 for a Swin window) are compared between every pair of heads
with SSIM, and ``1 - SSIM^2`` is minimised.  Its QAT part distils the
teacher's attention output into the student head by head with the structure
term of SSIM: that changes the student, not the images, and lives in
:mod:`dfq_dense.adapt.mimiq_distill`.

This module holds the pure synthesis losses (:func:`ssim_maps`,
:func:`inter_head_similarity_loss`) and the backbone-level synthesizer
:class:`MimiQ` (no task heads: the classifier's cross-entropy to random
labels is replaced by the
:class:`~dfq_dense.synth.feature_targets.RandomProjectionHead` stand-in).
"""
import math
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..registry import MODELS
from .base import get_backbone, parse_components, roll_flip
from .feature_targets import (LABEL_HEADS, ClassifierLogits,
                              RandomProjectionHead, classifier_num_classes,
                              random_hard_targets)
from .loop import PixelSynthesizer
from .losses import tv_prior_loss
from .qk_hooks import AttnLogitsRecorder

__all__ = [
    'ssim_maps', 'inter_head_similarity', 'inter_head_similarity_loss',
    'MimiQ', 'MIMIQ_TV_REF_PIXELS', 'SSIM_C1', 'SSIM_C2'
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
                          pairs: str = 'all',
                          total: Optional[int] = None) -> torch.Tensor:
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
        total: the images of the whole batch when ``logits`` hold a
            micro-batch of it: the sum over the micro-batch is divided by
            the valid queries of ``total`` images (its share of the batch's
            mean; the valid queries are the same for every image).

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
    # which ordered head pairs (i, j) the mean runs over
    pair_w = torch.ones(h, h, dtype=x.dtype, device=x.device)
    if pairs == 'distinct':
        pair_w = torch.triu(pair_w, 1)
    count = valid.sum().to(x.dtype)  # each valid query counts once
    if total is not None:  # the valid queries of `total` images
        count = count / B * int(total)
    return _InterHeadSimilarity.apply(x, valid, pair_w, c1, c2, eps,
                                      count.clamp_min(1.))


class _InterHeadSimilarity(torch.autograd.Function):
    """:func:`inter_head_similarity` with its gradient written out.

    Autograd would keep about a dozen tensors of the logits' size per layer
    and walk back through as many elementwise ops; here the chain rule of
    the SSIM statistics is applied directly (two saved tensors of the
    logits' size per layer, a few small ones), about 3x faster at 800x1333.
    The same function as the plain autograd composition up to float
    rounding, tested against it and against loops written from MimiQ's
    definition.  A tie for a query's min or max key splits its gradient
    evenly between the tied keys, as autograd's amin does.

    Layout: the logits ``(B, nW, h, N, K)`` (query N, key K) are copied once
    to ``(B, nW, N, h, K)``, so that the statistics of a query, an ``h x h``
    covariance matrix with the variances on its diagonal, are one batched
    matmul of contiguous centred maps.  The min-max map is affine in the
    logits, ``xn = (x - lo) / r``, so its centred form is
    ``d = (x - mean(x)) / r`` and its mean ``(mean(x) - lo) / r``: one fused
    pass from the logits.
    """

    @staticmethod
    def _zero_padding_keys(t, pad):
        """Zero the padding keys of ``t`` (B, nW, N, h, K) in place, touching
        only the windows that have padding (a few border windows)."""
        if pad is not None:
            win, keys = pad
            t[win] = t[win].masked_fill(~keys, 0.)
        return t

    @staticmethod
    def forward(ctx, x, valid, pair_w, c1, c2, eps, count):
        pairs_all = bool(pair_w.all())
        xt = x.transpose(2, 3).contiguous()  # (B, nW, N, h, K)
        lo = xt.amin(-1, keepdim=True)
        hi = xt.amax(-1, keepdim=True)
        total = xt.sum(-1, keepdim=True)
        # the windows with padding keys (B, nW) and their key masks
        win = ~valid.all(-1)
        pad = (win, valid[win][:, None, None, :]) if bool(win.any()) \
            else None
        if pad is not None:  # min / max / sum over their valid keys only
            sub, keys = xt[win], pad[1]
            lo_p = sub.masked_fill(~keys, float('inf')).amin(-1, keepdim=True)
            hi_p = sub.masked_fill(~keys, float('-inf')).amax(-1,
                                                              keepdim=True)
            # a query whose keys are all padding has no map (zeros)
            lo[win] = torch.where(torch.isfinite(lo_p), lo_p, 0.)
            hi[win] = torch.where(torch.isfinite(hi_p), hi_p, 0.)
            total[win] = sub.masked_fill(~keys, 0.).sum(-1, keepdim=True)
        span = hi - lo
        inv_r = span.clamp_min(eps).reciprocal()
        # valid keys per window, (B, nW, 1, 1, 1)
        n = valid.sum(-1).to(x.dtype).clamp_min(1.)[:, :, None, None, None]
        mean = total / n
        d = torch.addcmul(-mean * inv_r, xt, inv_r)  # centred min-max maps
        _InterHeadSimilarity._zero_padding_keys(d, pad)
        m = ((mean - lo) * inv_r)[..., 0]  # their means, (B, nW, N, h)
        cov = torch.matmul(d, d.transpose(-1, -2)).div_(n)  # (.., N, h, h)
        var = torch.diagonal(cov, dim1=-2, dim2=-1)  # (B, nW, N, h)
        mi, mj = m[..., :, None], m[..., None, :]
        a = torch.addcmul(torch.full_like(mi, c1), mi, mj, value=2.)
        m2 = torch.addcmul(torch.full_like(m, c1 / 2), m, m)
        dd = m2[..., :, None] + m2[..., None, :]  # m_i^2 + m_j^2 + c1
        cc = 2 * cov + c2
        var = var + c2 / 2
        e = var[..., :, None] + var[..., None, :]  # v_i + v_j + c2
        s = (a * cc) / (dd * e)
        s2 = s * s
        if pairs_all:
            per_query = 1. - s2.mean((-2, -1))
        else:
            per_query = ((1. - s2) * pair_w).sum((-2, -1)) / pair_w.sum()
        if not bool(valid.all()):  # padding queries take no part
            per_query = per_query * valid.to(x.dtype)
        loss = per_query.sum() / count
        ctx.save_for_backward(xt, d, valid, pair_w, lo, hi, span, inv_r, n,
                              m, a, dd, cc, e, s, count)
        ctx.pad, ctx.eps = pad, eps
        return loss

    @staticmethod
    def backward(ctx, grad):
        (xt, d, valid, pair_w, lo, hi, span, inv_r, n, m, a, dd, cc, e, s,
         count) = ctx.saved_tensors
        pad = ctx.pad
        # loss = sum_q qw sum_ij w_ij (1 - s_ij^2) / (sum w) / count
        k0 = -2. * grad / (count * pair_w.sum())
        g_s = s * k0 if bool(pair_w.all()) else s * (k0 * pair_w)
        if not bool(valid.all()):  # padding queries take no part
            g_s = g_s * valid.to(s.dtype)[..., None, None]
        # s = a cc / (dd e): d s / d a = s / a, d s / d dd = -s / dd,
        # d s / d e = -s / e (a, dd, e >= c1 or c2 > 0); d s / d cc =
        # a / (dd e)
        u = g_s * s
        g_a = u / a
        g_c = g_s * a / (dd * e)
        g_e = u / e  # minus the gradient of e
        g_dd = u.div_(dd)  # minus the gradient of dd
        # a = 2 m_i m_j + c1, dd = m_i^2 + m_j^2 + c1, e = v_i + v_j + c2,
        # cc = 2 cov + c2 (v_i = cov_ii)
        g_m = 2 * ((g_a + g_a.transpose(-1, -2)) @ m[..., None])[..., 0] - \
            2 * m * (g_dd.sum(-1) + g_dd.sum(-2))  # (B, nW, N, h)
        g_cov = g_c + g_c.transpose(-1, -2)
        g_cov.diagonal(dim1=-2, dim2=-1).sub_(g_e.sum(-1) + g_e.sum(-2))
        # cov = d d^T / n and m = sum_k xn_k / n over the valid keys (the
        # centring's own term vanishes: d sums to 0 over the valid keys),
        # so d loss / d xn = (2 g_cov d + g_m) / n; with each row scaled
        # by its 1 / r, this is the gradient g_x of the logits' own row
        # (the min and max keys get theirs below)
        scale = inv_r / n  # (B, nW, N, h, 1)
        g_x = torch.matmul(2 * g_cov * scale, d).add_(g_m[..., None] * scale)
        _InterHeadSimilarity._zero_padding_keys(g_x, pad)
        # xn = (x - lo) / r with r = max(hi - lo, eps) and xn = d + m on
        # the valid keys; lo and hi are the min and max keys
        # (the sums of g_xn = g_x r over the keys, and of g_xn xn)
        s1 = g_x.sum(-1, keepdim=True)
        sx = (g_x * d).sum(-1, keepdim=True) + m[..., None] * s1
        sx = sx * (span >= ctx.eps).to(sx.dtype)  # where the clamp passes
        _InterHeadSimilarity._to_extreme(g_x, xt, lo, sx - s1, pad)
        _InterHeadSimilarity._to_extreme(g_x, xt, hi, -sx, pad)
        return g_x.transpose(2, 3), None, None, None, None, None, None

    @staticmethod
    def _to_extreme(g_x, xt, value, g, pad):
        """Add a query's min (or max) gradient ``g`` to its min (max) key,
        split evenly between tied keys as autograd's amin / amax do (ties
        are real: saturated pixels give identical tokens)."""
        tied = xt == value
        if pad is not None:  # padding keys take no part
            win, keys = pad
            tied[win] = tied[win] & keys
        # count in bytes where the keys fit (no int64 copy of the mask)
        if tied.shape[-1] < 256:
            n_tied = tied.view(torch.uint8).sum(-1, keepdim=True,
                                                dtype=torch.uint8)
        else:
            n_tied = tied.sum(-1, keepdim=True)
        g_x.add_(torch.where(tied, g / n_tied.clamp_min(1).to(g.dtype), 0.))


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
                               pairs: str = 'all',
                               total: Optional[int] = None,
                               recompute: bool = False):
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
        total: the images of the whole batch when the logits hold a
            micro-batch (see :func:`inter_head_similarity`).
        recompute: compute each layer under non-reentrant activation
            checkpointing: its backward recomputes the SSIM statistics
            instead of keeping them (two tensors of the logits' size per
            layer), the same numbers.

    See :func:`inter_head_similarity` for the per-layer definition.
    """
    layers = _layers(logits, valid)
    if len(layers) == 0:
        raise ValueError('inter_head_similarity_loss got no logits: was the '
                         'backbone run inside an AttnLogitsRecorder?')
    if recompute:
        per_layer = torch.stack([
            checkpoint(inter_head_similarity, lg, v, c1, c2, eps, pairs,
                       total, use_reentrant=False, preserve_rng_state=False)
            if lg.requires_grad else
            inter_head_similarity(lg, v, c1, c2, eps, pairs, total)
            for lg, v in layers
        ])
    else:
        per_layer = torch.stack([
            inter_head_similarity(lg, v, c1=c1, c2=c2, eps=eps, pairs=pairs,
                                  total=total)
            for lg, v in layers
        ])
    loss = per_layer.mean()
    if return_per_layer:
        return loss, per_layer.detach()
    return loss


# --------------------------------------------------------------------------
# synthesizer
# --------------------------------------------------------------------------
@MODELS.register_module()
class MimiQ(PixelSynthesizer):
    """MimiQ data-free synthesis at the backbone level of a Swin model.

    Per batch: ``x ~ N(0, 1)`` ``(n, 3, H, W)`` (normalised space, clamped to
    the valid range), AdamW on the pixels with a cosine schedule from ``lr``
    to ``min_lr``; each iteration augments the batch (see :meth:`augment`),
    runs ``backbone(x_aug)`` under an
    :class:`~dfq_dense.synth.qk_hooks.AttnLogitsRecorder` and minimises::

        head_sim_weight * inter_head_similarity_loss(logits of all blocks)
      + ce_weight * CE(RandomProjectionHead(backbone(x_aug)), random labels)
      + TV term on the un-augmented x

    then clamps ``x`` to the valid normalised range (the loop of
    :class:`~dfq_dense.synth.loop.PixelSynthesizer`).  The random labels are
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

    Args (beyond :class:`~dfq_dense.synth.base.BaseSynthesizer`):
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
        label_head: where the pseudo-label CE takes its logits:
            ``'projection'`` (the random projection of the pooled backbone
            features, the backbone-level variant for detectors and
            segmentors) or ``'classifier'`` (a timm classifier's own
            logits, as MimiQ does on ImageNet; ``num_classes`` is then the
            classifier's, ``logit_scale`` unused).
        ssim_c1, ssim_c2: SSIM constants (0.01^2, 0.03^2).
        head_pairs: head pairs of the similarity (see
            :func:`inter_head_similarity`): ``'all'`` (H x H with the
            diagonal, as released, default) or ``'distinct'`` (i < j, the
            behaviour of earlier versions).
        micro_batch_size: forward / backpropagate this many images at a
            time (see :mod:`~dfq_dense.synth.loop`); the same images: the
            head similarity and the pseudo-label CE are means over images
            (each micro-batch adds its images' sum over the batch's
            count), the augmentation (roll, flip, colour jitter, noise) is
            drawn for the whole batch as before, and the TV term, whose
            Frobenius norms couple the images, is taken on the whole
            batch (pixels only).  MimiQ's random labels are drawn once per
            batch, before the iterations.
        with_cp: activation checkpointing of the backbone's Swin blocks and
            of the head similarity of every layer (its SSIM statistics,
            two tensors of the size of the logits per layer, are
            recomputed in backward instead of kept): the same images.

    MimiQ's distillation of the quantized student (head-wise structural
    attention distillation) changes the student, not the images: it is the
    adapter :class:`~dfq_dense.adapt.mimiq_distill.MimiQDistill`
    (``dfq.adapter``).
    """

    COMPONENTS = ('head_similarity', 'pseudo_label', 'tv')

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
                 label_head: str = 'projection',
                 ssim_c1: float = SSIM_C1,
                 ssim_c2: float = SSIM_C2,
                 head_pairs: str = 'all',
                 micro_batch_size: Optional[int] = None,
                 with_cp: bool = False,
                 log_interval: int = 50,
                 progress: bool = True,
                 device=None):
        super().__init__(num_images=num_images, batch_size=batch_size,
                         img_size=img_size, iterations=iterations, seed=seed,
                         log_interval=log_interval, progress=progress,
                         device=device, micro_batch_size=micro_batch_size,
                         with_cp=with_cp)
        self.components = parse_components('MimiQ', self.COMPONENTS,
                                           components)
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
        if label_head not in LABEL_HEADS:
            raise ValueError(f'MimiQ: label_head must be one of '
                             f'{LABEL_HEADS}, got {label_head!r}')
        self.label_head = label_head
        self.head = RandomProjectionHead(num_classes=num_classes,
                                         logit_scale=logit_scale, seed=seed)

    def _use_classifier(self, backbone):
        """``label_head='classifier'``: the CE on the classifier's logits,
        labels over its classes."""
        if self.label_head == 'classifier':
            self.num_classes = classifier_num_classes(backbone)
            self.head = ClassifierLogits(self.num_classes)

    def check_model(self, model):
        """MimiQ hooks Swin window attention: fail early without it."""
        super().check_model(model)
        AttnLogitsRecorder(get_backbone(model)).remove()
        self._use_classifier(get_backbone(model))

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

    # ------------------------------------------------------- loop pieces
    LOSS_TERMS = ('head_sim', 'ce', 'tv')

    @property
    def weights(self):
        """Weights of the head similarity and the pseudo-label CE; the TV
        term carries its own (see :meth:`tv_loss`)."""
        return dict(head_sim=self.head_sim_weight, ce=self.ce_weight)

    def make_optimizer(self, x):
        return torch.optim.AdamW([x], lr=self.lr, betas=self.betas,
                                 weight_decay=self.weight_decay)

    def start_batch(self, state):
        """The batch's random labels, the generator of its pixel noise and,
        with ``head_similarity``, the logits recorder."""
        gen = state.generator
        self._use_classifier(state.backbone)
        state.targets = random_hard_targets(state.n, self.num_classes,
                                            gen).to(state.device)
        state.noise_gen = None
        if self.noise_std > 0:
            state.noise_gen = torch.Generator(
                device=state.device).manual_seed(
                    int(torch.randint(2**62, (), generator=gen)))
        if self.components['head_similarity']:
            state.recorder = AttnLogitsRecorder(state.backbone)

    def pass_input(self, state, p):
        return self.augment(state.x, state.generator, state.it,
                            state.noise_gen)

    def loss_terms(self, state, p, inputs, feats):
        terms = {}
        if state.recorder is not None:
            terms['head_sim'] = inter_head_similarity_loss(
                state.recorder.records, c1=self.ssim_c1, c2=self.ssim_c2,
                pairs=self.head_pairs, recompute=self.with_cp)
        if self.components['pseudo_label']:
            if isinstance(feats, torch.Tensor):
                feats = (feats, )
            terms['ce'] = F.cross_entropy(self.head(feats), state.targets)
        if self.components['tv']:
            terms['tv'] = self.tv_loss(state.x, state.generator)
        return terms

    # --------------------------------------------------- micro-batching
    def chunk_terms(self, state, p, inputs, feats, mb):
        """The micro-batch's shares of the head similarity and of the
        pseudo-label CE (sums over its images over the batch's count)."""
        terms = {}
        if state.recorder is not None:
            terms['head_sim'] = inter_head_similarity_loss(
                state.recorder.records, c1=self.ssim_c1, c2=self.ssim_c2,
                pairs=self.head_pairs, total=mb.total,
                recompute=self.with_cp)
        if self.components['pseudo_label']:
            if isinstance(feats, torch.Tensor):
                feats = (feats, )
            terms['ce'] = F.cross_entropy(
                self.head(feats, mb.start, mb.total),
                state.targets[mb.index], reduction='sum') / mb.total
        return terms

    def pixel_terms(self, state, p, inputs):
        """The TV term, on the whole un-augmented batch."""
        if self.components['tv']:
            return dict(tv=self.tv_loss(state.x, state.generator))
        return {}
