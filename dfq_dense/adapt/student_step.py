"""The student step: optimise the quantized student towards the frozen
full-precision teacher on a set of (synthetic) images, and the model helpers
it shares with the adapters.

* :class:`StudentStep`: a few optimisation steps of the student's weights,
  its quantizer scales, or both (PSAQ-ViT V2's student step, MimiQ's
  distillation);
* :func:`extract_features`: what the teacher and the student are compared
  on: the multi-scale outputs of a model's backbone (optionally followed by
  its neck), as a list of ``(B, C, H, W)``, or the class logits ``(B, K)``
  of a classifier backbone (a timm classifier, ``outputs='classifier'``;
  :func:`resolve_outputs`);
* :func:`mean_discrepancy`: the discrepancy averaged over an image pool;
* :func:`frozen_modules`, :func:`trainable_scales`, :func:`adapted_modules`,
  :func:`get_neck`, :func:`add_scalars`.

Models here are full mmdet/mmseg models (``.backbone`` and optionally
``.neck``) or :class:`~dfq_dense.cls.TimmClassifier` models (``.backbone``
the whole timm classifier); the teacher is the full-precision model, the
student its fake-quantized copy (see :mod:`dfq_dense.quant`).
"""
import contextlib
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from mmengine.logging import MessageHub, print_log
from torch import nn

from ..quant.quantizer import Quantizer
from ..synth.base import get_backbone
from ..synth.feature_targets import classifier_num_classes
from ..synth.hooks import AttnOutputRecorder
from .base import check_choice
from .losses import (MEASURES, _as_list, feature_discrepancy,
                     headwise_structure_loss_records)

__all__ = [
    'extract_features', 'mean_discrepancy', 'get_neck', 'adapted_modules',
    'trainable_scales', 'frozen_modules', 'StudentStep', 'add_scalars',
    'resolve_outputs', 'is_classifier', 'timm_feature_map',
    'STUDENT_PARAMS', 'STUDENT_LOSSES', 'OUTPUTS'
]

STUDENT_PARAMS = ('weights', 'qparams', 'both')
STUDENT_LOSSES = ('feature', 'mimiq')
OPTIMIZERS = ('adam', 'sgd')
#: What the teacher and the student are compared on (see
#: :func:`resolve_outputs`).
OUTPUTS = ('auto', 'classifier', 'features')


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


def is_classifier(backbone: nn.Module) -> bool:
    """Whether ``backbone`` outputs class logits (a timm classifier, the
    ``backbone`` of a :class:`~dfq_dense.cls.TimmClassifier`)."""
    try:
        classifier_num_classes(backbone)
    except ValueError:
        return False
    return True


def resolve_outputs(owner: str, outputs: str, measure: Optional[str],
                    model: nn.Module) -> Tuple[str, str]:
    """``(kind, measure)``: what ``owner`` compares teacher and student on
    for ``model``, and with which measure.

    ``outputs``: ``'classifier'``: the class logits of a classifier
    backbone (a timm classifier), as the methods' papers do on ImageNet;
    ``'features'``: backbone-level feature maps (the backbone's multi-scale
    outputs for mmdet / mmseg, :func:`timm_feature_map` for a timm
    classifier: the variant of the dense track); ``'auto'``:
    ``'classifier'`` when the backbone outputs class logits, else
    ``'features'``.  ``measure`` None: ``'kl'`` on logits (the KL
    divergence of the class probabilities), ``'mse'`` on feature maps.

    Raises:
        ValueError: ``'classifier'`` for a backbone without class logits,
            or ``measure='mse'`` on logits (it standardises every channel
            over the positions of a map; logits have no positions).
    """
    check_choice(owner, 'outputs', outputs, OUTPUTS)
    backbone = get_backbone(model)
    if outputs == 'classifier':
        try:
            classifier_num_classes(backbone)
        except ValueError as err:
            raise ValueError(
                f"{owner}: outputs='classifier' needs class logits: {err}; "
                "use outputs='features'") from None
        kind = 'classifier'
    elif outputs == 'auto':
        kind = 'classifier' if is_classifier(backbone) else 'features'
    else:
        kind = 'features'
    if measure is None:
        measure = 'kl' if kind == 'classifier' else 'mse'
    if kind == 'classifier' and measure == 'mse':
        raise ValueError(
            f"{owner}: measure='mse' standardises feature-map channels over "
            "their positions, class logits have none; use measure='kl' (or "
            "None) on the logits, or outputs='features'")
    return kind, measure


