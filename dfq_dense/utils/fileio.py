"""Atomic result files: a reader never sees a half-written file."""
import json
import os
import os.path as osp
import tempfile
from contextlib import contextmanager


@contextmanager
def atomic_path(path, suffix=''):
    """Yield a temporary sibling of ``path``; on success it replaces
    ``path``, on error it is removed."""
    folder = osp.dirname(osp.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix='.tmp.', suffix=suffix)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        if osp.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(path, obj, sort_keys=False):
    """Write ``obj`` as JSON to ``path`` through a temporary sibling file."""
    with atomic_path(path, '.json') as tmp:
        with open(tmp, 'w') as f:
            json.dump(obj, f, indent=2, sort_keys=sort_keys)
            f.write('\n')


def torch_save_atomic(obj, path):
    """``torch.save(obj, path)`` through a temporary sibling file."""
    import torch
    with atomic_path(path, '.pth') as tmp:
        torch.save(obj, tmp)
    return path
