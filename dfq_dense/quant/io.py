"""Save and reload a quantized model's parameters (``quant_params.pth``).

What is saved is everything the DFQ run added to or changed in the FP
checkpoint, so that the checkpoint plus this file rebuild the quantized
model exactly, without synthesis or calibration:

* every quantizer's ``scale`` / ``zero_point`` and its state (quantizing,
  or disabled when calibration never reached it) and granularity;
* the tensors the run changed (LayerNorm / Linear after a reparameterisation,
  weights adapted by a teacher-student method), found by comparing with a
  snapshot taken right after the conversion;
* ``meta``: the quantizer config, the model class and the reparameterised
  layers, checked against the model it is loaded into.

The file holds tensors, strings, numbers, lists and dicts only, so it loads
with ``torch.load(weights_only=True)``.
"""
import json
import os.path as osp

import torch

from ..utils.checkpoint import safe_torch_load
from ..utils.fileio import torch_save_atomic
from .convert import iter_quantizers
from .reparam import prepare_reparam_structure

__all__ = ['FORMAT', 'snapshot_state', 'save_quant_params',
           'load_quant_params', 'QuantParamsError']

FORMAT = 'dfq_dense.quant_params/1'
QPARAMS = ('scale', 'zero_point')


class QuantParamsError(ValueError):
    """Saved quantization parameters that do not fit the model/config."""


def _quantizer_keys(model):
    return {f'{name}.{b}' for name, _ in iter_quantizers(model)
            for b in QPARAMS}


def snapshot_state(model):
    """CPU copy of the model's tensors except the quantizer parameters."""
    skip = _quantizer_keys(model)
    return {k: v.detach().cpu().clone()
            for k, v in model.state_dict().items() if k not in skip}


def _plain(obj):
    return json.loads(json.dumps(obj))


def save_quant_params(path, model, snapshot, quantizer_cfg, reparam=(),
                      extra_meta=None):
    """Write ``path`` atomically (see the module docstring).

    Args:
        model: the calibrated quantized model.
        snapshot: :func:`snapshot_state` taken right after the conversion.
        quantizer_cfg (dict): the ``dfq.quantizer`` config used.
        reparam (Sequence[str]): names of the reparameterised Linear layers.
        extra_meta (dict | None): more (plain) metadata.
    """
    quantizers = {}
    tensors = {}
    for name, q in iter_quantizers(model):
        quantizers[name] = dict(state=q.state, granularity=q.granularity,
                                calibrated=bool(q.calibrated))
        for b in QPARAMS:
            tensors[f'{name}.{b}'] = getattr(q, b).detach().cpu().clone()
    skip = _quantizer_keys(model)
    changed = []
    for key, value in model.state_dict().items():
        if key in skip:
            continue
        ref = snapshot.get(key)
        value = value.detach().cpu()
        if ref is None or ref.shape != value.shape or \
                not torch.equal(ref, value):
            tensors[key] = value.clone()
            changed.append(key)
    meta = dict(format=FORMAT, model=type(model).__name__,
                quantizer=_plain(quantizer_cfg), reparam=list(reparam),
                changed=changed, quantizers=quantizers)
    meta.update(_plain(extra_meta or {}))
    torch_save_atomic(dict(meta=meta, tensors=tensors), path)
    return path


def read_quant_params(path):
    """``(meta, tensors)`` of a saved file, format checked."""
    if not osp.isfile(path):
        raise FileNotFoundError(
            f'quantized parameters not found: {path} (use the '
            'quant_params.pth an earlier dfq_test run wrote)')
    data = safe_torch_load(path)
    meta = data.get('meta') if isinstance(data, dict) else None
    if not isinstance(meta, dict) or meta.get('format') != FORMAT:
        raise QuantParamsError(f'{path} is not a dfq_dense quant_params file '
                               f'(expected format {FORMAT})')
    return meta, data['tensors']


def _describe(cfg):
    return f"W{cfg.get('w_bits')}A{cfg.get('a_bits')}"


def load_quant_params(path, model, quantizer_cfg):
    """Load ``path`` into ``model`` (FP weights loaded, then converted with
    the same ``dfq.quantizer`` config).  Raises :class:`QuantParamsError`
    with one line when the file does not match the model or the config.

    Returns the file's meta dict.
    """
    meta, tensors = read_quant_params(path)
    saved_cfg, cfg = meta['quantizer'], _plain(quantizer_cfg)
    if saved_cfg != cfg:
        diff = sorted(k for k in set(saved_cfg) | set(cfg)
                      if saved_cfg.get(k) != cfg.get(k))
        raise QuantParamsError(
            f'{path} was made with another quantizer config '
            f'({_describe(saved_cfg)}; differs in {diff}) than this config '
            f'({_describe(cfg)}): use the same dfq.quantizer settings')
    if meta['model'] != type(model).__name__:
        raise QuantParamsError(
            f"{path} belongs to a {meta['model']}, not a "
            f'{type(model).__name__}')
    try:
        prepare_reparam_structure(model, meta['reparam'])
    except ValueError as err:
        raise QuantParamsError(f'{path}: {err}') from None
    quantizers = dict(iter_quantizers(model))
    saved_names = set(meta['quantizers'])
    if saved_names != set(quantizers):
        missing = sorted(set(quantizers) - saved_names)
        extra = sorted(saved_names - set(quantizers))
        raise QuantParamsError(
            f'{path} does not match the model: {len(missing)} quantizers '
            f'missing (e.g. {missing[:2]}), {len(extra)} unknown (e.g. '
            f'{extra[:2]}); was it made with another model config?')
    state = model.state_dict()
    for key in meta['changed']:
        if key not in state:
            raise QuantParamsError(f'{path}: tensor {key} is not in the '
                                   'model')
        if tuple(state[key].shape) != tuple(tensors[key].shape):
            raise QuantParamsError(
                f'{path}: tensor {key} has shape '
                f'{tuple(tensors[key].shape)}, the model '
                f'{tuple(state[key].shape)}')
    with torch.no_grad():
        for key in meta['changed']:
            state[key].copy_(tensors[key])
    for name, q in quantizers.items():
        info = meta['quantizers'][name]
        for b in QPARAMS:
            t = tensors[f'{name}.{b}']
            setattr(q, b, t.clone().to(getattr(q, b).device))
        q.granularity = info['granularity']
        q.calibrated = info['calibrated']
        q.state = info['state']
    return meta
