"""SPDFQ (later renamed SARDFQ) image synthesis at the backbone level of Swin
(and of timm's DeiT on the classification track).

SPDFQ optimises the synthetic pixels with three terms:

* **Attention Priors Alignment (APA)**: every attention head of the deeper
  half of the blocks is asked to follow a random Gaussian-mixture "structure"
  prior (:func:`gaussian_mixture_prior`,
  :func:`attention_prior_alignment_loss`): on DeiT the CLS token's
  attention to the patch grid (the paper's form), on Swin, which has no CLS
  token, the window attention averaged over its queries;
  the post-softmax attention is recorded by :class:`AttnProbRecorder`.
* **Multi-Semantic Reinforcement (MSR)**: a few non-overlapping regions of
  every image are cropped, resized to the input size (the paper's form;
  ``crop_size='native'`` keeps each crop at its own pixel size, the dense
  setting of this suite's method fragment) and optimised with their own
  targets (:func:`msr_regions`, :func:`crop_and_resize`, :func:`msr_crops`),
  so each region carries its own semantics.
* **Soft-label learning (SL)**: soft targets ``softmax(Z)``, ``Z``'s target
  entry ``~ U(5, 10)``, with a soft cross-entropy per image and per crop.

plus the TV prior of PSAQ-ViT.  :class:`SPDFQ` is the synthesizer.
"""
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import MODELS
from .base import PixelAdamMixin, get_backbone
from .feature_targets import (LABEL_HEADS, ClassifierLogits,
                              RandomProjectionHead, classifier_num_classes,
                              random_hard_targets,
                              random_soft_targets, soft_cross_entropy)
from .hooks import SwinAttnRecorder, TimmAttentionSite
from .loop import PixelSynthesizer, SynthPass
from .losses import TAU_REF_PIXELS

__all__ = [
    'AttnProbRecorder', 'gaussian_mixture_prior',
    'attention_prior_alignment_loss', 'msr_regions', 'crop_and_resize',
    'msr_crops', 'native_crops', 'SPDFQ'
]


# --------------------------------------------------------------------------
# recorder of the post-softmax window attention
# --------------------------------------------------------------------------
class AttnProbRecorder(SwinAttnRecorder):
    """Record the post-softmax window attention of every Swin block (or the
    global attention of every timm ViT / DeiT block: one "window" of all
    tokens, ``prefix_tokens`` (the CLS token first) in front of the patch
    tokens, whose row 0 is the CLS token's attention that APA reads).

    :class:`~dfq_dense.synth.hooks.SwinAttnRecorder` recording ``'probs'``
    (the softmax output of ``w_msa``, ``(B_img, nW, heads, N, N)``, rows
    summing to 1) with ``valid``, ``depth`` (index of the block over all
    stages, 1..L), ``num_blocks`` (L) and the other metadata.  Works with
    mmdet's and mmseg's ``WindowMSA`` and with
    :class:`~dfq_dense.quant.modules.QuantWindowMSA`, provided the recorder
    is built after the replacement.  :meth:`block_specs` gives ``(num_heads,
    window_size)`` per block (``window_size`` None for global attention).

    Raises:
        ValueError: ``backbone`` has no Swin / timm ViT attention.
    """

    def __init__(self, backbone: nn.Module):
        super().__init__(backbone, record=('probs', ))


# --------------------------------------------------------------------------
# attention priors alignment
# --------------------------------------------------------------------------
def gaussian_mixture_prior(num_maps: int,
                           hw: Union[int, Sequence[int]] = (7, 7),
                           num_components: int = 5,
                           generator: Optional[torch.Generator] = None,
                           sigma_range: Tuple[float, float] = (0.1, 0.3),
                           weight_range: Tuple[float, float] = (0.1, 1.0)
                           ) -> torch.Tensor:
    """Random Gaussian-mixture maps over a window grid (Swin) or the patch
    grid (ViT / DeiT, e.g. 14x14), each summing to 1.

    Every map is ``sum_c w_c exp(-|p - mu_c|^2 / (2 sigma_c^2))`` evaluated
    at the cell centres ``p = (i, j)``, ``0 <= i < h``, ``0 <= j < w``, then
    divided by its sum.  Per component:

    * centre ``mu_c ~ U([0, h-1] x [0, w-1])`` (continuous, inside the
      window),
    * isotropic ``sigma_c = s * max(h, w)`` with ``s ~ U(sigma_range)``
      (default 0.1..0.3 of the window side: 0.7..2.1 cells for a 7x7
      window), so the prior's shape does not depend on the window size,
    * weight ``w_c ~ U(weight_range)`` (positive).

    Args:
        num_maps: number of maps (e.g. heads of a block).
        hw: ``(h, w)`` of the window grid (or an int).
        num_components: Gaussians per map.
        generator: CPU generator; the maps are a deterministic function of
            its state (a fresh one seeded with 0 when None).

    Returns:
        float32 ``(num_maps, h, w)``, non-negative, each map summing to 1.
    """
    if isinstance(hw, int):
        hw = (hw, hw)
    h, w = int(hw[0]), int(hw[1])
    if num_components < 1:
        raise ValueError(f'num_components must be >= 1, got {num_components}')
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    shape = (num_maps, num_components)
    cy = torch.rand(shape, generator=generator) * (h - 1)
    cx = torch.rand(shape, generator=generator) * (w - 1)
    s_lo, s_hi = sigma_range
    sigma = (s_lo + (s_hi - s_lo) * torch.rand(shape, generator=generator)) \
        * max(h, w)
    w_lo, w_hi = weight_range
    weight = w_lo + (w_hi - w_lo) * torch.rand(shape, generator=generator)
    ii = torch.arange(h, dtype=torch.float32).view(1, 1, h, 1)
    jj = torch.arange(w, dtype=torch.float32).view(1, 1, 1, w)
    d2 = (ii - cy[..., None, None])**2 + (jj - cx[..., None, None])**2
    g = torch.exp(-d2 / (2 * sigma[..., None, None]**2))
    maps = (weight[..., None, None] * g).sum(1)  # (num_maps, h, w)
    return maps / maps.sum((-2, -1), keepdim=True)


