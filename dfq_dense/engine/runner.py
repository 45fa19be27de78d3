"""Small helpers around mmengine's Runner shared by the tools and tests.

Also the input checks of ``tools/dfq_test.py`` that need no model: the
config (syntax errors with file and line), ``--cfg-options``, the data root,
the dataset files, the checkpoint path (and the sha256 of a shipped demo
checkpoint), the work dir and a ``dfq.load_images`` file or folder.  Each
raises :class:`DFQInputError` with one line naming the problem and the fix.
"""
import ast
import copy
import os
import os.path as osp
import traceback

from mmengine.config import Config
from mmengine.runner import Runner

from ..demo import ensure_demo_data
from .dfq_config import assemble_dfq

# The classification track's configs (configs/cls/) run in dfq_dense's own
# scope (a timm classifier, ImageNet val folders, top-1 / top-5).
TASKS = {'mmdet': 'det', 'mmseg': 'seg', 'dfq_dense': 'cls'}


class DFQInputError(RuntimeError):
    """Bad user input (path, config value): reported as one line."""


def task_of(cfg):
    """'det', 'seg' or 'cls', from the config's ``default_scope``."""
    scope = cfg.get('default_scope')
    if scope not in TASKS:
        raise DFQInputError(
            f"config default_scope is {scope!r}; dfq_dense supports "
            f"{sorted(TASKS)} (inherit an mmdet:: or mmseg:: config, or "
            f"configs/cls/_base_/cls_runtime.py for a timm classifier)")
    return TASKS[scope]


