"""Static validation of quantizer configs (clear errors before building).

``validate_quantizer_cfg(cfg, operand=None)`` checks a ``Quantizer`` /
``SoftmaxQuantizer`` config dict (``type`` defaults to ``'Quantizer'``;
a config with a ``mode`` key is treated as a ``SoftmaxQuantizer``).

``operand`` says what the quantizer is applied to (None: unknown, only the
operand-independent checks run):

* ``'weight'``: a layer weight (has an output-channel axis).
* ``'activation'``: a layer input activation (Linear / Conv input).
* ``'matmul'``: an operand of an activation-activation matmul (``q``,
  ``k``, ``v``): there is no channel axis with a fixed meaning, so
  ``granularity='channel'`` is rejected.
* ``'softmax'``: the post-softmax operand of ``attn @ v`` (also a matmul
  operand); the only operand where ``log2`` / ``log_sqrt2`` are valid.

Raises ``ValueError`` for: bits outside 2-16, unknown granularity,
per-channel on a matmul operand, per-token on a weight, unknown softmax mode,
log2/log_sqrt2 on a non-softmax operand, unknown observer type, percentile
outside (0, 100].
"""
from ..registry import TASK_UTILS
from .calibrators import check_percentile
from .quantizer import GRANULARITIES, check_bits
from .softmax_quant import LOG_MODES, SOFTMAX_MODES

__all__ = ['validate_quantizer_cfg', 'OPERANDS']

OPERANDS = ('weight', 'activation', 'matmul', 'softmax')


def _strip_scope(name):
    return name.split('.', 1)[1] if name.startswith('dfq_dense.') else name


def validate_quantizer_cfg(cfg, operand=None):
    """Validate ``cfg`` for ``operand`` (see the module docstring).

    Returns ``cfg`` unchanged when valid.
    """
    if not isinstance(cfg, dict):
        raise ValueError(f'quantizer config must be a dict, got '
                         f'{type(cfg).__name__}')
    if operand is not None and operand not in OPERANDS:
        raise ValueError(f'operand must be one of {OPERANDS} or None, got '
                         f'{operand!r}')
    qtype = _strip_scope(str(cfg.get('type', 'Quantizer')))
    is_softmax = qtype == 'SoftmaxQuantizer' or 'mode' in cfg
    check_bits(cfg.get('bits', 8), 'quantizer bits')

    if is_softmax:
        mode = cfg.get('mode', 'uniform')
        if mode not in SOFTMAX_MODES:
            raise ValueError(f'unknown softmax quantizer mode {mode!r}; '
                             f'expected one of {SOFTMAX_MODES}')
        if mode in LOG_MODES and operand is not None and \
                operand != 'softmax':
            raise ValueError(
                f"mode={mode!r} (logarithmic) is only valid for the "
                f"post-softmax input (values in [0, 1]), not for a "
                f"{operand!r} operand")
        if operand is not None and operand not in ('softmax', 'matmul',
                                                   'activation'):
            raise ValueError(f'SoftmaxQuantizer cannot quantize a '
                             f'{operand!r} operand')
    else:
        gran = cfg.get('granularity', 'tensor')
        if gran not in GRANULARITIES:
            raise ValueError(f'unknown granularity {gran!r}; expected one '
                             f'of {GRANULARITIES}')
        if gran == 'channel' and operand in ('matmul', 'softmax'):
            raise ValueError(
                f"granularity='channel' is not supported for a matmul "
                f"operand ({operand!r}): it has no channel axis; use "
                f"'tensor' or 'token'")
        if gran == 'token' and operand == 'weight':
            raise ValueError("granularity='token' is for activations, not "
                             'weights')

    observer = cfg.get('observer', None)
    if observer is not None:
        if not isinstance(observer, dict) or 'type' not in observer:
            raise ValueError(f'observer must be a dict with a "type", got '
                             f'{observer!r}')
        otype = observer['type']
        if not isinstance(otype, str) or \
                TASK_UTILS.get(_strip_scope(otype)) is None or \
                _strip_scope(otype) not in TASK_UTILS.module_dict:
            known = sorted(TASK_UTILS.module_dict)
            raise ValueError(f'unknown observer type {otype!r}; known '
                             f'observers: {known}')
        if 'percentile' in observer:
            check_percentile(observer['percentile'])
    return cfg
