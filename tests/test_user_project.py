"""A user's own method from outside the repository (projects/example_project):
configs inherited by scope (``_base_ = 'dfq_dense::...'``), a synthesizer
registered through ``custom_imports``, the suite's configs shipped in a
wheel."""
import json
import os
import os.path as osp
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch
from mmengine.config import Config

import dfq_dense  # noqa: F401  (lets _base_ use 'dfq_dense::')
from dfq_dense.config_scope import config_root, resolve_config
from dfq_dense.engine.runner import load_config

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
PROJECT = osp.join(REPO, 'projects', 'example_project')
DEMO_CONFIG = 'upernet_swin_demo_w8a8_smooth_psaq.py'


def _write(path, text):
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize('name', [
    'demo/upernet_swin_demo_w8a8.py',
    'mask_rcnn_swin_s_w8a8.py',  # no folder: mmengine's own pattern fails
    '_base_/methods/psaq_vit.py',
])
def test_scope_base_resolves_from_anywhere(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    leaf = _write(tmp_path / 'leaf.py', f"_base_ = 'dfq_dense::{name}'\n")
    by_scope = load_config(leaf)
    by_path = load_config(osp.join(REPO, 'configs', name))
    assert by_scope.to_dict() == by_path.to_dict()


def test_scope_base_overrides_and_lists(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    leaf = _write(tmp_path / 'leaf.py', (
        "_base_ = ['dfq_dense::demo/upernet_swin_demo_w8a8.py']\n"
        "dfq = dict(quantizer=dict(w_bits=4))\n"))
    cfg = load_config(leaf)
    assert cfg.default_scope == 'mmseg'
    assert cfg.dfq.quantizer.w_bits == 4 and cfg.dfq.quantizer.a_bits == 8
    assert cfg.dfq.synthesizer.type == 'PSAQViT'
    # Relative _base_ inside the suite's configs still resolve.
    assert cfg.model.type == 'EncoderDecoder'


def test_scope_missing_config_names_the_file(tmp_path):
    leaf = _write(tmp_path / 'leaf.py', "_base_ = 'dfq_dense::nope/x.py'\n")
    with pytest.raises(FileNotFoundError) as info:
        Config.fromfile(leaf)
    assert info.value.filename == osp.join(config_root(), 'nope', 'x.py')
    with pytest.raises(ValueError):
        resolve_config('dfq_dense::/etc/passwd')
    with pytest.raises(FileNotFoundError):
        resolve_config('dfq_dense::../pyproject.toml')


def test_other_scopes_untouched(tmp_path):
    leaf = _write(tmp_path / 'leaf.py', (
        "_base_ = 'mmseg::_base_/default_runtime.py'\n"))
    assert Config.fromfile(leaf).default_scope == 'mmseg'


def test_project_configs_and_method(monkeypatch):
    monkeypatch.syspath_prepend(PROJECT)
    from dfq_dense.engine.dfq_config import parse_dfq_config
    from dfq_dense.registry import MODELS, build
    for name, suite in ((DEMO_CONFIG, 'demo/upernet_swin_demo_w8a8.py'),
                        ('mask_rcnn_swin_s_w8a8_smooth_psaq.py',
                         'mask_rcnn_swin_s_w8a8.py')):
        cfg = load_config(osp.join(PROJECT, 'configs', name))
        base = load_config(osp.join(REPO, 'configs', suite))
        assert cfg.dfq.synthesizer.type == 'SmoothPSAQViT'
        # One change: the data source (and the import that provides it).
        synth = dict(cfg.dfq.synthesizer, type='PSAQViT')
        synth.pop('init_sigma', None)
        assert synth == base.dfq.synthesizer.to_dict()
        assert cfg.dfq.quantizer == base.dfq.quantizer
        assert parse_dfq_config(cfg.dfq).synthesizer['type'] == \
            'SmoothPSAQViT'
    assert 'SmoothPSAQViT' in MODELS.module_dict
    synth = build(MODELS, dict(type='SmoothPSAQViT', init_sigma=2.0))
    synth.mean = torch.zeros(3)
    synth.std = torch.ones(3)
    x, _, _ = synth._init_pixels(2, (32, 32), 'cpu',
                                 torch.Generator().manual_seed(0))
    assert x.requires_grad and x.shape == (2, 3, 32, 32)
    # Smoothed noise: neighbouring pixels are strongly correlated.
    a, b = x[..., :, :-1].flatten(), x[..., :, 1:].flatten()
    assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.5
    with pytest.raises(ValueError, match='init_sigma'):
        build(MODELS, dict(type='SmoothPSAQViT', init_sigma=-1))


def test_project_runs_from_outside_the_repository(tmp_path, demo_data_root):
    # The user's project lives in their own folder, the run starts there.
    project = tmp_path / 'my_project'
    shutil.copytree(PROJECT, project,
                    ignore=shutil.ignore_patterns('__pycache__'))
    work = tmp_path / 'work'
    env = dict(os.environ, PYTHONPATH=str(project), OMP_NUM_THREADS='1')
    proc = subprocess.run(
        [sys.executable, osp.join(REPO, 'tools', 'dfq_test.py'),
         osp.join('my_project', 'configs', DEMO_CONFIG),
         '--work-dir', str(work), '--data-root', demo_data_root,
         '--cfg-options', 'dfq.synthesizer.num_images=2',
         'dfq.synthesizer.iterations=2', 'test_dataloader.dataset.indices=4'],
        capture_output=True, text=True, cwd=str(tmp_path), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(work / 'dfq_results.json') as f:
        results = json.load(f)
    assert results['method'] == 'SmoothPSAQViT'
    assert results['synthesizer']['type'] == 'SmoothPSAQViT'
    assert results['num_images'] == 2
    # load_from of the demo config (relative to the repository) was found.
    assert osp.samefile(results['checkpoint']['path'], osp.join(
        REPO, 'dfq_dense', 'demo', 'checkpoints', 'upernet_swin_demo.pth'))


def test_wheel_ships_the_configs(tmp_path):
    # A regular install builds a wheel: it must carry configs/ at
    # dfq_dense/.mim/configs.  Built from a copy: nothing written here.
    src = tmp_path / 'src'
    skip = shutil.ignore_patterns('__pycache__', '*.pyc', '*.pth')
    for part in ('dfq_dense', 'configs'):
        shutil.copytree(osp.join(REPO, part), src / part, ignore=skip)
    for part in ('pyproject.toml', 'setup.py', 'MANIFEST.in', 'README.md'):
        shutil.copy(osp.join(REPO, part), src)
    proc = subprocess.run(
        [sys.executable, '-m', 'pip', 'wheel', str(src), '--no-deps',
         '--no-build-isolation', '--disable-pip-version-check', '-q',
         '-w', str(tmp_path / 'wheel')],
        capture_output=True, text=True, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (tmp_path / 'wheel').iterdir()
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {n[len('dfq_dense/.mim/configs/'):] for n in names
               if n.startswith('dfq_dense/.mim/configs/')}
    expected = set()
    for folder, _, files in os.walk(osp.join(REPO, 'configs')):
        for name in files:
            if '__pycache__' in folder or name.endswith('.pyc'):
                continue
            expected.add(osp.relpath(osp.join(folder, name),
                                     osp.join(REPO, 'configs')))
    assert shipped == expected
    assert 'dfq_dense/config_scope.py' in names
