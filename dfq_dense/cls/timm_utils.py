"""timm pieces of the classification track: data config, weights, loading.

Kept apart from the mmengine classes so the dataset and the classifier
resolve the model's eval transform and normalisation the same way, and so
that importing :mod:`dfq_dense.cls` (which the registries do for every
``dfq_dense.*`` look-up) does not import timm: timm is imported inside the
functions.

Weights (see :func:`find_weights` and :func:`load_timm_weights`):

* a local file given as ``checkpoint``: a state dict as timm saves it
  (``.safetensors``, or a torch file, plain or under ``state_dict``), or an
  official release file (the Swin and DeiT ``.pth`` files keep their
  weights under ``model`` and use the original key names, which the
  model's own timm ``checkpoint_filter_fn`` converts, as timm does when it
  downloads them itself);
* else the file timm itself would have downloaded, when it is already in
  timm's caches (the Hugging Face hub cache for ``hf_hub_id``, torch hub's
  ``checkpoints/`` folder for ``url``); nothing is downloaded;
* else :class:`WeightsNotFoundError`: one line naming the file to fetch.

Loading is strict: after the filter, a missing or unexpected key or a shape
mismatch raises :class:`~dfq_dense.utils.checkpoint.CheckpointMismatchError`
(one line).  Torch files are read with ``weights_only=True``
(:func:`dfq_dense.utils.checkpoint.safe_torch_load`).
"""
import argparse
import functools
import inspect
import os.path as osp
import sys
from urllib.parse import urlparse

import torch

from ..utils.checkpoint import (CheckpointReadError, CheckpointMismatchError,
                                mismatch_message, safe_torch_load,
                                state_dict_mismatch, tolerated_missing)

# What the Hugging Face hub holds for a timm model, in the order timm's own
# loader (timm.models._hub.load_state_dict_from_hf) prefers them.
HF_WEIGHT_FILES = ('model.safetensors', 'pytorch_model.bin')
# Wrapper prefixes of DDP / torch.compile, stripped as timm's
# clean_state_dict does.
_WRAPPER_PREFIXES = ('module.', '_orig_mod.')


class WeightsNotFoundError(FileNotFoundError):
    """No weights for a timm model offline: one line naming what to fetch."""


def create_timm_model(model_name, num_classes=None, model_kwargs=None,
                      device=None):
    """``timm.create_model(model_name, pretrained=False, ...)``.

    ``pretrained=False`` always: weights are loaded by
    :func:`load_timm_weights`, never downloaded.  ``device='meta'`` builds
    the modules without memory or init cost, enough to read the model's
    ``pretrained_cfg`` (the dataset needs nothing more).
    """
    import timm
    kwargs = dict(model_kwargs or {})
    if num_classes is not None:
        kwargs['num_classes'] = num_classes
    if device is None:
        return timm.create_model(model_name, pretrained=False, **kwargs)
    with torch.device(device):
        return timm.create_model(model_name, pretrained=False, **kwargs)


def timm_data_config(model, overrides=None):
    """timm's resolved eval data config of ``model`` (input size,
    interpolation, crop pct and mode, mean, std).

    ``overrides`` is timm's ``args`` of ``resolve_data_config`` (e.g.
    ``dict(input_size=(3, 112, 112))``).  Needed when ``model_kwargs`` change
    the input size: timm keeps the pretrained cfg of the named weights, whose
    ``input_size`` does not follow an ``img_size`` argument.
    """
    from timm.data import resolve_data_config
    return resolve_data_config(dict(overrides or {}), model=model)


def _arch_filter_fn(model_name):
    """The ``checkpoint_filter_fn`` of the timm module that defines
    ``model_name`` (what timm passes to its own pretrained loading), or
    None when the module has none.

    timm does not keep the filter on the model, so it is looked up where
    the model's entrypoint lives.  A filter taking ``adapt_layer_scale``
    (ViT's, used by DeiT) gets ``True``, as timm's DeiT builder gives it:
    it renames the ``gamma_1/2`` layer-scale keys of the official DeiT
    family releases and leaves other keys alone.
    """
    from timm.models import model_entrypoint
    from timm.models._registry import split_model_name_tag
    arch = split_model_name_tag(model_name)[0]
    module = sys.modules.get(model_entrypoint(arch).__module__)
    fn = getattr(module, 'checkpoint_filter_fn', None)
    if fn is None:
        return None
    if 'adapt_layer_scale' in inspect.signature(fn).parameters:
        fn = functools.partial(fn, adapt_layer_scale=True)
    return fn


def _torch_hub_checkpoints():
    return osp.join(torch.hub.get_dir(), 'checkpoints')


def cached_weights(pretrained_cfg, hf_cache_dir=None):
    """The weights file timm would download for ``pretrained_cfg`` when it
    is already in a local cache, else None.  Never touches the network.

    Looks where timm's loader would: the Hugging Face hub cache for
    ``hf_hub_id`` (``hf_hub_filename`` if set, else :data:`HF_WEIGHT_FILES`;
    ``hf_cache_dir`` defaults to the hub's own), then torch hub's
    ``checkpoints/`` folder for ``url`` (where
    ``torch.hub.load_state_dict_from_url`` keeps it).
    """
    hf_hub_id = pretrained_cfg.get('hf_hub_id')
    if hf_hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:  # no hub client: timm could not use it either
            try_to_load_from_cache = None
        if try_to_load_from_cache is not None:
            repo, _, revision = hf_hub_id.partition('@')
            names = [pretrained_cfg['hf_hub_filename']] \
                if pretrained_cfg.get('hf_hub_filename') else HF_WEIGHT_FILES
            for name in names:
                found = try_to_load_from_cache(
                    repo, name, cache_dir=hf_cache_dir,
                    revision=revision or None)
                # A str is a cached file; None / _CACHED_NO_EXIST are not.
                if isinstance(found, str) and osp.isfile(found):
                    return found
    url = pretrained_cfg.get('url')
    if url:
        path = osp.join(_torch_hub_checkpoints(),
                        osp.basename(urlparse(url).path))
        if osp.isfile(path):
            return path
    return None


