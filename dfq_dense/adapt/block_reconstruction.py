"""SPDFQ's "quantized-network learning": BRECQ-style block reconstruction.

SPDFQ (later SARDFQ) quantizes a ViT with a RepQ-ViT / I&S-ViT-style
quantizer, calibrates it on its synthetic images and then reconstructs it
block by block on the same images: for each transformer block in forward
order, the quantization parameters of the block are optimised so that the
quantized block reproduces the full-precision block's output (paper
setting: Adam, lr 4e-5, 100 iterations per block, 32 synthetic images).
There is no official code; :class:`BlockReconstruction` implements that
description at the backbone (and optionally neck) level of mmdet / mmseg
Swin models, and on timm Swin and ViT / DeiT classifiers (the
classification track: the whole classifier, its head included).  See the
class docstring for every choice made.
"""
import contextlib
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from mmengine.logging import print_log
from torch import nn

from ..quant.modules import clear_quant_caches
from ..quant.quantizer import Quantizer
from ..registry import ADAPTERS
from .base import BaseAdapter, check_choice

__all__ = ['BlockReconstruction', 'reconstruction_units', 'learnable_scales',
           'RECON_PARAMS', 'RECON_INPUTS', 'RECON_LOSSES']

RECON_PARAMS = ('qparams', 'both', 'weights')
RECON_INPUTS = ('quantized', 'fp')
RECON_LOSSES = ('mse', )

Acts = Tuple[torch.Tensor, ...]


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------
def learnable_scales(module: nn.Module) -> List[Tuple[str, Quantizer]]:
    """``(name, quantizer)`` of the quantizers under ``module`` whose
    ``scale`` is a calibrated quantity that enters the forward.

    Left out: quantizers that are not quantizing or were never calibrated
    (they are identities), per-token quantizers (their qparams come from
    the data at every forward), log-domain softmax quantizers (no scale)
    and fixed-grid ``[0, 1]`` uniform softmax quantizers (nothing was
    calibrated).
    """
    out = []
    for name, q in module.named_modules():
        if not isinstance(q, Quantizer):
            continue
        if q.state != 'quantizing' or not q.calibrated or \
                q.granularity == 'token' or \
                getattr(q, 'mode', 'uniform') != 'uniform' or \
                not getattr(q, 'needs_calibration', True):
            continue
        out.append((name, q))
    return out


class _Unit:
    """One step of the walk through the model (see
    :func:`reconstruction_units`)."""

    def __init__(self, name: str, kind: str, s_mod: nn.Module,
                 t_mod: nn.Module, learn: bool, index: int = -1,
                 arch: str = 'mm'):
        self.name = name
        # patch_embed / block / downsample / output / neck / head
        self.kind = kind
        self.s_mod = s_mod  # the student module whose parameters learn
        self.t_mod = t_mod
        self.learn = learn
        self.index = index  # stage index of an 'output' unit
        # 'mm' (mmdet / mmseg Swin), 'timm_swin' or 'timm_vit'
        self.arch = arch

    def __repr__(self):
        return f'_Unit({self.name!r}, {self.kind!r}, learn={self.learn})'


def _backbone(model: nn.Module) -> nn.Module:
    bb = getattr(model, 'backbone', None)
    if not isinstance(bb, nn.Module):
        raise ValueError(f'BlockReconstruction: {type(model).__name__} has '
                         'no `.backbone`')
    return bb


def _neck(model: nn.Module) -> Optional[nn.Module]:
    neck = getattr(model, 'neck', None)
    return neck if isinstance(neck, nn.Module) else None


def _check_swin(bb: nn.Module, who: str):
    stages = getattr(bb, 'stages', None)
    if not isinstance(getattr(bb, 'patch_embed', None), nn.Module) or \
            stages is None or not len(stages) or \
            not all(hasattr(s, 'blocks') and hasattr(s, 'downsample')
                    for s in stages):
        raise ValueError(
            f'BlockReconstruction: the {who} backbone '
            f'({type(bb).__name__}) is not a Swin Transformer (mmdet / '
            'mmseg SwinTransformer: patch_embed, stages[i].blocks, '
            'stages[i].downsample) or a timm Swin / ViT classifier')


