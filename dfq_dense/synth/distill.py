"""Teacher-student pieces shared by PSAQ-ViT V2 and MimiQ's student step.

* :func:`feature_discrepancy`: how far the student's multi-scale features
  are from the teacher's (``'mse'`` on teacher-standardised features or
  ``'kl'`` on channel softmaxes), per sample or averaged.
* :func:`extract_features`: the multi-scale outputs of a model's backbone
  (optionally followed by its neck), as a list of ``(B, C, H, W)``.
* :func:`mean_discrepancy`: the discrepancy averaged over an image pool.
* :class:`StudentStep`: a few optimisation steps of the quantized student
  (its weights, its quantizer scales, or both) towards the frozen
  full-precision teacher on a given set of (synthetic) images.

Models here are full mmdet/mmseg models (``.backbone`` and optionally
``.neck``); the teacher is the full-precision model, the student its
fake-quantized copy (see :mod:`dfq_dense.quant`).
"""
import contextlib
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from mmengine.logging import MessageHub, print_log
from torch import nn

from ..quant.quantizer import Quantizer
from .base import get_backbone
from .hooks import AttnOutputRecorder

__all__ = [
    'feature_discrepancy', 'extract_features', 'mean_discrepancy',
    'get_neck', 'adapted_modules', 'trainable_scales', 'frozen_modules',
    'StudentStep', 'add_scalars', 'headwise_structure_loss_records',
    'MEASURES', 'STUDENT_PARAMS', 'STUDENT_LOSSES'
]

MEASURES = ('mse', 'kl')
STUDENT_PARAMS = ('weights', 'qparams', 'both')
STUDENT_LOSSES = ('feature', 'mimiq')
OPTIMIZERS = ('adam', 'sgd')

Feats = Union[torch.Tensor, Sequence[torch.Tensor]]


# --------------------------------------------------------------------------
# discrepancy
# --------------------------------------------------------------------------
def _as_list(feats: Feats) -> List[torch.Tensor]:
    if isinstance(feats, torch.Tensor):
        return [feats]
    return list(feats)


