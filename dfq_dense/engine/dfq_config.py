"""The top-level ``dfq`` config key, validated before any work starts.

    dfq = dict(
        synthesizer=dict(type='PSAQViT', num_images=32, ...),  # data source
        adapter=None,                # or dict(type='PSAQViTV2Rounds', ...):
                                     # changes the calibrated student
        quantizer=dict(w_bits=8, a_bits=8, scope='model', skip=[],
                       # setting (dfq_dense.quant.spec): weight, act,
                       # matmul, softmax, reparam, first_last_bits,
                       # overrides
                       ),
        calib_batch_size=4,          # images per calibration forward
        load_images=None,            # reuse a synthetic_images.pth
        load_quantized=None,         # reuse a quant_params.pth
        eval_fp=False,               # also evaluate the FP model first
        allow_unobserved=False)      # run on with quantizers that saw no
                                     # calibration data left FP (reported)
"""
import copy
import inspect
import json
import math

from mmengine.config import ConfigDict

from ..quant.spec import SETTING_KEYS, validate_setting
from ..registry import MODELS


class DFQConfigError(ValueError):
    """An invalid ``dfq`` config value: reported as one line."""


QUANTIZER_KEYS = {'w_bits', 'a_bits', 'scope', 'skip'} | set(SETTING_KEYS)
TOP_KEYS = {'synthesizer', 'adapter', 'quantizer', 'calib_batch_size',
            'load_images', 'load_quantized', 'eval_fp', 'allow_unobserved'}
SCOPES = ('model', 'backbone')


