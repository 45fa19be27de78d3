"""MimiQ's distillation of the quantized student (its QAT part).

MimiQ distils the teacher's attention output into the student head by head
with the structure term of SSIM
(:func:`~dfq_dense.adapt.losses.headwise_structure_loss`).  At the backbone
level of a detector or segmentor it is a
:class:`~dfq_dense.adapt.student_step.StudentStep` with ``loss='mimiq'``
and MimiQ's QAT optimiser settings.
"""
from typing import Optional

from ..registry import ADAPTERS
from ..synth.base import get_backbone
from ..synth.hooks import AttnOutputRecorder
from .base import BaseAdapter
from .student_step import StudentStep

__all__ = ['MimiQDistill']


@ADAPTERS.register_module()
class MimiQDistill(BaseAdapter):
    """Head-wise structural attention distillation of the calibrated student.

    ``10 x (1 - structure term)`` per head on the ``attn @ v`` outputs of
    every window attention + the feature discrepancy of the backbone outputs
    (standing in for MimiQ's KL on class logits), SGD Nesterov (momentum
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
        """The structure loss hooks Swin window attention."""
        super().check_model(model)
        if self.student_step.loss == 'mimiq':
            AttnOutputRecorder(get_backbone(model)).remove()

    def run(self, teacher, student, images, calibrate=None):
        """Distil ``teacher`` into ``student`` on ``images`` (returned
        unchanged); ``calibrate`` is not used."""
        step = self.student_step
        step.visualizer = self.visualizer
        first = len(step.history)
        step.run(teacher, student, images)
        self.history.extend(step.history[first:])
        return images
