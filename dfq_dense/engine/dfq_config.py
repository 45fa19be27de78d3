"""The top-level ``dfq`` config key, validated before any work starts.

    dfq = dict(
        synthesizer=dict(type='PSAQViT', num_images=32, ...),  # data source
        quantizer=dict(w_bits=8, a_bits=8, scope='model', skip=[],
                       # setting (dfq_dense.quant.spec): weight, act,
                       # matmul, softmax, reparam, first_last_bits,
                       # overrides
                       ),
        calib_batch_size=4,          # images per calibration forward
        load_images=None,            # reuse a synthetic_images.pth
        load_quantized=None,         # reuse a quant_params.pth
        eval_fp=False)               # also evaluate the FP model first
"""
import json

from mmengine.config import ConfigDict

from ..quant.spec import SETTING_KEYS, validate_setting
from ..registry import MODELS


class DFQConfigError(ValueError):
    """An invalid ``dfq`` config value: reported as one line."""


QUANTIZER_KEYS = {'w_bits', 'a_bits', 'scope', 'skip'} | set(SETTING_KEYS)
TOP_KEYS = {'synthesizer', 'quantizer', 'calib_batch_size', 'load_images',
            'load_quantized', 'eval_fp'}
SCOPES = ('model', 'backbone')


def _check_bits(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or \
            not 2 <= value <= 16:
        raise DFQConfigError(
            f'dfq.quantizer.{name}={value!r} is not supported: bits must be '
            'an integer in 2-16')


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
    name = method.split('.', 1)[1] if method.startswith('dfq_dense.') \
        else method
    if MODELS.get(name) is None or name not in MODELS.module_dict:
        known = sorted(k for k, v in MODELS.module_dict.items()
                       if getattr(v, 'is_synthesizer', False))
        raise DFQConfigError(
            f'unknown DFQ method {method!r}; registered methods: {known}')

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
    if not isinstance(batch, int) or batch < 1:
        raise DFQConfigError(
            f'dfq.calib_batch_size={batch!r}; use a positive integer')
    cfg.setdefault('load_images', None)
    cfg.setdefault('load_quantized', None)
    cfg.setdefault('eval_fp', False)
    return cfg


def plain(cfg):
    """``cfg`` as plain Python values (safe to save with weights_only)."""
    return json.loads(json.dumps(cfg))
