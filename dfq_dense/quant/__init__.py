"""Fake quantization for data-free quantization of Swin detectors/segmentors.

See ``fake_quant`` (conventions), ``observers`` and ``calibrators``
(qparams), ``quantizer`` (``Quantizer`` modes), ``softmax_quant``
(post-softmax quantizers), ``modules`` (what is quantized / stays FP),
``spec`` (settings, roles, overrides), ``convert`` (``quantize_model`` and
calibration helpers), ``reparam`` (LayerNorm reparameterisation) and ``io``
(saved quantization parameters).
"""
from .calibrators import (MovingAverageMinMaxObserver, MSEObserver,
                          OMSEObserver, PercentileObserver,
                          PercentileSearchObserver)
from .convert import (enable_calibration, finish_calibration,
                      iter_quantizers, quant_state_dict, quantization_report,
                      quantize_model, set_quantizers_enabled)
from .fake_quant import fake_quantize, round_ste
from .modules import (QuantConv2d, clear_quant_caches, QuantConvTranspose2d, QuantLinear,
                      QuantMatMul, QuantWeightModule, QuantWindowMSA)
from .observers import (MinMaxObserver, calibration_step,
                        current_calibration_step, qrange, range_to_qparams,
                        replicated_observation)
from .quantizer import Quantizer, check_bits, fast_eval
from .softmax_quant import (SoftmaxQuantizer, log2_quantize,
                            log_sqrt2_quantize)
from .reparam import reparameterize_layernorms
from .timm_modules import QuantTimmAttention, QuantTimmWindowAttention
from .spec import ROLES, QuantSetting, module_roles, validate_setting
from .validate import validate_quantizer_cfg

__all__ = [
    'fake_quantize', 'round_ste', 'MinMaxObserver', 'qrange', 'Quantizer',
    'check_bits', 'QuantWeightModule', 'QuantLinear', 'QuantConv2d',
    'QuantConvTranspose2d', 'QuantMatMul', 'QuantWindowMSA',
    'quantize_model', 'iter_quantizers', 'enable_calibration',
    'finish_calibration', 'set_quantizers_enabled', 'quant_state_dict',
    'MovingAverageMinMaxObserver', 'PercentileObserver', 'MSEObserver',
    'OMSEObserver', 'range_to_qparams', 'SoftmaxQuantizer', 'log2_quantize',
    'log_sqrt2_quantize', 'validate_quantizer_cfg',
    'PercentileSearchObserver', 'reparameterize_layernorms', 'ROLES',
    'QuantSetting', 'module_roles', 'validate_setting', 'calibration_step',
    'current_calibration_step', 'replicated_observation',
    'quantization_report', 'clear_quant_caches', 'fast_eval',
    'QuantTimmWindowAttention', 'QuantTimmAttention'
]
