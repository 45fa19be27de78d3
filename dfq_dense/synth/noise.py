"""Gaussian-noise baseline synthesizer."""
import torch

from ..registry import MODELS
from .base import BaseSynthesizer, clamp_to_range


@MODELS.register_module()
class GaussianNoise(BaseSynthesizer):
    """Images ~ N(0, 1) in normalised space, clamped to the valid range.

    The valid range of channel c is ``((0 - mean_c) / std_c,
    (255 - mean_c) / std_c)``.  No model forward is run (``iterations`` is
    ignored).  Same arguments as :class:`BaseSynthesizer`.
    """

    def synthesize_batch(self, backbone, n, hw, device, generator,
                         batch_idx=0, bar=None):
        H, W = hw
        x = torch.randn((n, 3, H, W), generator=generator)
        x = clamp_to_range(x, self.mean, self.std).to(device)
        self._bar_update(bar)
        return x
