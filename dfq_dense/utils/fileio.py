"""Atomic result files: a reader never sees a half-written file.

Every writer goes through :func:`atomic_path`: the data is written to a
temporary sibling (``.tmp.*`` in the same folder), flushed to disk, then
renamed over the destination.  On any error -- a full disk (``ENOSPC``), a
read-only folder, an exception of the caller -- the temporary file is
removed, the destination keeps its old content (or stays absent), and so do
the folders :func:`atomic_path` created for it.  An ``OSError`` that carries
no path, or the temporary one, is re-raised with the destination path, so
that the one-line error names the file the user asked for.
:func:`atomic_dir` does the same for a whole tree (the demo dataset, its
crops).
"""
import json
import os
import os.path as osp
import shutil
import tempfile
from contextlib import contextmanager


def _make_parents(folder):
    """``os.makedirs(folder)``; returns the folders it created, deepest
    first (to remove them again if the write fails)."""
    created = []
    path = osp.abspath(folder)
    while not osp.isdir(path):
        created.append(path)
        parent = osp.dirname(path)
        if parent == path:
            break
        path = parent
    os.makedirs(folder, exist_ok=True)
    return created


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path, suffix=''):
    """Yield a temporary sibling of ``path``; on success it replaces
    ``path``, on error it is removed (see the module docstring)."""
    folder = osp.dirname(osp.abspath(path))
    created = []
    tmp = None
    try:
        created = _make_parents(folder)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix='.tmp.', suffix=suffix)
        os.close(fd)
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None and osp.lexists(tmp):
            os.unlink(tmp)
        for made in created:  # deepest first; only if still empty
            try:
                os.rmdir(made)
            except OSError:
                break
        if isinstance(err, OSError) and err.filename in (None, tmp):
            err.filename = path
        raise


@contextmanager
def atomic_dir(path, prefix='.tmp.'):
    """Yield a temporary sibling folder of ``path`` to build a tree in; on
    success it replaces ``path`` (an older tree there is removed), on error
    it is removed: an interrupted writer leaves no half-written tree."""
    parent = osp.dirname(osp.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
    try:
        yield tmp
        if osp.exists(path):
            shutil.rmtree(path)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json_atomic(path, obj, sort_keys=False):
    """Write ``obj`` as JSON to ``path`` through a temporary sibling file."""
    with atomic_path(path, '.json') as tmp:
        with open(tmp, 'w') as f:
            json.dump(obj, f, indent=2, sort_keys=sort_keys)
            f.write('\n')


def torch_save_atomic(obj, path):
    """``torch.save(obj, path)`` through a temporary sibling file.

    torch writes through a Python file object here, so that a failed write
    raises the ``OSError`` of the file system (``ENOSPC`` on a full disk)
    rather than torch's generic ``RuntimeError`` of its own file writer.
    """
    import torch
    with atomic_path(path, '.pth') as tmp:
        with open(tmp, 'wb') as f:
            torch.save(obj, f)
    return path
