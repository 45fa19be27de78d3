"""Quantizer settings: defaults, module roles, per-role / per-glob overrides.

A setting is the ``dfq.quantizer`` config minus the bits, scope and skip::

    weight=dict(observer=dict(type='OMSEObserver')),      # weight quantizers
    act=dict(observer=dict(type='PercentileObserver', percentile=99.99)),
    matmul=dict(granularity='token'),   # q, k, v operands of the matmuls
    softmax=dict(mode='log_sqrt2'),     # attn of attn @ v (None: stays FP)
    reparam=True,                       # RepQ-style LayerNorm folding
    first_last_bits=8,                  # patch embedding + prediction layers
    overrides={                         # role names or module-name globs
        'qkv': dict(act=dict(granularity='channel')),
        'backbone.stages.3.*': dict(w_bits=8)}

``weight`` / ``act`` / ``matmul`` are :class:`~dfq_dense.quant.Quantizer`
arguments (``observer``, ``granularity``, ``symmetric``...) merged over the
defaults: weights symmetric per output channel, activations and matmul
operands asymmetric per tensor, all min/max.  Bits never go there: they are
``w_bits`` / ``a_bits``.

Roles (what a quantized module is, from its qualified name):

* backbone: ``patch_embed``, ``qkv``, ``proj``, ``fc1``, ``fc2``,
  ``reduction`` (patch merging), ``matmul1`` (``q @ k^T``), ``matmul2``
  (``attn @ v``);
* task parts: ``neck``, ``rpn`` (``rpn_head``), ``roi`` (``roi_head``),
  ``decode_head`` (``decode_head`` and ``auxiliary_head``);
* ``pred``: the final prediction layers (``fc_cls``, ``fc_reg``,
  ``conv_logits``, ``rpn_cls``, ``rpn_reg``, ``conv_seg``; a timm
  classifier's ``head`` / ``head.fc``) -- they also carry their part's
  role (``roi``, ``rpn``, ``decode_head``).

timm's names map to the same roles: ``attn.qkv`` / ``attn.proj`` (qkv,
proj), ``mlp.fc1`` / ``mlp.fc2`` (fc1, fc2), ``downsample.reduction``
(reduction), ``patch_embed.proj`` (patch_embed).

An override entry holds any of ``w_bits``, ``a_bits``, ``weight``, ``act``,
``softmax`` (``matmul2`` only) and ``skip`` (True: leave the module FP).
Order of application, later wins: ``first_last_bits`` (as overrides of
``patch_embed`` and ``pred``), then role overrides from the general to the
specific (part roles, then layer roles, then ``pred``), then glob overrides
in the order written.  ``weight`` / ``act`` dicts are merged key by key;
everything else is replaced.
"""
import copy
import fnmatch
import re

from .validate import validate_quantizer_cfg

__all__ = [
    'ROLES', 'SETTING_KEYS', 'module_roles', 'QuantSetting',
    'validate_setting'
]

LAYER_ROLES = ('patch_embed', 'qkv', 'proj', 'fc1', 'fc2', 'reduction')
MATMUL_ROLES = ('matmul1', 'matmul2')
PART_ROLES = ('neck', 'rpn', 'roi', 'decode_head')
ROLES = LAYER_ROLES + MATMUL_ROLES + PART_ROLES + ('pred', )
SETTING_KEYS = ('weight', 'act', 'matmul', 'softmax', 'reparam',
                'first_last_bits', 'overrides')
OVERRIDE_KEYS = ('w_bits', 'a_bits', 'weight', 'act', 'softmax', 'skip')

