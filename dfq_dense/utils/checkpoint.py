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

A file that is not a torch checkpoint at all (empty, truncated, a text or
JSON file) raises :class:`CheckpointReadError`, also one line.

:func:`load_checkpoint_strict` loads a model checkpoint through mmengine's
own loader, strictly: a checkpoint whose keys or shapes do not fit the model
raises :class:`CheckpointMismatchError` naming the number and the first few
missing, unexpected and mis-shaped keys.  The only keys a checkpoint may
lack are those in :data:`TOLERATED_MISSING` (buffers the model recomputes
from its config; see there).
"""
import os.path as osp
import pickle
import re
from collections import OrderedDict

import numpy as np
import torch
from mmengine.logging import HistoryBuffer
from mmengine.runner.checkpoint import CheckpointLoader


class UnsafeCheckpointError(RuntimeError):
    """The checkpoint pickles a global that is not on the allow-list."""


class CheckpointReadError(ValueError):
    """The file is no readable torch checkpoint (empty, truncated, another
    kind of file): reported as one line."""


class CheckpointMismatchError(ValueError):
    """The checkpoint's keys or shapes do not fit the model: one line."""


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


def _first_line(err):
    """A short reason: the first meaningful line of ``err``'s message."""
    noise = ('Weights only load failed', 'Please file an issue',
             'Check the documentation')
    for line in str(err).splitlines():
        line = line.strip()
        if line and not line.startswith(noise):
            line = line.split('. ')[0][:160]
            if isinstance(err, (RuntimeError, pickle.UnpicklingError)):
                return line
            return f'{type(err).__name__}: {line}'
    return type(err).__name__


def _unreadable(filename, err):
    size = osp.getsize(filename)
    what = 'it is empty' if size == 0 else \
        f'{_first_line(err)}; {size} bytes'
    return CheckpointReadError(
        f'cannot read {filename}: not a torch checkpoint, or truncated or '
        f'corrupted ({what}); pass the .pth file itself, re-download or '
        're-create it')