# --------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------
def _base_files(path, tree):
    """The ``_base_`` files a parsed config names (best effort)."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == '_base_'
                for t in node.targets):
            try:
                bases = ast.literal_eval(node.value)
            except ValueError:
                return []
            bases = bases if isinstance(bases, (list, tuple)) else [bases]
            out = []
            for base in bases:
                try:
                    out.append(Config._get_cfg_path(str(base), path)[0])
                except Exception:  # noqa: BLE001  (unresolvable: skip)
                    pass
            return out
    return []


def find_syntax_error(path, _seen=None):
    """The first SyntaxError in ``path`` or its ``_base_`` files, with the
    real file name and line (mmengine parses without a file name, so its
    own error says ``<unknown>``); None if there is none."""
    seen = set() if _seen is None else _seen
    path = osp.abspath(path)
    if path in seen or not osp.isfile(path) or not path.endswith('.py'):
        return None
    seen.add(path)
    with open(path, encoding='utf-8') as f:
        source = f.read()
    try:
        tree = ast.parse(source, filename=path)
    except SyntaxError as err:
        return err
    for base in _base_files(path, tree):
        found = find_syntax_error(base, seen)
        if found is not None:
            return found
    return None


def _config_frame(err):
    """``(file, line)`` of the innermost traceback frame in a config file
    (not in an installed package), or None."""
    found = None
    for frame in traceback.extract_tb(err.__traceback__):
        name = frame.filename
        if name.endswith('.py') and 'site-packages' not in name and \
                osp.abspath(name) != osp.abspath(__file__):
            found = (name, frame.lineno)
    return found


def _syntax_message(path, err):
    found = find_syntax_error(path) or err
    where = found.filename if found.filename not in (None, '<unknown>') \
        else f'{path} (or one of its _base_ files)'
    text = (found.text or '').strip()
    return (f'config {where}, line {found.lineno}: syntax error: {found.msg}'
            + (f': {text!r}' if text else '') + '; fix the Python syntax '
            'there')


def load_config(path, cfg_options=None):
    """``Config.fromfile(path)`` merged with ``cfg_options``, with one-line
    errors; an override of ``dfq.synthesizer.type`` drops the settings the
    new method does not take (see :func:`drop_foreign_synth_keys`)."""
    if not osp.isfile(path):
        what = 'is a folder, not a file' if osp.isdir(path) else 'not found'
        raise DFQInputError(f'config {what}: {path}')
    try:
        cfg = Config.fromfile(path)
    except SyntaxError as err:
        raise DFQInputError(_syntax_message(path, err)) from None
    except FileNotFoundError as err:
        missing = err.filename or str(err)
        raise DFQInputError(
            f'config {path}: a file it inherits (_base_) is not found: '
            f'{missing}') from None
    except Exception as err:  # noqa: BLE001  (any error of the config code)
        frame = _config_frame(err)
        where = f'{frame[0]}, line {frame[1]}' if frame else path
        reason = str(err).strip().splitlines()[0] if str(err).strip() \
            else ''
        raise DFQInputError(
            f'cannot read config {where}: {type(err).__name__}: '
            f'{reason}') from None
    # dfq from the configs/_base_ fragments (and the DFQ test loop)
    assemble_dfq(cfg)
    if cfg_options:
        old_type = _synth_type(cfg)
        dfq = cfg.get('dfq')
        if isinstance(dfq, dict) and dfq.get('adapter') is None and any(
                k.startswith('dfq.adapter.') for k in cfg_options):
            # a method without adapter: dfq.adapter.* starts one
            dfq.adapter = {}
        try:
            cfg.merge_from_dict(cfg_options)
        except Exception as err:  # noqa: BLE001
            raise DFQInputError(
                f'--cfg-options cannot be applied: {type(err).__name__}: '
                f'{str(err).splitlines()[0] if str(err) else ""}') from None
        drop_foreign_synth_keys(cfg, cfg_options, old_type)
    return cfg


def _synth_type(cfg):
    synth = (cfg.get('dfq') or {}).get('synthesizer')
    return synth.get('type') if isinstance(synth, dict) else None


def drop_foreign_synth_keys(cfg, cfg_options, old_type):
    """After ``--cfg-options dfq.synthesizer.type=NEW``, remove the settings
    of the config's method that NEW does not take (e.g. PSAQ-ViT's
    ``max_samples`` for ``GaussianNoise``) and the method-specific
    sub-configs (``components``, ``student_step``), unless they were given
    on the command line too.  Logs one line naming what was dropped.

    Returns the dropped keys.
    """
    from .dfq_config import METHOD_SPECIFIC_KEYS, synthesizer_class, \
        synthesizer_keys
    new_type = cfg_options.get('dfq.synthesizer.type')
    synth = (cfg.get('dfq') or {}).get('synthesizer')
    if new_type is None or not isinstance(synth, dict) or \
            old_type is None or \
            str(new_type).split('.')[-1] == str(old_type).split('.')[-1]:
        return []
    cls = synthesizer_class(str(new_type))
    if cls is None:
        return []  # parse_dfq_config reports the unknown method
    accepted = synthesizer_keys(cls)
    given = {key.split('.')[2] for key in cfg_options
             if key.startswith('dfq.synthesizer.') and key.count('.') >= 2}
    drop = [k for k in synth if k not in ('type', '_scope_') and
            k not in given and
            ((accepted is not None and k not in accepted) or
             k in METHOD_SPECIFIC_KEYS)]
    for key in drop:
        synth.pop(key)
    # A method-specific sub-config given on the command line was merged
    # into the old method's: keep only what the command line gave.
    for key in METHOD_SPECIFIC_KEYS:
        if key not in given or key not in synth:
            continue
        fresh = None
        for option, value in cfg_options.items():
            parts = option.split('.')
            if parts[:3] != ['dfq', 'synthesizer', key]:
                continue
            if len(parts) == 3:
                fresh = copy.deepcopy(value)
                continue
            fresh = fresh if isinstance(fresh, dict) else {}
            node = fresh
            for part in parts[3:-1]:
                node = node.setdefault(part, {})
            node[parts[-1]] = value
        synth[key] = fresh
    if drop:
        # Printed, not logged: no Runner (and so no log file) exists yet,
        # and a logger made earlier in the process may hold a stale stream.
        print(f'dfq_test: notice: dfq.synthesizer.type={new_type} replaces '
              f'{old_type}: dropped its setting(s) {", ".join(drop)} '
              f'({new_type} does not take them, or they are specific to a '
              'method)', flush=True)
    return drop


# --------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------
def _innermost(dataset):
    while isinstance(dataset, dict) and 'dataset' in dataset:
        dataset = dataset['dataset']  # RepeatDataset and other wrappers
    return dataset


def set_data_root(cfg, root):
    """Point the config's datasets (train, val, test) and the ``ann_file``
    of its evaluators at ``root`` (``--data-root``).

    mmdet / mmseg configs read their top-level ``data_root`` into the
    dataloaders while the config is parsed, so overriding ``data_root``
    itself changes nothing; these are the keys that count.  A demo config's
    generated dataset (``demo_dataset.root``) follows.
    """
    root = osp.normpath(root)
    old_root = None
    for key in ('test_dataloader', 'val_dataloader', 'train_dataloader'):
        loader = cfg.get(key)
        if not isinstance(loader, dict) or 'dataset' not in loader:
            continue
        dataset = _innermost(loader['dataset'])
        if old_root is None and dataset.get('data_root'):
            old_root = dataset['data_root']
        dataset['data_root'] = root
    for key in ('test_evaluator', 'val_evaluator'):
        evaluators = cfg.get(key)
        for ev in evaluators if isinstance(evaluators, list) else \
                [evaluators]:
            if not isinstance(ev, dict) or not ev.get('ann_file'):
                continue
            ann = ev['ann_file']
            if old_root and osp.normpath(ann).startswith(
                    osp.normpath(old_root) + os.sep):
                ev['ann_file'] = osp.join(
                    root, osp.relpath(osp.normpath(ann),
                                      osp.normpath(old_root)))
            elif not osp.isabs(ann):
                ev['ann_file'] = osp.join(root, 'annotations',
                                          osp.basename(ann))
    if isinstance(cfg.get('demo_dataset'), dict):
        cfg.demo_dataset.root = root
    return cfg


def _dataset_paths(cfg):
    """(what, path) pairs a test run reads: images, annotation files and
    the evaluator's annotation file."""
    ds = _innermost(cfg.test_dataloader.dataset)
    root = ds.get('data_root', '') or ''
    paths = []
    ann = ds.get('ann_file')
    if ann:
        paths.append(('annotation file', osp.join(root, ann)))
    for value in (ds.get('data_prefix') or {}).values():
        paths.append(('image/label folder', osp.join(root, value)))
    evaluators = cfg.get('test_evaluator')
    for ev in evaluators if isinstance(evaluators, list) else [evaluators]:
        if isinstance(ev, dict) and ev.get('ann_file'):
            paths.append(('evaluator annotation file', ev['ann_file']))
    return root, paths