def _prior_of(priors, depth):
    if isinstance(priors, dict):
        return priors.get(depth)
    return priors[depth - 1] if depth - 1 < len(priors) else None


HEAD_REDUCTIONS = ('sum', 'mean')
MSR_COUNTS = ('random', 'fixed')


def _window_errors(rec: Dict, prior: torch.Tensor) -> torch.Tensor:
    """Swin: per image, window and head, the squared error of the
    attention averaged over the window's valid queries and the prior, both
    restricted to the valid keys (see
    :func:`attention_prior_alignment_loss`), ``(B, nW, H)``."""
    probs = rec['probs']  # (B, nW, H, N, N)
    B, nW, H, N, _ = probs.shape
    l = int(rec['depth'])
    prior = prior.to(probs).reshape(-1, N)
    assert prior.shape[0] == H, (
        f'block {l}: prior has {prior.shape[0]} maps for {H} heads')
    valid = rec.get('valid')
    if valid is None:
        valid = torch.ones((B, nW, N), dtype=torch.bool, device=probs.device)
    v = valid.to(probs)  # (B, nW, N)
    # 1. average over the valid queries -> (B, nW, H, N)
    nq = v.sum(-1).clamp_min(1)  # (B, nW)
    a = (probs * v[:, :, None, :, None]).sum(3) / nq[:, :, None, None]
    # 2. restrict to the valid keys and renormalise
    vk = v[:, :, None, :]  # (B, nW, 1, N)
    a = a * vk
    a = a / a.sum(-1, keepdim=True).clamp_min(1e-12)
    p = prior[None, None] * vk  # (B, nW, H, N)
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-12)
    # 3. MSE over the valid keys in uniform-density units
    nk = vk.sum(-1, keepdim=True).clamp_min(1)  # (B, nW, 1, 1)
    return ((nk * (a - p))**2 * vk).sum(-1) / nk[..., 0]


def _cls_row_errors(rec: Dict, prior: torch.Tensor) -> torch.Tensor:
    """ViT / DeiT: per image and head, the squared error of the CLS token's
    attention to the patch keys (renormalised over them) and the prior over
    the patch grid (see :func:`attention_prior_alignment_loss`),
    ``(B, 1, H)``."""
    probs = rec['probs']  # (B, 1, H, T, T): prefix tokens first, CLS at 0
    B, nW, H, T, _ = probs.shape
    l, prefix = int(rec['depth']), int(rec['prefix_tokens'])
    P = T - prefix
    prior = prior.to(probs).reshape(H, -1) if prior.numel() == H * P else \
        None
    if prior is None:
        raise ValueError(
            f'block {l}: the prior has no map of {P} patches per head '
            f'({H} heads, patch grid {tuple(rec["hw_shape"])})')
    # 1. the CLS query's row to the patch keys (CLS, distillation and
    #    other prefix keys dropped), renormalised to sum 1 over the patches
    a = probs[:, :, :, 0, prefix:]  # (B, 1, H, P)
    a = a / a.sum(-1, keepdim=True).clamp_min(1e-12)
    # 2. MSE over the patches in uniform-density units
    return ((P * (a - prior[None, None]))**2).mean(-1)