# Patterns on qualified names (relative to the model).  Block internals are
# matched anywhere so they also work with scope='backbone' on a bare Swin.
# The second alternative of qkv / proj / fc1 / fc2 is timm's naming
# (``blocks.0.attn.qkv``, ``layers.0.blocks.0.mlp.fc1``: Swin and ViT /
# DeiT classifiers of the classification track).
_LAYER_PATTERNS = [
    ('patch_embed', re.compile(r'(^|\.)patch_embed\.')),
    ('qkv', re.compile(r'\.attn\.w_msa\.qkv$|^attn\.w_msa\.qkv$|'
                       r'(^|\.)attn\.qkv$')),
    ('proj', re.compile(r'\.attn\.w_msa\.proj$|(^|\.)attn\.proj$')),
    ('fc1', re.compile(r'\.ffn\.layers\.0\.0$|(^|\.)mlp\.fc1$')),
    ('fc2', re.compile(r'\.ffn\.layers\.1$|(^|\.)mlp\.fc2$')),
    ('reduction', re.compile(r'\.downsample\.reduction$')),
    ('matmul1', re.compile(r'\.matmul1$')),
    ('matmul2', re.compile(r'\.matmul2$')),
]
_PART_PREFIXES = [
    ('neck', ('neck.', )),
    ('rpn', ('rpn_head.', )),
    ('roi', ('roi_head.', )),
    ('decode_head', ('decode_head.', 'auxiliary_head.')),
]
_PRED = re.compile(
    r'(^|\.)(fc_cls|fc_reg|conv_logits|rpn_cls|rpn_reg|conv_seg)$|'
    # a timm classifier's head (Swin: head.fc, ViT / DeiT: head and the
    # distilled head_dist), at the top of the timm model or of the
    # TimmClassifier's backbone
    r'^(backbone\.)?(head(\.fc)?|head_dist)$')


def module_roles(name):
    """Roles of the module called ``name``, from the general to the
    specific (see the module docstring)."""
    roles = [r for r, prefixes in _PART_PREFIXES if name.startswith(prefixes)]
    roles += [r for r, pat in _LAYER_PATTERNS if pat.search(name)]
    if _PRED.search(name):
        roles.append('pred')
    return roles


def _is_role(key):
    return key in ROLES


def _check_override(key, value):
    where = f'dfq.quantizer.overrides[{key!r}]'
    if not isinstance(value, dict):
        raise ValueError(f'{where} must be a dict, got {value!r}')
    unknown = set(value) - set(OVERRIDE_KEYS)
    if unknown:
        raise ValueError(f'{where}: unknown key(s) {sorted(unknown)}; '
                         f'allowed: {list(OVERRIDE_KEYS)}')
    if _is_role(key) and key in MATMUL_ROLES and 'weight' in value:
        raise ValueError(f'{where}: a matmul has no weight to quantize')
    if 'softmax' in value and _is_role(key) and key != 'matmul2':
        raise ValueError(f"{where}: 'softmax' is the attn operand of "
                         "attn @ v; set it under 'matmul2'")
    for k in ('w_bits', 'a_bits'):
        if k in value:
            _check_bits(f'{where}.{k}', value[k])
    if 'skip' in value and not isinstance(value['skip'], bool):
        raise ValueError(f'{where}.skip must be True or False')


def _check_bits(where, value):
    if isinstance(value, bool) or not isinstance(value, int) or \
            not 2 <= value <= 16:
        raise ValueError(f'{where}={value!r} is not supported: bits must be '
                         'an integer in 2-16')


def _check_qcfg(where, cfg, operand):
    if cfg is None:
        return
    if not isinstance(cfg, dict):
        raise ValueError(f'{where} must be a dict, got {cfg!r}')
    if 'bits' in cfg:
        raise ValueError(f"{where}: set bits with w_bits / a_bits, not "
                         "'bits'")
    try:
        validate_quantizer_cfg(cfg, operand)
    except ValueError as err:
        raise ValueError(f'{where}: {err}') from None


def _check_softmax(where, cfg):
    if cfg is None:
        return
    if not isinstance(cfg, dict):
        raise ValueError(f'{where} must be None or a dict, got {cfg!r}')
    cfg = dict(cfg)
    cfg.setdefault('mode', 'uniform')
    try:
        validate_quantizer_cfg(cfg, 'softmax')
    except ValueError as err:
        raise ValueError(f'{where}: {err}') from None


