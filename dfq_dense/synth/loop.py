"""The pixel-optimisation loop every iterative synthesizer runs.

PSAQ-ViT, MimiQ and SPDFQ differ in what they measure, not in how they
optimise: start from noise, and every iteration augment the pixels, run the
frozen backbone under the method's attention recorder, sum the method's
loss terms, back-propagate to the pixels, step, clamp to the valid range and
log.  :class:`PixelSynthesizer` owns that loop; a method supplies its
pieces:

* :meth:`~PixelSynthesizer.start_batch`: what is drawn once per batch
  (targets, priors, a TV target ...) and its recorder;
* :meth:`~PixelSynthesizer.make_optimizer`, :meth:`lr_at`,
  ``total_iterations``: optimiser and schedule;
* :meth:`~PixelSynthesizer.passes`: the forward/backward passes of an
  iteration (one for most methods; SPDFQ runs its images, then its
  multi-semantic crops, then its TV prior, each backpropagated before the
  next forward, so the peak memory is that of one forward);
* :meth:`~PixelSynthesizer.pass_input`: the augmented backbone input of a
  pass;
* :meth:`~PixelSynthesizer.loss_terms`: the pass's named loss terms
  (unweighted; ``weights`` gives the weight of each, a term without one
  enters the sum as it is, e.g. the TV prior, which carries its weight).

Every pass is the same sequence of phases, ``augment`` -> ``forward`` ->
``loss`` -> ``backward``, and the iteration ends with ``step``; setting
``phase_timer`` (a callable ``name -> context manager``) times them, and a
pass is the unit that micro-batching would split.

The total of a pass is the weighted sum of its terms in the order
:meth:`loss_terms` returns them (``w1 * t1 + w2 * t2 + ...``), the
floating-point order each method used before the loop was shared, so a seed
still gives bit-identical images.
"""
import contextlib
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import nn

from .base import BaseSynthesizer, clamp_to_range

__all__ = ['PixelSynthesizer', 'SynthPass', 'SynthState']


class SynthPass(NamedTuple):
    """One forward/backward pass of a synthesis iteration.

    Attributes:
        name: the method's name for it (e.g. ``'images'``, ``'crops'``).
        forward: run the backbone on :meth:`PixelSynthesizer.pass_input`
            (False: the terms depend on the pixels alone, e.g. a TV prior).
        record: keep the method's recorder on during that forward.
    """
    name: str = 'images'
    forward: bool = True
    record: bool = True


class SynthState:
    """What one batch's optimisation carries between its iterations.

    The loop sets ``backbone``, ``x`` (the pixels being optimised), ``mean``
    / ``std`` (on the device), ``generator`` (the batch's CPU generator),
    ``batch_idx``, ``hw``, ``device`` and, every iteration, ``it``.  A method
    stores its per-batch draws here in :meth:`PixelSynthesizer.start_batch`
    (as attributes of its own) and its ``recorder``; ``logs`` takes extra
    values to log with the iteration's terms (tensors or floats, read only
    when the iteration is logged).
    """

    def __init__(self, backbone: nn.Module, x: torch.Tensor,
                 mean: torch.Tensor, std: torch.Tensor,
                 generator: torch.Generator, batch_idx: int,
                 hw: Tuple[int, int], device: torch.device):
        self.backbone = backbone
        self.x = x
        self.mean = mean
        self.std = std
        self.generator = generator
        self.batch_idx = batch_idx
        self.hw = hw
        self.device = device
        self.n = int(x.shape[0])
        self.it = 0
        self.recorder = None
        self.logs: Dict[str, object] = {}


