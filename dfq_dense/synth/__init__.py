"""Data-free image synthesizers (registered in ``dfq_dense.registry.MODELS``).

Importing this package registers :class:`GaussianNoise` and :class:`PSAQViT`.
"""
from .base import (BaseSynthesizer, clamp_to_range, denormalize,  # noqa
                   frozen_backbone, get_mean_std, load_images, save_images,
                   valid_range)
from .hooks import AttnOutputRecorder, window_valid_mask  # noqa: F401
from .losses import (kde, kde_entropy, patch_similarity,  # noqa: F401
                     psaq_entropy_loss, scaled_tau, total_variation,
                     tv_prior_loss)
from .noise import GaussianNoise  # noqa: F401
from .psaq import PSAQViT  # noqa: F401

__all__ = [
    'BaseSynthesizer', 'GaussianNoise', 'PSAQViT', 'AttnOutputRecorder',
    'window_valid_mask', 'patch_similarity', 'kde', 'kde_entropy',
    'psaq_entropy_loss', 'total_variation', 'tv_prior_loss', 'scaled_tau',
    'denormalize', 'save_images', 'load_images', 'get_mean_std',
    'valid_range', 'clamp_to_range', 'frozen_backbone'
]

from .spdfq import (SPDFQ, AttnProbRecorder,  # noqa: F401,E402
                    attention_prior_alignment_loss, crop_and_resize,
                    gaussian_mixture_prior, msr_crops, msr_regions)

__all__ += [
    'SPDFQ', 'AttnProbRecorder', 'attention_prior_alignment_loss',
    'crop_and_resize', 'gaussian_mixture_prior', 'msr_crops', 'msr_regions'
]

from .mimiq import (MimiQ, headwise_structure_loss,  # noqa: F401,E402
                    inter_head_similarity, inter_head_similarity_loss,
                    ssim_maps)
from .qk_hooks import AttnLogitsRecorder, qk_logits  # noqa: F401,E402
from .real_images import RealImages, list_images  # noqa: F401,E402

__all__ += [
    'MimiQ', 'ssim_maps', 'inter_head_similarity',
    'inter_head_similarity_loss', 'headwise_structure_loss',
    'AttnLogitsRecorder', 'qk_logits', 'RealImages', 'list_images'
]

from .distill import (StudentStep, extract_features,  # noqa: F401,E402
                      feature_discrepancy, mean_discrepancy)
from .psaq_v2 import PSAQViTV2  # noqa: F401,E402

__all__ += [
    'StudentStep', 'feature_discrepancy', 'extract_features',
    'mean_discrepancy', 'PSAQViTV2'
]