def _timm_arch(bb: nn.Module) -> Optional[str]:
    """``'timm_swin'`` / ``'timm_vit'`` for timm's Swin / ViT (DeiT)
    classifiers, else None."""
    try:
        from timm.models.swin_transformer import SwinTransformer
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:  # pragma: no cover
        return None
    if isinstance(bb, SwinTransformer):
        return 'timm_swin'
    if isinstance(bb, VisionTransformer):
        return 'timm_vit'
    return None


def _timm_units(t_bb: nn.Module, s_bb: nn.Module, arch: str,
                patch_embed: bool, downsample: bool,
                head: bool) -> List[_Unit]:
    """The walk through a timm classifier: ``patch_embed`` (ViT: with the
    CLS token, the position embedding and the pre-norm), then timm Swin's
    ``layers[i].downsample`` (before the stage's blocks, when it merges)
    and ``layers[i].blocks[j]``, or ViT's ``blocks[j]``, then ``head`` (the
    final norm, the pooling and the classifier)."""
    if type(t_bb) is not type(s_bb):
        raise ValueError('BlockReconstruction: the teacher and the student '
                         'are different timm models')
    units = [_Unit('backbone.patch_embed', 'patch_embed', s_bb.patch_embed,
                   t_bb.patch_embed, bool(patch_embed), arch=arch)]
    if arch == 'timm_swin':
        if len(s_bb.layers) != len(t_bb.layers) or any(
                len(a.blocks) != len(b.blocks)
                for a, b in zip(s_bb.layers, t_bb.layers)):
            raise ValueError('BlockReconstruction: the teacher and the '
                             'student backbones differ in their stages / '
                             'blocks')
        for i, (s_st, t_st) in enumerate(zip(s_bb.layers, t_bb.layers)):
            if not isinstance(s_st.downsample, nn.Identity):
                units.append(_Unit(f'backbone.layers.{i}.downsample',
                                   'downsample', s_st.downsample,
                                   t_st.downsample, bool(downsample),
                                   arch=arch))
            for j, (s_blk, t_blk) in enumerate(zip(s_st.blocks,
                                                   t_st.blocks)):
                units.append(_Unit(f'backbone.layers.{i}.blocks.{j}',
                                   'block', s_blk, t_blk, True, arch=arch))
    else:
        if len(s_bb.blocks) != len(t_bb.blocks):
            raise ValueError('BlockReconstruction: the teacher and the '
                             'student backbones differ in their blocks')
        for j, (s_blk, t_blk) in enumerate(zip(s_bb.blocks, t_bb.blocks)):
            units.append(_Unit(f'backbone.blocks.{j}', 'block', s_blk,
                               t_blk, True, arch=arch))
    units.append(_Unit('backbone.head', 'head', s_bb.head, t_bb.head,
                       bool(head), arch=arch))
    return units


