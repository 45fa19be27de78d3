"""In-place conversion of a model to fake-quantized modules + helpers.

``quantize_model`` replaces, under ``model`` (or ``model.backbone``):

* ``nn.Linear`` (incl. ``mmcv.cnn.Linear``) -> ``QuantLinear``
* ``nn.Conv2d`` (incl. ``mmcv.cnn.Conv2d``) -> ``QuantConv2d``
* ``nn.ConvTranspose2d`` (incl. mmcv's) -> ``QuantConvTranspose2d``
* Swin ``WindowMSA`` (mmdet's and mmseg's) -> ``QuantWindowMSA`` (whose
  ``qkv`` / ``proj`` are then converted like any Linear);
* timm's Swin ``WindowAttention`` -> ``QuantTimmWindowAttention`` and
  timm's ViT / DeiT ``Attention`` -> ``QuantTimmAttention`` (classification
  track; explicit attention with the same ``matmul1`` / ``matmul2`` as
  ``QuantWindowMSA``, see :mod:`dfq_dense.quant.timm_modules`); the Linear
  layers of timm's blocks, ``Mlp``, ``PatchMerging`` and head are converted
  like any Linear.

Not converted (left FP, logged): subclasses of these layer types that
override ``forward`` with different semantics (e.g. weight-standardized or
adaptive-padding convs), and Linear layers owned by ``nn.MultiheadAttention``
(it reads their ``weight`` directly instead of calling them).
"""
import fnmatch
from collections import OrderedDict

import torch
import torch.nn as nn
from mmengine.logging import print_log

from .modules import (QuantConv2d, QuantConvTranspose2d, QuantLinear,
                      QuantMatMul, QuantWeightModule, QuantWindowMSA)
from .quantizer import Quantizer, check_bits
from .reparam import reparameterize_layernorms
from .spec import QuantSetting, module_roles
from .timm_modules import (QuantTimmAttention, QuantTimmWindowAttention,
                           timm_attention_wrappers)
from .validate import validate_quantizer_cfg

__all__ = [
    'quantize_model', 'iter_quantizers', 'enable_calibration',
    'finish_calibration', 'set_quantizers_enabled', 'quant_state_dict',
    'quantization_report', 'weight_codes', 'codes_changed'
]

SCOPES = ('model', 'backbone')


def _window_msa_types():
    types = []
    try:
        from mmdet.models.backbones.swin import WindowMSA as DetWindowMSA
        types.append(DetWindowMSA)
    except ImportError:  # pragma: no cover
        pass
    try:
        from mmseg.models.backbones.swin import WindowMSA as SegWindowMSA
        types.append(SegWindowMSA)
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


def _supported_forwards():
    """Forward functions whose semantics the wrappers reproduce."""
    fwd = {
        nn.Linear: {nn.Linear.forward},
        nn.Conv2d: {nn.Conv2d.forward},
        nn.ConvTranspose2d: {nn.ConvTranspose2d.forward},
    }
    try:
        from mmcv.cnn.bricks import wrappers
        fwd[nn.Linear].add(wrappers.Linear.forward)
        fwd[nn.Conv2d].add(wrappers.Conv2d.forward)
        fwd[nn.ConvTranspose2d].add(wrappers.ConvTranspose2d.forward)
    except ImportError:  # pragma: no cover
        pass
    return fwd


_WRAPPERS = OrderedDict([
    (nn.Linear, QuantLinear),
    (nn.Conv2d, QuantConv2d),
    (nn.ConvTranspose2d, QuantConvTranspose2d),
])


_ATTENTION_WRAPPERS = (QuantWindowMSA, QuantTimmWindowAttention,
                       QuantTimmAttention)


