"""An example DFQ method kept outside the dfq_dense repository.

Importing this package registers its synthesizers in dfq_dense's MODELS
registry; a config loads it with
``custom_imports = dict(imports=['example_dfq'])``.
"""
from .smooth_psaq import SmoothPSAQViT, gaussian_blur

__all__ = ['SmoothPSAQViT', 'gaussian_blur']
