"""Small helpers around mmengine's Runner shared by the tools and tests."""
import os
import os.path as osp

from mmengine.config import Config
from mmengine.runner import Runner

from ..demo import ensure_demo_data

TASKS = {'mmdet': 'det', 'mmseg': 'seg'}


class DFQInputError(RuntimeError):
    """Bad user input (path, config value): reported as one line."""


def task_of(cfg):
    """'det' or 'seg', from the config's ``default_scope``."""
    scope = cfg.get('default_scope')
    if scope not in TASKS:
        raise DFQInputError(
            f"config default_scope is {scope!r}; dfq_dense supports "
            f"{sorted(TASKS)} (inherit an mmdet:: or mmseg:: config)")
    return TASKS[scope]


def load_config(path, cfg_options=None):
    if not osp.isfile(path):
        raise DFQInputError(f'config not found: {path}')
    cfg = Config.fromfile(path)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    return cfg


def _dataset_paths(cfg):
    """(what, path) pairs a test run reads: images and annotation files."""
    ds = cfg.test_dataloader.dataset
    root = ds.get('data_root', '') or ''
    paths = []
    ann = ds.get('ann_file')
    if ann:
        paths.append(('annotation file', osp.join(root, ann)))
    for value in (ds.get('data_prefix') or {}).values():
        paths.append(('image/label folder', osp.join(root, value)))
    return root, paths


DATASET_HINTS = {
    'det': 'download COCO 2017 (val2017 images and annotations) into '
           'data/coco/ as in mmdet\'s dataset_prepare docs, or set '
           '--cfg-options data_root=...',
    'seg': 'download ADE20K (ADEChallengeData2016) into data/ade/ as in '
           'mmseg\'s dataset_prepare docs, or set --cfg-options '
           'data_root=...',
}


def check_dataset(cfg):
    """Generate the demo data if asked for, else fail fast on missing paths."""
    ensure_demo_data(cfg)
    root, paths = _dataset_paths(cfg)
    for what, path in paths:
        if not osp.exists(path):
            raise DFQInputError(
                f'dataset {what} not found: {path} '
                f'({DATASET_HINTS[task_of(cfg)]})')


def resolve_checkpoint(checkpoint):
    """Local path of ``checkpoint``; a URL is fetched into torch's hub cache.

    Fetching here, before the Runner exists, means a failed download leaves
    nothing behind in the work dir.
    """
    if checkpoint is None:
        raise DFQInputError(
            'no checkpoint: pass CHECKPOINT or set load_from in the config')
    if checkpoint.startswith(('http://', 'https://')):
        import torch
        cached = osp.join(torch.hub.get_dir(), 'checkpoints',
                          osp.basename(checkpoint.split('?')[0]))
        if not osp.isfile(cached):
            os.makedirs(osp.dirname(cached), exist_ok=True)
            try:
                torch.hub.download_url_to_file(checkpoint, cached)
            except Exception as err:  # noqa: BLE001  (any network failure)
                reason = str(err).splitlines()[0] if str(err) else \
                    type(err).__name__
                raise DFQInputError(
                    f'checkpoint not available: could not download '
                    f'{checkpoint} ({reason}); download it by hand and pass '
                    'its path as CHECKPOINT') from None
        return cached
    if not osp.isfile(checkpoint):
        raise DFQInputError(
            f'checkpoint not found: {checkpoint} (download the model-zoo '
            'checkpoint named in the config\'s load_from, or pass its local '
            'path as CHECKPOINT)')
    return checkpoint


def build_test_runner(cfg, checkpoint=None, work_dir=None, launcher='none'):
    """A Runner ready for ``.test()`` on ``cfg`` with weights ``checkpoint``."""
    cfg = cfg.copy()
    cfg.launcher = launcher
    if checkpoint is not None:
        cfg.load_from = checkpoint
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('work_dirs', 'test')
    os.makedirs(cfg.work_dir, exist_ok=True)
    return Runner.from_cfg(cfg)