def _fetch_hint(model_name, pretrained_cfg):
    """What to download for ``model_name``, for the one-line errors."""
    where = []
    if pretrained_cfg.get('url'):
        where.append(pretrained_cfg['url'])
    if pretrained_cfg.get('hf_hub_id'):
        name = pretrained_cfg.get('hf_hub_filename') or HF_WEIGHT_FILES[0]
        where.append(f'https://huggingface.co/{pretrained_cfg["hf_hub_id"]}'
                     f' ({name})')
    if not where:
        return f'timm lists no weights for {model_name}, give your own'
    return 'download ' + ' or '.join(where)


def find_weights(model_name, pretrained_cfg, checkpoint=None,
                 hf_cache_dir=None):
    """The weights file to load: ``checkpoint`` when given, else timm's
    cached file (:func:`cached_weights`).

    Raises:
        WeightsNotFoundError: ``checkpoint`` does not exist, or none was
            given and nothing is cached; one line naming the file to fetch.
    """
    hint = _fetch_hint(model_name, pretrained_cfg)
    if checkpoint is not None:
        path = osp.expanduser(str(checkpoint))
        if not osp.isfile(path):
            what = 'is a folder, not a file' if osp.isdir(path) \
                else 'not found'
            raise WeightsNotFoundError(
                f'checkpoint of timm model {model_name} {what}: {path} '
                f'({hint}; pass the file as model.checkpoint=PATH)')
        return path
    found = cached_weights(pretrained_cfg, hf_cache_dir)
    if found is None:
        raise WeightsNotFoundError(
            f'no weights for timm model {model_name} offline (none given as '
            f'model.checkpoint, none in timm\'s caches): {hint}; pass the '
            'file as model.checkpoint=PATH')
    return found


def read_state_dict(path):
    """The state dict in ``path``, the way timm's ``load_state_dict`` reads
    it with ``use_ema=False``: ``.safetensors`` as is; a torch file with
    ``weights_only=True``, its ``state_dict`` or ``model`` entry (timm
    training checkpoints / official releases) or the file itself; DDP and
    torch.compile prefixes stripped.

    The EMA copy of a timm training checkpoint (``state_dict_ema``) is not
    taken: ``state_dict`` are the weights the checkpoint was saved for;
    extract the EMA weights into a file of their own to evaluate them.
    """
    if path.endswith('.safetensors'):
        import safetensors.torch
        try:
            checkpoint = safetensors.torch.load_file(path, device='cpu')
        except Exception as err:  # noqa: BLE001  (any unreadable file)
            raise CheckpointReadError(
                f'cannot read {path}: not a safetensors file, or truncated '
                f'({type(err).__name__}); re-download it') from None
    else:
        # timm training checkpoints carry their argparse.Namespace under
        # 'args'; timm's own loader allow-lists it the same way (a plain
        # attribute bag, no code runs).
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = safe_torch_load(path)
    if isinstance(checkpoint, dict):
        for key in ('state_dict', 'model'):
            if isinstance(checkpoint.get(key), dict):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, dict) or not checkpoint or not all(
            torch.is_tensor(v) for v in checkpoint.values()):
        raise CheckpointReadError(
            f'{path} holds no state dict (expected a dict of tensors, or one '
            'under "state_dict" or "model"); pass the weights file of a timm '
            'or an official model')
    out = {}
    for key, value in checkpoint.items():
        while key.startswith(_WRAPPER_PREFIXES):
            for prefix in _WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key = key[len(prefix):]
        out[key] = value
    return out


def load_timm_weights(model, model_name, path):
    """Load the weights file ``path`` into the timm ``model``, strictly.

    The state dict goes through the model's own timm checkpoint filter
    (:func:`_arch_filter_fn`: official key names to timm's, non-persistent
    buffers dropped) and then ``model.load_state_dict(strict=True)``.
    Before that, a missing or unexpected key or a shape mismatch is
    reported as one line; only the keys
    :data:`dfq_dense.utils.checkpoint.TOLERATED_MISSING` names (buffers
    computed from the config) may be missing, and keep the model's value.
    """
    state_dict = read_state_dict(path)
    filter_fn = _arch_filter_fn(model_name)
    if filter_fn is not None:
        state_dict = filter_fn(state_dict, model)
    missing, unexpected, shapes = state_dict_mismatch(model, state_dict)
    if missing or unexpected or shapes:
        raise CheckpointMismatchError(mismatch_message(
            path, model, missing, unexpected, shapes))
    own = model.state_dict()
    for key in own:
        if key not in state_dict and tolerated_missing(key):
            state_dict[key] = own[key]
    model.load_state_dict(state_dict, strict=True)
    return path