class PixelSynthesizer(BaseSynthesizer):
    """A synthesizer that optimises pixels with the shared loop.

    Subclasses set :attr:`LOSS_TERMS` (every term they may log, in log
    order) and implement :meth:`make_optimizer`, :meth:`lr_at`,
    :meth:`pass_input` and :meth:`loss_terms`; :meth:`start_batch`,
    :meth:`passes`, ``weights`` and :meth:`log_values` have defaults.
    """

    #: Names of the loss terms, logged as ``loss_<name>`` (0 when a pass
    #: did not produce one, e.g. a component switched off).
    LOSS_TERMS: Tuple[str, ...] = ()

    #: ``name -> context manager`` around each phase (``augment``,
    #: ``forward``, ``loss``, ``backward``, ``step``); None: untimed.
    phase_timer = None

    # ------------------------------------------------------- method pieces
    @property
    def total_iterations(self) -> int:
        """Iterations of one batch."""
        return self.iterations

    @property
    def weights(self) -> Dict[str, float]:
        """Weight of each term in the total (a term without one enters it
        as it is)."""
        return {}

    def make_optimizer(self, x: torch.Tensor) -> torch.optim.Optimizer:
        """The optimiser of the pixels ``x``."""
        raise NotImplementedError

    def lr_at(self, it: int) -> float:
        """Learning rate of iteration ``it`` (0-based)."""
        raise NotImplementedError

    def start_batch(self, state: SynthState) -> None:
        """Per-batch draws (from ``state.generator``, after the initial
        pixels) and ``state.recorder``; nothing by default."""

    def passes(self, state: SynthState) -> List[SynthPass]:
        """The passes of iteration ``state.it``: one recorded forward."""
        return [SynthPass()]

    def pass_input(self, state: SynthState, p: SynthPass) -> torch.Tensor:
        """The backbone input of pass ``p`` (the augmented pixels)."""
        raise NotImplementedError

    def loss_terms(self, state: SynthState, p: SynthPass,
                   inputs: Optional[torch.Tensor],
                   feats) -> Dict[str, torch.Tensor]:
        """The terms of pass ``p``, in summation order.

        Args:
            state: the batch (``state.recorder.records`` holds the
                forward's records).
            p: the pass.
            inputs: what the backbone saw (None without a forward).
            feats: the backbone's output (None without a forward).
        """
        raise NotImplementedError

    def log_values(self, terms: Dict[str, torch.Tensor],
                   total: torch.Tensor) -> Dict[str, float]:
        """What is logged of an iteration: ``loss`` (the total) and every
        term of :attr:`LOSS_TERMS`, unweighted."""
        out = dict(loss=total.item())
        for name in self.LOSS_TERMS:
            out[f'loss_{name}'] = terms[name].item() if name in terms \
                else 0.0
        return out

    # ------------------------------------------------------------ the loop
    def _phase(self, name: str):
        if self.phase_timer is None:
            return contextlib.nullcontext()
        return self.phase_timer(name)

    def _bar_steps(self) -> int:
        return max(1, self.total_iterations)

    def synthesize_batch(self, backbone, n, hw, device, generator,
                         batch_idx=0, bar=None):
        x, mean, std = self._init_pixels(n, hw, device, generator)
        state = SynthState(backbone, x, mean, std, generator, batch_idx, hw,
                           device)
        try:
            self.start_batch(state)
            opt = self.make_optimizer(x)
            total_its = self.total_iterations
            for it in range(total_its):
                state.it = it
                state.logs = {}
                for group in opt.param_groups:
                    group['lr'] = self.lr_at(it)
                opt.zero_grad(set_to_none=True)
                terms, totals = {}, []
                for p in self.passes(state):
                    pass_terms, pass_total = self._run_pass(state, p)
                    terms.update(pass_terms)
                    if pass_total is not None:
                        totals.append(pass_total)
                with self._phase('step'):
                    if x.grad is not None:
                        opt.step()
                    with torch.no_grad():
                        x.copy_(clamp_to_range(x, mean, std))
                self._bar_update(bar)
                if self._log_due(it, total_its):
                    total = sum(totals[1:], totals[0]) if totals else \
                        torch.zeros((), device=device)
                    logs = {k: float(v) for k, v in state.logs.items()}
                    self.log_terms(dict(
                        batch=batch_idx, iter=it + 1,
                        lr=opt.param_groups[0]['lr'],
                        **self.log_values(terms, total), **logs))
        finally:
            if state.recorder is not None:
                state.recorder.remove()
        return x.detach()

    def _run_pass(self, state: SynthState, p: SynthPass):
        """augment -> forward -> loss -> backward of one pass; returns its
        terms and its total, detached (the pass's graph is gone once it
        is backpropagated)."""
        rec = state.recorder
        inputs = feats = None
        if p.forward:
            with self._phase('augment'):
                inputs = self.pass_input(state, p)
            with self._phase('forward'):
                if rec is not None:
                    rec.clear()
                    rec.enabled = p.record
                try:
                    feats = state.backbone(inputs)
                finally:
                    if rec is not None:
                        rec.enabled = True
        with self._phase('loss'):
            terms = self.loss_terms(state, p, inputs, feats)
            if rec is not None:
                rec.clear()
            del feats
            total = None
            weights = self.weights
            for name, term in terms.items():
                w = weights.get(name)
                term = term if w is None else w * term
                total = term if total is None else total + term
        terms = {k: v.detach() for k, v in terms.items()}
        if total is None:
            return terms, None
        with self._phase('backward'):
            if total.requires_grad:
                total.backward()
        return terms, total.detach()
