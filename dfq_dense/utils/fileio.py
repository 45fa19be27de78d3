"""Atomic result files: a reader never sees a half-written file."""
import json
import os
import os.path as osp
import tempfile


def write_json_atomic(path, obj, sort_keys=False):
    """Write ``obj`` as JSON to ``path`` through a temporary sibling file."""
    folder = osp.dirname(osp.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix='.tmp.', suffix='.json')
    try:
        with os.fdopen(fd, 'w') as f:
            json.dump(obj, f, indent=2, sort_keys=sort_keys)
            f.write('\n')
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        if osp.exists(tmp):
            os.unlink(tmp)
        raise
