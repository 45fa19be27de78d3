"""PSAQ-ViT V2's adaptive teacher-student rounds.

V2 keeps V1's patch-similarity entropy and adds a competition between the
synthetic images and the quantized model (the student), refereed by the
full-precision model (the teacher): the images are pushed towards samples
the current student gets wrong, the student is then trained on them, and so
on.  The initial images are V1's
(:class:`~dfq_dense.synth.psaq_v2.PSAQViTV2`, ``dfq.synthesizer``); the
rounds are :class:`PSAQViTV2Rounds` (``dfq.adapter``).  The paper's code is
not public; what this implementation does where the paper leaves a choice
open is listed in :class:`PSAQViTV2Rounds`.
"""
import contextlib
import math
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
from mmengine.logging import MessageHub, print_log
from torch import nn

from ..registry import ADAPTERS
from ..synth.base import (JITTER_SHIFTS, bar_update, clamp_to_range,
                          get_backbone, get_mean_std, jitter_per_round,
                          parse_components, progress_bar, roll_flip,
                          warmup_cosine_lr)
from ..synth.hooks import AttnOutputRecorder
from ..synth.loop import checkpointed_blocks
from ..synth.losses import (GRIDS, TAU_REF_PIXELS, kde_chunk_of,
                            kde_grid_points, psaq_entropy_loss, pse_bounds,
                            tv_prior_loss)
from .base import BaseAdapter, check_choice
from .losses import MEASURES, feature_discrepancy
from .student_step import (OUTPUTS, StudentStep, adapted_modules,
                           add_scalars, extract_features, frozen_modules,
                           mean_discrepancy, resolve_outputs)

__all__ = ['PSAQViTV2Rounds']

#: Offset of the seed of the rounds' generator from ``seed``, so the rounds
#: do not replay the random stream the synthesis with the same seed used.
ADAPT_SEED_OFFSET = 1000003