def _check_bits(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or \
            not 2 <= value <= 16:
        raise DFQConfigError(
            f'dfq.quantizer.{name}={value!r} is not supported: bits must be '
            'an integer in 2-16')


# --------------------------------------------------------------------------
# dfq.synthesizer and dfq.adapter: generic validation of the settings, by key
# (a key means the same in every method: see the constructors in
# dfq_dense/synth/ and dfq_dense/adapt/)
# --------------------------------------------------------------------------
# Data sources that run no optimisation: ``iterations`` may be 0.
NON_ITERATIVE = ('GaussianNoise', 'RealImages')
# Sub-configs whose content only one method understands.
METHOD_SPECIFIC_KEYS = ('components', 'student_step')
# Components a synthesizer took before the adaptation had a key of its own,
# and the adapter that is that step now.
MOVED_COMPONENTS = {'distill': 'MimiQDistill'}
# Integer settings and their minimum; True: None is allowed too.
INT_MIN = {
    'num_images': (1, False), 'batch_size': (1, False),
    'num_points': (2, False),  # KDE points: one leaves nothing to integrate
    'max_samples': (1, True), 'tau_ref_pixels': (1, False),
    'tv_ref_pixels': (1, False), 'num_classes': (1, False),
    'num_components': (1, False), 'log_interval': (1, False),
    'rounds': (0, False), 'sample_iters': (0, False),
    'images_per_round': (1, True), 'iters': (0, False),
    'warmup_iters': (0, True), 'num_patches': (0, False),
    'micro_batch_size': (1, True),  # None: the whole batch at once
}
# Settings that must be > 0 (True: or None).
POSITIVE = {
    'lr': False, 'sample_lr': False, 'tau': False, 'logit_scale': False,
    'ssim_c1': False, 'ssim_c2': False, 'min_scale': False,
    'qparam_lr': True, 'grad_clip': True,
    'bandwidth': False,  # PSAQ-ViT's KDE bandwidth: 0 makes the images NaN
}
# Settings that must be >= 0 (besides every ``*_weight``).
NON_NEGATIVE = ('min_lr', 'weight_decay', 'noise_std', 'color_jitter')
# Settings in [lo, hi] (hi_open: [lo, hi)).
INTERVALS = {'jitter_switch': (0.0, 1.0, False),
             'msr_split_jitter': (0.0, 0.5, True),
             'momentum': (0.0, 1.0, True)}
BETAS = ('betas', 'sample_betas')
# (lo, hi) ranges: lowest allowed lo, whether lo may equal it, None allowed.
RANGES = {'tau_range': (0.0, True, False), 'tv_tau_range': (0.0, True, True),
          'soft_range': (0.0, True, False),
          'prior_sigma_range': (0.0, False, False)}
SIZES = ('img_size', 'crop_size')
# Sizes that may also be a word: SPDFQ's crops at their own pixel size.
SIZE_WORDS = {'crop_size': ('native', )}
# Settings that must be True or False.
BOOLS = ('with_cp', )
# Why a bound holds, added to the message.
NOTES = {
    'bandwidth': "PSAQ-ViT's KDE bandwidth; 0 makes every image NaN",
    'num_points': 'KDE evaluation points between min and max',
    'lr': 'the learning rate of the pixel optimisation',
}


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_num(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _non_finite(value, path):
    """``(path, value)`` of the first NaN/Inf float inside ``value``."""
    if isinstance(value, float) and not math.isfinite(value):
        return path, value
    if isinstance(value, dict):
        for k, v in value.items():
            found = _non_finite(v, f'{path}.{k}')
            if found:
                return found
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            found = _non_finite(v, f'{path}[{i}]')
            if found:
                return found
    return None


def _pair(value):
    return isinstance(value, (list, tuple)) and len(value) == 2


def _check_size(value):
    if value is None:
        return None
    if _is_int(value):
        return None if value >= 1 else 'a size must be >= 1'
    if _pair(value) and all(_is_int(v) for v in value):
        return None if min(value) >= 1 else 'H and W must be >= 1'
    return 'use None, an integer or (H, W) with integers >= 1'


def _check_setting(key, value, iterative):
    """What is wrong with one synthesizer setting (None: nothing)."""
    if key == 'iterations':
        lo = 1 if iterative else 0
        if not _is_int(value) or value < lo:
            return f'use an integer >= {lo}'
    elif key == 'seed':
        if not _is_int(value):
            return 'use an integer'
    elif key in INT_MIN:
        lo, none_ok = INT_MIN[key]
        if value is None and none_ok:
            return None
        if not _is_int(value) or value < lo:
            return f'use an integer >= {lo}' + (' or None' if none_ok
                                                else '')
    elif key in POSITIVE:
        if value is None and POSITIVE[key]:
            return None
        if not _is_num(value) or value <= 0:
            return 'use a number > 0' + (' or None' if POSITIVE[key]
                                         else '')
    elif key in NON_NEGATIVE or key.endswith('_weight'):
        if not _is_num(value) or value < 0:
            return 'use a number >= 0'
    elif key in INTERVALS:
        lo, hi, hi_open = INTERVALS[key]
        if not _is_num(value) or value < lo or value > hi or \
                (hi_open and value == hi):
            return f'use a number in [{lo}, {hi}{")" if hi_open else "]"}'
    elif key in BETAS:
        if not _pair(value) or not all(
                _is_num(b) and 0 <= b < 1 for b in value):
            return 'use two numbers in [0, 1)'
    elif key in RANGES:
        lo, lo_ok, none_ok = RANGES[key]
        if value is None and none_ok:
            return None
        if not _pair(value) or not all(_is_num(v) for v in value) or \
                value[0] > value[1] or value[0] < lo or \
                (not lo_ok and value[0] == lo):
            return (f'use (low, high) with {lo} {"<=" if lo_ok else "<"} '
                    'low <= high')
    elif key in SIZES:
        if isinstance(value, str) and value in SIZE_WORDS.get(key, ()):
            return None
        why = _check_size(value)
        if why and key in SIZE_WORDS:
            why = why.replace('use None,', 'use None, ' + ', '.join(
                repr(w) for w in SIZE_WORDS[key]) + ',')
        return why
    elif key in BOOLS:
        if not isinstance(value, bool):
            return 'use True or False'
    elif key == 'jitter':
        values = value if _pair(value) else [value]
        if not all(_is_int(v) and v >= 0 for v in values):
            return 'use an integer >= 0 (or two, for MimiQ)'
    elif key == 'msr_grid':
        if not _pair(value) or not all(_is_int(v) and v >= 1
                                       for v in value):
            return 'use two integers >= 1'
    return None


def synthesizer_class(method):
    """The registered data-source class of ``method`` (None if unknown)."""
    name = method.split('.', 1)[1] if method.startswith('dfq_dense.') \
        else method
    cls = MODELS.get(name)
    if cls is None or name not in MODELS.module_dict or \
            not getattr(cls, 'is_synthesizer', False):
        return None
    return cls


def synthesizer_keys(cls):
    """The keyword arguments ``cls`` takes, following ``**kwargs`` to the
    base classes; None when they are open-ended."""
    keys = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get('__init__')
        if init is None:
            continue
        params = list(inspect.signature(init).parameters.values())[1:]
        keys |= {p.name for p in params
                 if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            return keys
    return None


def adapter_class(name):
    """The registered adapter class of ``name`` (None if unknown)."""
    from ..registry import ADAPTERS
    if not isinstance(name, str):
        return None
    name = name.split('.', 1)[1] if name.startswith('dfq_dense.') else name
    if '.' in name:
        return None
    cls = ADAPTERS.get(name)
    return cls if name in ADAPTERS.module_dict else None


def registered_adapters():
    """``{name: class}`` of the registered adapters."""
    from ..registry import ADAPTERS
    ADAPTERS.import_from_location()
    return dict(ADAPTERS.module_dict)


def _moved_to_adapter(synth, name, cls, unknown):
    """The one-line error for synthesizer settings that belong to the
    adaptation step now (keys an adapter takes, components it is), or
    None."""
    adapters = {n: synthesizer_keys(a) or set()
                for n, a in registered_adapters().items()}
    # a key of an adapter no synthesizer takes, or any key of the adapter
    # that took over part of this method (PSAQViTV2 -> PSAQViTV2Rounds)
    synth_keys = set()
    for other in MODELS.module_dict.values():
        if getattr(other, 'is_synthesizer', False):
            synth_keys |= synthesizer_keys(other) or set()
    moved = [k for k in unknown
             if any(k in keys and (k not in synth_keys or n.startswith(name))
                    for n, keys in adapters.items())]
    if moved:
        takers = [n for n, keys in adapters.items() if set(moved) <= keys]
        takers.sort(key=lambda n: (not n.startswith(name), n))
        example = f"dict(type='{takers[0]}', {moved[0]}=...)" if takers \
            else 'dict(type=...)'
        return (f'dfq.synthesizer: {name} does not take {moved}: they '
                'change the quantized student, so they belong to '
                f'dfq.adapter (e.g. dfq.adapter={example})')
    components = synth.get('components')
    if isinstance(components, dict):
        components = list(components)
    known = getattr(cls, 'COMPONENTS', None)
    if isinstance(components, (list, tuple)) and known is not None:
        for comp in components:
            if comp not in known and comp in MOVED_COMPONENTS:
                return (f'dfq.synthesizer.components: {comp!r} is not a '
                        f'synthesis component of {name} any more: set '
                        f"dfq.adapter=dict(type='{MOVED_COMPONENTS[comp]}') "
                        '(or dfq.adapter=None to switch it off)')
    return None


def _validate_settings(settings, where, name, cls, iterative=True):
    """Raise :class:`DFQConfigError` (one line) on a non-finite number, a
    key ``cls`` does not take or a value out of range in ``settings`` (the
    config ``where``, e.g. ``'dfq.adapter'``)."""
    found = _non_finite(dict(settings), where)
    if found:
        raise DFQConfigError(f'{found[0]}={found[1]!r} is not a finite '
                             'number: set a finite value')
    accepted = synthesizer_keys(cls)
    if accepted is not None:
        unknown = sorted(k for k in settings
                         if k not in accepted and k not in ('type',
                                                            '_scope_'))
        if unknown:
            raise DFQConfigError(
                f'{where}: {name} does not take {unknown}; it takes '
                f'{sorted(accepted)}')
    for key, value in settings.items():
        problem = _check_setting(key, value, iterative)
        if problem:
            note = f' ({NOTES[key]})' if key in NOTES else ''
            raise DFQConfigError(
                f'{where}.{key}={value!r} is invalid: {problem}{note}')
    student = settings.get('student_step')
    if isinstance(student, dict):
        for key, value in student.items():
            problem = _check_setting(key, value, True)
            if problem:
                raise DFQConfigError(
                    f'{where}.student_step.{key}={value!r} is invalid: '
                    f'{problem}')
    elif student is not None:
        raise DFQConfigError(f'{where}.student_step must be a dict or None')


def validate_synthesizer(synth, name, cls):
    """Raise :class:`DFQConfigError` (one line) on a non-finite number, a
    key ``cls`` does not take or a value out of range in ``synth``; settings
    of the adaptation step (PSAQ-ViT V2's rounds, a ``student_step``,
    MimiQ's ``distill``) name ``dfq.adapter`` as the fix."""
    accepted = synthesizer_keys(cls)
    unknown = [k for k in synth if accepted is not None and
               k not in accepted and k not in ('type', '_scope_')]
    moved = _moved_to_adapter(synth, name, cls, unknown)
    if moved:
        raise DFQConfigError(moved)
    _validate_settings(synth, 'dfq.synthesizer', name, cls,
                       iterative=name not in NON_ITERATIVE)


def validate_adapter(adapter, name, cls):
    """:func:`validate_synthesizer` for ``dfq.adapter``."""
    _validate_settings(adapter, 'dfq.adapter', name, cls)


def parse_dfq_config(cfg):
    """Validate and complete ``cfg`` (the ``dfq`` dict); return a ConfigDict."""
    if cfg is None:
        raise DFQConfigError(
            'the config has no `dfq` key: inherit a method and a bit setting '
            'from configs/_base_/ (see configs/mask_rcnn_swin_s_w8a8.py)')
    cfg = ConfigDict(cfg)
    unknown = set(cfg) - TOP_KEYS
    if unknown:
        raise DFQConfigError(
            f'unknown dfq key(s) {sorted(unknown)}; allowed: {sorted(TOP_KEYS)}')

    synth = cfg.get('synthesizer')
    if not isinstance(synth, dict) or 'type' not in synth:
        raise DFQConfigError(
            'dfq.synthesizer must be a dict with a `type` (e.g. PSAQViT)')
    method = synth['type']
    cls = synthesizer_class(method) if isinstance(method, str) else None
    if cls is None:
        MODELS.get('GaussianNoise')  # imports the data sources
        known = sorted(k for k, v in MODELS.module_dict.items()
                       if getattr(v, 'is_synthesizer', False))
        raise DFQConfigError(
            f'unknown DFQ method {method!r}; registered methods: {known}')
    validate_synthesizer(synth, cls.__name__, cls)

    adapter = cfg.setdefault('adapter', None)
    if adapter is not None:
        if not isinstance(adapter, dict) or 'type' not in adapter:
            raise DFQConfigError(
                'dfq.adapter must be None or a dict with a `type` (e.g. '
                'PSAQViTV2Rounds)')
        acls = adapter_class(adapter['type'])
        if acls is None:
            known = sorted(registered_adapters())
            raise DFQConfigError(
                f'unknown DFQ adapter {adapter["type"]!r}; registered '
                f'adapters: {known}')
        validate_adapter(adapter, acls.__name__, acls)

    quant = ConfigDict(cfg.get('quantizer') or {})
    unknown = set(quant) - QUANTIZER_KEYS
    if unknown:
        raise DFQConfigError(
            f'unknown dfq.quantizer key(s) {sorted(unknown)}; allowed: '
            f'{sorted(QUANTIZER_KEYS)}')
    for key in ('w_bits', 'a_bits'):
        if key not in quant:
            raise DFQConfigError(
                f'dfq.quantizer.{key} is missing: inherit a bit setting from '
                'configs/_base_/bits/')
        _check_bits(key, quant[key])
    quant.setdefault('scope', 'model')
    if quant.scope not in SCOPES:
        raise DFQConfigError(
            f'dfq.quantizer.scope={quant.scope!r}; use one of {SCOPES}')
    quant.setdefault('skip', [])
    try:
        validate_setting({k: v for k, v in quant.items()
                          if k in SETTING_KEYS})
    except ValueError as err:
        raise DFQConfigError(str(err)) from None
    cfg.quantizer = quant

    batch = cfg.setdefault('calib_batch_size', 4)
    if not _is_int(batch) or batch < 1:
        raise DFQConfigError(
            f'dfq.calib_batch_size={batch!r}; use a positive integer')
    for key in ('load_images', 'load_quantized'):
        value = cfg.setdefault(key, None)
        if value is not None and (not isinstance(value, str) or not value):
            raise DFQConfigError(
                f'dfq.{key}={value!r}: use the path of a file (or None)')
    cfg.setdefault('eval_fp', False)
    cfg.setdefault('allow_unobserved', False)
    return cfg


def plain(cfg):
    """``cfg`` as plain Python values (safe to save with weights_only)."""
    return json.loads(json.dumps(cfg))


# --------------------------------------------------------------------------
# dfq from the configs/_base_ fragments
# --------------------------------------------------------------------------
# The fragment keys of configs/_base_/ (methods, quantizers, bits, runtime)
# and where each goes in ``dfq``.  mmengine forbids one top-level key in two
# bases, so each fragment sets a key of its own and the leaf config would
# have to join them; :func:`assemble_dfq` joins them instead, so that a leaf
# config is its ``_base_`` list plus what differs.
FRAGMENT_KEYS = (('synthesizer', 'dfq_synthesizer'),
                 ('adapter', 'dfq_adapter'),
                 ('calib_batch_size', 'dfq_calib_batch_size'))
QUANTIZER_FRAGMENTS = ('dfq_quantizer', 'dfq_bits')
DFQ_LOOP = 'dfq_dense.DFQTestLoop'


def _strip_delete(value):
    """``value`` without mmengine's ``_delete_`` markers (left behind where
    the key was not in a base)."""
    if isinstance(value, dict):
        return {k: _strip_delete(v) for k, v in value.items()
                if k != '_delete_'}
    return value


def _type_name(value):
    if isinstance(value, dict) and isinstance(value.get('type'), str):
        return value['type'].split('.')[-1]
    return None


def _switched(name, new_type, fragment):
    """What of the fragment's ``name`` settings carries over to a method of
    another type: all of them for a subclass of the fragment's class (a
    variant of the method, e.g. a user's PSAQ-ViT with one change), none
    for another method (its own defaults hold: one method's settings mean
    nothing to another)."""
    def cls_of(type_name):
        if not isinstance(type_name, str):
            return None
        if name == 'synthesizer':
            return synthesizer_class(type_name)
        from ..registry import ADAPTERS
        return ADAPTERS.get(type_name.split('.')[-1])
    new_cls, old_cls = cls_of(new_type), cls_of(fragment.get('type'))
    if new_cls is None or old_cls is None or \
            not issubclass(new_cls, old_cls):
        return {}
    return {k: v for k, v in fragment.items() if k != 'type'}


def assemble_dfq(cfg):
    """Set ``cfg.dfq`` from the fragments' keys with ``cfg.dfq`` on top.

    ``dfq.synthesizer`` starts from ``dfq_synthesizer``, ``dfq.adapter``
    from ``dfq_adapter``, ``dfq.quantizer`` from ``dfq_quantizer`` and
    ``dfq_bits``, ``dfq.calib_batch_size`` from ``dfq_calib_batch_size``;
    what the config writes under ``dfq`` is merged on top as mmengine
    merges a config into its base (``_delete_=True`` replaces).  A
    ``dfq.synthesizer`` / ``dfq.adapter`` naming another ``type`` than the
    fragment's replaces it, unless the new class is a subclass of the
    fragment's (see :func:`_switched`).  Also makes the test loop the DFQ
    loop (a base cannot: mmdet's and mmseg's bases set ``test_cfg``).

    Idempotent; a config without fragment keys is left as it is.  Returns
    ``cfg``.
    """
    from mmengine.config import Config
    if not any(key in cfg for _, key in FRAGMENT_KEYS) and \
            not any(key in cfg for key in QUANTIZER_FRAGMENTS):
        return cfg
    base = {}
    for name, key in FRAGMENT_KEYS:
        if key in cfg:
            value = cfg[key]
            base[name] = copy.deepcopy(value.to_dict() if isinstance(
                value, ConfigDict) else value)
    quant = {}
    for key in QUANTIZER_FRAGMENTS:
        quant.update(copy.deepcopy(dict(cfg.get(key) or {})))
    if quant:
        base['quantizer'] = quant
    leaf = cfg.get('dfq') or {}
    leaf = copy.deepcopy(leaf.to_dict() if isinstance(leaf, ConfigDict)
                         else dict(leaf))
    for name in ('synthesizer', 'adapter'):
        if isinstance(leaf.get(name), dict) and name in base and \
                not isinstance(base[name], dict):
            base.pop(name)  # e.g. an adapter where the fragment has None
        new = _type_name(leaf.get(name))
        if new is not None and isinstance(base.get(name), dict) and \
                new != _type_name(base[name]):
            base[name] = _switched(name, leaf[name]['type'], base[name])
    merged = Config._merge_a_into_b(leaf, base)
    cfg.dfq = _strip_delete(
        {k: (v.to_dict() if isinstance(v, ConfigDict) else v)
         for k, v in merged.items()})
    test_cfg = cfg.get('test_cfg')
    if test_cfg is None or test_cfg.get('type') in ('TestLoop',
                                                     'mmengine.TestLoop'):
        cfg.test_cfg = dict(test_cfg or {}, type=DFQ_LOOP)
    return cfg
