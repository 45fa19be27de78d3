"""PSAQ-ViT started from smoothed noise instead of white noise."""
import math

import torch
import torch.nn.functional as F

from dfq_dense.registry import MODELS
from dfq_dense.synth.base import clamp_to_range
from dfq_dense.synth.psaq import PSAQViT


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``x`` ``(N, C, H, W)`` (reflect padding,
    kernel radius ``ceil(3 sigma)``, capped by the image size)."""
    if sigma <= 0:
        return x
    _, c, h, w = x.shape
    radius = min(int(math.ceil(3 * sigma)), h - 1, w - 1)
    if radius < 1:
        return x
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    x = F.pad(x, (radius, radius, radius, radius), mode='reflect')
    x = F.conv2d(x, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


@MODELS.register_module()
class SmoothPSAQViT(PSAQViT):
    """PSAQ-ViT whose pixels start from low-pass filtered noise.

    White noise has no spatial structure at all; natural images have most
    of their energy at low frequencies.  This method blurs the starting
    noise with a Gaussian of ``init_sigma`` pixels and rescales it to unit
    variance per image and channel, then runs PSAQ-ViT unchanged: the
    patch-similarity entropy loss, the TV prior, the Adam schedule, the
    jitter and the attention recorder all come from
    :class:`~dfq_dense.synth.psaq.PSAQViT` and
    :class:`~dfq_dense.synth.base.PixelAdamMixin`.

    Args:
        init_sigma: standard deviation (pixels) of the blur of the starting
            noise; 0 gives PSAQ-ViT's white-noise start.
        **kwargs: every setting of :class:`PSAQViT`.
    """

    def __init__(self, init_sigma: float = 2.0, **kwargs):
        super().__init__(**kwargs)
        if not (isinstance(init_sigma, (int, float))
                and math.isfinite(init_sigma) and init_sigma >= 0):
            raise ValueError(f'{type(self).__name__}: init_sigma must be a '
                             f'number >= 0, got {init_sigma!r}')
        self.init_sigma = float(init_sigma)

    def _init_pixels(self, n, hw, device, generator):
        """Smoothed ``N(0, 1)`` noise, drawn on the CPU ``generator`` (the
        same start for a seed on any device), clamped to the valid range,
        requiring grad.  Returns ``(x, mean, std)`` as the base class."""
        H, W = hw
        mean, std = self.mean.to(device), self.std.to(device)
        x = torch.randn((n, 3, H, W), generator=generator)
        if self.init_sigma > 0:
            x = gaussian_blur(x, self.init_sigma)
            x = x / x.std(dim=(2, 3), keepdim=True).clamp_min(1e-12)
        x = clamp_to_range(x.to(device), mean, std).requires_grad_(True)
        return x, mean, std