def _matches(name, patterns):
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def quantize_model(model, w_bits, a_bits, scope='model', skip=(),
                   logger=None, dry_run=False, **setting):
    """Replace supported modules of ``model`` by quantized ones, in place.

    Args:
        model (nn.Module): the model (detector / segmentor / backbone).
        w_bits (int): weight bits, 2..16.
        a_bits (int): activation bits, 2..16.
        scope (str): ``'model'`` (everything) or ``'backbone'`` (only
            ``model.backbone``).
        skip (Sequence[str]): fnmatch patterns on qualified module names
            (relative to ``model``, e.g. ``'backbone.patch_embed.*'``,
            ``'*.fc_cls'``); matching modules stay FP (their children are
            still considered individually).
        logger: ``print_log`` logger; defaults to ``'current'``.
        dry_run (bool): resolve and validate every module's quantizer
            arguments without changing the model (config errors surface
            before any work).
        **setting: quantizer setting (``weight``, ``act``, ``matmul``,
            ``softmax``, ``reparam``, ``first_last_bits``, ``overrides``),
            see :mod:`dfq_dense.quant.spec`.  ``reparam`` is applied later,
            by :func:`finish_calibration`.

    Returns:
        dict: number of converted modules per original type name, e.g.
        ``{'Linear': 17, 'Conv2d': 1, 'WindowMSA': 4}``.
    """
    check_bits(w_bits, 'w_bits')
    check_bits(a_bits, 'a_bits')
    if scope not in SCOPES:
        raise ValueError(f'scope must be one of {SCOPES}, got {scope!r}')
    if isinstance(skip, str):
        skip = (skip, )
    skip = tuple(skip)
    logger = logger or 'current'
    spec = QuantSetting(w_bits, a_bits, **setting)

    if scope == 'backbone':
        root = getattr(model, 'backbone', None)
        if not isinstance(root, nn.Module):
            raise ValueError("scope='backbone' but the model has no "
                             '`backbone` module')
        root_prefix = 'backbone.'
    else:
        root, root_prefix = model, ''

    msa_types = _window_msa_types()
    forwards = _supported_forwards()
    counts = OrderedDict()
    left_fp = []
    matched_globs = set()

    def resolve(qname, kind):
        for pattern, _ in spec.glob_overrides:
            if fnmatch.fnmatchcase(qname, pattern):
                matched_globs.add(pattern)
        args = spec.resolve(qname, kind)
        if args is not None:
            _validate_resolved(qname, kind, args)
        return args

    timm_attn = timm_attention_wrappers()

    def attention_wrapper(child):
        """The quantized class of an attention module (None: none)."""
        if msa_types and isinstance(child, msa_types):
            return QuantWindowMSA
        for cls, (forward, wrapper) in timm_attn.items():
            if isinstance(child, cls) and type(child).forward is forward:
                return wrapper
        return None

    def build_msa(child, qname, wrapper):
        m1 = resolve(qname + '.matmul1', 'matmul')
        m2 = resolve(qname + '.matmul2', 'matmul')
        if dry_run:
            return child
        new = wrapper(
            child, a_bits=a_bits, matmul1=m1,
            matmul2=None if m2 is None else
            {k: v for k, v in m2.items() if k != 'softmax'},
            softmax_quant=None if m2 is None else m2['softmax'])
        # A skipped matmul stays FP: identity quantizers.
        for mm, args in (('matmul1', m1), ('matmul2', m2)):
            if args is None:
                getattr(new, mm).quantizer_a = nn.Identity()
                getattr(new, mm).quantizer_b = nn.Identity()
        return new

    def convert(parent, prefix):
        for name, child in list(parent.named_children()):
            qname = prefix + name
            if isinstance(child, QuantWeightModule):
                continue  # already converted: never wrap `.module` again
            if isinstance(child, nn.MultiheadAttention):
                left_fp.append(f'{qname} (MultiheadAttention)')
                continue
            skipped = _matches(qname, skip)
            new = None
            is_msa = False
            wrapper = None if skipped else attention_wrapper(child)
            if wrapper is not None:
                new = build_msa(child, qname, wrapper)
                is_msa = True
            elif not skipped and not isinstance(child, _ATTENTION_WRAPPERS):
                for base, wrapper in _WRAPPERS.items():
                    if isinstance(child, base):
                        if type(child).forward not in forwards[base]:
                            left_fp.append(
                                f'{qname} ({type(child).__name__}: '
                                'unsupported forward)')
                            break
                        args = resolve(qname, 'layer')
                        if args is None:
                            left_fp.append(f'{qname} (override skip)')
                        elif not dry_run:
                            new = wrapper(child, **args)
                        else:
                            new = child
                        break
            if new is not None:
                if not dry_run:
                    setattr(parent, name, new)
                tname = type(child).__name__
                counts[tname] = counts.get(tname, 0) + 1
                if is_msa:
                    convert(new, qname + '.')
            else:
                convert(child, qname + '.')

    convert(root, root_prefix)
    unmatched = [p for p, _ in spec.glob_overrides if p not in matched_globs]
    if unmatched:
        raise ValueError(
            f'dfq.quantizer.overrides: glob(s) {unmatched} match no '
            'quantizable module of the model')
    counts = dict(counts)
    if dry_run:
        return counts
    print_log(
        f'quantize_model(W{w_bits}A{a_bits}, scope={scope}, '
        f'skip={list(skip)}): converted {counts}', logger=logger)
    if left_fp:
        print_log('quantize_model: left in FP: ' + ', '.join(left_fp),
                  logger=logger)
    return counts