def attention_prior_alignment_loss(records: Sequence[Dict],
                                   priors: Union[Sequence, Dict],
                                   deeper_half: bool = True,
                                   depth_weight: bool = True,
                                   return_per_block: bool = False,
                                   heads: str = 'sum',
                                   batch_total: Optional[int] = None):
    """APA loss of SPDFQ for Swin window attention and ViT / DeiT global
    attention.

    For a block of depth ``l`` (``records[i]['depth']``, 1..L over all blocks
    of all stages) and every image ``b``, window ``w`` and head ``h``, with
    ``p`` the head's prior map (``priors[l][h]``, flattened row-major):

    *Swin* (records without prefix tokens):

    1. ``a[k] = mean_{valid queries q} probs[b, w, h, q, k]``: the attention
       averaged over the real (non-padding) query tokens, Swin's counterpart
       of DeiT's CLS-to-patch row (Swin has no CLS token); a distribution
       over the ``N = ws * ws`` keys of the window (row-major window grid).
    2. Padding keys (Swin's zero padding, ``valid`` False) carry no image
       content: both ``a`` and ``p`` are restricted to the ``n_v`` valid
       keys of the window and renormalised to sum 1 there.  Windows without
       padding use them unchanged.
    3. ``mse = mean_{valid k} (n_v * (a[k] - p[k]))^2``: the squared error
       of the two maps in units of the uniform density ``1 / n_v``
       (i.e. plain MSE of the probabilities times ``n_v^2``), so the loss
       scale, and hence ``apa_weight``, does not depend on the window size.

    *ViT / DeiT* (records with ``prefix_tokens`` ``T_p >= 1``, the CLS token
    first, as timm orders them; one "window" of all tokens), the paper's
    form (the CLS token's attention to the patches, the "CLS-to-patch
    row"):

    1. ``a[k] = probs[b, 0, h, 0, T_p + k]``, ``k`` over the ``P`` patch
       tokens (row-major patch grid, e.g. 14x14 at 224x224 for /16
       patches): the CLS query's attention row to the patch keys; the CLS
       key itself (and a distillation token's) is dropped and the row
       renormalised to sum 1 over the patches, so that it is a map over
       the same grid as ``p``.
    2. ``mse = mean_k (P * (a[k] - p[k]))^2``, the units of step 3 above.

    Head loss ``L_{l,h} = mean_{b, w} mse`` (images and windows weigh the
    same; one window for ViT / DeiT).  Total, as the paper's APA loss
    (arXiv 2412.16553, Sec. "Attention Priors Alignment": ``L_APA =
    sum_{l=S}^{L} sum_{h=1}^{H} (l / L) L_{l,h}``)::

        L_APA = sum_{l > L/2} (l / L) * sum_h L_{l,h}

    (a *sum* over the heads and over the deeper half of the blocks, each
    block weighted by its depth; ``deeper_half=False`` uses every block,
    ``depth_weight=False`` weight 1, ``heads='mean'`` averages over the
    heads instead of summing, the behaviour of earlier versions:
    ``L_l = mean_{b, w, h} mse``).

    Args:
        records: :class:`AttnProbRecorder` records (``probs``, ``valid``,
            ``depth``, ``num_blocks``, ``prefix_tokens``).
        priors: ``priors[l - 1]`` (a sequence) or ``priors[l]`` (a dict) is
            block ``l``'s ``(heads, ws, ws)`` (or ``(heads, N)``) maps, for
            ViT / DeiT ``(heads, gh, gw)`` over the patch grid (or
            ``(heads, P)``); may be None for blocks that are not used.
        return_per_block: also return ``{l: detached L_l}`` (the block's
            loss before the depth weight).
        heads: ``'sum'`` (paper) or ``'mean'`` over the heads of a block.
        batch_total: the images of the whole batch when the records hold
            a micro-batch of it: ``L_{l,h}`` is then the micro-batch's sum
            over images and windows divided by ``batch_total`` images'
            windows (its share of the batch's mean).

    Returns:
        scalar loss (and the per-block dict).
    """
    if heads not in HEAD_REDUCTIONS:
        raise ValueError(f'heads must be one of {HEAD_REDUCTIONS}, got '
                         f'{heads!r}')
    if len(records) == 0:
        raise ValueError('attention_prior_alignment_loss got no records: was '
                         'the backbone run inside an AttnProbRecorder?')
    total = None
    per_block = {}
    for rec in records:
        l, L = int(rec['depth']), int(rec['num_blocks'])
        if deeper_half and not l > L / 2:
            continue
        prior = _prior_of(priors, l)
        if prior is None:
            raise ValueError(f'no prior for block {l}')
        if rec['probs'].dtype not in (torch.float32, torch.float64):
            rec = dict(rec, probs=rec['probs'].float())
        if int(rec.get('prefix_tokens', 0) or 0) > 0:
            err = _cls_row_errors(rec, prior)  # (B, 1, H)
        else:
            err = _window_errors(rec, prior)  # (B, nW, H)
        nW = err.shape[1]
        if batch_total is None:
            per_head = err.mean((0, 1))  # L_{l,h}, (H,)
        else:  # a micro-batch's share of the batch's mean
            per_head = err.sum((0, 1)) / (nW * int(batch_total))
        block = per_head.sum() if heads == 'sum' else per_head.mean()
        per_block[l] = block.detach()
        wgt = l / L if depth_weight else 1.0
        total = wgt * block if total is None else total + wgt * block
    if total is None:
        total = records[0]['probs'].new_zeros(()).float()
    if return_per_block:
        return total, per_block
    return total


# --------------------------------------------------------------------------
# multi-semantic reinforcement
# --------------------------------------------------------------------------
def _grid_cuts(size: int, parts: int, jitter: float,
               generator: torch.Generator) -> List[int]:
    """``parts + 1`` increasing cut positions of ``[0, size]``: the equal
    cuts ``i * size / parts`` moved by ``U(-jitter, jitter)`` of a cell."""
    cell = size / parts
    cuts = [0]
    for i in range(1, parts):
        u = (2 * torch.rand((), generator=generator).item() - 1) * jitter
        cuts.append(int(round((i + u) * cell)))
    cuts.append(size)
    for i in range(1, len(cuts)):  # at least one pixel per cell
        cuts[i] = max(cuts[i], cuts[i - 1] + 1)
    if cuts[-1] != size:
        raise ValueError(f'cannot split {size} pixels into {parts} parts')
    return cuts