@ADAPTERS.register_module()
class PSAQViTV2Rounds(BaseAdapter):
    """PSAQ-ViT V2's rounds (adaptive teacher-student): at the backbone
    level of Swin for detectors and segmentors, on the class logits of a
    timm Swin / DeiT classifier (the classification track, as the paper on
    ImageNet).

    :meth:`run` (after the DFQ loop synthesized the V1 images on the frozen
    FP teacher and calibrated the student on them) runs ``rounds`` rounds
    of

    (a) *sample step*: for ``sample_iters`` Adam iterations per batch (lr
        ``sample_lr``, cosine decay towards 0 within the step, fresh Adam
        state every round and batch; V1's jitter/flip only with
        ``sample_augment=True``), on ``images_per_round`` images of the pool
        (all by default), descend on three terms::

            L_ent  = psaq_entropy_loss(teacher attention records)
            L_disc = -feature_discrepancy(teacher(x), student(x))
            L_tv   = TV prior (V1's tv_prior_loss, on the un-jittered x)

        i.e. raise the patch-similarity entropy of the teacher and the
        teacher-student discrepancy (hard samples for the current student)
        under V1's smoothness prior; both models are frozen; ``x`` is
        clamped to the valid range after every step.  How the terms are
        combined (``balance``):

        * ``'grad_norm'`` (default): each term's gradient w.r.t. the pixels
          is computed separately and, *per image*, rescaled to the common
          norm ``sqrt(3 H W)`` (RMS 1 per pixel); the update direction is
          ``sum_k share_k * g_k / ||g_k|| * sqrt(3 H W)`` with ``share_k =
          sample_shares[k] / sum of the active shares``, so
          ``sample_shares`` are the fractions of the update each term
          owns, whatever the raw magnitudes of the losses (a term with a
          zero gradient on an image contributes nothing there).  With the
          plain sum the entropy gradient (5-20x the discrepancy's on the
          tiny test model) and the TV gradient dominate, and on the demo
          the discrepancy *falls* during the step (0.113 -> 0.088): the
          competitive half of the method is lost.  Since the
          unit directions of different terms are nearly orthogonal in pixel
          space, a term with a positive share makes progress on its own
          objective to first order;
        * ``None`` (the former behaviour)::

              entropy_weight * L_ent + disc_weight * L_disc + L_tv

          (``tv_weight`` is inside ``L_tv``), one backward pass;
    (b) optional *recalibration* (``recalibrate=True`` and a ``calibrate``
        callable given): the engine's calibration re-run on the updated
        pool;
    (c) *student step*: :class:`~dfq_dense.adapt.student_step.StudentStep`
        on the whole pool (loss ``'feature'`` by default).

    What the discrepancy is measured on (``outputs``,
    :func:`~dfq_dense.adapt.student_step.resolve_outputs`):

    * a classifier (a :class:`~dfq_dense.cls.TimmClassifier`: its backbone
      outputs class logits): the teacher's and the student's logits, the
      KL divergence of their class probabilities
      (:func:`~dfq_dense.adapt.losses.feature_discrepancy` ``'kl'`` on
      ``(B, K)``: ``tau^2 KL(softmax(t / tau) || softmax(s / tau))``,
      ``tau=1``), which the paper's ImageNet setting uses: the samples
      raise it, the student step lowers it (knowledge distillation).  No
      label term (V2 has no category guidance).  ``outputs='features'``
      takes the backbone-level variant instead (the classifier's last
      feature map, :func:`~dfq_dense.adapt.student_step.timm_feature_map`,
      ``measure='mse'``).

    Choices the paper leaves open (all configurable):

    * What the discrepancy is measured on for detectors and segmentors:
      the teacher's and student's multi-scale backbone outputs (the neck
      outputs with ``include_neck=True``), with
      :func:`~dfq_dense.adapt.losses.feature_discrepancy`, ``measure``
      ``'mse'`` (on teacher-standardised features, default) or ``'kl'``
      (channel softmax, temperature ``tau``).  Detection / segmentation
      heads are not used: the method stays task-independent.
    * The entropy is taken on the teacher only (the FP model defines what
      "natural" patch structure is).
    * Step counts and rates: ``rounds=4``, ``sample_iters=50``,
      ``sample_lr=0.05`` (lower than V1's 0.25: the images start from V1's
      result and are refined, not created), student step Adam ``lr=1e-5``
      on the weights, 50 iterations, batch ``batch_size``.
    * No augmentation in the sample step by default
      (``sample_augment=False``): the student step trains on the pool
      images as they are, so they are made hard as they are (with V1's
      15 px jitter the discrepancy gradient of small images is mostly
      noise); the images already got V1's jittered synthesis.
    * Images per round: all (``images_per_round=None``); when fewer, which
      ones (``selection``): ``'random'``, ``'easy'`` (lowest current
      per-sample discrepancy: the ones the student already handles, made
      harder) or ``'hard'`` (highest).
    * Balance of the terms: gradient-norm shares (``balance='grad_norm'``,
      ``sample_shares=dict(entropy=1, discrepancy=1, tv=1)``: a third of
      the update each, the neutral choice; on the tiny test model the
      discrepancy of the updated images then rises ~15x in 50 iterations,
      ``discrepancy=2`` makes it 25-35x); with
      ``balance=None`` the loss weights ``entropy_weight`` (1.0, V1's),
      ``disc_weight`` (1.0) and V1's ``tv_weight`` (0.05).
    * The pool's discrepancy on the images the sample step updates is
      measured before and after it every round (``disc_before`` /
      ``disc_after`` in the round's ``history`` entry and the
      ``adapt/disc_before`` / ``adapt/disc_after`` scalars, always
      computed; two no-grad passes over those images).
    * Recalibration between the sample and the student steps: off
      (``recalibrate=False``), because the engine's calibration re-derives
      every qparam (discarding learned scales); the student step is the
      adaptation mechanism.
    * What the student learns: its weights (``student_step=dict(params=
      'qparams' | 'both')`` for the quantizer scales); the student stays in
      eval mode (see :class:`~dfq_dense.adapt.student_step.StudentStep`).

    Components can be switched off for ablations with ``components=dict(
    entropy=..., discrepancy=..., student_step=..., tv=...)`` (missing names
    stay on; a list gives the names that are on).  Everything random comes
    from a CPU generator seeded from ``seed`` (the student step's batch
    order from ``student_step['seed']`` (default ``seed``) plus the round),
    so a seed gives the same images and the same student on a given device.

    Args:
        batch_size: images per sample-step batch (and the student step's
            default batch size).
        seed: seed of the rounds (selection, the sample step's random
            draws, the student step's default).
        rounds: adaptation rounds.
        sample_iters, sample_lr, sample_betas: the sample step's Adam.
        sample_augment: V1's roll jitter / flip in the sample step (off).
        images_per_round, selection: see above.
        disc_weight: weight of the (maximised) discrepancy
            (``balance=None`` only).
        balance: ``'grad_norm'`` (per-image gradient-norm shares) or None
            (plain weighted sum of the losses), see above.
        sample_shares: ``dict(entropy=, discrepancy=, tv=)`` shares of the
            update with ``balance='grad_norm'`` (missing names keep their
            defaults; renormalised over the active components).
        outputs: ``'auto'`` (default: the class logits of a classifier,
            else the backbone's feature maps), ``'classifier'`` or
            ``'features'``, see above.
        measure, tau: the discrepancy measure (``measure`` None: ``'kl'``
            on logits, ``'mse'`` on feature maps; ``'mse'`` on logits is
            refused).
        include_neck: measure on (and adapt) the neck outputs too.
        recalibrate: re-run ``calibrate(pool)`` after each sample step.
        components: ablation switches, see above.
        student_step: :class:`StudentStep` arguments; defaults
            ``batch_size``, ``include_neck``, ``outputs``, ``measure``,
            ``tau``, ``seed`` and ``log_interval // 5`` to this adapter's.
        eval_discrepancy: log the pool's mean discrepancy at the start and
            end of every round (two no-grad passes over the pool).
        entropy_weight, bandwidth, num_points, max_samples, diagonal, grid,
            drop_first_token, kde_chunk: V1's patch-similarity entropy (see
            :class:`~dfq_dense.synth.psaq.PSAQViT`; same names and
            defaults).
        tv_weight, tau_range, tau_ref_pixels: V1's TV prior.
        jitter, jitter_shift, flip: V1's augmentation (round 1's jitter),
            used with ``sample_augment``.
        micro_batch_size: run the sample step's teacher and student
            forwards and backwards on at most this many images at a time
            (None: the whole batch).  The same images, as V1's
            micro-batching (:mod:`~dfq_dense.synth.loop`): the entropy is
            a mean over images on the batch's KDE grid (a no-grad teacher
            forward over the micro-batches first), the discrepancy a mean
            over images, the TV prior taken on the whole batch; with
            ``balance='grad_norm'`` each term's pixel gradient is gathered
            over the micro-batches before its per-image rescaling.  Not
            with ``max_samples``.
        with_cp: activation checkpointing of the teacher's and the
            student's transformer blocks (Swin; timm Swin / ViT / DeiT) in
            the sample step
            (:func:`~dfq_dense.synth.loop.checkpointed_blocks`; the same
            images).
        log_interval: log the sample step every this many iterations.
        progress: show a progress bar.
        device: run the sample step there; default the student's device.
    """

    COMPONENTS = ('entropy', 'discrepancy', 'student_step', 'tv')
    SELECTIONS = ('random', 'easy', 'hard')
    BALANCES = (None, 'grad_norm')
    SAMPLE_TERMS = ('entropy', 'discrepancy', 'tv')
    DEFAULT_SHARES = dict(entropy=1.0, discrepancy=1.0, tv=1.0)

    def __init__(self,
                 batch_size: int = 8,
                 seed: int = 0,
                 rounds: int = 4,
                 sample_iters: int = 50,
                 sample_lr: float = 0.05,
                 sample_betas: Tuple[float, float] = (0.5, 0.9),
                 sample_augment: bool = False,
                 images_per_round: Optional[int] = None,
                 selection: str = 'random',
                 disc_weight: float = 1.0,
                 balance: Optional[str] = 'grad_norm',
                 sample_shares: Optional[Dict[str, float]] = None,
                 measure: Optional[str] = None,
                 tau: float = 1.0,
                 include_neck: bool = False,
                 outputs: str = 'auto',
                 recalibrate: bool = False,
                 components: Union[None, Dict[str, bool],
                                   Sequence[str]] = None,
                 student_step: Optional[dict] = None,
                 eval_discrepancy: bool = True,
                 entropy_weight: float = 1.0,
                 bandwidth: float = 0.01,
                 num_points: int = 10,
                 max_samples: Optional[int] = None,
                 diagonal: bool = True,
                 grid: str = 'batch',
                 drop_first_token: bool = False,
                 kde_chunk: Union[int, str, None] = 'auto',
                 tv_weight: float = 0.05,
                 tau_range: Tuple[float, float] = (2500., 3000.),
                 tau_ref_pixels: int = TAU_REF_PIXELS,
                 jitter: Union[int, Sequence[int]] = (15, 30),
                 jitter_shift: str = 'shared',
                 flip: bool = True,
                 micro_batch_size: Optional[int] = None,
                 with_cp: bool = False,
                 log_interval: int = 50,
                 progress: bool = True,
                 device=None):
        super().__init__()
        name = type(self).__name__
        if micro_batch_size is not None and (
                isinstance(micro_batch_size, bool)
                or not isinstance(micro_batch_size, int)
                or micro_batch_size < 1):
            raise ValueError(f'{name}: micro_batch_size must be an integer '
                             f'>= 1 or None, got {micro_batch_size!r}')
        if not isinstance(with_cp, bool):
            raise ValueError(f'{name}: with_cp must be True or False, got '
                             f'{with_cp!r}')
        if micro_batch_size is not None and max_samples is not None:
            raise ValueError(f'{name}: micro_batch_size does not work with '
                             'max_samples; use one of them')
        self.micro_batch_size = micro_batch_size
        self.with_cp = with_cp
        self.components = parse_components(name, self.COMPONENTS, components)
        if int(batch_size) < 1:
            raise ValueError(f'{name}: batch_size must be >= 1')
        if int(rounds) < 0 or int(sample_iters) < 0:
            raise ValueError(f'{name}: rounds and sample_iters must be >= 0')
        check_choice(name, 'selection', selection, self.SELECTIONS)
        check_choice(name, 'measure', measure, (None, ) + MEASURES)
        check_choice(name, 'outputs', outputs, OUTPUTS)
        if images_per_round is not None and int(images_per_round) < 1:
            raise ValueError(f'{name}: images_per_round must be >= 1 or '
                             'None (all)')
        check_choice(name, 'balance', balance, self.BALANCES)
        check_choice(name, 'grid', grid, GRIDS)
        check_choice(name, 'jitter_shift', jitter_shift, JITTER_SHIFTS)
        shares = dict(self.DEFAULT_SHARES)
        unknown = set(sample_shares or {}) - set(self.SAMPLE_TERMS)
        if unknown:
            raise ValueError(f'{name}: unknown sample_shares '
                             f'{sorted(unknown)}, known: '
                             f'{", ".join(self.SAMPLE_TERMS)}')
        shares.update({k: float(v) for k, v in (sample_shares or {}).items()})
        if any(v < 0 or not math.isfinite(v) for v in shares.values()):
            raise ValueError(f'{name}: sample_shares must be finite and '
                             f'>= 0, got {shares}')
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rounds = int(rounds)
        self.sample_iters = int(sample_iters)
        self.sample_lr = float(sample_lr)
        self.sample_betas = tuple(sample_betas)
        self.sample_augment = bool(sample_augment)
        self.balance = balance
        self.sample_shares = shares
        self.images_per_round = (None if images_per_round is None else
                                 int(images_per_round))
        self.selection = selection
        self.disc_weight = float(disc_weight)
        self.measure = measure
        self.tau = float(tau)
        self.outputs = outputs
        # what the discrepancy is taken on, and how, for the model at hand
        # (resolve_outputs; set by run / sample_step)
        self._outputs, self._measure = None, measure
        self.include_neck = bool(include_neck)
        self.recalibrate = bool(recalibrate)
        self.eval_discrepancy = bool(eval_discrepancy)
        # V1's entropy, TV prior and augmentation, for the sample step
        self.entropy_weight = float(entropy_weight)
        self.bandwidth = float(bandwidth)
        self.num_points = int(num_points)
        self.max_samples = max_samples
        self.diagonal = bool(diagonal)
        self.grid = grid
        self.drop_first_token = bool(drop_first_token)
        self.kde_chunk = kde_chunk
        self.tv_weight = float(tv_weight)
        self.tau_range = tuple(tau_range)
        self.tau_ref_pixels = int(tau_ref_pixels)
        self.jitter = jitter_per_round(name, jitter)[0]
        self.jitter_shift = jitter_shift
        self.flip = bool(flip)
        self.log_interval = max(1, int(log_interval))
        self.progress = progress
        self.device = device
        self.student = StudentStep.build(
            student_step, batch_size=self.batch_size,
            include_neck=self.include_neck, outputs=self.outputs,
            measure=self.measure, tau=self.tau, seed=self.seed,
            log_interval=max(1, self.log_interval // 5),
            name=f'{name}/student')
        self._sample_log_step = 0

    def check_model(self, model):
        """The entropy (and a ``'mimiq'`` student loss) hooks Swin window
        attention (or a timm classifier's attention): fail early without
        it, or without class logits for ``outputs='classifier'``."""
        super().check_model(model)
        self._resolve(model)
        if self.components['student_step']:
            resolve_outputs(self.student.name, self.student.outputs,
                            self.student.measure, model)
        if self.components['entropy'] or self.student.loss == 'mimiq':
            AttnOutputRecorder(get_backbone(model)).remove()

    # ------------------------------------------------------- V1's pieces
    def entropy_loss(self, records, generator):
        """``(loss, per-layer entropies)`` of
        :func:`~dfq_dense.synth.losses.psaq_entropy_loss` with V1's PSE
        settings."""
        return psaq_entropy_loss(
            records, bandwidth=self.bandwidth, num_points=self.num_points,
            max_samples=self.max_samples, generator=generator,
            return_per_layer=True, diagonal=self.diagonal, grid=self.grid,
            drop_first_token=self.drop_first_token, chunk=self.kde_chunk)

    def tv_prior(self, x: torch.Tensor,
                 generator: torch.Generator) -> torch.Tensor:
        """V1's TV prior (weighted), a fresh target from ``generator``."""
        return tv_prior_loss(x, weight=self.tv_weight,
                             tau_range=self.tau_range,
                             ref_pixels=self.tau_ref_pixels,
                             generator=generator)

    def augment(self, x: torch.Tensor,
                generator: torch.Generator) -> torch.Tensor:
        """V1's roll jitter (round 1's maximum) and flip."""
        return roll_flip(x, generator, self.jitter, self.flip,
                         self.jitter_shift)

    def sample_lr_at(self, it: int) -> float:
        """Sample-step learning rate: cosine from ``sample_lr`` towards 0
        (:func:`~dfq_dense.synth.base.warmup_cosine_lr` without warm-up)."""
        return warmup_cosine_lr(it, self.sample_lr, 0,
                                max(1, self.sample_iters))

    def _resolve(self, model: nn.Module) -> None:
        """Set what the discrepancy is taken on for ``model``, and how
        (:func:`~dfq_dense.adapt.student_step.resolve_outputs`)."""
        self._outputs, self._measure = resolve_outputs(
            type(self).__name__, self.outputs, self.measure, model)

    def _device(self, model: nn.Module) -> torch.device:
        if self.device is not None:
            return torch.device(self.device)
        p = next(get_backbone(model).parameters(), None)
        return p.device if p is not None else torch.device('cpu')

    def _log_due(self, it: int, total: int) -> bool:
        return (it + 1) % self.log_interval == 0 or it == 0 or \
            it + 1 == total

    # ------------------------------------------------------------------ api
    def run(self, teacher: nn.Module, student: nn.Module,
            images: torch.Tensor, calibrate=None) -> torch.Tensor:
        """Adapt images and student in turn (see the class docstring);
        returns the adapted pool, CPU float ``(N, 3, H, W)``."""
        self.mean, self.std = get_mean_std(teacher)
        self._resolve(teacher)
        comp = self.components
        pool = images.detach().float().cpu().clone()
        generator = torch.Generator().manual_seed(self.seed +
                                                  ADAPT_SEED_OFFSET)
        hub = MessageHub.get_current_instance()
        self.student.visualizer = self.visualizer
        sample_on = comp['entropy'] or comp['discrepancy'] or comp['tv']
        n_sel = len(pool) if self.images_per_round is None else min(
            len(pool), self.images_per_round)
        steps = self.rounds * math.ceil(n_sel / self.batch_size) * \
            self.sample_iters if sample_on else 0
        bar = progress_bar(type(self).__name__, steps,
                           self.progress) if steps else None
        try:
            for r in range(self.rounds):
                d_start = self._pool_discrepancy(teacher, student, pool)
                self._sample_disc = (None, None)
                if sample_on and self.sample_iters > 0:
                    pool = self.sample_step(teacher, student, pool, r,
                                            generator, bar)
                d_hard = self._pool_discrepancy(teacher, student, pool)
                if self.recalibrate and calibrate is not None:
                    calibrate(pool)
                    print_log(f'[{type(self).__name__}] round {r + 1}/'
                              f'{self.rounds}: student re-calibrated on the '
                              'adapted pool', logger='current')
                if comp['student_step'] and self.student.iters > 0:
                    self.student.history = []
                    self.student.run(teacher, student, pool,
                                     seed=self.student.seed + r,
                                     tag=f'round {r + 1}/{self.rounds}')
                    self.history.extend(
                        dict(h, round=r) for h in self.student.history)
                d_end = self._pool_discrepancy(teacher, student, pool)
                self._log_round(r, d_start, d_hard, d_end, hub)
        finally:
            if bar is not None and hasattr(bar, 'close'):
                bar.close()
        for m in student.modules():  # eval mode, without Swin's train() hook
            m.training = False
        return pool

    def _pool_discrepancy(self, teacher, student, pool) -> Optional[float]:
        if not self.eval_discrepancy:
            return None
        return mean_discrepancy(teacher, student, pool, self.include_neck,
                                self._measure, self.tau, self.batch_size,
                                outputs=self._outputs).item()

    def _log_round(self, r, d_start, d_hard, d_end, hub):
        d_before, d_after = getattr(self, '_sample_disc', (None, None))
        log = dict(phase='round', round=r, disc_start=d_start,
                   disc_after_sample=d_hard, disc_end=d_end,
                   disc_before=d_before, disc_after=d_after)
        self.history.append(log)
        name = type(self).__name__
        if d_before is not None:
            scalars = dict(disc_before=d_before, disc_after=d_after)
            for k, v in scalars.items():
                hub.update_scalar(f'adapt/{k}', v)
            add_scalars(self.visualizer,
                        {f'adapt/{k}': v for k, v in scalars.items()}, r + 1)
            print_log(f'[{name}] round {r + 1}/{self.rounds}: sample '
                      f'step discrepancy {d_before:.5f} -> {d_after:.5f} '
                      f'(updated images, balance={self.balance})',
                      logger='current')
        if d_end is None:
            return
        scalars = {f'adapt/{k}': log[k]
                   for k in ('disc_start', 'disc_after_sample', 'disc_end')}
        for k, v in scalars.items():
            hub.update_scalar(k, v)
        add_scalars(self.visualizer, scalars, r + 1)
        print_log(f'[{name}] round {r + 1}/{self.rounds}: pool '
                  f'discrepancy {d_start:.5f} -> {d_hard:.5f} (sample step)'
                  f' -> {d_end:.5f} (student step)', logger='current')

    # ---------------------------------------------------------- sample step
    def select(self, teacher, student, pool,
               generator: torch.Generator) -> torch.Tensor:
        """Indices of the pool images that the sample step updates."""
        n = len(pool)
        k = n if self.images_per_round is None else min(
            n, self.images_per_round)
        if k == n:
            return torch.arange(n)
        if self.selection == 'random':
            return torch.randperm(n, generator=generator)[:k]
        d = mean_discrepancy(teacher, student, pool, self.include_neck,
                             self._measure, self.tau, self.batch_size,
                             reduction='none', outputs=self._outputs)
        order = torch.sort(d, descending=self.selection == 'hard',
                           stable=True).indices
        return order[:k]

    def sample_step(self, teacher: nn.Module, student: nn.Module,
                    pool: torch.Tensor, round_idx: int,
                    generator: torch.Generator, bar=None) -> torch.Tensor:
        """Step (a) of a round on ``pool`` (returned updated, CPU)."""
        self._resolve(teacher)
        comp = self.components
        device = self._device(student)
        mean, std = self.mean.to(device), self.std.to(device)
        sel = self.select(teacher, student, pool, generator)
        d_before = self._disc_of(teacher, student, pool[sel])
        pool = pool.clone()
        hub = MessageHub.get_current_instance()
        n_batches = math.ceil(len(sel) / self.batch_size)
        use_neck = self.include_neck and comp['discrepancy']
        mods = adapted_modules(teacher, use_neck) + \
            adapted_modules(student, use_neck)
        rec = None
        with frozen_modules(mods), \
                checkpointed_blocks(get_backbone(teacher), self.with_cp), \
                checkpointed_blocks(get_backbone(student), self.with_cp):
            try:
                if comp['entropy']:
                    rec = AttnOutputRecorder(get_backbone(teacher))
                for b in range(n_batches):
                    idx = sel[b * self.batch_size:(b + 1) * self.batch_size]
                    x = pool[idx].to(device).requires_grad_(True)
                    opt = torch.optim.Adam([x], lr=self.sample_lr,
                                           betas=self.sample_betas)
                    for it in range(self.sample_iters):
                        lr = self.sample_lr_at(it)
                        for group in opt.param_groups:
                            group['lr'] = lr
                        terms = self._sample_iter(teacher, student, x, opt,
                                                  rec, generator, use_neck,
                                                  mean, std)
                        bar_update(bar)
                        if self._log_due(it, self.sample_iters):
                            self._log_sample(round_idx, b, n_batches, it, lr,
                                             terms, hub)
                    pool[idx] = x.detach().cpu()
            finally:
                if rec is not None:
                    rec.remove()
        self._sample_disc = (d_before,
                             self._disc_of(teacher, student, pool[sel]))
        return pool

    def _disc_of(self, teacher, student, images) -> float:
        """Mean discrepancy of ``images`` (no grad, this adapter's
        measure)."""
        return mean_discrepancy(teacher, student, images, self.include_neck,
                                self._measure, self.tau, self.batch_size,
                                outputs=self._outputs).item()

    def sample_terms(self, teacher, student, x, rec, generator, use_neck
                     ) -> Tuple[Dict[str, torch.Tensor], float]:
        """The sample step's terms on ``x`` as differentiable tensors.

        Returns ``({'entropy': L_ent, 'discrepancy': L_disc, 'tv': L_tv},
        mean entropy)`` for the active components (losses to *minimise*:
        ``L_disc`` is the negated discrepancy), unweighted except the TV
        prior, which carries ``tv_weight``.  Uses ``generator`` in the
        order entropy, TV.
        """
        comp = self.components
        if self._outputs is None:  # called outside run / sample_step
            self._resolve(teacher)
        x_aug = self.augment(x, generator) if self.sample_augment else x
        terms = {}
        mean_ent = 0.
        t_feats = None
        if comp['entropy'] or comp['discrepancy']:
            if rec is not None:
                rec.clear()
            t_device = self._device(teacher)
            t_feats = extract_features(teacher, x_aug.to(t_device), use_neck,
                                       self._outputs)
        if comp['entropy']:
            loss_ent, ents = self.entropy_loss(rec.records, generator)
            rec.clear()
            mean_ent = ents.mean().item()
            terms['entropy'] = loss_ent.to(x.device)
        if comp['discrepancy']:
            s_feats = extract_features(student, x_aug, use_neck,
                                       self._outputs)
            terms['discrepancy'] = -feature_discrepancy(
                [f.to(x.device) for f in t_feats], s_feats, self._measure,
                self.tau)
        del t_feats
        if comp['tv']:
            terms['tv'] = self.tv_prior(x, generator)
        return terms, mean_ent

    def active_shares(self, names: Sequence[str]) -> Dict[str, float]:
        """``sample_shares`` of ``names`` normalised to sum 1."""
        total = sum(self.sample_shares[k] for k in names)
        if total <= 0:
            raise ValueError(f'{type(self).__name__}: the sample_shares of '
                             f'the active terms {list(names)} sum to 0')
        return {k: self.sample_shares[k] / total for k in names}

    def balanced_grad(self, terms: Dict[str, torch.Tensor], x: torch.Tensor
                      ) -> Tuple[torch.Tensor, Dict[str, float]]:
        """``balance='grad_norm'``: the combined pixel gradient.

        Per image ``b`` and term ``k`` with gradient ``g_k = dL_k/dx``::

            grad[b] = sum_k share_k * g_k[b] / ||g_k[b]|| * sqrt(numel(x[b]))

        Returns it and the raw per-term gradient norms (mean over images).
        """
        names = [k for k in self.SAMPLE_TERMS
                 if k in terms and terms[k].requires_grad]
        grads = {}
        for n, k in enumerate(names):
            grads[k], = torch.autograd.grad(terms[k], x,
                                            retain_graph=n < len(names) - 1,
                                            allow_unused=True)
        return self.combine_grads(grads, x)

    def combine_grads(self, grads: Dict[str, Optional[torch.Tensor]],
                      x: torch.Tensor
                      ) -> Tuple[torch.Tensor, Dict[str, float]]:
        """:meth:`balanced_grad` from the terms' pixel gradients ``grads``
        (``{term: dL/dx or None}``, in :attr:`SAMPLE_TERMS` order)."""
        shares = self.active_shares(list(grads))
        grad = torch.zeros_like(x)
        norms = {}
        scale = math.sqrt(x[0].numel())
        for k, g in grads.items():
            if g is None:
                norms[k] = 0.
                continue
            nrm = g.flatten(1).norm(dim=1)
            norms[k] = nrm.mean().item()
            unit = g / nrm.clamp_min(1e-30).view(-1, *([1] * (g.dim() - 1)))
            grad.add_(unit, alpha=shares[k] * scale)
        return grad, norms

    @contextlib.contextmanager
    def _replaying(self, rec):
        """With ``with_cp``: the teacher recorder's hooks run in the blocks'
        recompute during backward, their records dropped."""
        if rec is None or not self.with_cp:
            yield
            return
        rec.keep = False
        try:
            yield
        finally:
            rec.keep = True
            rec.clear()

    def _sample_iter(self, teacher, student, x, opt, rec, generator,
                     use_neck, mean, std) -> Dict[str, float]:
        opt.zero_grad(set_to_none=True)
        if self._outputs is None:  # called outside run / sample_step
            self._resolve(teacher)
        m = self.micro_batch_size
        if m is not None and m < x.shape[0]:
            return self._sample_iter_micro(teacher, student, x, opt, rec,
                                           generator, use_neck, mean, std)
        terms, mean_ent = self.sample_terms(teacher, student, x, rec,
                                            generator, use_neck)
        zero = torch.zeros((), device=x.device)
        loss_ent = terms.get('entropy', zero)
        loss_disc = -terms['discrepancy'] if 'discrepancy' in terms else zero
        loss_tv = terms.get('tv', zero)
        loss = self.entropy_weight * loss_ent.detach() - \
            self.disc_weight * loss_disc.detach() + loss_tv.detach()
        out = {}
        if self.balance == 'grad_norm':
            if any(t.requires_grad for t in terms.values()):
                with self._replaying(rec):
                    x.grad, norms = self.balanced_grad(terms, x)
                opt.step()
                out = {f'gnorm_{k}': v for k, v in norms.items()}
        else:
            total = self.entropy_weight * loss_ent - \
                self.disc_weight * loss_disc + loss_tv
            if total.requires_grad:
                with self._replaying(rec):
                    total.backward()
                opt.step()
        with torch.no_grad():
            x.copy_(clamp_to_range(x, mean, std))
        return dict(loss=loss.item(), loss_entropy=loss_ent.item(),
                    loss_disc=loss_disc.item(), loss_tv=loss_tv.item(),
                    mean_entropy=mean_ent, **out)

    def _sample_iter_micro(self, teacher, student, x, opt, rec, generator,
                           use_neck, mean, std) -> Dict[str, float]:
        """:meth:`_sample_iter` ``micro_batch_size`` images at a time.

        The input (augmented when ``sample_augment``) is made for the whole
        batch, the TV prior taken on the whole ``x``; the teacher's and
        student's forwards, the entropy and the discrepancy run per
        micro-batch, each term's gradient w.r.t. the (detached) input is
        gathered over the micro-batches (each micro-batch's term is its
        share of the batch's mean), then taken back to ``x`` and combined
        as the whole batch's are (:meth:`combine_grads`, or summed with the
        loss weights when ``balance`` is None).  Draws from ``generator``
        in the whole batch's order (augmentation, then the TV target).
        """
        comp = self.components
        n, step = int(x.shape[0]), self.micro_batch_size
        x_in = self.augment(x, generator) if self.sample_augment else x
        leaf = x_in.detach()
        t_device = self._device(teacher)
        chunks = [(i, min(i + step, n)) for i in range(0, n, step)] \
            if comp['entropy'] or comp['discrepancy'] else []
        points = None
        if comp['entropy'] and self.grid == 'batch':
            bounds = None
            with torch.no_grad():
                for i, j in chunks:
                    rec.clear()
                    get_backbone(teacher)(leaf[i:j].to(t_device))
                    b = pse_bounds(rec.records, self.diagonal,
                                   self.drop_first_token, self.kde_chunk)
                    rec.clear()
                    bounds = b if bounds is None else [
                        (torch.minimum(lo0, lo1), torch.maximum(hi0, hi1))
                        for (lo0, hi0), (lo1, hi1) in zip(bounds, b)]
            points = [kde_grid_points(lo, hi, self.num_points)
                      for lo, hi in bounds]
        # per term (balance='grad_norm') or of their weighted sum (None):
        # the gradient w.r.t. the input, gathered over the micro-batches
        grads: Dict[str, Optional[torch.Tensor]] = {}
        values = {}
        ents = None
        for i, j in chunks:
            xc = leaf[i:j].detach().requires_grad_(True)
            terms = {}
            if rec is not None:
                rec.clear()
            t_feats = extract_features(teacher, xc.to(t_device), use_neck,
                                       self._outputs)
            if comp['entropy']:
                loss_ent, e = psaq_entropy_loss(
                    rec.records, bandwidth=self.bandwidth,
                    num_points=self.num_points, return_per_layer=True,
                    diagonal=self.diagonal, grid=self.grid,
                    drop_first_token=self.drop_first_token,
                    chunk=kde_chunk_of(self.kde_chunk, j - i, n, t_device),
                    points=points, total=n)
                rec.clear()
                ents = e if ents is None else ents + e
                terms['entropy'] = loss_ent.to(x.device)
            if comp['discrepancy']:
                s_feats = extract_features(student, xc, use_neck,
                                           self._outputs)
                terms['discrepancy'] = -(feature_discrepancy(
                    [f.to(x.device) for f in t_feats], s_feats,
                    self._measure, self.tau, reduction='sum') / n)
            del t_feats
            for k, t in terms.items():
                values[k] = t.detach() if k not in values else \
                    values[k] + t.detach()
            if self.balance == 'grad_norm':
                parts = {k: t for k, t in terms.items() if t.requires_grad}
            else:  # entropy_weight * L_ent - disc_weight * L_disc
                total = None
                if 'entropy' in terms:
                    total = self.entropy_weight * terms['entropy']
                if 'discrepancy' in terms:
                    d = -self.disc_weight * -terms['discrepancy']
                    total = d if total is None else total + d
                parts = {} if total is None or not total.requires_grad \
                    else dict(sum=total)
            with self._replaying(rec):
                for q, (k, t) in enumerate(parts.items()):
                    g, = torch.autograd.grad(
                        t, xc, retain_graph=q < len(parts) - 1,
                        allow_unused=True)
                    if k not in grads:
                        grads[k] = None
                    if g is not None:
                        if grads[k] is None:
                            grads[k] = torch.zeros_like(leaf)
                        grads[k][i:j] = g
        loss_tv = None
        if comp['tv']:
            loss_tv = self.tv_prior(x, generator)
        # back to x: each term's input gradient through the augmentation
        x_grads = {}
        for k, g in grads.items():
            if g is None or x_in is x:
                x_grads[k] = g
            else:
                x_grads[k], = torch.autograd.grad(x_in, x, g,
                                                  retain_graph=True)
        zero = torch.zeros((), device=x.device)
        loss_ent = values.get('entropy', zero)
        loss_disc = -values['discrepancy'] if 'discrepancy' in values \
            else zero
        tv_value = loss_tv.detach() if loss_tv is not None else zero
        loss = self.entropy_weight * loss_ent - \
            self.disc_weight * loss_disc + tv_value
        out = {}
        if self.balance == 'grad_norm':
            if loss_tv is not None and loss_tv.requires_grad:
                x_grads['tv'], = torch.autograd.grad(loss_tv, x)
            x_grads = {k: x_grads[k] for k in self.SAMPLE_TERMS
                       if k in x_grads}
            if x_grads:
                x.grad, norms = self.combine_grads(x_grads, x)
                opt.step()
                out = {f'gnorm_{k}': v for k, v in norms.items()}
        else:
            grad = x_grads.get('sum')
            if loss_tv is not None and loss_tv.requires_grad:
                g_tv, = torch.autograd.grad(loss_tv, x)
                grad = g_tv if grad is None else grad + g_tv
            if grad is not None:
                x.grad = grad
                opt.step()
        with torch.no_grad():
            x.copy_(clamp_to_range(x, mean, std))
        mean_ent = ents.mean().item() if ents is not None else 0.
        return dict(loss=loss.item(), loss_entropy=loss_ent.item(),
                    loss_disc=loss_disc.item(), loss_tv=tv_value.item(),
                    mean_entropy=mean_ent, **out)

    def _log_sample(self, r, b, n_batches, it, lr, terms, hub):
        log = dict(phase='sample', round=r, batch=b, iter=it + 1, lr=lr,
                   **terms)
        self.history.append(log)
        scalars = {f'adapt/sample_{k}': log[k]
                   for k in ('loss', 'loss_entropy', 'loss_disc', 'loss_tv')}
        for k, v in scalars.items():
            hub.update_scalar(k, v)
        self._sample_log_step += 1
        add_scalars(self.visualizer, scalars, self._sample_log_step)
        print_log(
            f'[{type(self).__name__}] round {r + 1}/{self.rounds} batch '
            f'{b + 1}/{n_batches} iter {it + 1}/{self.sample_iters} lr '
            f'{lr:.4f} loss {log["loss"]:.4f} entropy '
            f'{log["loss_entropy"]:.4f} disc {log["loss_disc"]:.5f} tv '
            f'{log["loss_tv"]:.4f}', logger='current')