def _validate_resolved(qname, kind, args):
    """Config errors that depend on the module a glob override reached."""
    try:
        if kind == 'matmul':
            for key in ('quantizer_a', 'quantizer_b'):
                validate_quantizer_cfg(args[key], 'matmul')
            if args.get('softmax') is not None:
                validate_quantizer_cfg(dict(args['softmax']), 'softmax')
        else:
            validate_quantizer_cfg(args['weight_quantizer'], 'weight')
            validate_quantizer_cfg(args['input_quantizer'], 'activation')
    except ValueError as err:
        raise ValueError(f'quantizer of {qname}: {err}') from None


def iter_quantizers(model):
    """Yield ``(qualified_name, Quantizer)`` for every quantizer."""
    for name, m in model.named_modules():
        if isinstance(m, Quantizer):
            yield name, m


def enable_calibration(model):
    """Put every quantizer in calibration mode (observers reset)."""
    for _, q in iter_quantizers(model):
        q.enable_calibration()


def finish_calibration(model, reparam=False):
    """Finish calibration of every quantizer.

    Activation quantizers first; then, with ``reparam``, the per-channel
    post-LayerNorm quantizers are folded into their LayerNorm (see
    :mod:`dfq_dense.quant.reparam`); last the weight quantizers, re-fed with
    their module's (possibly folded) weight, so their qparams come from the
    final weights even for layers that calibration data never reached.
    Must be called on all ranks in distributed runs (observers all-reduce
    their ranges).

    Returns:
        list[str]: names of the reparameterised Linear layers.
    """
    weight_qs = set()
    for m in model.modules():
        if isinstance(m, QuantWeightModule):
            weight_qs.add(m.weight_quantizer)
    for name, q in iter_quantizers(model):
        if q not in weight_qs:
            q.finish_calibration(name)
    folded = reparameterize_layernorms(model) if reparam else []
    for m in model.modules():
        if isinstance(m, QuantWeightModule):
            m.observe_weight()
    for name, q in iter_quantizers(model):
        if q in weight_qs:
            # Weights are identical on every rank: nothing to merge.
            q.finish_calibration(name, sync=False)
    return folded


def set_quantizers_enabled(model, enabled):
    """Enable (quantize) or disable (identity) every quantizer.

    Enabling skips quantizers that were never calibrated (they observed no
    data and stay FP).
    """
    for _, q in iter_quantizers(model):
        if not enabled:
            q.disable()
        elif q.calibrated:
            q.enable()


def quant_state_dict(model):
    """``{quantizer_name: {'scale': Tensor, 'zero_point': Tensor}}`` (CPU
    copies), e.g. to check that all ranks hold identical qparams."""
    out = OrderedDict()
    for name, q in iter_quantizers(model):
        out[name] = dict(scale=q.scale.detach().cpu().clone(),
                         zero_point=q.zero_point.detach().cpu().clone())
    return out


