"""The quick mode of tools/train_demo.py, so training can't silently break."""
import json
import os
import os.path as osp
import subprocess
import sys

import pytest
import torch

from dfq_dense.utils.checkpoint import safe_torch_load


@pytest.mark.parametrize('task,name', [('det', 'mask_rcnn_swin_demo'),
                                       ('seg', 'upernet_swin_demo'),
                                       ('cls', 'swin_cls_demo')])
def test_quick_training_runs_and_exports(tmp_path, repo_root, task, name):
    work = tmp_path / task
    proc = subprocess.run(
        [sys.executable, osp.join(repo_root, 'tools', 'train_demo.py'), task,
         '--quick', '--work-dir', str(work)],
        capture_output=True, text=True, cwd=repo_root,
        env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert proc.returncode == 0, proc.stderr[-3000:]
    # 3 iterations logged with a finite loss.
    losses = [float(line.split(' loss: ')[1].split()[0])
              for line in proc.stdout.splitlines() + proc.stderr.splitlines()
              if 'Iter(train)' in line and ' loss: ' in line]
    assert len(losses) == 3 and all(l == l and l < 1e4 for l in losses)
    ckpt = safe_torch_load(str(work / f'{name}.pth'))
    weights = [v for v in ckpt['state_dict'].values() if v.is_floating_point()]
    assert weights and all(v.dtype == torch.float16 for v in weights)
    assert ckpt['meta']['iters'] == 3
    # The exported weights were evaluated through Runner.test.
    summary = json.loads(proc.stdout[proc.stdout.rindex('{\n  "checkpoint"'):])
    key = dict(det='coco/bbox_mAP', seg='mIoU', cls='imagenet/top1')[task]
    assert key in summary['metrics']
    if task == 'cls':
        # timm's own state dict (no "backbone." of the mmengine wrapper):
        # what TimmClassifier loads, strictly, like any timm weights file.
        assert 'head.fc.weight' in ckpt['state_dict']
        assert not any(k.startswith('backbone.') for k in ckpt['state_dict'])