def msr_regions(n: int,
                hw: Tuple[int, int],
                num_patches: int = 4,
                generator: Optional[torch.Generator] = None,
                grid: Tuple[int, int] = (2, 2),
                split_jitter: float = 0.15,
                count: str = 'fixed',
                return_cells: bool = False):
    """Non-overlapping MSR regions of ``n`` images of size ``hw``.

    Each image is split by a ``grid`` (default 2x2: quadrants) whose inner
    cut lines are drawn per image (the equal cuts moved by up to
    ``split_jitter`` of a cell, uniformly), so the regions differ between
    images; then ``m`` cells are picked at random (``randperm``).  The
    cells of a grid tile the image, so the picked regions never overlap.
    With ``K = min(num_patches, grid_h * grid_w)``:

    * ``count='fixed'``: ``m = K`` for every image (a fixed crop batch),
      chosen in a different random subset;
    * ``count='random'``: ``m ~ U{1, ..., K}`` drawn per image (the paper's
      "m in {1, ..., K_MSR} non-overlapping patches", K_MSR = 4).

    Draws per image, in order: the row cuts, the column cuts, ``m``
    (``'random'`` only), the cell permutation.

    Returns:
        long ``(M, 5)``: ``(image index, y0, y1, x0, x1)`` (end exclusive),
        images outermost (``M = n * K`` for ``'fixed'``); with
        ``return_cells`` also the long ``(M,)`` grid cell (row-major) of
        every region.
    """
    if count not in MSR_COUNTS:
        raise ValueError(f'count must be one of {MSR_COUNTS}, got {count!r}')
    H, W = int(hw[0]), int(hw[1])
    gh, gw = int(grid[0]), int(grid[1])
    if not 0 <= split_jitter < 0.5:
        raise ValueError(f'split_jitter must be in [0, 0.5), got '
                         f'{split_jitter}')
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    k = min(int(num_patches), gh * gw)
    if k < 1:
        raise ValueError(f'num_patches must be >= 1, got {num_patches}')
    boxes, picked = [], []
    for b in range(n):
        ys = _grid_cuts(H, gh, split_jitter, generator)
        xs = _grid_cuts(W, gw, split_jitter, generator)
        m = k
        if count == 'random':
            m = int(torch.randint(1, k + 1, (), generator=generator))
        cells = torch.randperm(gh * gw, generator=generator)[:m].tolist()
        for c in cells:
            r, q = divmod(c, gw)
            boxes.append((b, ys[r], ys[r + 1], xs[q], xs[q + 1]))
            picked.append(c)
    boxes = torch.tensor(boxes, dtype=torch.long).reshape(-1, 5)
    if return_cells:
        return boxes, torch.tensor(picked, dtype=torch.long)
    return boxes


#: ``crop_size`` that keeps every MSR crop at its own pixel size.
NATIVE = 'native'


def native_crops(x: torch.Tensor, boxes: torch.Tensor
                 ) -> Tuple[List[torch.Tensor], List[int]]:
    """The ``boxes`` (``(M, 5)``, see :func:`msr_regions`) of ``x`` at their
    own pixel size (no resampling), grouped by size: ``(groups, order)``,
    ``groups[g]`` ``(M_g, C, h_g, w_g)`` the crops of one size in box
    order, the groups in the order their size first occurs, ``order`` the
    box index of every crop of the concatenated groups.  A crop is a slice
    of ``x``: its gradient is that of its region."""
    sizes: Dict[Tuple[int, int], List[int]] = {}
    rows = boxes.tolist()
    for i, (_, y0, y1, x0, x1) in enumerate(rows):
        sizes.setdefault((y1 - y0, x1 - x0), []).append(i)
    groups, order = [], []
    for idx in sizes.values():
        groups.append(torch.cat([
            x[rows[i][0]:rows[i][0] + 1, :, rows[i][1]:rows[i][2],
              rows[i][3]:rows[i][4]] for i in idx], 0))
        order.extend(idx)
    return groups, order


