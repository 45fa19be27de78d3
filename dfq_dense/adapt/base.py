"""Base class of the adapters: the ``(adapt)`` stage of the DFQ loop.

An adapter changes the calibrated quantized student after calibration,
with the frozen full-precision teacher as the reference and the synthetic
images as data, and may change the images too (PSAQ-ViT V2's sample step).
The DFQ loop builds one from ``dfq.adapter`` (None: no adaptation, and no
FP copy of the model is kept), calls :meth:`BaseAdapter.run` after the
calibration and reports what :attr:`BaseAdapter.history` logged.
"""
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from ..synth.base import get_backbone

__all__ = ['BaseAdapter']


def check_choice(owner: str, name: str, value, choices):
    """``value`` if it is one of ``choices``, else a one-line ValueError
    naming the owner, the argument and the choices."""
    if value not in choices:
        raise ValueError(f'{owner}: {name} must be one of {tuple(choices)}, '
                         f'got {value!r}')
    return value


class BaseAdapter:
    """Base of the adapters (registered in
    :data:`dfq_dense.registry.ADAPTERS`).

    Attributes:
        history: the logged dicts of the last runs.  Entries with
            ``phase='round'`` and keys ``disc_*`` are what the DFQ loop
            reports per round (``adaptation.rounds`` of
            ``dfq_results.json``); ``phase='student'`` entries are student
            steps, ``phase='sample'`` sample steps.
        visualizer: an mmengine Visualizer (the DFQ loop sets the
            runner's) that also receives the logged scalars; None: none.
    """

    def __init__(self):
        self.history: List[Dict] = []
        self.visualizer = None

    def check_model(self, model: nn.Module) -> None:
        """Raise ValueError if ``model`` lacks what this adapter needs (the
        DFQ loop calls it before any work)."""
        get_backbone(model)

    def run(self, teacher: nn.Module, student: nn.Module,
            images: torch.Tensor,
            calibrate: Optional[Callable[[torch.Tensor], None]] = None
            ) -> torch.Tensor:
        """Adapt ``student`` (in place) towards ``teacher`` on ``images``.

        Args:
            teacher: the frozen full-precision model (``.backbone``,
                optional ``.neck``, ``.data_preprocessor``).
            student: its quantized, calibrated copy; left in eval mode with
                its ``requires_grad`` flags and quantizer states as they
                were.
            images: normalised ``(N, 3, H, W)`` CPU images; not modified.
            calibrate: ``calibrate(images)`` re-runs the calibration of the
                student (None: not possible, e.g. after a reparameterisation).

        Returns:
            the images after adaptation (``images`` itself when they do not
            change).
        """
        raise NotImplementedError
