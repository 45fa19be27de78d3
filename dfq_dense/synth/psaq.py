"""PSAQ-ViT (V1) image synthesis at the backbone level of a Swin model.

The teacher is the full-precision backbone alone (no labels, no heads).  The
synthetic pixels (normalised space) are optimised so that, at every window
attention of the backbone, the within-window patch similarity of the
attention output has maximal entropy (diverse, "natural" patch structure),
plus a total-variation prior.
"""
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from ..registry import MODELS
from .base import PixelAdamMixin, get_backbone
from .feature_targets import (ClassifierLogits, classifier_num_classes,
                              random_hard_targets)
from .hooks import AttnOutputRecorder
from .losses import (GRIDS, TAU_REF_PIXELS, kde_chunk_of, kde_grid_points,
                     psaq_entropy_loss, pse_bounds)
from .loop import PixelSynthesizer


@MODELS.register_module()
class PSAQViT(PixelAdamMixin, PixelSynthesizer):
    """Patch-Similarity-Aware data-free synthesis (PSAQ-ViT V1) for Swin.

    Per batch: ``x ~ N(0, 1)`` ``(n, 3, H, W)`` (normalised space), one TV
    target ``tau ~ U(tau_range)``, one Adam on the pixels, then
    ``synth_rounds`` rounds of ``iterations`` iterations.  Each iteration
    jitters the batch (random ``torch.roll`` up to the round's ``jitter``
    px, horizontal flip with p=0.5; both differentiable, nothing to undo),
    runs ``backbone(x_aug)`` under an :class:`AttnOutputRecorder`, and
    minimises::

        entropy_weight * psaq_entropy_loss(records) + tv_prior_loss(x_aug)

    then clamps ``x`` to the valid normalised range (the loop of
    :class:`~dfq_dense.synth.loop.PixelSynthesizer`).

    Schedule (defaults = the official code, ``generate_data.py`` of
    github.com/zkkli/PSAQ-ViT): 2 rounds x 500 iterations (``iterations``
    is the count *per round*); every round warms up linearly over
    ``min(100, iterations // 5)`` iterations (100 for 500; unless
    ``warmup_iters`` is given) then decays with a cosine to 0; maximal roll
    15 px in round 1 and 30 px in round 2, one offset for both axes; the
    Adam optimizer (lr 0.25 for Swin, betas (0.5, 0.9)) is created once
    and keeps its state across the rounds; the TV target is drawn once per
    synthesized batch (the official code draws it once per run, and a run
    is one batch of 32 images) and the TV prior sees the jittered, flipped
    batch.  Schedule, augmentation and TV prior come from
    :class:`~dfq_dense.synth.base.PixelAdamMixin`.

    The schedule of earlier versions (one round, 15 px on independent axes,
    a new TV target every iteration, TV on the un-jittered ``x``) is
    ``synth_rounds=1, jitter=15, jitter_shift='independent',
    tau_per='iteration', tv_on='raw'`` (:attr:`LEGACY_SCHEDULE`).

    Args (beyond :class:`~dfq_dense.synth.base.BaseSynthesizer`):
        iterations: iterations *per round* (500).
        synth_rounds: rounds (2).  (Not ``rounds``: PSAQ-ViT V2 uses that
            name for its adaptation rounds.)
        lr, betas: Adam settings (0.25, (0.5, 0.9)).
        warmup_iters: override the warm-up length of every round.
        jitter: max roll in pixels, one per round ((15, 30)) or an int for
            every round.
        jitter_shift: ``'shared'`` (one offset for both axes, official) or
            ``'independent'``.
        flip: random horizontal flip.
        tau_per: ``'run'`` (one TV target per batch, official) or
            ``'iteration'``.
        tv_on: ``'augmented'`` (TV of the jittered batch, official) or
            ``'raw'``.
        entropy_weight: weight of the patch-similarity entropy loss.
        tv_weight, tau_range, tau_ref_pixels: TV prior (see
            :func:`~dfq_dense.synth.losses.tv_prior_loss`).
        bandwidth, num_points: KDE settings (0.01, 10).
        label_head: None (default, the backbone-level variant: no label
            term, nothing but the backbone's attention is read) or
            ``'classifier'``: PSAQ-ViT's one-hot loss of the paper and the
            official code, ``ce_weight * CrossEntropy(logits, y)`` with
            ``y`` uniform random labels over the classifier's classes,
            drawn once per batch, on the logits of a timm classifier
            backbone (the classification track).
        ce_weight: weight of that loss (1.0, as the official code).

    Patch-similarity entropy (see
    :func:`~dfq_dense.synth.losses.pse_entropy`).  The defaults are the
    official PSAQ-ViT code's conventions, exact at any resolution (the KDE
    runs in chunks, memory linear in the number of similarities): every
    token-pair similarity of every window, the diagonal included, one KDE
    grid per layer over the whole batch, every token of a window.  Padding
    tokens of Swin windows are always left out (the official code never
    pads).  Options, each a departure from the official code:

        diagonal: False leaves a token's similarity with itself out.
        grid: ``'image'`` takes one KDE grid per image instead of
            ``'batch'``.
        drop_first_token: True drops token 0 of every window, as the
            official code does (DeiT's CLS token, a carry-over on Swin).
        max_samples: keep at most this many similarities per image and
            layer (uniform subsample, None keeps all).  Not faithful: at
            dense resolution the entropy stays close but the gradient does
            not follow the exact one.
        kde_chunk: similarity values per KDE step (``'auto'``: per device
            type; None: one shot); numerics only.

    The behaviour of earlier versions is ``diagonal=False, grid='image',
    max_samples=100000``.

    Memory (see :mod:`~dfq_dense.synth.loop`):

        micro_batch_size: forward / backpropagate this many images at a
            time.  The images are those of the whole batch: the entropy is
            a mean over images (each micro-batch contributes the sum of its
            images' entropies divided by the batch size), its KDE grid
            (``grid='batch'``: min..max of each layer's similarities over
            the *whole* batch) is computed first by a forward without
            gradient over the micro-batches (one extra no-grad forward per
            iteration, about a third more compute), and the TV prior
            ``|TV(x_aug) - tau|``, whose Frobenius norms and sign couple
            all images, is taken on the whole jittered batch (pixels only,
            no backbone).  Not with ``max_samples`` (its subsample draws
            would come in another order).
        with_cp: activation checkpointing of the backbone's Swin blocks.
    """

    #: The schedule of earlier versions (see the class docstring).
    LEGACY_SCHEDULE = dict(synth_rounds=1, jitter=15,
                           jitter_shift='independent', tau_per='iteration',
                           tv_on='raw')

    def __init__(self,
                 num_images: int = 8,
                 batch_size: int = 8,
                 img_size=None,
                 iterations: int = 500,
                 seed: int = 0,
                 lr: float = 0.25,
                 betas: Tuple[float, float] = (0.5, 0.9),
                 warmup_iters: Optional[int] = None,
                 synth_rounds: int = 2,
                 jitter: Union[int, Sequence[int]] = (15, 30),
                 jitter_shift: str = 'shared',
                 flip: bool = True,
                 tau_per: str = 'run',
                 tv_on: str = 'augmented',
                 entropy_weight: float = 1.0,
                 tv_weight: float = 0.05,
                 tau_range: Tuple[float, float] = (2500., 3000.),
                 tau_ref_pixels: int = TAU_REF_PIXELS,
                 bandwidth: float = 0.01,
                 num_points: int = 10,
                 max_samples: Optional[int] = None,
                 diagonal: bool = True,
                 grid: str = 'batch',
                 drop_first_token: bool = False,
                 kde_chunk: Union[int, str, None] = 'auto',
                 label_head: Optional[str] = None,
                 ce_weight: float = 1.0,
                 micro_batch_size: Optional[int] = None,
                 with_cp: bool = False,
                 log_interval: int = 50,
                 progress: bool = True,
                 device=None):
        super().__init__(num_images=num_images, batch_size=batch_size,
                         img_size=img_size, iterations=iterations, seed=seed,
                         log_interval=log_interval, progress=progress,
                         device=device, micro_batch_size=micro_batch_size,
                         with_cp=with_cp)
        self._init_pixel_adam(lr, betas, warmup_iters, jitter, flip,
                              tv_weight, tau_range, tau_ref_pixels,
                              synth_rounds=synth_rounds,
                              jitter_shift=jitter_shift, tau_per=tau_per,
                              tv_on=tv_on)
        self.entropy_weight = float(entropy_weight)
        self.bandwidth = float(bandwidth)
        self.num_points = int(num_points)
        self.max_samples = max_samples
        if grid not in GRIDS:
            raise ValueError(f'{type(self).__name__}: grid must be one of '
                             f'{GRIDS}, got {grid!r}')
        self.diagonal = bool(diagonal)
        self.grid = grid
        self.drop_first_token = bool(drop_first_token)
        self.kde_chunk = kde_chunk
        if label_head not in (None, 'classifier'):
            raise ValueError(f"{type(self).__name__}: label_head must be None "
                             f"or 'classifier', got {label_head!r}")
        self.label_head = label_head
        self.ce_weight = float(ce_weight)
        self.num_classes = None
        if micro_batch_size is not None and max_samples is not None:
            raise ValueError(f'{type(self).__name__}: micro_batch_size does '
                             'not work with max_samples (the subsample '
                             'draws would change order); use one of them')

    def entropy_loss(self, records, generator):
        """``(loss, per-layer entropies)`` of
        :func:`~dfq_dense.synth.losses.psaq_entropy_loss` with this
        synthesizer's PSE settings."""
        return psaq_entropy_loss(
            records, bandwidth=self.bandwidth, num_points=self.num_points,
            max_samples=self.max_samples, generator=generator,
            return_per_layer=True, diagonal=self.diagonal, grid=self.grid,
            drop_first_token=self.drop_first_token, chunk=self.kde_chunk)

    def check_model(self, model):
        """PSAQ-ViT hooks Swin window attention: fail early without it
        (and, with ``label_head='classifier'``, without class logits)."""
        super().check_model(model)
        AttnOutputRecorder(get_backbone(model)).remove()
        if self.label_head == 'classifier':
            self.num_classes = classifier_num_classes(get_backbone(model))

    # ------------------------------------------------------- loop pieces
    LOSS_TERMS = ('entropy', 'ce', 'tv')

    @property
    def weights(self):
        """The entropy's and the one-hot loss's weights; the TV prior
        carries ``tv_weight``."""
        return dict(entropy=self.entropy_weight, ce=self.ce_weight)

    def make_optimizer(self, x):
        """One Adam for all rounds, as the official code."""
        return torch.optim.Adam([x], lr=self.lr, betas=self.betas)

    def start_batch(self, state):
        state.tau = self.draw_tau(state.generator)  # None: one per iteration
        state.recorder = AttnOutputRecorder(state.backbone)
        state.labels = None
        if self.label_head == 'classifier':
            # from a copy of the batch's generator: the backbone-level
            # variant's draws (jitter, flips) stay the same
            self.num_classes = classifier_num_classes(state.backbone)
            g = torch.Generator()
            g.set_state(state.generator.get_state())
            state.labels = random_hard_targets(
                state.n, self.num_classes, g).to(state.device)

    def pass_input(self, state, p):
        return self.augment(state.x, state.generator,
                            self.round_of(state.it))

    def loss_terms(self, state, p, inputs, feats):
        loss_ent, ents = self.entropy_loss(state.recorder.records,
                                           state.generator)
        state.logs['mean_entropy'] = ents.mean()
        terms = dict(entropy=loss_ent)
        if state.labels is not None:
            terms['ce'] = F.cross_entropy(ClassifierLogits(
                self.num_classes)(feats), state.labels)
        terms['tv'] = self.tv_prior(self.tv_input(state.x, inputs),
                                    state.generator, state.tau)
        return terms

    # --------------------------------------------------- micro-batching
    def prepare_chunks(self, state, p, chunks):
        """``grid='batch'``: each layer's KDE grid over the whole batch,
        from a forward without gradient of every micro-batch (min / max of
        the similarities combine exactly)."""
        state.pse_points = None
        state.ent_acc = None
        if self.grid != 'batch':
            return
        rec = state.recorder
        bounds = None
        with torch.no_grad():
            for inputs, _ in chunks:
                rec.clear()
                state.backbone(inputs)
                b = pse_bounds(rec.records, self.diagonal,
                               self.drop_first_token, self.kde_chunk)
                rec.clear()
                bounds = b if bounds is None else [
                    (torch.minimum(lo0, lo1), torch.maximum(hi0, hi1))
                    for (lo0, hi0), (lo1, hi1) in zip(bounds, b)]
        state.pse_points = [kde_grid_points(lo, hi, self.num_points)
                            for lo, hi in bounds]

    def chunk_terms(self, state, p, inputs, feats, mb):
        """The micro-batch's share of the entropy term (the sum of its
        images' entropies over the batch size, on the batch's grids)."""
        records = state.recorder.records
        chunk = kde_chunk_of(self.kde_chunk, mb.stop - mb.start, mb.total,
                             inputs.device)
        loss_ent, ents = psaq_entropy_loss(
            records, bandwidth=self.bandwidth, num_points=self.num_points,
            return_per_layer=True, diagonal=self.diagonal, grid=self.grid,
            drop_first_token=self.drop_first_token, chunk=chunk,
            points=state.pse_points, total=mb.total)
        state.ent_acc = ents if state.ent_acc is None else \
            state.ent_acc + ents
        state.logs['mean_entropy'] = state.ent_acc.mean()
        terms = dict(entropy=loss_ent)
        if state.labels is not None:
            terms['ce'] = F.cross_entropy(
                ClassifierLogits(self.num_classes)(feats),
                state.labels[mb.index], reduction='sum') / mb.total
        return terms

    def pixel_terms(self, state, p, inputs):
        """The TV prior on the whole (jittered) batch."""
        return dict(tv=self.tv_prior(self.tv_input(state.x, inputs),
                                     state.generator, state.tau))