# The fix for a missing dataset.  ``--data-root DIR`` (tools/dfq_test.py)
# sets the keys that count (see set_data_root); the equivalent
# --cfg-options are spelled out too.
DATASET_HINTS = {
    'det': 'download COCO 2017 (val2017 images and annotations) into '
           'data/coco/ as in mmdet\'s dataset_prepare docs, or pass '
           '--data-root DIR for a copy elsewhere (the same as --cfg-options '
           'test_dataloader.dataset.data_root=DIR '
           'test_evaluator.ann_file=DIR/annotations/instances_val2017.json)',
    'cls': 'put the ImageNet val images into data/imagenet/val/<wnid '
           'class folder>/*.JPEG, or pass --data-root DIR for a copy '
           'elsewhere (the same as --cfg-options '
           'test_dataloader.dataset.data_root=DIR)',
    'seg': 'download ADE20K (ADEChallengeData2016) into data/ade/ as in '
           'mmseg\'s dataset_prepare docs, or pass --data-root DIR for a '
           'copy elsewhere (the same as --cfg-options '
           'test_dataloader.dataset.data_root=DIR)',
}


def check_dataset(cfg):
    """Generate the demo data if asked for, else fail fast on missing paths.
    A classification config's test set is built here (a folder scan): a
    missing folder or a wrong number of class folders is one line."""
    ensure_demo_data(cfg)
    if task_of(cfg) == 'cls':
        _check_class_folders(cfg)
        return
    root, paths = _dataset_paths(cfg)
    for what, path in paths:
        if not osp.exists(path):
            raise DFQInputError(
                f'dataset {what} not found: {path} '
                f'({DATASET_HINTS[task_of(cfg)]})')


def _check_class_folders(cfg):
    from ..cls.dataset import ImageFolderError
    from ..registry import DATASETS
    ds_cfg = copy.deepcopy(_innermost(cfg.test_dataloader.dataset))
    ds_cfg = ds_cfg.to_dict() if hasattr(ds_cfg, 'to_dict') else dict(ds_cfg)
    try:
        DATASETS.build(ds_cfg)
    except ImageFolderError as err:
        raise DFQInputError(f'{err} ({DATASET_HINTS["cls"]})') from None


# --------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------
def _packaged_path(path):
    """A relative ``dfq_dense/...`` path (the demo configs' ``load_from``)
    that does not exist from the working directory: the file inside the
    installed package (editable checkout or wheel), so the demo configs
    also run from a user's own folder."""
    if osp.isabs(path) or osp.exists(path):
        return path
    parts = osp.normpath(path).split(os.sep)
    if parts[0] != 'dfq_dense':
        return path
    import dfq_dense
    root = osp.dirname(osp.dirname(osp.abspath(dfq_dense.__file__)))
    packaged = osp.join(root, *parts)
    return packaged if osp.exists(packaged) else path


def resolve_checkpoint(checkpoint):
    """Local path of ``checkpoint``; a URL is fetched into torch's hub cache.

    Fetching here, before the Runner exists, means a failed download leaves
    nothing behind in the work dir.  A shipped demo checkpoint is checked
    against the sha256 of the manifest.
    """
    from ..demo import DemoCheckpointError, verify_demo_checkpoint
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
    checkpoint = _packaged_path(checkpoint)
    if osp.isdir(checkpoint):
        raise DFQInputError(
            f'checkpoint is a folder, not a file: {checkpoint} (pass the '
            '.pth file)')
    if not osp.isfile(checkpoint):
        raise DFQInputError(
            f'checkpoint not found: {checkpoint} (download the model-zoo '
            'checkpoint named in the config\'s load_from, or pass its local '
            'path as CHECKPOINT)')
    try:
        verify_demo_checkpoint(checkpoint)
    except DemoCheckpointError as err:
        raise DFQInputError(str(err)) from None
    return checkpoint