def feature_discrepancy(t_feats: Feats,
                        s_feats: Feats,
                        measure: str = 'mse',
                        tau: float = 1.0,
                        reduction: str = 'mean',
                        eps: float = 1e-6) -> torch.Tensor:
    """Teacher-student discrepancy of multi-scale ``(B, C, H, W)`` features.

    Per stage ``k`` (teacher ``t``, student ``s``, same shape) a per-sample
    value ``d_k(b)`` is computed, then averaged over the stages (each stage
    counts the same, whatever its resolution or width):

    * ``'mse'``: both features are standardised with the *teacher's*
      per-sample, per-channel statistics over the spatial positions,
      ``mu = mean_{H,W} t``, ``sigma = sqrt(var_{H,W} t + eps)``
      (population variance), *detached*::

          d_k(b) = mean_{C,H,W} ((s - mu) / sigma - (t - mu) / sigma)^2

      Swin's stages (and FPN levels) have very different magnitudes; the
      standardisation makes every channel of every stage count alike and
      measures the student's error in units of the teacher's own spread.
      The statistics are constants (no gradient through them), so the
      measure is a plain weighted MSE in ``s`` (and in ``t``).  Identical
      features give exactly 0.
    * ``'kl'``: at every spatial position, the softmax over channels with
      temperature ``tau``, ``p = softmax(t / tau)``, ``q = softmax(s /
      tau)``, and ``KL(p || q) = sum_c p_c (log p_c - log q_c)``, averaged
      over the positions and multiplied by ``tau^2`` (Hinton's factor, which
      keeps the gradient magnitude independent of ``tau``)::

          d_k(b) = tau^2 * mean_{H,W} KL(p || q)

      The raw (un-standardised) features are used: the channel softmax is
      what a 1x1 classifier over the features would see.

    Args:
        t_feats, s_feats: a ``(B, C, H, W)`` tensor or a list of them (one
            per stage); the lists must match in length and shapes.
        measure: ``'mse'`` or ``'kl'``.
        tau: KL temperature (``'kl'`` only).
        reduction: ``'mean'`` (scalar, mean over the batch), ``'sum'``
            (sum over the batch) or ``'none'`` (``(B,)``, e.g. to pick the
            hard samples).
        eps: added to the teacher variance (``'mse'``).

    The teacher is not detached (the sample step of PSAQ-ViT V2 needs its
    gradient to the pixels); run it under ``no_grad`` when it is a target.
    """
    if measure not in MEASURES:
        raise ValueError(f'feature_discrepancy: measure must be one of '
                         f'{MEASURES}, got {measure!r}')
    if reduction not in ('mean', 'sum', 'none'):
        raise ValueError("feature_discrepancy: reduction must be 'mean', "
                         f"'sum' or 'none', got {reduction!r}")
    t_list, s_list = _as_list(t_feats), _as_list(s_feats)
    if len(t_list) != len(s_list) or not t_list:
        raise ValueError('feature_discrepancy: teacher and student need the '
                         'same, non-zero number of feature maps, got '
                         f'{len(t_list)} and {len(s_list)}')
    per_stage = []
    for k, (t, s) in enumerate(zip(t_list, s_list)):
        if t.shape != s.shape or t.dim() != 4:
            raise ValueError(
                f'feature_discrepancy: stage {k}: teacher {tuple(t.shape)} '
                f'and student {tuple(s.shape)} must be equal (B, C, H, W)')
        t = t if t.dtype == torch.float64 else t.float()
        s = s.to(t.dtype)
        if measure == 'mse':
            td = t.detach()
            mu = td.mean(dim=(2, 3), keepdim=True)
            sigma = (td.var(dim=(2, 3), unbiased=False, keepdim=True) +
                     eps).sqrt()
            d = ((s - t) / sigma).pow(2).mean(dim=(1, 2, 3))
        else:
            log_p = F.log_softmax(t / tau, dim=1)
            log_q = F.log_softmax(s / tau, dim=1)
            kl = (log_p.exp() * (log_p - log_q)).sum(dim=1)  # (B, H, W)
            d = kl.mean(dim=(1, 2)) * (tau * tau)
        per_stage.append(d)
    per_sample = torch.stack(per_stage, 0).mean(0)  # (B,)
    if reduction == 'none':
        return per_sample
    if reduction == 'sum':
        return per_sample.sum()
    return per_sample.mean()


# --------------------------------------------------------------------------
# model helpers
# --------------------------------------------------------------------------
def get_neck(model: nn.Module) -> Optional[nn.Module]:
    """The model's neck, or None (mmseg models without one, bare models)."""
    neck = getattr(model, 'neck', None)
    return neck if isinstance(neck, nn.Module) else None


def adapted_modules(model: nn.Module,
                    include_neck: bool = False) -> List[nn.Module]:
    """``[backbone]`` or ``[backbone, neck]`` (when present)."""
    mods = [get_backbone(model)]
    neck = get_neck(model) if include_neck else None
    if neck is not None:
        mods.append(neck)
    return mods


def extract_features(model: nn.Module, x: torch.Tensor,
                     include_neck: bool = False) -> List[torch.Tensor]:
    """``model.backbone(x)`` (then ``model.neck``) as a list of maps."""
    feats = get_backbone(model)(x)
    neck = get_neck(model) if include_neck else None
    if neck is not None:
        feats = neck(tuple(_as_list(feats)))
    return _as_list(feats)


def _device_of(model: nn.Module) -> torch.device:
    p = next(get_backbone(model).parameters(), None)
    return p.device if p is not None else torch.device('cpu')


@torch.no_grad()
def mean_discrepancy(teacher: nn.Module,
                     student: nn.Module,
                     images: torch.Tensor,
                     include_neck: bool = False,
                     measure: str = 'mse',
                     tau: float = 1.0,
                     batch_size: int = 8,
                     reduction: str = 'mean') -> torch.Tensor:
    """:func:`feature_discrepancy` over an image pool (no gradient).

    Both models are run in eval mode (their modes are restored).  Returns a
    CPU scalar (``'mean'`` over the images) or ``(N,)`` (``'none'``).
    """
    with frozen_modules(adapted_modules(teacher, include_neck) +
                        adapted_modules(student, include_neck)):
        device = _device_of(student)
        t_device = _device_of(teacher)
        out = []
        for i in range(0, len(images), max(1, int(batch_size))):
            x = images[i:i + batch_size]
            t = extract_features(teacher, x.to(t_device), include_neck)
            s = extract_features(student, x.to(device), include_neck)
            t = [f.to(device) for f in t]
            out.append(
                feature_discrepancy(t, s, measure, tau,
                                    reduction='none').cpu())
    per_sample = torch.cat(out)
    return per_sample if reduction == 'none' else per_sample.mean()