def reconstruction_units(teacher: nn.Module, student: nn.Module,
                         patch_embed: bool = True, downsample: bool = True,
                         include_neck: bool = False,
                         head: bool = True) -> List[_Unit]:
    """The forward-order walk through a Swin model, one :class:`_Unit` per
    step: ``patch_embed`` (with the absolute position embedding and its
    dropout), every ``SwinBlock``, every ``PatchMerging`` (``downsample``),
    the output norms of the ``out_indices`` stages (``output``, only when
    the neck is reconstructed: they feed it) and the neck.  ``learn`` says
    whether the unit is reconstructed or only run to carry the
    activations to the next one.

    A timm Swin or ViT / DeiT classifier (the backbone of a
    :class:`~dfq_dense.cls.TimmClassifier`) is walked as timm runs it
    (:func:`_timm_units`), its classifier head last (``head``: whether
    it is reconstructed)."""
    s_bb, t_bb = _backbone(student), _backbone(teacher)
    arch = _timm_arch(s_bb)
    if arch is not None:
        return _timm_units(t_bb, s_bb, arch, patch_embed, downsample, head)
    _check_swin(s_bb, 'student')
    _check_swin(t_bb, 'teacher')
    if len(s_bb.stages) != len(t_bb.stages) or any(
            len(a.blocks) != len(b.blocks)
            for a, b in zip(s_bb.stages, t_bb.stages)):
        raise ValueError('BlockReconstruction: the teacher and the student '
                         'backbones differ in their stages / blocks')
    s_neck, t_neck = _neck(student), _neck(teacher)
    use_neck = include_neck and s_neck is not None and t_neck is not None
    outs = tuple(getattr(s_bb, 'out_indices', ()))
    units = [_Unit('backbone.patch_embed', 'patch_embed', s_bb.patch_embed,
                   t_bb.patch_embed, bool(patch_embed))]
    for i, (s_st, t_st) in enumerate(zip(s_bb.stages, t_bb.stages)):
        for j, (s_blk, t_blk) in enumerate(zip(s_st.blocks, t_st.blocks)):
            units.append(_Unit(f'backbone.stages.{i}.blocks.{j}', 'block',
                               s_blk, t_blk, True))
        if use_neck and i in outs:
            units.append(_Unit(f'backbone.norm{i}', 'output',
                               getattr(s_bb, f'norm{i}'),
                               getattr(t_bb, f'norm{i}'), False, index=i))
        if s_st.downsample is not None:
            if t_st.downsample is None:
                raise ValueError('BlockReconstruction: the teacher and the '
                                 'student backbones differ in stage '
                                 f'{i}\'s downsample')
            units.append(_Unit(f'backbone.stages.{i}.downsample',
                               'downsample', s_st.downsample,
                               t_st.downsample, bool(downsample)))
    if use_neck:
        units.append(_Unit('neck', 'neck', s_neck, t_neck, True))
    return units


