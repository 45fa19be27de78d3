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

Integrity: ``meta['checksums']`` holds the sha256 of every tensor (dtype,
shape and bytes), computed at save time and verified by
:func:`read_quant_params`: a file whose tensors were altered or damaged,
or one without checksums (format 1, written before they existed), is
refused with one line.
"""
import hashlib
import json
import os.path as osp

import torch

from ..utils.checkpoint import safe_torch_load
from ..utils.fileio import torch_save_atomic
from .convert import iter_quantizers
from .reparam import prepare_reparam_structure

__all__ = ['FORMAT', 'snapshot_state', 'save_quant_params',
           'read_quant_params', 'load_quant_params', 'QuantParamsError',
           'tensor_sha256']

FORMAT = 'dfq_dense.quant_params/2'
# Formats this version refuses, with the reason.
OLD_FORMATS = {
    'dfq_dense.quant_params/1': 'was written without tensor checksums by an '
                                'older dfq_dense',
}
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


def tensor_sha256(tensor):
    """sha256 (hex) of a tensor's dtype, shape and bytes."""
    t = tensor.detach().cpu().contiguous()
    digest = hashlib.sha256(f'{t.dtype}|{tuple(t.shape)}|'.encode())
    digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


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
    meta['checksums'] = {k: tensor_sha256(v) for k, v in tensors.items()}
    torch_save_atomic(dict(meta=meta, tensors=tensors), path)
    return path


RECREATE = ('; re-create it: run tools/dfq_test.py without --load-quantized '
            '(it writes a new quant_params.pth)')


def read_quant_params(path):
    """``(meta, tensors)`` of a saved file, format and checksums checked.

    Raises:
        FileNotFoundError: no such file.
        QuantParamsError: not a quant_params file, an old format without
            checksums, or a tensor whose checksum does not match.
        dfq_dense.utils.checkpoint.CheckpointReadError: no torch file at
            all (empty, truncated, text).
    """
    if not osp.isfile(path):
        what = 'is a folder' if osp.isdir(path) else 'not found'
        raise FileNotFoundError(
            f'quantized parameters {what}: {path} (use the '
            'quant_params.pth an earlier dfq_test run wrote)')
    data = safe_torch_load(path)
    meta = data.get('meta') if isinstance(data, dict) else None
    fmt = meta.get('format') if isinstance(meta, dict) else None
    if fmt in OLD_FORMATS:
        raise QuantParamsError(f'{path} {OLD_FORMATS[fmt]} (format {fmt}, '
                               f'this version reads {FORMAT})'
                               + RECREATE)
    if fmt != FORMAT:
        raise QuantParamsError(f'{path} is not a dfq_dense quant_params file '
                               f'(expected format {FORMAT})')
    tensors = data.get('tensors')
    checksums = meta.get('checksums')
    if not isinstance(tensors, dict) or not isinstance(checksums, dict) or \
            not all(torch.is_tensor(v) for v in tensors.values()):
        raise QuantParamsError(f'{path} is damaged: its tensors or their '
                               'checksums are missing' + RECREATE)
    if set(tensors) != set(checksums):
        extra = sorted(set(tensors) ^ set(checksums))
        raise QuantParamsError(
            f'{path} is damaged: {len(extra)} tensor(s) without a matching '
            f'checksum (e.g. {extra[0]})' + RECREATE)
    bad = [k for k, v in tensors.items() if tensor_sha256(v) != checksums[k]]
    if bad:
        raise QuantParamsError(
            f'{path} is corrupted: sha256 mismatch of {len(bad)} of '
            f'{len(tensors)} tensor(s) (e.g. {bad[0]}); the file was '
            'modified or damaged after it was written' + RECREATE)
    try:
        needed = [f'{name}.{b}' for name in meta['quantizers']
                  for b in QPARAMS] + list(meta['changed'])
        meta['quantizer'], meta['model'], meta['reparam']  # noqa: B018
    except (KeyError, TypeError):
        needed = None
    lacking = [k for k in needed if k not in tensors] if needed is not None \
        else ['meta']
    if lacking:
        raise QuantParamsError(
            f'{path} is damaged: {len(lacking)} entr(y/ies) its meta names '
            f'are missing (e.g. {lacking[0]})' + RECREATE)
    return meta, tensors


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
