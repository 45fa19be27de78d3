"""Data-free image synthesizers (registered in ``dfq_dense.registry.MODELS``).

Importing this package registers the data sources (:class:`GaussianNoise`,
:class:`PSAQViT`, :class:`PSAQViTV2`, :class:`MimiQ`, :class:`SPDFQ`,
:class:`RealImages`).  Synthesis sees the full-precision model only: what
changes the quantized student (PSAQ-ViT V2's rounds, MimiQ's distillation,
the teacher-student losses and the student step) is in
:mod:`dfq_dense.adapt`, which this package never imports.
"""
from .base import (BaseSynthesizer, clamp_to_range, denormalize,  # noqa
                   frozen_backbone, get_mean_std, load_images, save_images,
                   valid_range)
from .hooks import (AttnOutputRecorder, SwinAttnRecorder,  # noqa: F401
                    window_valid_mask)
from .loop import PixelSynthesizer, SynthPass, SynthState  # noqa: F401
from .losses import (kde, kde_entropy, patch_similarity,  # noqa: F401
                     psaq_entropy_loss, scaled_tau, total_variation,
                     tv_prior_loss)
from .noise import GaussianNoise  # noqa: F401
from .psaq import PSAQViT  # noqa: F401

__all__ = [
    'BaseSynthesizer', 'PixelSynthesizer', 'SynthPass', 'SynthState',
    'GaussianNoise', 'PSAQViT', 'SwinAttnRecorder', 'AttnOutputRecorder',
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

from .mimiq import (MimiQ, inter_head_similarity,  # noqa: F401,E402
                    inter_head_similarity_loss, ssim_maps)
from .qk_hooks import AttnLogitsRecorder, qk_logits  # noqa: F401,E402
from .real_images import RealImages, list_images  # noqa: F401,E402

__all__ += [
    'MimiQ', 'ssim_maps', 'inter_head_similarity',
    'inter_head_similarity_loss', 'AttnLogitsRecorder', 'qk_logits',
    'RealImages', 'list_images'
]

from .psaq_v2 import PSAQViTV2  # noqa: F401,E402

__all__ += ['PSAQViTV2']