def _device_of(module: nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device('cpu')


@contextlib.contextmanager
def _frozen(models: Sequence[nn.Module]):
    """Eval mode, ``with_cp=False`` and ``requires_grad=False`` for every
    module / parameter of ``models`` and every quantizer ``scale``; all
    restored on exit (the ``.grad`` of the scales too)."""
    modes, cps, flags = {}, {}, {}
    for model in models:
        for m in model.modules():
            modes[m] = m.training
            if isinstance(getattr(m, 'with_cp', None), bool):
                cps[m] = m.with_cp
            if isinstance(m, Quantizer) and torch.is_tensor(m.scale):
                flags.setdefault(m.scale, m.scale.requires_grad)
        for p in model.parameters():
            flags.setdefault(p, p.requires_grad)
    try:
        for m in modes:
            m.training = False
        for m in cps:
            m.with_cp = False
        for t in flags:
            if not t.is_inference():
                t.requires_grad_(False)
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode
        for m, cp in cps.items():
            m.with_cp = cp
        for t, flag in flags.items():
            if not t.is_inference():
                t.requires_grad_(flag)


def _take(acts: Acts, idx: torch.Tensor, device) -> Acts:
    return tuple(a[idx.to(a.device)].to(device) for a in acts)


def _chunk(acts: Acts, i: int, j: int, device) -> Acts:
    return tuple(a[i:j].to(device) for a in acts)


# --------------------------------------------------------------------------
# the adapter
# --------------------------------------------------------------------------
@ADAPTERS.register_module()
class BlockReconstruction(BaseAdapter):
    """BRECQ-style block-wise reconstruction of the quantized student.

    Walk: the Swin backbone in forward order, as *units*:
    ``patch_embed`` -> ``stages[0].blocks[0..]`` -> ``stages[0].downsample``
    -> ``stages[1].blocks[0..]`` -> ... (-> the neck with
    ``include_neck``).  Every ``SwinBlock`` is reconstructed as one unit
    (both its attention and its MLP, jointly: BRECQ's block granularity).
    BRECQ reconstructs *every* quantized layer, the layers inside a block
    jointly and those outside any block (the stem and the down-sampling
    layers of a ResNet) one by one; a Swin model's quantized layers outside
    the blocks are the patch embedding's Conv2d and the ``PatchMerging``
    Linear of every stage, so by default they are reconstructed too, each
    as a unit of its own (``reconstruct_patch_embed`` /
    ``reconstruct_downsample``).  Left as calibrated, their quantization
    error would reach the next block uncorrected, and a block can only
    partly make up for it.  A unit that is not reconstructed (or has
    nothing to learn) is still run, to carry the activations on.

    A timm classifier (the classification track: the ``backbone`` of a
    :class:`~dfq_dense.cls.TimmClassifier` is the whole timm model) is
    walked as its ``forward_features`` and ``forward_head`` run it:
    ``patch_embed`` (for a ViT / DeiT with the CLS token, the position
    embedding and the pre-norm, which hold no quantized layer), then timm
    Swin's ``layers[i].downsample`` (timm merges patches at the *start* of
    a stage) and ``layers[i].blocks[j]``, or ViT's ``blocks[j]`` (each a
    BRECQ block: attention and MLP jointly), then ``head``: the final
    norm, the pooling and the classifier, whose Linear is the last
    quantized layer (BRECQ reconstructs the last layer of a classifier on
    its own too), against the FP logits (``reconstruct_head``).  The
    tokens / maps between the units are timm's (``(B, H, W, C)`` for Swin,
    ``(B, N, C)`` with the CLS token for a ViT).  The learned module of the
    head unit is ``head`` (timm Swin's ``ClassifierHead``, a ViT's Linear),
    the final norm is run with the head but not learned with
    ``params='both'`` (it is not quantized).

    Per unit, with ``x_t`` the teacher's (FP) input to the unit, computed
    by the FP units before it on the images, and ``x_s`` the student's:

    * target: ``y = teacher_unit(x_t)``, the FP model's own output of the
      unit on the images (as BRECQ: the FP model run on the FP path);
    * input of the student unit (``input``): ``'quantized'`` (default):
      ``x_s``, the output of the already reconstructed quantized units
      before it (BRECQ's choice: the unit learns to also compensate the
      error it receives); ``'fp'``: ``x_t`` (each unit learns in
      isolation, on clean inputs);
    * loss (``loss='mse'``): ``mean((student_unit(x_in) - y)^2)`` over all
      elements of the mini-batch (per sample the mean over tokens and
      channels, then the mean over the samples; for the neck the mean of
      the per-level values).  BRECQ's ``lp_loss`` sums over one axis
      instead of averaging: a constant factor, which Adam's normalisation
      removes (up to its ``eps``);
    * learned (``params``): ``'qparams'`` (default): the ``scale`` of every
      weight and activation quantizer inside the unit that holds a
      calibrated scale (:func:`learnable_scales`: per-channel weight
      scales, per-tensor input / matmul-operand scales, a calibrated
      uniform softmax scale), with the LSQ-style straight-through gradient
      of :func:`~dfq_dense.quant.fake_quant.fake_quantize`; zero points
      are integers and stay fixed; weights are not touched (no AdaRound:
      SPDFQ's description optimises quantization parameters).  ``'both'``:
      also every parameter of the unit (linear / conv weights and biases,
      LayerNorm affines, the relative position bias table), with
      ``weight_lr`` (default ``lr``); ``'weights'``: only those.  After
      every step the scales are clamped to ``>= min_scale``;
    * optimiser: a fresh Adam per unit (``lr``, ``betas``, ``eps``, no
      weight decay), ``iters`` steps;
    * mini-batches: ``batch_size`` images per step (all of them when there
      are fewer), from a ``torch.Generator`` seeded with ``seed`` afresh for
      every unit (every unit sees the same batch sequence): consecutive
      random permutations of the images, so each image is used once before
      any is used twice.  With SPDFQ's 32 images and ``batch_size=32``
      every step sees all images.

    Everything outside the unit is frozen (its inputs are detached
    constants, the teacher is never trained).  During :meth:`run` both
    models are in eval mode (no dropout / drop-path; Swin has no
    BatchNorm, a neck's BatchNorm statistics stay frozen) with
    ``with_cp=False``; ``requires_grad`` flags, train/eval modes and
    ``with_cp`` flags are restored on exit.  Every unit's cached quantized
    weights / quantizer constants are dropped after its reconstruction
    (:func:`~dfq_dense.quant.modules.clear_quant_caches`).  The
    calibration is not redone: ``calibrate`` is accepted for the adapter
    interface and ignored.

    Memory: the activations of all images at the current point of the walk
    are held (on ``cache_device``; default the student's device), one unit
    at a time: the teacher's activation (which becomes the target, written
    over the input for a block with ``input='quantized'``) and the
    student's (updated in place through each block once the block is
    reconstructed); the activations of a unit are freed as soon as the
    next one has been computed.  A block therefore needs two ``(N, L, C)``
    float tensors (``input='quantized'``: the student's input and the
    target; ``input='fp'``: the teacher's input, which is also the
    student's, and the target), a shape-changing unit (patch embedding,
    patch merging) about one more for a moment.  Swin-T at 800x1333, 32
    images, stage 0: ``32 x 200*334 x 96`` floats = 0.82 GB per tensor.
    With ``include_neck`` the backbone
    outputs of both paths are kept until the neck (about twice the stage-0
    size per path).  Forward passes outside the optimisation run in chunks
    of ``batch_size`` images.  ``cache_device='cpu'`` keeps the
    activations in host memory (each mini-batch is then copied to the
    device).

    ``self.history``: one dict per reconstructed unit (``block``: its name
    in the student, ``kind``, ``loss_before`` / ``loss_after``: the loss
    above over all images before and after, ``iters``, ``num_scales``,
    ``num_weights``).

    Args:
        iters: Adam steps per unit (0: nothing changes).
        lr: learning rate of the scales (SPDFQ: 4e-5).
        batch_size: images per step and per forward chunk (SPDFQ: 32).
        params: ``'qparams'``, ``'both'`` or ``'weights'``.
        include_neck: reconstruct the neck too (one unit, after the
            backbone; its input is the backbone's outputs along the same
            path as ``input``); no-op without a neck.
        input: ``'quantized'`` or ``'fp'`` (see above).
        loss: ``'mse'``.
        seed: seed of the mini-batch order.
        log_interval: log the mini-batch loss every this many steps (and
            the first and last); 0: only one line per unit.
        reconstruct_patch_embed: reconstruct the patch embedding.
        reconstruct_downsample: reconstruct the ``PatchMerging`` layers.
        reconstruct_head: reconstruct a timm classifier's head (its
            final norm, pooling and classifier; the classifier Linear is
            the quantized layer).
        weight_lr: learning rate of the weights (``'both'`` /
            ``'weights'``), default ``lr``.
        betas, eps: Adam settings.
        min_scale: lower clamp of the learned scales.
        cache_device: where the activations of all images are held
            (default the student's device).
    """

    def __init__(self,
                 iters: int = 100,
                 lr: float = 4e-5,
                 batch_size: int = 32,
                 params: str = 'qparams',
                 include_neck: bool = False,
                 input: str = 'quantized',
                 loss: str = 'mse',
                 seed: int = 0,
                 log_interval: int = 50,
                 reconstruct_patch_embed: bool = True,
                 reconstruct_downsample: bool = True,
                 reconstruct_head: bool = True,
                 weight_lr: Optional[float] = None,
                 betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8,
                 min_scale: float = 1e-8,
                 cache_device: Optional[str] = None):
        check_choice('BlockReconstruction', 'params', params, RECON_PARAMS)
        check_choice('BlockReconstruction', 'input', input, RECON_INPUTS)
        check_choice('BlockReconstruction', 'loss', loss, RECON_LOSSES)
        if isinstance(iters, bool) or int(iters) != iters or iters < 0:
            raise ValueError('BlockReconstruction: iters must be an integer '
                             f'>= 0, got {iters!r}')
        if isinstance(batch_size, bool) or int(batch_size) != batch_size \
                or batch_size < 1:
            raise ValueError('BlockReconstruction: batch_size must be an '
                             f'integer >= 1, got {batch_size!r}')
        if not float(lr) > 0 or (weight_lr is not None
                                 and not float(weight_lr) > 0):
            raise ValueError('BlockReconstruction: lr / weight_lr must be '
                             '> 0')
        if not float(min_scale) > 0:
            raise ValueError('BlockReconstruction: min_scale must be > 0')
        self.iters = int(iters)
        self.lr = float(lr)
        self.batch_size = int(batch_size)
        self.params = params
        self.include_neck = bool(include_neck)
        self.input = input
        self.loss = loss
        self.seed = int(seed)
        self.log_interval = max(0, int(log_interval))
        self.reconstruct_patch_embed = bool(reconstruct_patch_embed)
        self.reconstruct_downsample = bool(reconstruct_downsample)
        self.reconstruct_head = bool(reconstruct_head)
        self.weight_lr = self.lr if weight_lr is None else float(weight_lr)
        self.betas = tuple(float(b) for b in betas)
        self.eps = float(eps)
        self.min_scale = float(min_scale)
        self.cache_device = cache_device
        self.history: List[Dict] = []
        # An mmengine Visualizer that also receives the per-unit losses;
        # set by the caller.
        self.visualizer = None

    # ------------------------------------------------------------ batches
    def batch_indices(self, num_images: int,
                      generator: torch.Generator) -> List[torch.Tensor]:
        """The ``iters`` index batches of one unit (consecutive random
        permutations of ``range(num_images)``)."""
        bs = min(self.batch_size, num_images)
        out, buf = [], torch.empty(0, dtype=torch.long)
        for _ in range(self.iters):
            if len(buf) < bs:
                buf = torch.cat([buf, torch.randperm(num_images,
                                                     generator=generator)])
            out.append(buf[:bs])
            buf = buf[bs:]
        return out

    # --------------------------------------------------------------- loss
    def unit_loss(self, outs: Acts, targets: Acts) -> torch.Tensor:
        """Per-sample loss ``(B,)``: mean squared error over each output
        tensor's non-batch elements, averaged over the output tensors."""
        per = []
        for o, t in zip(outs, targets):
            per.append((o.float() - t.float()).pow(2).flatten(1).mean(1))
        return per[0] if len(per) == 1 else torch.stack(per, 0).mean(0)

    # ------------------------------------------------------------ forward
    @staticmethod
    def _forward(unit: _Unit, model: nn.Module, acts: Acts,
                 hw: Optional[tuple], student: bool):
        """Run ``unit`` of ``model`` on ``acts``: ``(outputs, hw_shape)``."""
        mod = unit.s_mod if student else unit.t_mod
        if unit.arch != 'mm':
            return BlockReconstruction._forward_timm(unit, model, mod,
                                                     acts), hw
        if unit.kind == 'patch_embed':
            bb = _backbone(model)
            x, hw = mod(acts[0])
            if getattr(bb, 'use_abs_pos_embed', False):
                x = x + bb.absolute_pos_embed
            drop = getattr(bb, 'drop_after_pos', None)
            if drop is not None:
                x = drop(x)
            return (x, ), tuple(hw)
        if unit.kind == 'block':
            return (mod(acts[0], hw), ), hw
        if unit.kind == 'downsample':
            x, hw = mod(acts[0], hw)
            return (x, ), tuple(hw)
        if unit.kind == 'output':
            x = mod(acts[0])
            x = x.view(-1, *hw, x.shape[-1]).permute(0, 3, 1,
                                                     2).contiguous()
            return (x, ), hw
        if unit.kind == 'neck':
            outs = mod(tuple(acts))
            if torch.is_tensor(outs):
                outs = (outs, )
            return tuple(outs), hw
        raise ValueError(f'unknown unit kind {unit.kind!r}')

    @staticmethod
    def _forward_timm(unit: _Unit, model: nn.Module, mod: nn.Module,
                      acts: Acts) -> Acts:
        """A unit of a timm classifier, as its ``forward_features`` /
        ``forward_head`` run it (Swin: ``(B, H, W, C)`` maps, ViT: ``(B,
        N, C)`` tokens; the head gives the ``(B, K)`` logits)."""
        bb = _backbone(model)
        x = acts[0]
        if unit.kind == 'patch_embed':
            x = mod(x)
            if unit.arch == 'timm_vit':
                x = bb.norm_pre(bb.patch_drop(bb._pos_embed(x)))
        elif unit.kind == 'head':
            x = bb.forward_head(bb.norm(x))  # mod is bb.head
        elif unit.kind in ('block', 'downsample'):
            x = mod(x)
        else:
            raise ValueError(f'unknown unit kind {unit.kind!r}')
        return (x, )

    @torch.no_grad()
    def _map(self, unit, model, acts: Acts, hw, student: bool, device,
             store, inplace: bool = False, targets: Optional[Acts] = None):
        """The unit on all images, in chunks: ``(outputs stored on
        ``store``, hw_shape, mean loss against ``targets`` or None)``.
        ``inplace``: write the outputs over ``acts`` (same shapes)."""
        n = acts[0].shape[0]
        outs, total, hw_out = None, 0.0, hw
        for i in range(0, n, self.batch_size):
            j = min(n, i + self.batch_size)
            o, hw_out = self._forward(unit, model, _chunk(acts, i, j, device),
                                      hw, student)
            if targets is not None:
                tgt = _chunk(targets, i, j, o[0].device)
                total += float(self.unit_loss(o, tgt).double().sum())
            if outs is None:
                same = inplace and len(o) == len(acts) and all(
                    a.shape[1:] == b.shape[1:] and a.dtype == b.dtype
                    for a, b in zip(acts, o))
                outs = acts if same else tuple(
                    torch.empty((n, ) + tuple(b.shape[1:]), dtype=b.dtype,
                                device=store) for b in o)
            for buf, b in zip(outs, o):
                buf[i:j].copy_(b)
        return outs, hw_out, (total / n if targets is not None else None)

    # --------------------------------------------------------------- run
    def run(self, teacher: nn.Module, student: nn.Module,
            images: torch.Tensor, calibrate=None) -> torch.Tensor:
        """Reconstruct ``student`` towards ``teacher`` on ``images``
        (normalised ``(N, 3, H, W)``), unit by unit; returns ``images``
        unchanged.  ``calibrate`` is ignored (the calibration is kept)."""
        if not torch.is_tensor(images) or images.dim() != 4 or \
                not len(images):
            raise ValueError('BlockReconstruction.run: images must be a '
                             'non-empty (N, 3, H, W) tensor')
        units = reconstruction_units(
            teacher, student, patch_embed=self.reconstruct_patch_embed,
            downsample=self.reconstruct_downsample,
            include_neck=self.include_neck, head=self.reconstruct_head)
        if self.include_neck and units[-1].kind != 'neck':
            print_log('[BlockReconstruction] include_neck: the model has no '
                      'neck, only the backbone is reconstructed',
                      logger='current')
        device = _device_of(_backbone(student))
        t_device = _device_of(_backbone(teacher))
        store = torch.device(self.cache_device) \
            if self.cache_device is not None else device
        models = [student] if teacher is student else [teacher, student]
        n_learn = sum(u.learn for u in units)
        print_log(f'[BlockReconstruction] {n_learn} units, {self.iters} '
                  f'iters each, {len(images)} images, batch '
                  f'{min(self.batch_size, len(images))}, params '
                  f'{self.params}, input {self.input}, lr {self.lr:g}',
                  logger='current')
        with torch.inference_mode(False), _frozen(models):
            x0 = images.detach()
            if x0.is_inference():
                x0 = x0.clone()
            self._walk(units, teacher, student, (x0, ), device, t_device,
                       store)
        return images

    def _walk(self, units, teacher, student, x0, device, t_device, store):
        quantized = self.input == 'quantized'
        acts_t: Acts = x0  # teacher path (input of the current unit)
        acts_s: Optional[Acts] = x0 if quantized else None
        feats_t: List[torch.Tensor] = []
        feats_s: List[torch.Tensor] = []
        hw = None
        k_learn = 0
        for unit in units:
            if unit.kind == 'output':
                out_t, _, _ = self._map(unit, teacher, acts_t, hw, False,
                                        t_device, store)
                feats_t.extend(out_t)
                if quantized:
                    out_s, _, _ = self._map(unit, student, acts_s, hw, True,
                                            device, store)
                    feats_s.extend(out_s)
                continue
            in_t = tuple(feats_t) if unit.kind == 'neck' else acts_t
            in_s = None
            if quantized:
                in_s = tuple(feats_s) if unit.kind == 'neck' else acts_s
            # Targets: the FP unit on the FP path.  With input='quantized'
            # the teacher's input is not needed any more: overwrite it.
            target, hw_out, _ = self._map(
                unit, teacher, in_t, hw, False, t_device, store,
                inplace=quantized and unit.kind == 'block')
            if quantized:
                acts_t = in_t = None  # not needed any more: free it
            x_in = in_s if quantized else in_t
            scales = [q for _, q in learnable_scales(unit.s_mod)] \
                if unit.learn and self.params != 'weights' else []
            weights = list(unit.s_mod.parameters()) \
                if unit.learn and self.params != 'qparams' else []
            learn = unit.learn and bool(scales or weights)
            if learn:
                k_learn += 1
                before = None
                if self.iters > 0:
                    _, _, before = self._map(unit, student, x_in, hw, True,
                                             device, store, targets=target)
                    self._optimise(unit, student, x_in, target, hw, scales,
                                   weights, device, k_learn)
                    clear_quant_caches(unit.s_mod)
            # Carry the student's path on (through the reconstructed unit).
            after = None
            if quantized and unit.kind != 'neck':
                acts_s, _, after = self._map(
                    unit, student, in_s, hw, True, device, store,
                    inplace=unit.kind == 'block',
                    targets=target if learn else None)
            elif learn:
                _, _, after = self._map(unit, student, x_in, hw, True,
                                        device, store, targets=target)
            if learn:
                if before is None:
                    before = after
                self._record(unit, k_learn, before, after, len(scales),
                             len(weights))
            if unit.kind != 'neck':
                acts_t = target
            hw = hw_out
            target = in_t = in_s = x_in = None

    def _optimise(self, unit, student, x_in: Acts, target: Acts, hw,
                  quantizers: List[Quantizer], weights, device, k: int):
        """``iters`` Adam steps of ``unit``'s learnable tensors."""
        scales = []
        for q in quantizers:
            if q.scale.is_inference():  # made under inference_mode
                q.scale = q.scale.clone()
            scales.append(q.scale)
        groups = []
        if weights:
            groups.append(dict(params=weights, lr=self.weight_lr))
        if scales:
            groups.append(dict(params=scales, lr=self.lr))
        trainable = weights + scales
        generator = torch.Generator().manual_seed(self.seed)
        batches = self.batch_indices(x_in[0].shape[0], generator)
        try:
            for t in trainable:
                t.requires_grad_(True)
            opt = torch.optim.Adam(groups, lr=self.lr, betas=self.betas,
                                   eps=self.eps)
            with torch.enable_grad():
                for it, idx in enumerate(batches):
                    xb = _take(x_in, idx, device)
                    tb = _take(target, idx, device)
                    out, _ = self._forward(unit, student, xb, hw, True)
                    loss = self.unit_loss(out, tb).mean()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    with torch.no_grad():
                        for s in scales:
                            s.clamp_(min=self.min_scale)
                    if self.log_interval and (
                            it == 0 or it + 1 == self.iters
                            or (it + 1) % self.log_interval == 0):
                        print_log(f'[BlockReconstruction] {unit.name} iter '
                                  f'{it + 1}/{self.iters} loss '
                                  f'{loss.item():.6g}', logger='current')
        finally:
            for t in trainable:
                t.grad = None
                t.requires_grad_(False)  # _frozen restores the flags

    def _record(self, unit, k, before, after, num_scales, num_weights):
        rec = dict(block=unit.name, kind=unit.kind, loss_before=before,
                   loss_after=after, iters=self.iters,
                   num_scales=num_scales, num_weights=num_weights)
        self.history.append(rec)
        print_log(f'[BlockReconstruction] {unit.name}: loss {before:.6g} -> '
                  f'{after:.6g} ({self.iters} iters, {num_scales} scales, '
                  f'{num_weights} weight tensors)', logger='current')
        if self.visualizer is not None:
            self.visualizer.add_scalars(
                {'adapt/recon_loss_before': before,
                 'adapt/recon_loss_after': after}, step=k)
