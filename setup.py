"""Build step of dfq_dense: ship the suite's configs inside the package.

The metadata is in pyproject.toml.  This only adds what pyproject.toml
cannot say: a wheel (``pip install .``, ``pip wheel .``) carries a copy of
``configs/`` at ``dfq_dense/.mim/configs``, where OpenMMLab packages keep
theirs, so that a config anywhere can inherit the suite's configs as
``_base_ = 'dfq_dense::...'`` (see dfq_dense/config_scope.py).  An editable
install (``pip install -e .``) copies nothing: it reads ``configs/`` of the
checkout.
"""
import os
import os.path as osp
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = osp.dirname(osp.abspath(__file__))
CONFIGS = osp.join(HERE, 'configs')
SKIP_DIRS = {'__pycache__'}
SKIP_SUFFIXES = ('.pyc', '.pyo')


class BuildPyWithConfigs(build_py):
    """``build_py`` that also copies ``configs/`` into
    ``<build_lib>/dfq_dense/.mim/configs``."""

    def run(self):
        super().run()
        if getattr(self, 'editable_mode', False):
            return
        self.copy_configs()

    def config_files(self):
        """``(source, destination)`` of every config file."""
        dest_root = osp.join(self.build_lib, 'dfq_dense', '.mim', 'configs')
        pairs = []
        for folder, dirs, files in os.walk(CONFIGS):
            dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
            for name in sorted(files):
                if name.endswith(SKIP_SUFFIXES):
                    continue
                src = osp.join(folder, name)
                pairs.append(
                    (src, osp.join(dest_root, osp.relpath(src, CONFIGS))))
        return pairs

    def copy_configs(self):
        if not osp.isdir(CONFIGS):
            raise FileNotFoundError(
                f'{CONFIGS} is missing: the sdist must include configs/ '
                '(see MANIFEST.in)')
        dest_root = osp.join(self.build_lib, 'dfq_dense', '.mim', 'configs')
        if osp.isdir(dest_root) and not self.dry_run:
            shutil.rmtree(dest_root)  # no stale configs from earlier builds
        for src, dst in self.config_files():
            self.mkpath(osp.dirname(dst))
            self.copy_file(src, dst, preserve_mode=False)

    def get_outputs(self, include_bytecode=True):
        outputs = super().get_outputs(include_bytecode)
        if getattr(self, 'editable_mode', False) or not osp.isdir(CONFIGS):
            return outputs
        return outputs + [dst for _, dst in self.config_files()]


setup(cmdclass={'build_py': BuildPyWithConfigs})