def work_dir_of(cfg, work_dir=None, config_path=None):
    """The work dir a run will use: ``--work-dir``, the config's
    ``work_dir``, or ``./work_dirs/<config name>``."""
    if work_dir is not None:
        return work_dir
    if cfg.get('work_dir') is not None:
        return cfg.work_dir
    name = osp.splitext(osp.basename(config_path or 'dfq'))[0]
    return osp.join('./work_dirs', name)


def check_work_dir(path):
    """The work dir must be a folder (or creatable as one) and writable."""
    probe = osp.abspath(path)
    if osp.exists(probe) and not osp.isdir(probe):
        raise DFQInputError(
            f'work dir {path} is an existing file, not a folder: pass another '
            '--work-dir (or move the file away)')
    while not osp.exists(probe):
        parent = osp.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not osp.isdir(probe):
        raise DFQInputError(
            f'work dir {path} cannot be created: {probe} is a file, not a '
            'folder; pass another --work-dir')
    if not os.access(probe, os.W_OK | os.X_OK):
        raise DFQInputError(
            f'work dir {path} is not writable (no write permission on '
            f'{probe}); pass another --work-dir')


SYNTH_FILE = 'synthetic_images.pth'


def resolve_load_images(path, with_saved=False):
    """The ``synthetic_images.pth`` that ``dfq.load_images=PATH`` means.

    PATH may be the file, the ``synthetic/`` folder of an earlier run or
    that run's work dir.  The file is read and checked (a dict with a
    finite ``images`` tensor ``(N, 3, H, W)``, N >= 1).

    Returns:
        ``(file, images)``; with ``with_saved``, ``(file, images, saved)``
        (``saved``: the whole dict the file holds).
    """
    import torch

    from ..utils.checkpoint import CheckpointReadError, \
        UnsafeCheckpointError, safe_torch_load
    if osp.isdir(path):
        candidates = [osp.join(path, SYNTH_FILE),
                      osp.join(path, 'synthetic', SYNTH_FILE)]
        found = [c for c in candidates if osp.isfile(c)]
        if not found:
            raise DFQInputError(
                f'dfq.load_images folder {path} holds no {SYNTH_FILE} (nor '
                f'synthetic/{SYNTH_FILE}): point it at the '
                f'synthetic/{SYNTH_FILE} of an earlier run, its synthetic/ '
                'folder or its work dir')
        path = found[0]
    elif not osp.isfile(path):
        raise DFQInputError(
            f'dfq.load_images not found: {path} (point it at the '
            f'synthetic/{SYNTH_FILE} of an earlier run)')
    elif not path.endswith('.pth'):
        raise DFQInputError(
            f'dfq.load_images: {path} is not a .pth file (point it at the '
            f'synthetic/{SYNTH_FILE} of an earlier run)')
    try:
        saved = safe_torch_load(path)
    except (CheckpointReadError, UnsafeCheckpointError) as err:
        raise DFQInputError(f'dfq.load_images: {err}') from None
    images = saved.get('images') if isinstance(saved, dict) else None
    if not torch.is_tensor(images) or images.dim() != 4 or \
            images.shape[1] != 3 or images.shape[0] < 1 or \
            not images.is_floating_point():
        raise DFQInputError(
            f'dfq.load_images: {path} is not a {SYNTH_FILE} of dfq_test '
            '(expected a dict with a float tensor "images" of shape '
            '(N, 3, H, W)); point it at the synthetic images of an earlier '
            'run')
    if not bool(torch.isfinite(images).all()):
        raise DFQInputError(
            f'dfq.load_images: {path} holds NaN/Inf pixels (a diverged '
            'synthesis); synthesize the images again')
    if not isinstance(saved.get('meta', {}), dict):
        raise DFQInputError(
            f'dfq.load_images: {path} has a malformed "meta" entry')
    return (path, images, saved) if with_saved else (path, images)


def build_test_runner(cfg, checkpoint=None, work_dir=None, launcher='none'):
    """A Runner ready for ``.test()`` on ``cfg`` with weights ``checkpoint``.

    A classification config's timm model loads its weights itself (strictly,
    timm's layout, :class:`~dfq_dense.cls.TimmClassifier`): ``checkpoint``
    becomes ``model.checkpoint`` there, not the Runner's ``load_from``.
    """
    cfg = cfg.copy()
    cfg.launcher = launcher
    if checkpoint is not None and task_of(cfg) == 'cls':
        cfg.model.pretrained = True
        cfg.model.checkpoint = checkpoint
        cfg.load_from = None
    elif checkpoint is not None:
        cfg.load_from = checkpoint
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('work_dirs', 'test')
    os.makedirs(cfg.work_dir, exist_ok=True)
    return Runner.from_cfg(cfg)