@contextlib.contextmanager
def frozen_modules(modules: Sequence[nn.Module], trainable=()):
    """Eval mode, ``with_cp=False``, ``requires_grad=False`` inside.

    Every parameter of ``modules`` is frozen except those in ``trainable``
    (parameters or other leaf tensors, e.g. quantizer scales), which are
    made trainable.  Modes, ``with_cp`` flags, ``requires_grad`` flags are
    restored on exit, and the ``.grad`` of the trainable tensors is dropped.
    Gradient checkpointing is switched off because its recompute would run
    the attention hooks a second time (and, reentrant, under ``no_grad``).
    """
    modes, grads, cps = {}, {}, {}
    for mod in modules:
        for m in mod.modules():
            modes[m] = m.training
            if isinstance(getattr(m, 'with_cp', None), bool):
                cps[m] = m.with_cp
        for p in mod.parameters():
            grads[p] = p.requires_grad
    trainable = list(trainable)
    for t in trainable:
        grads.setdefault(t, t.requires_grad)
    try:
        for m in modes:
            m.training = False
        for m in cps:
            m.with_cp = False
        for p in grads:
            p.requires_grad_(False)
        for t in trainable:
            t.requires_grad_(True)
        yield
    finally:
        for t in trainable:
            t.grad = None
        for m, mode in modes.items():
            m.training = mode
        for m, cp in cps.items():
            m.with_cp = cp
        for p, g in grads.items():
            p.requires_grad_(g)


def trainable_scales(modules: Sequence[nn.Module]
                     ) -> List[Tuple[str, Quantizer]]:
    """``(name, quantizer)`` of the quantizers whose ``scale`` can learn.

    Those that are calibrated and quantizing, with a calibrated scale that
    enters the forward: per-token quantizers (qparams from the data),
    log-domain softmax quantizers (no scale) and fixed-range ``[0, 1]``
    uniform softmax quantizers (nothing calibrated) are left out.
    """
    out, seen = [], set()
    for k, mod in enumerate(modules):
        for name, q in mod.named_modules():
            if not isinstance(q, Quantizer) or id(q) in seen:
                continue
            seen.add(id(q))
            if q.state != 'quantizing' or not q.calibrated or \
                    q.granularity == 'token' or \
                    getattr(q, 'mode', 'uniform') != 'uniform' or \
                    not getattr(q, 'needs_calibration', True):
                continue
            out.append((f'{k}.{name}', q))
    return out