def _owner(qname):
    """``(module name, operand)`` of a quantizer's qualified name."""
    for suffix, operand in (('.input_quantizer', 'input'),
                            ('.weight_quantizer', 'weight'),
                            ('.quantizer_a', 'a'), ('.quantizer_b', 'b')):
        if qname.endswith(suffix):
            return qname[:-len(suffix)], operand
    return qname, 'tensor'


def quantization_report(model):
    """What quantization did to ``model``, per role, for the results file.

    Every quantizer is counted under the most specific role of the module
    it belongs to (:func:`~dfq_dense.quant.spec.module_roles`; ``other``
    when none applies) as ``quantizing`` or ``disabled``; a disabled one is
    listed with the reason (observed no data, NaN/Inf calibration input, or
    never calibrated).  ``modules`` counts the converted layers and matmuls
    of the role.  Modules left in FP by ``skip`` or an override have no
    quantizer and are not counted here (``quantized_modules`` in the
    results lists what was converted).

    Returns:
        dict: ``{'roles': {role: {'modules', 'quantizers', 'quantizing',
        'disabled'}}, 'total': {...}, 'disabled': [{'quantizer', 'why'}]}``
    """
    roles = OrderedDict()
    disabled = []
    modules = {}

    def role_of(name):
        found = module_roles(name)
        return found[-1] if found else 'other'

    for name, m in model.named_modules():
        if isinstance(m, (QuantWeightModule, QuantMatMul)):
            modules[name] = role_of(name)
    for name, q in iter_quantizers(model):
        owner, _ = _owner(name)
        role = role_of(owner)
        row = roles.setdefault(role, dict(modules=0, quantizers=0,
                                          quantizing=0, disabled=0))
        row['quantizers'] += 1
        if q.enabled:
            row['quantizing'] += 1
            continue
        row['disabled'] += 1
        if getattr(q, 'nonfinite', False):
            why = 'NaN/Inf in its calibration input'
        elif getattr(q, 'unobserved', False):
            why = 'observed no calibration data'
        elif not q.calibrated:
            why = 'never calibrated'
        else:
            why = 'disabled'
        disabled.append(dict(quantizer=name, why=why))
    for name, role in modules.items():
        roles.setdefault(role, dict(modules=0, quantizers=0, quantizing=0,
                                    disabled=0))['modules'] += 1
    total = dict(modules=len(modules),
                 quantizers=sum(r['quantizers'] for r in roles.values()),
                 quantizing=sum(r['quantizing'] for r in roles.values()),
                 disabled=sum(r['disabled'] for r in roles.values()))
    return dict(roles=dict(roles), total=total, disabled=disabled)


@torch.no_grad()
def weight_codes(model):
    """``{layer name: integer codes of its quantized weight}`` (CPU,
    int32): ``clamp(round(W / scale) + zp)`` with the weight quantizer's
    current qparams (per output channel), the integers a deployed model
    would store.  Compared before and after a teacher-student method's
    student step, it tells how much of the quantized model the step
    changed."""
    out = OrderedDict()
    for name, m in model.named_modules():
        if not isinstance(m, QuantWeightModule):
            continue
        q = m.weight_quantizer
        if not q.calibrated or q.granularity == 'token':
            continue
        w = m.module.weight.detach().float()
        scale = q.scale.detach().float()
        zp = q.zero_point.detach().float()
        if q.granularity == 'channel' and scale.dim() == 1:
            shape = [1] * w.dim()
            shape[q.ch_axis % w.dim()] = -1
            scale, zp = scale.reshape(shape), zp.reshape(shape)
        codes = torch.clamp(torch.round(w * (1.0 / scale)) + zp,
                            q.quant_min, q.quant_max)
        out[name] = codes.to(torch.int32).cpu()
    return out


def codes_changed(before, after):
    """Share of the weight codes that differ between two
    :func:`weight_codes` snapshots (layers present in both)."""
    changed = total = 0
    for name, a in before.items():
        b = after.get(name)
        if b is None or b.shape != a.shape:
            continue
        changed += int((a != b).sum())
        total += a.numel()
    return changed / total if total else 0.0
