"""The ``(adapt)`` stage: steps that change the calibrated quantized student.

Synthesis (``dfq_dense.synth``) only makes images from the FP model; what a
method does to the quantized student afterwards lives here, registered in
:data:`dfq_dense.registry.ADAPTERS` and built from ``dfq.adapter``:

* :class:`PSAQViTV2Rounds` (``'PSAQViTV2Rounds'``): PSAQ-ViT V2's rounds of
  sample step (images made harder for the student) and student step;
* :class:`MimiQDistill` (``'MimiQDistill'``): MimiQ's head-wise structural
  attention distillation;
* :class:`BlockReconstruction` (``'BlockReconstruction'``): SPDFQ's
  BRECQ-style block-wise reconstruction.

This package may import ``synth`` and ``quant``; neither imports it.
"""
from .base import BaseAdapter  # noqa: F401
from .block_reconstruction import BlockReconstruction  # noqa: F401
from .losses import (MEASURES, feature_discrepancy,  # noqa: F401
                     headwise_structure_loss,
                     headwise_structure_loss_records)
from .mimiq_distill import MimiQDistill  # noqa: F401
from .psaq_v2 import PSAQViTV2Rounds  # noqa: F401
from .student_step import (StudentStep, adapted_modules,  # noqa: F401
                           add_scalars, extract_features, frozen_modules,
                           get_neck, mean_discrepancy, resolve_outputs,
                           timm_feature_map, trainable_scales)

__all__ = [
    'BaseAdapter', 'PSAQViTV2Rounds', 'MimiQDistill', 'BlockReconstruction',
    'StudentStep',
    'feature_discrepancy', 'headwise_structure_loss',
    'headwise_structure_loss_records', 'extract_features',
    'mean_discrepancy', 'adapted_modules', 'frozen_modules',
    'trainable_scales', 'get_neck', 'add_scalars', 'resolve_outputs',
    'timm_feature_map', 'MEASURES'
]
