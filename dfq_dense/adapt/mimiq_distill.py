"""MimiQ's distillation of the quantized student (its QAT part).

MimiQ distils the teacher's attention output into the student head by head
with the structure term of SSIM
(:func:`~dfq_dense.adapt.losses.headwise_structure_loss`), plus a KL
divergence on the class logits.  It is a
:class:`~dfq_dense.adapt.student_step.StudentStep` with ``loss='mimiq'``
and MimiQ's QAT optimiser settings: on a timm classifier with the KL of the
class probabilities, at the backbone level of a detector or segmentor with
the feature discrepancy of the backbone outputs in its place.
"""
from typing import Optional

from ..registry import ADAPTERS
from ..synth.base import get_backbone
from ..synth.hooks import AttnOutputRecorder
from .base import BaseAdapter
from .student_step import StudentStep, resolve_outputs

__all__ = ['MimiQDistill']


@ADAPTERS.register_module()
class MimiQDistill(BaseAdapter):
    """Head-wise structural attention distillation of the calibrated student.

    ``10 x (1 - structure term)`` per head on the ``attn @ v`` outputs of
    every attention (Swin windows; a timm DeiT's global attention, CLS
    token included) + MimiQ's KL divergence of the class probabilities on
    a timm classifier (``student_step=dict(outputs='features')``: the
    backbone-level variant), or, on a detector or segmentor, the feature
    discrepancy of the backbone outputs standing in for it (see
    :class:`~dfq_dense.adapt.student_step.StudentStep`), SGD Nesterov (momentum
    0.9, lr 1e-6, weight decay 1e-4, MimiQ's QAT settings), 50 steps, on the
    student's backbone weights through the straight-through fake
    quantizers.  The quantization parameters stay those of the calibration;
    the images do not change.

    Args:
        student_step: :class:`~dfq_dense.adapt.student_step.StudentStep`
            arguments overriding those defaults (e.g. ``iters``, ``lr``).
        seed: seed of the batch order (unless ``student_step`` gives one).
    """

    #: MimiQ's QAT settings, the defaults of ``student_step``.
    DEFAULTS = dict(loss='mimiq', optimizer='sgd', lr=1e-6, momentum=0.9,
                    nesterov=True, weight_decay=1e-4, iters=50)

    def __init__(self, student_step: Optional[dict] = None, seed: int = 0):
        super().__init__()
        self.student_step = StudentStep.build(
            student_step, seed=seed, name='MimiQ.distill', **self.DEFAULTS)

    def check_model(self, model):
        """The structure loss hooks Swin window attention (or a timm
        classifier's attention); ``outputs='classifier'`` needs class
        logits."""
        super().check_model(model)
        step = self.student_step
        if step.loss == 'mimiq':
            AttnOutputRecorder(get_backbone(model)).remove()
        resolve_outputs(step.name, step.outputs, step.measure, model)

    def run(self, teacher, student, images, calibrate=None):
        """Distil ``teacher`` into ``student`` on ``images`` (returned
        unchanged); ``calibrate`` is not used."""
        step = self.student_step
        step.visualizer = self.visualizer
        first = len(step.history)
        step.run(teacher, student, images)
        self.history.extend(step.history[first:])
        return images
