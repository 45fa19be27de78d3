"""Inherit the suite's configs from anywhere by scope.

A config in a user's own folder writes::

    _base_ = 'dfq_dense::mask_rcnn_swin_s_w8a8.py'
    _base_ = 'dfq_dense::demo/upernet_swin_demo_w8a8.py'
    _base_ = 'dfq_dense::_base_/methods/psaq_vit.py'

the way an mmdet config writes ``'mmdet::...'``.  The path after ``::`` is
relative to the suite's ``configs/`` folder.

Where the configs are: an installed wheel (``pip install .``) carries a
copy of ``configs/`` inside the package, at ``dfq_dense/.mim/configs`` as
the OpenMMLab packages do (the build step of ``setup.py`` puts it there); an
editable install (``pip install -e .``) reads ``configs/`` of the source
checkout next to the package.

Why a hook and not mmengine's own look-up: mmengine resolves ``pkg::`` only
for the scopes of its hard-coded ``MODULE2PACKAGE`` table, only for paths
with a folder (its pattern ``\\w*::\\w*/\\w*`` rejects
``'dfq_dense::mask_rcnn_swin_s_w8a8.py'``), and finds the package through
the distribution's location, which is not the source folder of an editable
install.  :func:`register_config_scope` therefore wraps
``Config._get_cfg_path`` (the one function ``Config.fromfile`` asks for the
path of each ``_base_``): ``dfq_dense::`` paths are resolved here, every
other path goes to mmengine unchanged.

When: mmengine reads ``_base_`` before it imports a config's
``custom_imports``, so the hook must be in place before ``Config.fromfile``
runs.  ``import dfq_dense`` installs it; tools/dfq_test.py imports
dfq_dense before it reads the config, and a script of one's own does the
same::

    import dfq_dense  # noqa: F401  (lets _base_ use 'dfq_dense::')
    from mmengine.config import Config
    cfg = Config.fromfile('my_config.py')

The inherited files are read as if ``_base_`` named their absolute path (no
``_scope_`` is attached): their own ``mmdet::`` / ``mmseg::`` bases set the
default scope, exactly as when they are used inside the suite.
"""
import errno
import os.path as osp

SCOPE = 'dfq_dense'
PACKAGE_DIR = osp.dirname(osp.abspath(__file__))
#: The copy shipped inside an installed wheel.
INSTALLED_CONFIGS = osp.join(PACKAGE_DIR, '.mim', 'configs')
#: configs/ of the source checkout (editable install, or no install).
SOURCE_CONFIGS = osp.join(osp.dirname(PACKAGE_DIR), 'configs')


def config_root():
    """Folder of the suite's configs (see the module docstring)."""
    for root in (INSTALLED_CONFIGS, SOURCE_CONFIGS):
        if osp.isdir(root):
            return root
    raise FileNotFoundError(
        errno.ENOENT, 'the configs of dfq_dense are not found: neither '
        f'{INSTALLED_CONFIGS} (installed package) nor {SOURCE_CONFIGS} '
        '(source checkout) exists; reinstall dfq_dense', INSTALLED_CONFIGS)


def resolve_config(name):
    """Absolute path of a suite config: ``name`` relative to the configs
    folder (``'demo/upernet_swin_demo_w8a8.py'``), with or without the
    ``'dfq_dense::'`` prefix.

    Raises FileNotFoundError (with ``filename`` set) when there is no
    such file.
    """
    scope, sep, rest = name.partition('::')
    if sep:
        if scope != SCOPE:
            raise ValueError(f'not a {SCOPE}:: config path: {name!r}')
        name = rest
    if not name or osp.isabs(name):
        raise ValueError(f'{SCOPE}:: takes a path relative to the suite\'s '
                         f'configs folder, got {name!r}')
    root = config_root()
    path = osp.normpath(osp.join(root, name))
    if not path.startswith(osp.join(root, '')) or not osp.isfile(path):
        raise FileNotFoundError(
            errno.ENOENT, f'no config {SCOPE}::{name} (looked for {path})',
            path)
    return path


def register_config_scope():
    """Let ``Config.fromfile`` resolve ``_base_ = 'dfq_dense::...'``.

    Idempotent; other scopes and relative paths are left to mmengine.
    """
    from mmengine.config import Config

    original = Config._get_cfg_path
    if getattr(original, '_dfq_dense_scope', False):
        return

    def _get_cfg_path(cfg_path, filename):
        if isinstance(cfg_path, str) and \
                cfg_path.partition('::')[0] == SCOPE and '::' in cfg_path:
            return resolve_config(cfg_path), None
        return original(cfg_path, filename)

    _get_cfg_path._dfq_dense_scope = True
    _get_cfg_path.__wrapped__ = original
    _get_cfg_path.__doc__ = original.__doc__
    Config._get_cfg_path = staticmethod(_get_cfg_path)


__all__ = ['SCOPE', 'config_root', 'resolve_config', 'register_config_scope']
