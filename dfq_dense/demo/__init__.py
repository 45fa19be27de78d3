"""The embedded demo: a generated dataset and two small trained models."""
import hashlib
import json
import os.path as osp

from .crops import generate_demo_crops
from .dataset import (DEFAULT_SEED, DEFAULT_SIZE, SEG_CLASSES, THING_CLASSES,
                      demo_metainfo, generate_demo_dataset, render_scene)

CHECKPOINT_DIR = osp.join(osp.dirname(__file__), 'checkpoints')
MANIFEST = osp.join(CHECKPOINT_DIR, 'manifest.json')
# Demo model name -> (task, config relative to the repo root).
DEMO_MODELS = {
    'mask_rcnn_swin_demo': ('det', 'configs/demo/mask_rcnn_swin_demo.py'),
    'upernet_swin_demo': ('seg', 'configs/demo/upernet_swin_demo.py'),
    'swin_cls_demo': ('cls', 'configs/demo/swin_cls_demo.py'),
}


def demo_checkpoint(name):
    """Path of a shipped demo checkpoint."""
    return osp.join(CHECKPOINT_DIR, f'{name}.pth')


class DemoCheckpointError(ValueError):
    """A shipped demo checkpoint that differs from its manifest entry."""


def load_manifest():
    """Training command, sha256 and recorded FP metrics of each checkpoint."""
    if not osp.isfile(MANIFEST):
        return {}
    with open(MANIFEST) as f:
        return json.load(f)


def manifest_entry(path):
    """``(name, entry)`` of the manifest when ``path`` is a shipped demo
    checkpoint (a file in :data:`CHECKPOINT_DIR` whose name the manifest
    lists), else None.  Symlinks and relative paths are resolved."""
    real = osp.realpath(path)
    if osp.dirname(real) != osp.realpath(CHECKPOINT_DIR):
        return None
    for name, entry in load_manifest().items():
        listed = osp.basename(entry.get('checkpoint') or f'{name}.pth')
        if osp.basename(real) == listed:
            return name, entry
    return None


def verify_demo_checkpoint(path):
    """Check a shipped demo checkpoint against the manifest's sha256.

    A no-op (returns None) for any other file.  Returns the sha256 of a
    verified demo checkpoint; raises :class:`DemoCheckpointError` (one line)
    when it differs from the recorded one.
    """
    found = manifest_entry(path)
    if found is None or not found[1].get('sha256'):
        return None
    name, entry = found
    digest = sha256sum(path)
    if digest != entry['sha256']:
        rel = entry.get('checkpoint') or osp.join(
            'dfq_dense', 'demo', 'checkpoints', osp.basename(path))
        raise DemoCheckpointError(
            f'demo checkpoint {path} sha256 mismatch: corrupted or modified '
            f'(manifest {entry["sha256"][:12]}..., file {digest[:12]}...); '
            f'restore it with git checkout -- {rel} (a retrained one is '
            'recorded in manifest.json by tools/train_demo.py)')
    return digest


def sha256sum(path):
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()


def set_demo_data_root(cfg, root, splits=None):
    """Point every dataloader and evaluator of a demo config at ``root``.

    ``splits`` (e.g. ``dict(train=8, val=4)``) shrinks the generated dataset,
    which the quick training mode and the tests use.  A classification demo
    config (``demo_dataset.crops``) reads the crops' class folders,
    ``<root>/cls/train`` and ``<root>/cls/val``.
    """
    root = root.rstrip('/')
    cfg.demo_dataset.root = root
    if splits is not None:
        cfg.demo_dataset.splits = splits
    crops = cfg.demo_dataset.get('crops')
    for key in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        if cfg.get(key) is not None:
            cfg[key].dataset.data_root = root if not crops else osp.join(
                root, 'cls', 'train' if key == 'train_dataloader' else 'val')
    for key in ('val_evaluator', 'test_evaluator'):
        ev = cfg.get(key)
        if isinstance(ev, dict) and 'ann_file' in ev:
            ev.ann_file = osp.join(root, 'annotations',
                                   osp.basename(ev.ann_file))
    return cfg


def ensure_demo_data(cfg):
    """Generate the demo dataset a config asks for (``demo_dataset``), and
    its object crops when it asks for them (``demo_dataset.crops``: the
    keyword arguments of :func:`~dfq_dense.demo.crops.generate_demo_crops`,
    the classification demo).

    A no-op for configs without ``demo_dataset`` and when an identical dataset
    (and identical crops) already exist.
    """
    spec = cfg.get('demo_dataset')
    if not spec:
        return None
    root = generate_demo_dataset(
        spec['root'], seed=spec.get('seed', DEFAULT_SEED),
        size=spec.get('size', DEFAULT_SIZE), splits=spec.get('splits'))
    if spec.get('crops') is not None:
        generate_demo_crops(root, **dict(spec['crops']))
    return root


__all__ = [
    'CHECKPOINT_DIR', 'DEMO_MODELS', 'SEG_CLASSES', 'THING_CLASSES',
    'DemoCheckpointError', 'demo_checkpoint', 'manifest_entry',
    'verify_demo_checkpoint', 'demo_metainfo', 'ensure_demo_data',
    'generate_demo_crops', 'generate_demo_dataset', 'load_manifest', 'render_scene',
    'set_demo_data_root', 'sha256sum'
]
