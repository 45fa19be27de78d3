"""Safe checkpoint loading for torch >= 2.6 (``weights_only=True``).

torch refuses any pickled global that is not allow-listed.  mmengine-saved
checkpoints carry a few harmless ones in their ``message_hub`` and ``meta``
(mmengine's HistoryBuffer, numpy arrays, dtypes and scalars); exactly those are
allow-listed here, at import of :mod:`dfq_dense`, so mmengine's own loading
path (``Runner.load_checkpoint``, ``load_from``) works unchanged.

Deliberately *not* allow-listed: general callables such as ``getattr`` or
``builtins.eval``, which would reopen arbitrary code execution.  mmengine's
HistoryBuffer does pickle ``getattr`` (its ``statistics_methods`` are bound
methods), so a checkpoint that fails only on ``getattr`` is re-read with a
restricted unpickler in which ``getattr`` is inert (it returns a placeholder
and resolves nothing); from that read only ``state_dict`` and the plain values
of ``meta`` are kept.  Any other global is refused with
:class:`UnsafeCheckpointError`, a one-line message naming the global.
"""
import os.path as osp
import pickle
import re

import numpy as np
import torch
from mmengine.logging import HistoryBuffer
from mmengine.runner.checkpoint import CheckpointLoader


class UnsafeCheckpointError(RuntimeError):
    """The checkpoint pickles a global that is not on the allow-list."""


def _numpy_globals():
    """numpy objects needed to rebuild arrays, dtypes and scalars.

    Each is listed under its numpy 2 name and its numpy 1 name
    (``numpy.core``), because checkpoints record the name of the numpy that
    saved them.
    """
    from numpy._core import multiarray
    entries = [np.ndarray, np.dtype]
    for fn in (multiarray._reconstruct, multiarray.scalar):
        entries.append(fn)
        entries.append((fn, f'numpy.core.multiarray.{fn.__name__}'))
    # numpy >= 1.25 pickles dtypes through their per-type classes.
    for name in dir(np.dtypes):
        obj = getattr(np.dtypes, name)
        if isinstance(obj, type) and issubclass(obj, np.dtype):
            entries.append(obj)
    return entries


SAFE_GLOBALS = [HistoryBuffer] + _numpy_globals()
torch.serialization.add_safe_globals(SAFE_GLOBALS)

_GLOBAL_RE = re.compile(r'GLOBAL ([\w.]+)')
_GETATTR = ('builtins.getattr', '__builtin__.getattr', 'getattr')


def _offending_global(err):
    match = _GLOBAL_RE.search(str(err))
    return match.group(1) if match else 'an unknown global'


class _InertAttribute:
    """What ``getattr(obj, name)`` unpickles to: a name, never a lookup."""

    def __init__(self, obj, name):
        self.name = name

    def __repr__(self):
        return f'<not resolved: .{self.name}>'


class _Discarded:
    """Stand-in for HistoryBuffer in the restricted read.

    The real ``HistoryBuffer.__setstate__`` copies the pickled statistics
    methods into a class-level dict, which would spread the inert getattr
    placeholders to every buffer of the process.  The message hub is
    discarded anyway, so its buffers are rebuilt as inert objects.
    """

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only torch's weights-only globals plus our allow-list."""

    def find_class(self, module, name):
        full = f'{module}.{name}'
        if full in _GETATTR:
            return _InertAttribute
        if full == f'{HistoryBuffer.__module__}.{HistoryBuffer.__qualname__}':
            return _Discarded
        allowed = torch._weights_only_unpickler._get_allowed_globals()
        if full in allowed:
            return allowed[full]
        for entry in torch.serialization.get_safe_globals():
            obj, alias = entry if isinstance(entry, tuple) else (entry, None)
            if full in (alias, f'{obj.__module__}.{obj.__qualname__}'):
                return obj
        raise pickle.UnpicklingError(f'Unsupported global: GLOBAL {full}')


class _RestrictedPickleModule:
    Unpickler = _RestrictedUnpickler
    UnpicklingError = pickle.UnpicklingError

    @staticmethod
    def load(file, **kwargs):
        return _RestrictedUnpickler(file, **kwargs).load()


_PLAIN = (str, int, float, bool, type(None))


def _plain(value):
    """``value`` if it is built of plain Python values only, else None."""
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, (list, tuple)):
        items = [_plain(v) for v in value]
        ok = all(i is not None or v is None for i, v in zip(items, value))
        return type(value)(items) if ok else None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()
                if isinstance(k, str) and
                (_plain(v) is not None or v is None)}
    return None


def _load_weights_and_meta(filename, map_location):
    ckpt = torch.load(filename, map_location=map_location, weights_only=False,
                      pickle_module=_RestrictedPickleModule)
    if not isinstance(ckpt, dict) or 'state_dict' not in ckpt:
        raise pickle.UnpicklingError(
            'GLOBAL builtins.getattr outside of an mmengine checkpoint')
    out = dict(state_dict=ckpt['state_dict'])
    if isinstance(ckpt.get('meta'), dict):
        out['meta'] = _plain(ckpt['meta'])
    return out


def safe_torch_load(filename, map_location='cpu'):
    """``torch.load(..., weights_only=True)`` with one-line errors."""
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(
            f'checkpoint not found: {filename} (check the path, or download '
            f'it: see the "Checkpoints" section of the README)')
    try:
        try:
            return torch.load(filename, map_location=map_location,
                              weights_only=True)
        except pickle.UnpicklingError as err:
            if _offending_global(err) not in _GETATTR:
                raise
            return _load_weights_and_meta(filename, map_location)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f'refusing to load {filename}: it pickles {_offending_global(err)}'
            ', which is not on dfq_dense\'s allow-list of checkpoint globals '
            '(only load checkpoints you trust; re-save it as a plain '
            'state_dict)') from None


# mmengine's loader for local paths calls torch.load directly; route it
# through safe_torch_load so a refused checkpoint gives the one-line error.
@CheckpointLoader.register_scheme(prefixes='', force=True)
def _load_from_local(filename, map_location):
    return safe_torch_load(filename, map_location)