def safe_torch_load(filename, map_location='cpu'):
    """``torch.load(..., weights_only=True)`` with one-line errors.

    Raises:
        FileNotFoundError: no such file (or a folder).
        UnsafeCheckpointError: a pickled global outside the allow-list.
        CheckpointReadError: an empty, truncated or non-torch file.
    """
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        what = 'is a folder, not a file' if osp.isdir(filename) else \
            'not found'
        raise FileNotFoundError(
            f'checkpoint {what}: {filename} (check the path, or download '
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
        if not _GLOBAL_RE.search(str(err)):
            # No global involved: the bytes are no (complete) pickle.
            raise _unreadable(filename, err) from None
        raise UnsafeCheckpointError(
            f'refusing to load {filename}: it pickles {_offending_global(err)}'
            ', which is not on dfq_dense\'s allow-list of checkpoint globals '
            '(only load checkpoints you trust; re-save it as a plain '
            'state_dict)') from None
    except (EOFError, RuntimeError, KeyError, ValueError, IndexError,
            TypeError, AttributeError, OverflowError, MemoryError,
            UnicodeDecodeError) as err:
        # What torch.load raises on an empty file (EOFError), a truncated
        # zip (RuntimeError: failed finding central directory), a text file
        # read as a legacy pickle (KeyError, ValueError ...).
        raise _unreadable(filename, err) from None
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except OSError as err:
        # torch's zip reader on a truncated archive: [Errno 22] Invalid
        # argument.
        raise _unreadable(filename, err) from None


# mmengine's loader for local paths calls torch.load directly; route it
# through safe_torch_load so a refused checkpoint gives the one-line error.
@CheckpointLoader.register_scheme(prefixes='', force=True)
def _load_from_local(filename, map_location):
    return safe_torch_load(filename, map_location)


# --------------------------------------------------------------------------
# strict loading
# --------------------------------------------------------------------------
# Model keys a checkpoint may lack.  Everything else is strict.  Each entry
# is a buffer that is not learned and that the model computes from its
# config alone, so the freshly built model already holds the right value
# (which is kept):
TOLERATED_MISSING = (
    # Swin's WindowMSA (mmdet and mmseg): the index into the relative
    # position bias table, built in __init__ from window_size only.
    # Checkpoints converted from other Swin code may not carry it.
    re.compile(r'(^|\.)relative_position_index$'),
    # BatchNorm's batch counter: only used for a cumulative moving average
    # in training, never at test time; mmengine's own load_state_dict does
    # not report it missing either.
    re.compile(r'(^|\.)num_batches_tracked$'),
)
# How many keys of each kind a mismatch message names.
SHOWN_KEYS = 3


def tolerated_missing(key):
    """Whether a checkpoint may lack the model key ``key``."""
    return any(p.search(key) for p in TOLERATED_MISSING)


def checkpoint_state_dict(checkpoint, filename='checkpoint'):
    """The state dict of a loaded checkpoint, the way mmengine reads it
    (``checkpoint['state_dict']`` or the checkpoint itself, a ``module.``
    prefix stripped); :class:`CheckpointReadError` if it is none."""
    if not isinstance(checkpoint, dict):
        raise CheckpointReadError(
            f'{filename} is not a model checkpoint (it holds a '
            f'{type(checkpoint).__name__}, not a dict of weights); pass the '
            '.pth of a trained model')
    state_dict = checkpoint.get('state_dict', checkpoint)
    if not isinstance(state_dict, dict) or not all(
            torch.is_tensor(v) for v in state_dict.values()):
        raise CheckpointReadError(
            f'{filename} is not a model checkpoint (expected a dict of '
            'tensors, or one under "state_dict"); pass the .pth of a trained '
            'model')
    out = OrderedDict()
    for key, value in state_dict.items():
        out[re.sub(r'^module\.', '', key)] = value
    metadata = getattr(state_dict, '_metadata', None)
    if metadata is not None:
        out._metadata = metadata
    return out


def _keys(keys):
    shown = ', '.join(keys[:SHOWN_KEYS])
    more = f', ... (+{len(keys) - SHOWN_KEYS})' if len(keys) > SHOWN_KEYS \
        else ''
    return shown + more


def state_dict_mismatch(model, state_dict):
    """``(missing, unexpected, shapes)`` of ``state_dict`` against
    ``model``: model keys the checkpoint lacks (tolerated ones excluded),
    checkpoint keys the model does not have, and ``(key, checkpoint shape,
    model shape)`` of the common keys whose shapes differ."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict and
               not tolerated_missing(k)]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [(k, tuple(v.shape), tuple(own[k].shape))
              for k, v in state_dict.items()
              if k in own and tuple(v.shape) != tuple(own[k].shape)]
    return missing, unexpected, shapes


def mismatch_message(filename, model, missing, unexpected, shapes):
    parts = []
    if missing:
        parts.append(f'{len(missing)} missing key(s) ({_keys(missing)})')
    if unexpected:
        parts.append(f'{len(unexpected)} unexpected key(s) '
                     f'({_keys(unexpected)})')
    if shapes:
        shown = '; '.join(f'{k}: checkpoint {tuple(a)}, model {tuple(b)}'
                          for k, a, b in shapes[:SHOWN_KEYS])
        more = f'; ... (+{len(shapes) - SHOWN_KEYS})' \
            if len(shapes) > SHOWN_KEYS else ''
        parts.append(f'{len(shapes)} shape mismatch(es) ({shown}{more})')
    return (f'checkpoint {filename} does not fit the {type(model).__name__} '
            f'of the config: {", ".join(parts)}; use the config the '
            'checkpoint was trained with, or convert the checkpoint to this '
            'model\'s keys')


class _Silent:
    """A logger for mmengine's load_state_dict that keeps nothing."""

    def warning(self, *args, **kwargs):
        pass


def load_checkpoint_strict(model, filename, map_location='cpu'):
    """Load ``filename`` into ``model`` through mmengine, strictly.

    The file is read by mmengine's ``_load_checkpoint`` (for local files
    :func:`safe_torch_load`) and loaded by mmengine's
    ``_load_checkpoint_to_model`` with ``strict=True``.  Before that, the
    model's own values of missing :data:`TOLERATED_MISSING` buffers are
    put into the state dict (a no-op for the model), and any other missing
    key, any unexpected key and any shape mismatch raises
    :class:`CheckpointMismatchError` with one line.

    Returns:
        dict: the checkpoint.
    """
    from mmengine.runner.checkpoint import (_load_checkpoint,
                                            _load_checkpoint_to_model)
    checkpoint = _load_checkpoint(filename, map_location=map_location,
                                  logger='silent')
    state_dict = checkpoint_state_dict(checkpoint, filename)
    missing, unexpected, shapes = state_dict_mismatch(model, state_dict)
    if missing or unexpected or shapes:
        raise CheckpointMismatchError(mismatch_message(
            filename, model, missing, unexpected, shapes))
    own = model.state_dict()
    for key in own:
        if key not in state_dict:  # tolerated: keep the model's value
            state_dict[key] = own[key]
    try:
        _load_checkpoint_to_model(model, dict(state_dict=state_dict),
                                  strict=True, logger=_Silent(),
                                  revise_keys=[])
    except RuntimeError as err:
        # Anything a module's own loading hook refuses beyond the checks
        # above (mmengine lists it over several lines).
        lines = [ln.strip() for ln in str(err).splitlines()
                 if ln.strip() and 'do not match exactly' not in ln]
        raise CheckpointMismatchError(
            f'checkpoint {filename} does not fit the {type(model).__name__} '
            f'of the config: {lines[0][:300] if lines else err}; use the '
            'config the checkpoint was trained with') from None
    return checkpoint