# --------------------------------------------------------------------------
# student step
# --------------------------------------------------------------------------
class StudentStep:
    """Optimise the quantized student towards the FP teacher on images.

    Each of ``iters`` iterations draws ``batch_size`` images of the pool
    (order from a ``torch.Generator`` seeded with ``seed``: consecutive
    random permutations of the pool, so every image is used once before any
    is used again), runs the frozen teacher (no gradient) and the student,
    and takes one optimiser step on the student's trainable tensors:

    * ``params='weights'``: every parameter of the student's backbone (and
      neck with ``include_neck``); the fake quantizers pass straight-through
      gradients to the weights; their scales stay as calibrated.
    * ``params='qparams'``: the ``scale`` of every calibrated quantizer of
      those parts (see :func:`trainable_scales`), made trainable through
      ``requires_grad`` (LSQ-style gradient of
      :func:`~dfq_dense.quant.fake_quant.fake_quantize`); zero points stay
      fixed.  After every step the scales are clamped to ``>= min_scale``.
    * ``'both'``: both groups (the scales with ``qparam_lr``).

    Everything else of the student is frozen.  The student is kept in eval
    mode throughout (no dropout / drop-path noise; Swin has no BatchNorm, a
    neck's BatchNorm statistics stay frozen).  ``requires_grad`` flags,
    modes and ``with_cp`` flags are restored afterwards.

    Losses (``loss``):

    * ``'feature'``: ``feature_weight *`` :func:`feature_discrepancy`
      (``measure``, ``tau``) between the teacher's and the student's
      backbone outputs (neck outputs with ``include_neck``).
    * ``'mimiq'``: MimiQ's distillation, ``structure_weight *``
      :func:`~dfq_dense.synth.mimiq.headwise_structure_loss` between the
      per-head ``attn @ v`` outputs of every window attention of the two
      backbones (:class:`~dfq_dense.synth.hooks.AttnOutputRecorder` with
      ``average_heads=False``, padding tokens masked) ``+ feature_weight *``
      feature discrepancy.  MimiQ's ``KL(student || teacher)`` on class
      logits has no counterpart at the backbone level of a detector or
      segmentor; the feature discrepancy takes its place (``measure='kl'``
      gives the closest analogue, a KL over channels at every position).

    Weight decay applies to the weights only (decaying a scale shrinks the
    quantization grid).  SGD with LSQ scale gradients (sums over whole
    tensors) needs a tiny ``qparam_lr``; Adam normalises them.

    Args:
        params: ``'weights'``, ``'qparams'`` or ``'both'``.
        optimizer: ``'adam'`` or ``'sgd'``.
        lr: learning rate of the weights (and of the scales, unless
            ``qparam_lr`` is given).
        qparam_lr: learning rate of the scales.
        momentum, nesterov: SGD settings.
        betas: Adam settings.
        weight_decay: L2 / Adam weight decay of the weights.
        iters: optimiser steps per :meth:`run`.
        batch_size: images per step.
        include_neck: adapt the neck too and measure the feature
            discrepancy on the neck outputs (no-op without a neck).
        loss: ``'feature'`` or ``'mimiq'``.
        measure, tau: :func:`feature_discrepancy` settings.
        feature_weight, structure_weight: loss weights (1.0 and 10.0, the
            latter MimiQ's weight of its structure term).
        min_scale: lower clamp of the trained scales.
        grad_clip: max global gradient norm (None = no clipping).
        seed: seed of the batch order (``run(seed=...)`` overrides it).
        log_interval: log every this many steps (and the first and last).
        name: prefix of the log lines.
    """

    def __init__(self,
                 params: str = 'weights',
                 optimizer: str = 'adam',
                 lr: float = 1e-5,
                 qparam_lr: Optional[float] = None,
                 momentum: float = 0.9,
                 nesterov: bool = False,
                 betas: Tuple[float, float] = (0.9, 0.999),
                 weight_decay: float = 0.0,
                 iters: int = 50,
                 batch_size: int = 8,
                 include_neck: bool = False,
                 loss: str = 'feature',
                 measure: str = 'mse',
                 tau: float = 1.0,
                 feature_weight: float = 1.0,
                 structure_weight: float = 10.0,
                 min_scale: float = 1e-8,
                 grad_clip: Optional[float] = None,
                 seed: int = 0,
                 log_interval: int = 10,
                 name: str = 'StudentStep'):
        if params not in STUDENT_PARAMS:
            raise ValueError(f'StudentStep: params must be one of '
                             f'{STUDENT_PARAMS}, got {params!r}')
        optimizer = str(optimizer).lower()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f'StudentStep: optimizer must be one of '
                             f'{OPTIMIZERS}, got {optimizer!r}')
        if loss not in STUDENT_LOSSES:
            raise ValueError(f'StudentStep: loss must be one of '
                             f'{STUDENT_LOSSES}, got {loss!r}')
        if measure not in MEASURES:
            raise ValueError(f'StudentStep: measure must be one of '
                             f'{MEASURES}, got {measure!r}')
        if int(iters) < 0 or int(batch_size) < 1:
            raise ValueError('StudentStep: iters must be >= 0 and '
                             'batch_size >= 1')
        self.params = params
        self.optimizer = optimizer
        self.lr = float(lr)
        self.qparam_lr = self.lr if qparam_lr is None else float(qparam_lr)
        self.momentum = float(momentum)
        self.nesterov = bool(nesterov)
        self.betas = tuple(betas)
        self.weight_decay = float(weight_decay)
        self.iters = int(iters)
        self.batch_size = int(batch_size)
        self.include_neck = bool(include_neck)
        self.loss = loss
        self.measure = measure
        self.tau = float(tau)
        self.feature_weight = float(feature_weight)
        self.structure_weight = float(structure_weight)
        self.min_scale = float(min_scale)
        self.grad_clip = grad_clip
        self.seed = int(seed)
        self.log_interval = max(1, int(log_interval))
        self.name = name
        self.history: List[Dict] = []
        # An mmengine Visualizer (e.g. the runner's) that also receives the
        # logged terms; set by the caller.
        self.visualizer = None
        self._vis_step = 0

    @classmethod
    def build(cls, cfg: Union[None, dict, 'StudentStep'] = None,
              **defaults) -> 'StudentStep':
        """From a config dict (``defaults`` fill the missing keys)."""
        if isinstance(cfg, StudentStep):
            return cfg
        kwargs = dict(defaults)
        kwargs.update(dict(cfg or {}))
        kwargs.pop('type', None)
        return cls(**kwargs)

    # --------------------------------------------------------------- helpers
    def _optimizer(self, weights, scales):
        groups = []
        if weights:
            groups.append(dict(params=weights, lr=self.lr,
                               weight_decay=self.weight_decay))
        if scales:
            groups.append(dict(params=scales, lr=self.qparam_lr,
                               weight_decay=0.0))
        if self.optimizer == 'adam':
            return torch.optim.Adam(groups, lr=self.lr, betas=self.betas)
        return torch.optim.SGD(groups, lr=self.lr, momentum=self.momentum,
                               nesterov=self.nesterov and self.momentum > 0)

    def batch_indices(self, num_images: int,
                      generator: torch.Generator) -> List[torch.Tensor]:
        """The ``iters`` index batches (consecutive random permutations)."""
        bs = min(self.batch_size, num_images)
        out, buf = [], torch.empty(0, dtype=torch.long)
        for _ in range(self.iters):
            if len(buf) < bs:
                buf = torch.cat([buf, torch.randperm(num_images,
                                                     generator=generator)])
            out.append(buf[:bs])
            buf = buf[bs:]
        return out

    # ------------------------------------------------------------------- run
    def run(self, teacher: nn.Module, student: nn.Module,
            images: torch.Tensor, seed: Optional[int] = None,
            tag: str = '') -> Dict:
        """Run ``iters`` steps on ``images`` (normalised ``(N, 3, H, W)``).

        ``teacher`` and ``student`` are full models (``.backbone``, optional
        ``.neck``).  Returns ``dict(loss_first, loss_last, iters,
        num_weights, num_scales)``; the per-step terms are appended to
        ``self.history`` (and logged).
        """
        if len(images) == 0:
            raise ValueError('StudentStep.run: no images')
        s_mods = adapted_modules(student, self.include_neck)
        t_mods = adapted_modules(teacher, self.include_neck)
        weights, scales, qnames = [], [], []
        if self.params in ('weights', 'both'):
            seen = set()
            for m in s_mods:
                for p in m.parameters():
                    if id(p) not in seen:
                        seen.add(id(p))
                        weights.append(p)
        if self.params in ('qparams', 'both'):
            for name, q in trainable_scales(s_mods):
                scales.append(q.scale)
                qnames.append(name)
        if not weights and not scales:
            raise ValueError(
                f'StudentStep(params={self.params!r}): nothing to train '
                '(no calibrated quantizer / no parameter in the adapted '
                'parts of the student)')
        generator = torch.Generator().manual_seed(
            self.seed if seed is None else int(seed))
        batches = self.batch_indices(len(images), generator)
        device, t_device = _device_of(student), _device_of(teacher)
        hub = MessageHub.get_current_instance()
        summary = dict(loss_first=None, loss_last=None, iters=self.iters,
                       num_weights=len(weights), num_scales=len(scales))
        t_rec = s_rec = heads = None
        with frozen_modules(t_mods), \
                frozen_modules(s_mods, trainable=weights + scales):
            opt = self._optimizer(weights, scales)
            try:
                if self.loss == 'mimiq':
                    t_rec = AttnOutputRecorder(get_backbone(teacher),
                                               average_heads=False)
                    s_rec = AttnOutputRecorder(get_backbone(student),
                                               average_heads=False)
                    heads = [m.w_msa.num_heads for _, m in s_rec.modules]
                for it, idx in enumerate(batches):
                    x = images[idx]
                    terms = self._step(teacher, student, x, t_device, device,
                                       opt, t_rec, s_rec, heads,
                                       weights + scales, scales)
                    if summary['loss_first'] is None:
                        summary['loss_first'] = terms['loss']
                    summary['loss_last'] = terms['loss']
                    if (it + 1) % self.log_interval == 0 or it == 0 or \
                            it + 1 == self.iters:
                        self._log(dict(tag=tag, iter=it + 1, **terms), hub)
            finally:
                for rec in (t_rec, s_rec):
                    if rec is not None:
                        rec.remove()
        return summary

    def _step(self, teacher, student, x, t_device, device, opt, t_rec,
              s_rec, heads, trainable, scales) -> Dict:
        with torch.no_grad():
            if t_rec is not None:
                t_rec.clear()
            t_feats = extract_features(teacher, x.to(t_device),
                                       self.include_neck)
            t_feats = [f.to(device) for f in t_feats]
        if s_rec is not None:
            s_rec.clear()
        s_feats = extract_features(student, x.to(device), self.include_neck)
        loss_feat = feature_discrepancy(t_feats, s_feats, self.measure,
                                        self.tau)
        loss = self.feature_weight * loss_feat
        loss_struct = None
        if t_rec is not None:
            t_records = [dict(r, feat=r['feat'].to(device),
                              valid=r['valid'].to(device))
                         for r in t_rec.records]
            loss_struct = headwise_structure_loss_records(
                t_records, s_rec.records, heads)
            t_rec.clear()
            s_rec.clear()
            loss = loss + self.structure_weight * loss_struct
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(trainable, float(self.grad_clip))
        opt.step()
        if scales:
            with torch.no_grad():
                for s in scales:
                    s.clamp_(min=self.min_scale)
        terms = dict(loss=loss.item(), loss_feature=loss_feat.item())
        if loss_struct is not None:
            terms['loss_structure'] = loss_struct.item()
        return terms

    def _log(self, log: Dict, hub) -> None:
        log = dict(phase='student', **log)
        self.history.append(log)
        scalars = {f'adapt/student_{k}': log[k]
                   for k in ('loss', 'loss_feature', 'loss_structure')
                   if k in log}
        for k, v in scalars.items():
            hub.update_scalar(k, v)
        self._vis_step += 1
        add_scalars(self.visualizer, scalars, self._vis_step)
        msg = ' '.join(f'{k} {log[k]:.5f}' for k in
                       ('loss', 'loss_feature', 'loss_structure') if k in log)
        tag = f' {log["tag"]}' if log.get('tag') else ''
        print_log(f'[{self.name}]{tag} iter {log["iter"]}/{self.iters} '
                  f'{msg}', logger='current')


def add_scalars(visualizer, scalars: Dict[str, float], step: int) -> None:
    """``visualizer.add_scalars(scalars, step=step)`` if one is given."""
    if visualizer is not None and scalars:
        visualizer.add_scalars(scalars, step=step)


def headwise_structure_loss_records(t_records: Sequence[Dict],
                                    s_records: Sequence[Dict],
                                    num_heads: Sequence[int]) -> torch.Tensor:
    """:func:`~dfq_dense.synth.mimiq.headwise_structure_loss` over the
    :class:`AttnOutputRecorder` (``average_heads=False``) records of the
    teacher and the student (same layers, same order), mean over layers."""
    from .mimiq import headwise_structure_loss
    if len(t_records) != len(s_records) or len(t_records) != len(num_heads) \
            or not t_records:
        raise ValueError(
            'headwise_structure_loss_records: got '
            f'{len(t_records)} teacher and {len(s_records)} student records '
            f'for {len(num_heads)} attention layers (were both backbones run '
            'once inside their recorders?)')
    return headwise_structure_loss(t_records, s_records, list(num_heads))