def crop_and_resize(x: torch.Tensor, boxes: torch.Tensor,
                    size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """Crop ``boxes`` (``(M, 5)``, see :func:`msr_regions`) out of ``x``
    ``(B, C, H, W)`` and resize each to ``size`` (default ``(H, W)``) with
    bilinear interpolation (``align_corners=False``).

    Each crop is computed from its slice of ``x`` only, so its gradient
    w.r.t. ``x`` is zero outside its region.  Returns ``(M, C, *size)``.
    """
    if size is None:
        size = tuple(x.shape[-2:])
    size = (int(size[0]), int(size[1]))
    out = []
    for b, y0, y1, x0, x1 in boxes.tolist():
        patch = x[b:b + 1, :, y0:y1, x0:x1]
        out.append(F.interpolate(patch, size=size, mode='bilinear',
                                 align_corners=False))
    return torch.cat(out, 0)


def msr_crops(x: torch.Tensor,
              num_patches: int = 4,
              generator: Optional[torch.Generator] = None,
              grid: Tuple[int, int] = (2, 2),
              split_jitter: float = 0.15,
              size: Optional[Tuple[int, int]] = None,
              count: str = 'fixed'
              ) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`msr_regions` then :func:`crop_and_resize`.

    Returns:
        ``(crops (M, C, H, W), boxes (M, 5))``.
    """
    boxes = msr_regions(x.shape[0], tuple(x.shape[-2:]), num_patches,
                        generator, grid, split_jitter, count=count)
    return crop_and_resize(x, boxes, size), boxes


# --------------------------------------------------------------------------
# synthesizer
# --------------------------------------------------------------------------
@MODELS.register_module()
class SPDFQ(PixelAdamMixin, PixelSynthesizer):
    """SPDFQ / SARDFQ data-free synthesis for Swin backbones (mmdet / mmseg
    and timm) and timm ViT / DeiT classifiers.

    Per batch of ``n`` images (everything random from the seeded generator,
    drawn in this order): ``x ~ N(0, 1)`` (normalised space, clamped to the
    valid range); one prior per (block, head)
    (:func:`gaussian_mixture_prior`, ``num_components`` Gaussians over the
    block's window grid, a DeiT's patch grid), kept for the whole batch;
    one target per image; one target per image and MSR grid cell (kept for
    the batch, so a region of an image keeps optimising towards the same
    target).  Adam on the pixels; each iteration:

    1. ``x_aug`` = random roll (``jitter`` px) + horizontal flip of ``x`` (as
       :class:`~dfq_dense.synth.psaq.PSAQViT`); ``backbone(x_aug)`` under an
       :class:`AttnProbRecorder`; ``L_APA`` on its records
       (:func:`attention_prior_alignment_loss`: sum over the blocks
       ``l > L/2`` of ``(l / L) *`` the sum over the heads of the
       mean-over-images/windows MSE, the paper's form) and
       ``L_SL_img = soft_cross_entropy(head(feats), image targets)``;
       backward.
    2. MSR: ``m ~ U{1, ..., min(num_patches, 4)}`` non-overlapping regions
       of every image are drawn for this iteration (:func:`msr_regions`
       with ``count='random'``, the paper's "m in {1, ..., K_MSR}" with
       K_MSR = 4: cells of a 2x2 grid with per-image jittered cut lines),
       cropped from the *un-augmented* ``x`` and resized (bilinear) to
       ``crop_size`` (default None: the input size, as in the paper;
       ``'native'``: not resized, see below), then given one random roll /
       flip (the same for all crops); each region's target is that of its
       image and grid cell;
       ``L_SL_crops = soft_cross_entropy(head(backbone(crops)), region
       targets)``; backward (a second forward, not recorded, so the peak
       memory is that of one batch; the gradients add up in ``x``).
       A crop's gradient reaches only its region of ``x``.
    3. ``L_TV = tv_prior_loss(x)`` (on the un-augmented ``x``, random
       target from ``tau_range`` scaled to the batch size / resolution,
       exactly as PSAQViT); backward; Adam step; clamp to the valid range.

    Total: ``apa_weight * L_APA + L_SL_img + L_SL_crops + L_TV`` (``L_TV``
    already carries ``tv_weight``, 0.05 as in the reference).

    Backbone-level replacement of the class logits: a detector / segmentor
    backbone has no classifier, so the logits are those of a fixed
    :class:`~dfq_dense.synth.feature_targets.RandomProjectionHead`
    (``num_classes`` random directions of the concatenated, per-stage
    standardised, spatially pooled backbone outputs; its weights are drawn
    from ``seed``).  A soft target asks the pooled features of an image /
    region to point mostly along one random direction, like the soft label
    of a class asks the classifier.  Targets:
    :func:`~dfq_dense.synth.feature_targets.random_soft_targets`
    (``softmax(Z)``, ``Z`` zero except one random entry ``~ U(5, 10)``).
    ``num_classes`` defaults to 1000, ImageNet's, so a target keeps the
    paper's softness (0.13 .. 0.96 on the target entry for ``Z`` in
    ``[5, 10]``).

    Choices the paper / reference leave open (documented here):

    * DeiT attention target (the paper's "CLS-to-patch row"; arXiv
      2412.16553, APA): the CLS query's attention row to the patch keys,
      the CLS (and distillation) key dropped and the row renormalised over
      the patches so that it is a map over the same grid as the prior
      (whether the paper drops / renormalises is not stated in what could be
      read here), MSE in uniform-density units as for Swin, priors over the
      patch grid with the Swin priors' draws (centres uniform on the grid,
      sigma a share of the grid side).
    * Swin attention target: the attention averaged over the valid query
      tokens of each window, restricted and renormalised to the valid keys;
      the prior is shared by all windows and images of a block / head and
      compared on the window grid (see
      :func:`attention_prior_alignment_loss`, which also fixes the MSE
      units: uniform-density units, so the default ``apa_weight`` of 1.0 is
      window-size independent; the paper's alpha is not given).
    * Depth ``l`` counts all blocks of all stages (1..L); "deeper half" is
      ``l > L / 2``; the block losses are summed.
    * Prior maps: centres uniform in the window, isotropic sigma
      ``U(prior_sigma_range) * window side``, weights ``U(0.1, 1)``; drawn
      once per synthesized batch.
    * MSR crop size: the paper (ImageNet classifiers at 224x224) resizes
      every patch to the network's input size, which a classifier with a
      fixed input size needs; what MSR asks is that each patch, fed to the
      network as an image of its own, carries its own target.  A dense
      backbone takes any size, and at 800x1333 "the input size" makes each
      crop (a quarter of the image) a full-size forward, up to 4 per image,
      upsampled about 2x.  ``crop_size='native'`` (the method fragment's
      setting) forwards each crop at its own pixel size instead: the
      region's content at the scale it has in the image, no resampling,
      and the crops of an image together cost at most one forward of the
      image.  Crops of one size are forwarded together, crops of different
      sizes one size at a time (the 2x2 cut lines are jittered per image,
      so the sizes mostly differ).  ``crop_size=None`` keeps the paper's
      resize to the input size, an int or ``(h, w)`` a fixed size.  A timm
      classifier takes only its own input size: there
      :meth:`check_model` refuses any other crop size (the fragment's
      ``'native'`` included) in one line, before any work, instead of
      timm's assertion in the first crop forward; the classification
      configs set ``crop_size=None``.
    * MSR regions: the paper draws m in {1..4} non-overlapping patches but
      does not say where; here they are cells of a 2x2 grid with per-image
      jittered cut lines (redrawn every iteration), one target per image
      and cell for the batch; crops and images optimised in two forwards
      per iteration.  ``msr_count='fixed'`` restores earlier versions:
      ``min(num_patches, 4)`` cells per image, regions and their targets
      fixed for the batch.
    * APA: ``apa_heads='mean'`` averages over the heads instead of the
      paper's sum (earlier versions).
    * ``L_SL`` = mean soft CE over the images + mean soft CE over the
      crops (each its own mean, so the crops weigh as much as the images).
    * Optimiser / schedule: Adam ``lr=0.25``, ``betas=(0.5, 0.9)``, linear
      warm-up over ``min(100, iterations // 5)`` iterations then cosine to
      0, and the roll / flip augmentation, as this repo's PSAQViT (both
      from :class:`~dfq_dense.synth.base.PixelAdamMixin`; the reference
      gives only "Adam, 1000 iterations, 32 images").

    Ablation: ``components=dict(apa=..., msr=..., soft_label=..., tv=...)``
    (missing keys default to True).  ``apa=False`` drops ``L_APA`` (and the
    hooks); ``msr=False`` drops the crops; ``soft_label=False`` replaces the
    soft targets by one-hot random labels (the hard-label CE of PSAQ-ViT,
    i.e. the paper's "without SL" setting) for images and crops alike;
    ``tv=False`` drops ``L_TV``.  Set ``label_weight=0`` to drop the label
    loss altogether.

    Args (beyond :class:`BaseSynthesizer`):
        lr, betas, warmup_iters, jitter, flip: optimiser and augmentation.
        apa_weight: alpha, the weight of ``L_APA``.
        num_components, prior_sigma_range: prior maps.
        num_patches, msr_grid, msr_split_jitter: MSR regions.
        crop_size: size the MSR crops are forwarded at: None (the input
            size, the paper's), ``'native'`` (each crop's own size, no
            resampling) or an int / ``(h, w)``.
        msr_count: ``'random'`` (m ~ U{1..K} per image and iteration,
            paper) or ``'fixed'`` (K per image, fixed for the batch).
        apa_heads: ``'sum'`` (paper) or ``'mean'`` over the heads.
        num_classes, logit_scale, soft_range: random head and soft targets.
        label_head: where the soft-label CE takes its logits:
            ``'projection'`` (the random projection of the pooled backbone
            features, the backbone-level variant) or ``'classifier'`` (a
            timm classifier's own logits, as the paper on ImageNet;
            ``num_classes`` is then the classifier's).
        label_weight: weight of ``L_SL`` (1.0).
        tv_weight, tau_range, tau_ref_pixels: TV prior.
        components: the ablation switches above.
        micro_batch_size: forward / backpropagate at most this many images
            of the images pass, and this many crops of the crops pass, at a
            time (see :mod:`~dfq_dense.synth.loop`); the same images: APA
            and the soft CEs are means over images / crops (each
            micro-batch adds its sum over the batch's count), regions and
            targets are drawn for the whole batch as before, and the TV
            prior is its own pass on the whole batch.
        with_cp: activation checkpointing of the backbone's Swin blocks.
    """

    COMPONENTS = ('apa', 'msr', 'soft_label', 'tv')

    def __init__(self,
                 num_images: int = 32,
                 batch_size: int = 32,
                 img_size=None,
                 iterations: int = 1000,
                 seed: int = 0,
                 lr: float = 0.25,
                 betas: Tuple[float, float] = (0.5, 0.9),
                 warmup_iters: Optional[int] = None,
                 jitter: int = 15,
                 flip: bool = True,
                 apa_weight: float = 1.0,
                 num_components: int = 5,
                 prior_sigma_range: Tuple[float, float] = (0.1, 0.3),
                 num_patches: int = 4,
                 msr_grid: Tuple[int, int] = (2, 2),
                 msr_split_jitter: float = 0.15,
                 crop_size=None,
                 msr_count: str = 'random',
                 apa_heads: str = 'sum',
                 num_classes: int = 1000,
                 logit_scale: float = 1.0,
                 label_head: str = 'projection',
                 soft_range: Tuple[float, float] = (5.0, 10.0),
                 label_weight: float = 1.0,
                 tv_weight: float = 0.05,
                 tau_range: Tuple[float, float] = (2500., 3000.),
                 tau_ref_pixels: int = TAU_REF_PIXELS,
                 components: Optional[dict] = None,
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
        comps = dict(components or {})
        unknown = sorted(set(comps) - set(self.COMPONENTS))
        if unknown:
            raise ValueError(
                f'SPDFQ: unknown component(s) {unknown}; known components: '
                f'{list(self.COMPONENTS)}')
        self.components = {k: bool(comps.get(k, True))
                           for k in self.COMPONENTS}
        self._init_pixel_adam(lr, betas, warmup_iters, jitter, flip,
                              tv_weight, tau_range, tau_ref_pixels)
        self.apa_weight = float(apa_weight)
        self.num_components = int(num_components)
        self.prior_sigma_range = tuple(prior_sigma_range)
        self.num_patches = int(num_patches)
        self.msr_grid = tuple(int(g) for g in msr_grid)
        self.msr_split_jitter = float(msr_split_jitter)
        if crop_size is None or crop_size == NATIVE:
            self.crop_size = crop_size
        elif isinstance(crop_size, str):
            raise ValueError(f"SPDFQ: crop_size must be None, 'native', an "
                             f'int or (h, w), got {crop_size!r}')
        else:
            self.crop_size = self._hw(crop_size)
        if msr_count not in MSR_COUNTS:
            raise ValueError(f'SPDFQ: msr_count must be one of {MSR_COUNTS}'
                             f', got {msr_count!r}')
        if apa_heads not in HEAD_REDUCTIONS:
            raise ValueError(f'SPDFQ: apa_heads must be one of '
                             f'{HEAD_REDUCTIONS}, got {apa_heads!r}')
        self.msr_count = msr_count
        self.apa_heads = apa_heads
        self.num_classes = int(num_classes)
        self.soft_range = tuple(soft_range)
        self.label_weight = float(label_weight)
        self.head = RandomProjectionHead(num_classes=self.num_classes,
                                         logit_scale=logit_scale,
                                         seed=self.seed)
        if label_head not in LABEL_HEADS:
            raise ValueError(f'SPDFQ: label_head must be one of '
                             f'{LABEL_HEADS}, got {label_head!r}')
        self.label_head = label_head
        if self.components['msr'] and self.num_patches < 1:
            raise ValueError('SPDFQ: num_patches must be >= 1 with msr on')

    def _use_classifier(self, backbone):
        """``label_head='classifier'``: the CE on the classifier's logits,
        targets over its classes."""
        if self.label_head == 'classifier':
            self.num_classes = classifier_num_classes(backbone)
            self.head = ClassifierLogits(self.num_classes)

    def check_model(self, model):
        """SPDFQ hooks the attention of a Swin (window attention) or a timm
        ViT / DeiT (global attention, APA on the CLS token's row): one-line
        ValueError without it, for APA on non-square windows or on a ViT
        without CLS token, and for MSR crops forwarded at a size a
        fixed-size timm classifier refuses (``crop_size='native'``, the
        dense method fragment's setting)."""
        super().check_model(model)
        backbone = get_backbone(model)
        rec = AttnProbRecorder(backbone)
        sites = rec.sites
        rec.remove()
        if self.components['apa']:
            for site in sites:
                if isinstance(site, TimmAttentionSite):
                    if site.prefix_tokens < 1 or getattr(
                            backbone, 'cls_token', None) is None or \
                            site.grid is None:
                        raise ValueError(
                            'SPDFQ\'s attention priors on ViT / DeiT global '
                            'attention align the CLS token\'s row to the '
                            f'patch grid; this {type(backbone).__name__} has '
                            'no CLS token or patch grid (switch APA off with '
                            'components=dict(apa=False))')
                elif not isinstance(site.window_size, int):
                    raise ValueError(
                        'SPDFQ\'s attention priors are Gaussian-mixture maps '
                        'over square Swin windows; this backbone has '
                        f'{site.window_size} windows (switch APA off with '
                        'components=dict(apa=False))')
        self._check_crop_size(backbone)
        self._use_classifier(backbone)

    def _check_crop_size(self, backbone):
        """A timm classifier built for one input size (its patch embedding
        checks it: ``strict_img_size``) refuses MSR crops of another size
        in the middle of the first iteration; say so before any work."""
        if not self.components['msr'] or self.label_weight == 0:
            return
        embed = getattr(backbone, 'patch_embed', None)
        if not getattr(embed, 'strict_img_size', False):
            return
        size = tuple(int(v) for v in embed.img_size)
        if self.crop_size is None or self.crop_size == size:
            return
        raise ValueError(
            f'crop_size={self.crop_size!r} forwards the MSR crops at '
            f'another size than the {size[0]}x{size[1]} inputs this timm '
            f'{type(backbone).__name__} takes; use crop_size=None (each '
            'crop resized to the input size, the paper\'s form)')

    @staticmethod
    def prior_grids(recorder, backbone, hw=None) -> List[Tuple[int, int]]:
        """The grid of every attention's prior maps, forward order: the
        ``(ws, ws)`` window of a Swin block, the patch grid (e.g. 14x14
        for a /16 DeiT at 224x224) of a ViT / DeiT attention, that of
        images of size ``hw`` for a timm model with ``dynamic_img_size``."""
        grids = []
        for site in recorder.sites:
            if not isinstance(site, TimmAttentionSite):
                grids.append((site.window_size, site.window_size))
                continue
            grid = site.grid
            embed = getattr(backbone, 'patch_embed', None)
            if hw is not None and getattr(backbone, 'dynamic_img_size',
                                          False):
                grid = embed.dynamic_feat_size(tuple(hw))
            if grid is None:
                raise ValueError(f'SPDFQ: {site.name} has no patch grid')
            grids.append((int(grid[0]), int(grid[1])))
        return grids

    # --------------------------------------------------------------- targets
    def _targets(self, n: int, generator: torch.Generator) -> torch.Tensor:
        if self.components['soft_label']:
            lo, hi = self.soft_range
            return random_soft_targets(n, self.num_classes, generator, lo, hi)
        idx = random_hard_targets(n, self.num_classes, generator)
        return F.one_hot(idx, self.num_classes).float()

    def _random_regions(self, n, hw, generator, cell_targets):
        """This iteration's MSR regions (``m ~ U{1..K}`` per image) and
        their targets (the target of the region's image and grid cell)."""
        boxes, cells = msr_regions(n, hw, self.num_patches, generator,
                                   self.msr_grid, self.msr_split_jitter,
                                   count='random', return_cells=True)
        n_cells = self.msr_grid[0] * self.msr_grid[1]
        index = (boxes[:, 0] * n_cells + cells).to(cell_targets.device)
        return boxes, cell_targets[index]

    # ------------------------------------------------------- loop pieces
    LOSS_TERMS = ('apa', 'sl', 'sl_img', 'sl_crops', 'tv')

    @property
    def weights(self):
        """``alpha`` for L_APA, ``label_weight`` for the soft labels of
        images and crops; the TV prior carries ``tv_weight``."""
        return dict(apa=self.apa_weight, sl_img=self.label_weight,
                    sl_crops=self.label_weight)

    def make_optimizer(self, x):
        return torch.optim.Adam([x], lr=self.lr, betas=self.betas)

    def start_batch(self, state):
        """Per batch, in this order from the generator: the priors of every
        block and head, the image targets, then the MSR regions and their
        targets (``'fixed'``) or one target per image and grid cell
        (``'random'``).  The recorder is kept with APA only."""
        comps, n, gen = self.components, state.n, state.generator
        self._use_classifier(state.backbone)
        rec = AttnProbRecorder(state.backbone)  # also checks the backbone
        if comps['apa']:
            state.recorder = rec
            grids = self.prior_grids(rec, state.backbone, state.hw)
            state.priors = [
                gaussian_mixture_prior(heads, grid, self.num_components,
                                       gen, self.prior_sigma_range
                                       ).to(state.device)
                for (heads, _), grid in zip(rec.block_specs(), grids)
            ]
        else:
            rec.remove()
        state.img_targets = self._targets(n, gen).to(state.device)
        state.boxes = state.crop_targets = state.cell_targets = None
        if comps['msr'] and self.msr_count == 'fixed':
            state.boxes = msr_regions(n, state.hw, self.num_patches, gen,
                                      self.msr_grid, self.msr_split_jitter)
            state.crop_targets = self._targets(state.boxes.shape[0],
                                               gen).to(state.device)
        elif comps['msr']:  # one target per (image, grid cell)
            cells = self.msr_grid[0] * self.msr_grid[1]
            state.cell_targets = self._targets(n * cells,
                                               gen).to(state.device)

    def passes(self, state):
        """1. the images (APA and their labels), 2. the MSR crops (their
        labels; a forward that is not recorded), 3. the TV prior; each
        backpropagated before the next forward."""
        comps = self.components
        use_labels = self.label_weight != 0
        out = []
        if comps['apa'] or use_labels:
            out.append(SynthPass('images'))
        if comps['msr'] and use_labels:
            out.append(SynthPass('crops', record=False))
        if comps['tv']:
            out.append(SynthPass('tv', forward=False))
        return out

    def pass_input(self, state, p):
        if p.name == 'images':
            return self.augment(state.x, state.generator)
        # crops: this iteration's regions ('random') or the batch's
        boxes, state.crop_targets_it = state.boxes, state.crop_targets
        if self.msr_count == 'random':
            boxes, state.crop_targets_it = self._random_regions(
                state.n, state.hw, state.generator, state.cell_targets)
        if self.crop_size == NATIVE:
            return self._native_crop_input(state, boxes)
        crops = crop_and_resize(state.x, boxes, self.crop_size)
        return self.augment(crops, state.generator)

    def _native_crop_input(self, state, boxes):
        """The crops at their own size, grouped by size (a list: the loop
        forwards each group on its own), each group given the same roll /
        flip, drawn once (the draws of one :meth:`augment` call); the
        targets follow the crops' new order."""
        groups, order = native_crops(state.x, boxes)
        state.crop_targets_it = state.crop_targets_it[
            torch.as_tensor(order, device=state.crop_targets_it.device)]
        gen = state.generator
        start = gen.get_state()
        out = []
        for crops in groups:
            gen.set_state(start)
            out.append(self.augment(crops, gen))
        return out

    def loss_terms(self, state, p, inputs, feats):
        if p.name == 'tv':
            return dict(tv=self.tv_prior(state.x, state.generator))
        if p.name == 'crops':
            return dict(sl_crops=self._label_loss(feats,
                                                  state.crop_targets_it))
        # images: their labels' CE is computed first and summed after L_APA
        # (alpha * L_APA + w * L_SL_img), the order a seed's images were
        # always made in
        terms = {}
        loss_img = None
        if self.label_weight != 0:
            loss_img = self._label_loss(feats, state.img_targets)
        if self.components['apa']:
            terms['apa'] = attention_prior_alignment_loss(
                state.recorder.records, state.priors, heads=self.apa_heads)
        if loss_img is not None:
            terms['sl_img'] = loss_img
        return terms

    # --------------------------------------------------- micro-batching
    def chunk_terms(self, state, p, inputs, feats, mb):
        """The micro-batch's shares of the pass's terms (sums over its
        images / crops over the pass's count), in :meth:`loss_terms`'
        order."""
        if p.name == 'crops':
            return dict(sl_crops=self._label_loss(
                feats, state.crop_targets_it[mb.index], mb))
        terms = {}
        loss_img = None
        if self.label_weight != 0:
            loss_img = self._label_loss(feats, state.img_targets[mb.index],
                                        mb)
        if self.components['apa']:
            terms['apa'] = attention_prior_alignment_loss(
                state.recorder.records, state.priors, heads=self.apa_heads,
                batch_total=mb.total)
        if loss_img is not None:
            terms['sl_img'] = loss_img
        return terms

    def log_values(self, terms, total):
        """``loss = apa_weight * L_APA + label_weight * (L_SL_img +
        L_SL_crops) + L_TV`` and its terms, ``loss_sl`` the sum of the two
        label terms."""
        zero = total.new_zeros(())
        apa = terms.get('apa', zero).detach()
        img = terms.get('sl_img', zero).detach()
        crop = terms.get('sl_crops', zero).detach()
        tv = terms.get('tv', zero).detach()
        sl = img + crop
        loss = self.apa_weight * apa + self.label_weight * sl + tv
        return dict(loss=loss.item(), loss_apa=apa.item(),
                    loss_sl=sl.item(), loss_sl_img=img.item(),
                    loss_sl_crops=crop.item(), loss_tv=tv.item())

    def _label_loss(self, feats, targets, mb=None):
        """Soft CE of the images / crops ``feats``; with ``mb`` (a
        micro-batch) its share of the pass's mean."""
        if isinstance(feats, torch.Tensor):
            feats = [feats]
        if mb is None:
            return soft_cross_entropy(self.head(list(feats)), targets)
        return soft_cross_entropy(self.head(list(feats), mb.start, mb.total),
                                  targets, mb.total)
