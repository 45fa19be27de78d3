"""PSAQ-ViT (V1) image synthesis at the backbone level of a Swin model.

The teacher is the full-precision backbone alone (no labels, no heads).  The
synthetic pixels (normalised space) are optimised so that, at every window
attention of the backbone, the within-window patch similarity of the
attention output has maximal entropy (diverse, "natural" patch structure),
plus a total-variation prior.
"""
from typing import Optional, Tuple

import torch

from ..registry import MODELS
from .base import (BaseSynthesizer, PixelAdamMixin, clamp_to_range,
                   get_backbone)
from .hooks import AttnOutputRecorder
from .losses import TAU_REF_PIXELS, psaq_entropy_loss


@MODELS.register_module()
class PSAQViT(PixelAdamMixin, BaseSynthesizer):
    """Patch-Similarity-Aware data-free synthesis (PSAQ-ViT V1) for Swin.

    Per batch: ``x ~ N(0, 1)`` ``(n, 3, H, W)`` (normalised space), Adam on the
    pixels; each iteration jitters the batch (random ``torch.roll`` up to
    ``jitter`` px in both axes, horizontal flip with p=0.5; both
    differentiable, nothing to undo), runs ``backbone(x_aug)`` under an
    :class:`AttnOutputRecorder`, and minimises::

        entropy_weight * psaq_entropy_loss(records) + tv_prior_loss(x)

    then clamps ``x`` to the valid normalised range.  The TV prior is taken
    on the un-jittered ``x`` (the roll would add a wrap-around seam).
    Learning rate: linear warm-up over ``min(100, iterations // 5)``
    iterations (unless ``warmup_iters`` is given) then cosine decay to 0.
    Schedule, augmentation and TV prior come from
    :class:`~dfq_dense.synth.base.PixelAdamMixin` (SPDFQ uses them too).

    Args (beyond :class:`BaseSynthesizer`):
        lr, betas: Adam settings (0.25, (0.5, 0.9)).
        warmup_iters: override the warm-up length.
        jitter: max roll in pixels (15).
        flip: random horizontal flip.
        entropy_weight: weight of the patch-similarity entropy loss.
        tv_weight, tau_range, tau_ref_pixels: TV prior (see
            :func:`~dfq_dense.synth.losses.tv_prior_loss`).
        bandwidth, num_points: KDE settings (0.01, 10).
        max_samples: similarities kept per image and layer (uniform
            subsample; None keeps all).  Bounds memory at dense resolution.
    """

    def __init__(self,
                 num_images: int = 8,
                 batch_size: int = 8,
                 img_size=None,
                 iterations: int = 500,
                 seed: int = 0,
                 lr: float = 0.25,
                 betas: Tuple[float, float] = (0.5, 0.9),
                 warmup_iters: Optional[int] = None,
                 jitter: int = 15,
                 flip: bool = True,
                 entropy_weight: float = 1.0,
                 tv_weight: float = 0.05,
                 tau_range: Tuple[float, float] = (2500., 3000.),
                 tau_ref_pixels: int = TAU_REF_PIXELS,
                 bandwidth: float = 0.01,
                 num_points: int = 10,
                 max_samples: Optional[int] = 100000,
                 log_interval: int = 50,
                 progress: bool = True,
                 device=None):
        super().__init__(num_images=num_images, batch_size=batch_size,
                         img_size=img_size, iterations=iterations, seed=seed,
                         log_interval=log_interval, progress=progress,
                         device=device)
        self._init_pixel_adam(lr, betas, warmup_iters, jitter, flip,
                              tv_weight, tau_range, tau_ref_pixels)
        self.entropy_weight = float(entropy_weight)
        self.bandwidth = float(bandwidth)
        self.num_points = int(num_points)
        self.max_samples = max_samples

    def check_model(self, model):
        """PSAQ-ViT hooks Swin window attention: fail early without it."""
        super().check_model(model)
        AttnOutputRecorder(get_backbone(model)).remove()

    # ------------------------------------------------------------ synthesis
    def synthesize_batch(self, backbone, n, hw, device, generator,
                         batch_idx=0, bar=None):
        x, mean, std = self._init_pixels(n, hw, device, generator)
        opt = torch.optim.Adam([x], lr=self.lr, betas=self.betas)
        with AttnOutputRecorder(backbone) as rec:
            for it in range(self.iterations):
                for group in opt.param_groups:
                    group['lr'] = self.lr_at(it)
                opt.zero_grad(set_to_none=True)
                x_aug = self.augment(x, generator)
                rec.clear()
                backbone(x_aug)
                loss_ent, ents = psaq_entropy_loss(
                    rec.records, bandwidth=self.bandwidth,
                    num_points=self.num_points, max_samples=self.max_samples,
                    generator=generator, return_per_layer=True)
                rec.clear()
                loss_tv = self.tv_prior(x, generator)
                loss = self.entropy_weight * loss_ent + loss_tv
                loss.backward()
                opt.step()
                with torch.no_grad():
                    x.copy_(clamp_to_range(x, mean, std))
                self._bar_update(bar)
                if self._log_due(it, self.iterations):
                    self.log_terms(dict(
                        batch=batch_idx, iter=it + 1,
                        lr=opt.param_groups[0]['lr'], loss=loss.item(),
                        loss_entropy=loss_ent.item(),
                        loss_tv=loss_tv.item(),
                        mean_entropy=ents.mean().item()))
        return x.detach()
