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
``phase_timer`` (a callable ``name -> context manager``) times them.

The total of a pass is the weighted sum of its terms in the order
:meth:`loss_terms` returns them (``w1 * t1 + w2 * t2 + ...``), the
floating-point order each method used before the loop was shared, so a seed
still gives bit-identical images.

Memory (the settings ``micro_batch_size`` and ``with_cp``; at their
defaults, None and False, nothing of this runs and a seed gives the images
it always gave):

* **micro-batching** (``micro_batch_size=m``): the pass input is computed
  for the whole batch (the augmentation draws its randomness once, as
  before) and detached; the terms taken on the whole input
  (:meth:`~PixelSynthesizer.pixel_terms`: the TV priors, whose batch-wide
  Frobenius norms couple the images) are backpropagated to that copy (and
  the pixels) first; then the backbone forward, the per-image loss terms
  and their backward run ``m`` items at a time, their gradients adding up
  in the copy (after the pixel terms', the order in which the whole
  batch's backward adds them); one backward takes the copy's gradient
  through the augmentation to the pixels.  The optimizer steps once per
  iteration on the whole batch (Adam / AdamW are elementwise: the same
  gradient gives the same step).  A method supplies
  :meth:`~PixelSynthesizer.chunk_terms` (each micro-batch's share of every
  per-image term: the sum over its images divided by the batch size, so
  that the shares add up to the batch's mean) and, for what couples the
  images of a batch (PSAQ-ViT's KDE grid over the whole batch),
  :meth:`~PixelSynthesizer.prepare_chunks` (here a no-grad pass over the
  micro-batches before the first backward).  A method may also give its
  pass input as a list of tensors (items of different sizes, SPDFQ's crops
  at their own size): each is then forwarded on its own, in micro-batches
  of at most ``m``.  The peak activation memory is that of ``m`` items.
  Every image's numbers are the whole batch's; the sums of a BLAS product
  may round differently with the number of rows, so the gradients agree
  to the last bits (bit-identical on CPU for SPDFQ, MimiQ from 2 images,
  PSAQ-ViT on some splits; relative differences below 1e-6 otherwise).
* **activation checkpointing** (``with_cp=True``): every transformer block
  of the frozen backbone (mmdet / mmseg ``SwinBlock``, timm's Swin and ViT /
  DeiT blocks) runs under non-reentrant :func:`torch.utils.checkpoint`
  (:func:`checkpointed_blocks`), so only the block inputs are kept between
  forward and backward and each block is recomputed during backward.  Not
  mmdet's / mmseg's own ``with_cp`` (reentrant: the tensors the recorders
  take inside a block would be made without a graph): the recorder hooks
  run again in the recompute with ``recorder.keep = False`` (same
  operations, records dropped).
"""
import contextlib
import importlib
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .base import BaseSynthesizer, clamp_to_range

__all__ = ['PixelSynthesizer', 'SynthPass', 'SynthState', 'MicroBatch',
           'checkpointed_blocks', 'find_swin_blocks']


def _swin_block_types() -> Tuple[type, ...]:
    """The transformer block classes :func:`checkpointed_blocks` wraps:
    mmdet's / mmseg's ``SwinBlock``, timm's Swin ``SwinTransformerBlock``
    and timm's ViT / DeiT ``Block`` (those importable)."""
    types = []
    for pkg in ('mmdet', 'mmseg'):
        try:
            swin = importlib.import_module(f'{pkg}.models.backbones.swin')
            types.append(swin.SwinBlock)
        except Exception:  # pragma: no cover - package missing
            pass
    for mod, name in (('timm.models.swin_transformer',
                       'SwinTransformerBlock'),
                      ('timm.models.vision_transformer', 'Block')):
        try:
            types.append(getattr(importlib.import_module(mod), name))
        except Exception:  # pragma: no cover - timm missing
            pass
    return tuple(types)


def find_swin_blocks(backbone: nn.Module) -> List[nn.Module]:
    """The transformer blocks of ``backbone`` in forward order: mmdet's /
    mmseg's ``SwinBlock`` (``forward(x, hw_shape)``), timm's Swin
    ``SwinTransformerBlock`` (``forward(x)``, ``x`` ``(B, H, W, C)``) and
    timm's ViT / DeiT ``Block`` (``forward(x, ...)``, ``x`` ``(B, N, C)``).
    A block nested in another one is not listed (the outer one is
    checkpointed as a whole)."""
    types = _swin_block_types()
    found = []
    for m in backbone.modules():
        if isinstance(m, types) if types else \
                type(m).__name__ == 'SwinBlock':
            found.append(m)
    inner = {id(c) for b in found for c in b.modules() if c is not b}
    return [b for b in found if id(b) not in inner]


@contextlib.contextmanager
def checkpointed_blocks(backbone: nn.Module, enabled: bool = True):
    """Run every transformer block of ``backbone`` (:func:`find_swin_blocks`:
    mmdet / mmseg Swin, timm Swin, timm ViT / DeiT) under non-reentrant
    activation checkpointing inside (nothing when not ``enabled``).

    A block's forward is replaced (on the instance) by
    ``checkpoint(forward, x, *args, use_reentrant=False, **kwargs)`` (its
    own arguments passed on: ``hw_shape`` for mmdet's, none or timm's
    ``attn_mask`` for timm's) when grad is enabled and ``x`` requires it
    (as mmdet's ``with_cp`` does), else left as it is; the originals are
    restored on exit.  Only the block inputs are kept between forward and
    backward; a block is recomputed when its backward runs, hooks included
    (a recorder then needs ``keep = False``, see
    :class:`~dfq_dense.synth.hooks.SwinAttnRecorder`).  The non-reentrant
    variant keeps the graph of tensors taken inside the block (the
    recorders'), which mmdet's reentrant ``with_cp`` would make under
    ``no_grad``; the RNG state is not stashed (the frozen backbone is in
    eval mode: no dropout, no drop path).

    Raises:
        ValueError: ``enabled`` and ``backbone`` has no such block.
    """
    if not enabled:
        yield []
        return
    blocks = find_swin_blocks(backbone)
    if not blocks:
        raise ValueError(f'with_cp: no SwinBlock (mmdet / mmseg) or timm '
                         f'Swin / ViT block in {type(backbone).__name__} to '
                         'checkpoint')
    saved = []
    for blk in blocks:
        saved.append(blk.__dict__.get('forward'))
        inner = blk.forward

        def forward(x, *args, _inner=inner, **kwargs):
            if torch.is_grad_enabled() and x.requires_grad:
                return checkpoint(_inner, x, *args, use_reentrant=False,
                                  preserve_rng_state=False, **kwargs)
            return _inner(x, *args, **kwargs)

        blk.forward = forward
    try:
        yield blocks
    finally:
        for blk, prev in zip(blocks, saved):
            if prev is None:
                del blk.forward
            else:
                blk.forward = prev


class MicroBatch(NamedTuple):
    """The items ``start:stop`` of a pass of ``total`` items (images, or
    crops for SPDFQ's crops pass) that one micro-batch forwards."""
    start: int
    stop: int
    total: int

    @property
    def index(self) -> slice:
        return slice(self.start, self.stop)


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
    Micro-batching needs :meth:`chunk_terms` too (and
    :meth:`pixel_terms` / :meth:`prepare_chunks` where they apply).

    Args (keywords, beyond :class:`~dfq_dense.synth.base.BaseSynthesizer`):
        micro_batch_size: forward and backpropagate at most this many items
            of a pass at a time (see the module doc; None: the whole
            batch).  Same images as the whole batch to the floating-point
            differences of a backbone run at another batch size (none on
            CPU), for every method: the terms that couple the images of a
            batch are computed for the whole batch.
        with_cp: activation checkpointing of the frozen backbone's
            transformer blocks (:func:`checkpointed_blocks`: mmdet / mmseg
            Swin, timm Swin, timm ViT / DeiT); the same images.
    """

    def __init__(self, *args, micro_batch_size: Optional[int] = None,
                 with_cp: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        if micro_batch_size is not None and (
                isinstance(micro_batch_size, bool)
                or not isinstance(micro_batch_size, int)
                or micro_batch_size < 1):
            raise ValueError(f'{type(self).__name__}: micro_batch_size must '
                             f'be an integer >= 1 or None, got '
                             f'{micro_batch_size!r}')
        if not isinstance(with_cp, bool):
            raise ValueError(f'{type(self).__name__}: with_cp must be True '
                             f'or False, got {with_cp!r}')
        self.micro_batch_size = micro_batch_size
        self.with_cp = with_cp

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

    def chunk_terms(self, state: SynthState, p: SynthPass,
                    inputs: torch.Tensor, feats,
                    mb: MicroBatch) -> Dict[str, torch.Tensor]:
        """The per-item terms of pass ``p`` on the micro-batch ``mb``, each
        the micro-batch's share of the pass's term (the terms of all
        micro-batches add up to :meth:`loss_terms`' minus
        :meth:`pixel_terms`), in summation order.  ``inputs`` are the
        items ``mb.index`` of the pass input."""
        raise NotImplementedError(
            f'{type(self).__name__} does not support micro_batch_size')

    def pixel_terms(self, state: SynthState, p: SynthPass,
                    inputs) -> Dict[str, torch.Tensor]:
        """The terms of pass ``p`` that are taken on the whole pass input
        (or the pixels) at once when the pass is micro-batched (e.g. a TV
        prior, whose batch-wide norm couples the images); ``inputs`` is the
        whole pass input, with its graph to the pixels.  None by default."""
        return {}

    def prepare_chunks(self, state: SynthState, p: SynthPass,
                       chunks: Sequence[Tuple[torch.Tensor, MicroBatch]]
                       ) -> None:
        """Called once per micro-batched pass before its first micro-batch,
        with every ``(input, micro-batch)`` (inputs detached): what couples
        the images of the batch is computed here (e.g. without gradient).
        Nothing by default."""

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
        with checkpointed_blocks(backbone, self.with_cp):
            return self._optimise(state, x, mean, std, device, batch_idx,
                                  bar)

    def _optimise(self, state, x, mean, std, device, batch_idx, bar):
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

    def _backward(self, state: SynthState, p: SynthPass, tensors,
                  grads=None) -> None:
        """``torch.autograd.backward``; with ``with_cp`` the recorder's
        hooks run in the blocks' recompute as they ran in the forward
        (``enabled = p.record``), their records dropped."""
        rec = state.recorder
        if rec is None or not self.with_cp:
            torch.autograd.backward(tensors, grads)
            return
        rec.enabled, rec.keep = p.record, False
        try:
            torch.autograd.backward(tensors, grads)
        finally:
            rec.enabled, rec.keep = True, True
            rec.clear()

    def _forward(self, state: SynthState, p: SynthPass, inputs):
        rec = state.recorder
        with self._phase('forward'):
            if rec is not None:
                rec.clear()
                rec.enabled = p.record
            try:
                return state.backbone(inputs)
            finally:
                if rec is not None:
                    rec.enabled = True

    def _weighted_total(self, terms: Dict[str, torch.Tensor]):
        total = None
        weights = self.weights
        for name, term in terms.items():
            w = weights.get(name)
            term = term if w is None else w * term
            total = term if total is None else total + term
        return total

    def _micro_batched(self, inputs) -> bool:
        """Whether a pass with ``inputs`` runs micro-batch by micro-batch:
        with ``micro_batch_size`` below its items, or when the method gave
        several input tensors (items of different sizes)."""
        if isinstance(inputs, (list, tuple)):
            return True
        m = self.micro_batch_size
        return m is not None and m < int(inputs.shape[0])

    def _run_pass(self, state: SynthState, p: SynthPass):
        """augment -> forward -> loss -> backward of one pass; returns its
        terms and its total, detached (the pass's graph is gone once it
        is backpropagated)."""
        rec = state.recorder
        inputs = feats = None
        if p.forward:
            with self._phase('augment'):
                inputs = self.pass_input(state, p)
            if self._micro_batched(inputs):
                return self._run_micro_batched(state, p, inputs)
            feats = self._forward(state, p, inputs)
        with self._phase('loss'):
            terms = self.loss_terms(state, p, inputs, feats)
            if rec is not None:
                rec.clear()
            del feats
            total = self._weighted_total(terms)
        terms = {k: v.detach() for k, v in terms.items()}
        if total is None:
            return terms, None
        with self._phase('backward'):
            if total.requires_grad:
                self._backward(state, p, total)
        return terms, total.detach()

    def _run_micro_batched(self, state: SynthState, p: SynthPass, inputs):
        """:meth:`_run_pass` micro-batch by micro-batch (see the module
        doc): ``inputs`` is the pass input, one tensor or a list of them
        (items in order); :meth:`pixel_terms` and then the micro-batches
        add their gradients in detached copies, which one backward takes to
        the pixels."""
        rec = state.recorder
        pieces = list(inputs) if isinstance(inputs, (list, tuple)) \
            else [inputs]
        leaves = [t.detach().requires_grad_(t.requires_grad) for t in pieces]
        total_items = sum(int(t.shape[0]) for t in pieces)
        chunks, start = [], 0
        for leaf in leaves:
            n_k = int(leaf.shape[0])
            step = self.micro_batch_size or n_k
            for i in range(0, n_k, step):
                j = min(i + step, n_k)
                chunks.append((leaf[i:j],
                               MicroBatch(start + i, start + j, total_items)))
            start += n_k
        terms: Dict[str, torch.Tensor] = {}
        total = None
        # the terms on the whole input first, backpropagated to the
        # detached input (and the pixels): the micro-batches' gradients
        # then add to theirs in the order the whole batch's backward adds
        # them (the backbone's last), for the same floating-point sums
        with self._phase('loss'):
            pix = self.pixel_terms(
                state, p, leaves if isinstance(inputs, (list, tuple))
                else leaves[0])
            pix_total = self._weighted_total(pix)
        if pix_total is not None:
            if pix_total.requires_grad:
                with self._phase('backward'):
                    pix_total.backward()
            total = pix_total.detach()
        self.prepare_chunks(state, p, [(c.detach(), mb) for c, mb in chunks])
        for chunk, mb in chunks:
            feats = self._forward(state, p, chunk)
            with self._phase('loss'):
                c_terms = self.chunk_terms(state, p, chunk, feats, mb)
                if rec is not None:
                    rec.clear()
                del feats
                c_total = self._weighted_total(c_terms)
            for k, v in c_terms.items():
                v = v.detach()
                terms[k] = v if k not in terms else terms[k] + v
            if c_total is None:
                continue
            with self._phase('backward'):
                if c_total.requires_grad:
                    self._backward(state, p, c_total)
            c_total = c_total.detach()
            total = c_total if total is None else total + c_total
        for k, v in pix.items():
            terms[k] = v.detach()
        tensors = [t for t, leaf in zip(pieces, leaves)
                   if leaf.grad is not None and t.requires_grad]
        if tensors:
            with self._phase('backward'):
                torch.autograd.backward(
                    tensors, [leaf.grad for t, leaf in zip(pieces, leaves)
                              if leaf.grad is not None and t.requires_grad])
        return terms, total
