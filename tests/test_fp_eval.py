"""FP evaluation of the shipped demo models reproduces the recorded figures.

Runs mmdet's / mmseg's own test flow (Runner.test with CocoMetric and
IoUMetric) on the demo val split.
"""
import os.path as osp

import pytest

from dfq_dense.demo import (DEMO_MODELS, demo_checkpoint, load_manifest,
                            sha256sum)
from dfq_dense.engine.runner import build_test_runner, load_config

MANIFEST = load_manifest()


@pytest.mark.parametrize('name', sorted(DEMO_MODELS))
def test_shipped_checkpoint_matches_manifest(name):
    entry = MANIFEST[name]
    assert sha256sum(demo_checkpoint(name)) == entry['sha256']
    assert osp.getsize(demo_checkpoint(name)) <= 20 * 2**20


@pytest.mark.parametrize('name', sorted(DEMO_MODELS))
def test_fp_metrics_reproduce(name, repo_root, demo_data_root, tmp_path):
    entry = MANIFEST[name]
    cfg = load_config(osp.join(repo_root, DEMO_MODELS[name][1]))
    runner = build_test_runner(cfg, checkpoint=demo_checkpoint(name),
                               work_dir=str(tmp_path))
    metrics = runner.test()
    for key, value in entry['fp_metrics'].items():
        assert float(metrics[key]) == pytest.approx(value, abs=1e-9), key