def timm_feature_map(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The backbone-level features of a timm classifier as one ``(B, C, H,
    W)`` map: ``forward_features`` (the last stage after the final norm,
    before pooling and head); Swin's ``NHWC`` map permuted, a ViT's /
    DeiT's tokens without the prefix (CLS) tokens laid out on the patch
    grid."""
    f = backbone.forward_features(x)
    if f.dim() == 4:
        if getattr(backbone, 'output_fmt', 'NCHW') == 'NHWC':
            f = f.permute(0, 3, 1, 2)
        return f
    if f.dim() != 3:
        raise ValueError(f'timm_feature_map: {type(backbone).__name__} '
                         f'features {tuple(f.shape)} are not a map or tokens')
    f = f[:, int(getattr(backbone, 'num_prefix_tokens', 0) or 0):]
    n = f.shape[1]
    embed = getattr(backbone, 'patch_embed', None)
    grid = tuple(getattr(embed, 'grid_size', None) or ())
    if len(grid) != 2 or grid[0] * grid[1] != n:
        grid = (x.shape[-2] // embed.patch_size[0],
                x.shape[-1] // embed.patch_size[1]) if embed is not None \
            else (1, n)
        if grid[0] * grid[1] != n:
            grid = (1, n)
    return f.transpose(1, 2).reshape(f.shape[0], f.shape[2], *grid)


def extract_features(model: nn.Module, x: torch.Tensor,
                     include_neck: bool = False,
                     outputs: str = 'features') -> List[torch.Tensor]:
    """What teacher and student are compared on, as a list: with
    ``outputs='features'`` ``model.backbone(x)`` (then ``model.neck``) as
    a list of maps, or a timm classifier's :func:`timm_feature_map`; with
    ``'classifier'`` ``[model.backbone(x)]``, the ``(B, K)`` logits of a
    classifier backbone; ``'auto'`` as :func:`resolve_outputs`."""
    backbone = get_backbone(model)
    if outputs == 'auto':
        outputs = 'classifier' if is_classifier(backbone) else 'features'
    if outputs == 'classifier':
        return [backbone(x)]
    if is_classifier(backbone):
        return [timm_feature_map(backbone, x)]
    feats = backbone(x)
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
                     reduction: str = 'mean',
                     outputs: str = 'features') -> torch.Tensor:
    """:func:`feature_discrepancy` over an image pool (no gradient), on
    what :func:`extract_features` gives for ``outputs``.

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
            t = extract_features(teacher, x.to(t_device), include_neck,
                                 outputs)
            s = extract_features(student, x.to(device), include_neck,
                                 outputs)
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
      (``measure``, ``tau``) between what the teacher and the student
      output (``outputs``, :func:`resolve_outputs`): the backbone outputs
      of a detector or segmentor (neck outputs with ``include_neck``); the
      class logits of a timm classifier (default there: the KL divergence
      of the class probabilities, knowledge distillation on the logits),
      or its backbone-level feature map with ``outputs='features'``.
    * ``'mimiq'``: MimiQ's distillation, ``structure_weight *``
      :func:`~dfq_dense.adapt.losses.headwise_structure_loss` between the
      per-head ``attn @ v`` outputs of every attention of the two
      backbones (:class:`~dfq_dense.synth.hooks.AttnOutputRecorder` with
      ``average_heads=False``, padding tokens masked; mmdet / mmseg Swin
      windows, timm Swin windows, timm ViT / DeiT's global attention, CLS
      token included) ``+ feature_weight *`` that discrepancy.  MimiQ's KL
      divergence on class logits is the logits' KL on a timm classifier;
      it has no counterpart at the backbone level of a detector or
      segmentor, where the feature discrepancy takes its place
      (``measure='kl'`` gives the closest analogue, a KL over channels at
      every position).

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
        outputs: ``'auto'`` (the class logits of a classifier backbone,
            else the backbone's feature maps), ``'classifier'`` or
            ``'features'`` (:func:`resolve_outputs`).
        measure, tau: :func:`feature_discrepancy` settings (``measure``
            None: ``'kl'`` on logits, ``'mse'`` on feature maps).
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
                 measure: Optional[str] = None,
                 tau: float = 1.0,
                 outputs: str = 'auto',
                 feature_weight: float = 1.0,
                 structure_weight: float = 10.0,
                 min_scale: float = 1e-8,
                 grad_clip: Optional[float] = None,
                 seed: int = 0,
                 log_interval: int = 10,
                 name: str = 'StudentStep'):
        check_choice('StudentStep', 'params', params, STUDENT_PARAMS)
        optimizer = str(optimizer).lower()
        check_choice('StudentStep', 'optimizer', optimizer, OPTIMIZERS)
        check_choice('StudentStep', 'loss', loss, STUDENT_LOSSES)
        check_choice('StudentStep', 'measure', measure, (None, ) + MEASURES)
        check_choice('StudentStep', 'outputs', outputs, OUTPUTS)
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
        self.outputs = outputs
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
        self._outputs, self._measure = resolve_outputs(
            self.name, self.outputs, self.measure, student)
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
                    heads = [site.num_heads for site in s_rec.sites]
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
                                       self.include_neck, self._outputs)
            t_feats = [f.to(device) for f in t_feats]
        if s_rec is not None:
            s_rec.clear()
        s_feats = extract_features(student, x.to(device), self.include_neck,
                                   self._outputs)
        loss_feat = feature_discrepancy(t_feats, s_feats, self._measure,
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