def validate_setting(setting):
    """Raise ValueError (naming the key) for an invalid setting."""
    unknown = set(setting) - set(SETTING_KEYS)
    if unknown:
        raise ValueError(f'unknown dfq.quantizer key(s) {sorted(unknown)}')
    _check_qcfg('dfq.quantizer.weight', setting.get('weight'), 'weight')
    _check_qcfg('dfq.quantizer.act', setting.get('act'), 'activation')
    _check_qcfg('dfq.quantizer.matmul', setting.get('matmul'), 'matmul')
    _check_softmax('dfq.quantizer.softmax', setting.get('softmax'))
    flb = setting.get('first_last_bits')
    if flb is not None:
        _check_bits('dfq.quantizer.first_last_bits', flb)
    if not isinstance(setting.get('reparam', False), bool):
        raise ValueError('dfq.quantizer.reparam must be True or False')
    overrides = setting.get('overrides') or {}
    if not isinstance(overrides, dict):
        raise ValueError('dfq.quantizer.overrides must be a dict of role '
                         f'names or module-name globs, got {overrides!r}')
    for key, value in overrides.items():
        if not _is_role(key) and not re.search(r'[*?\[.]', key):
            raise ValueError(
                f'dfq.quantizer.overrides: {key!r} is neither a role '
                f'{list(ROLES)} nor a module-name glob (use e.g. '
                f"'backbone.stages.0.*')")
        _check_override(key, value)
        where = f'dfq.quantizer.overrides[{key!r}]'
        matmul = _is_role(key) and key in MATMUL_ROLES
        _check_qcfg(f'{where}.weight', value.get('weight'), 'weight')
        _check_qcfg(f'{where}.act', value.get('act'),
                    'matmul' if matmul else
                    (None if not _is_role(key) else 'activation'))
        _check_softmax(f'{where}.softmax', value.get('softmax'))
    return setting


class QuantSetting:
    """Resolves the quantizer arguments of every module (see the module
    docstring).

    Args:
        w_bits, a_bits: the global bits.
        **setting: the keys of :data:`SETTING_KEYS`.
    """

    def __init__(self, w_bits, a_bits, **setting):
        validate_setting(setting)
        self.w_bits = w_bits
        self.a_bits = a_bits
        self.weight = dict(setting.get('weight') or {})
        self.act = dict(setting.get('act') or {})
        self.matmul = dict(setting.get('matmul') or {})
        self.softmax = copy.deepcopy(setting.get('softmax'))
        self.reparam = bool(setting.get('reparam', False))
        overrides = []
        flb = setting.get('first_last_bits')
        if flb is not None:
            for role in ('patch_embed', 'pred'):
                overrides.append((role, dict(w_bits=flb, a_bits=flb)))
        self.role_overrides = overrides + [
            (k, dict(v)) for k, v in (setting.get('overrides') or {}).items()
            if _is_role(k)]
        self.glob_overrides = [
            (k, dict(v)) for k, v in (setting.get('overrides') or {}).items()
            if not _is_role(k)]

    def _matching(self, name):
        roles = module_roles(name)
        out = []
        for role in roles:  # general -> specific
            out += [v for k, v in self.role_overrides if k == role]
        out += [v for k, v in self.glob_overrides
                if fnmatch.fnmatchcase(name, k)]
        return out

    def resolve(self, name, kind):
        """Arguments for the module ``name`` of ``kind`` (``'layer'`` or
        ``'matmul'``), or None when an override skips it.

        Returns for a layer ``dict(w_bits, a_bits, weight_quantizer,
        input_quantizer)`` and for a matmul ``dict(bits, quantizer_a,
        quantizer_b, softmax)`` (``softmax`` only for ``matmul2``).
        """
        w_bits, a_bits = self.w_bits, self.a_bits
        weight = copy.deepcopy(self.weight)
        act = copy.deepcopy(self.matmul if kind == 'matmul' else self.act)
        softmax = copy.deepcopy(self.softmax)
        for ov in self._matching(name):
            if ov.get('skip'):
                return None
            w_bits = ov.get('w_bits', w_bits)
            a_bits = ov.get('a_bits', a_bits)
            weight.update(copy.deepcopy(ov.get('weight') or {}))
            act.update(copy.deepcopy(ov.get('act') or {}))
            if 'softmax' in ov:
                softmax = copy.deepcopy(ov['softmax'])
        if kind == 'matmul':
            out = dict(bits=a_bits, quantizer_a=dict(act),
                       quantizer_b=dict(act))
            if name.endswith('matmul2'):
                if softmax is not None:
                    softmax = dict(softmax)
                    softmax.setdefault('mode', 'uniform')
                    softmax.setdefault('bits', a_bits)
                out['softmax'] = softmax
            return out
        return dict(w_bits=w_bits, a_bits=a_bits, weight_quantizer=weight,
                    input_quantizer=act)

    def skipped(self, name):
        """Whether an override leaves the module ``name`` FP."""
        return any(ov.get('skip') for ov in self._matching(name))
