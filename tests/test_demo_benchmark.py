"""The README's main job and what hangs on it, on the full demo val.

One run of ``tools/run_demo.py`` (both demo models, PSAQ-ViT, W8A8,
``--eval-fp``) is shared by the tests below:

* data-free W8A8 stays within 0.02 mAP (box, mask) and 1.0 mIoU of FP;
* W16A16 on the same synthetic images matches FP within 0.002 mAP and
  0.2 mIoU: the wiring loses nothing;
* reusing the saved synthetic images (``dfq.load_images``) skips synthesis
  and reproduces the quantized metrics exactly.
"""
import json
import os
import os.path as osp
import subprocess
import sys

import pytest

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, osp.join(REPO, 'tools'))
import dfq_test  # noqa: E402

MODELS = {
    'mask_rcnn_swin_demo_w8a8': ('coco/bbox_mAP', 'coco/segm_mAP'),
    'upernet_swin_demo_w8a8': ('mIoU', ),
}
W8A8_TOL = {'coco/bbox_mAP': 0.02, 'coco/segm_mAP': 0.02, 'mIoU': 1.0}
W16A16_TOL = {'coco/bbox_mAP': 0.002, 'coco/segm_mAP': 0.002, 'mIoU': 0.2}
# The metrics are decimals rounded by CocoMetric / IoUMetric: a difference of
# exactly the tolerance must not fail on float representation.
EPS = 1e-9


@pytest.fixture(scope='module')
def demo_run(tmp_path_factory, demo_data_root):
    work = tmp_path_factory.mktemp('demo')
    proc = subprocess.run(
        [sys.executable, osp.join(REPO, 'tools', 'run_demo.py'),
         '--work-dir', str(work)],
        capture_output=True, text=True, cwd=REPO,
        env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {}
    for name in MODELS:
        with open(work / name / 'dfq_results.json') as f:
            results[name] = json.load(f)
    with open(work / 'summary_w8a8_psaq.json') as f:
        summary = json.load(f)
    return work, results, summary


def test_demo_w8a8_close_to_fp(demo_run):
    _, results, summary = demo_run
    assert len(summary) == 3
    for row in summary:
        res = results[row['run']]
        # The summary table shows exactly what dfq_results.json recorded.
        assert row['quantized'] == res['metrics'][row['metric']]
        assert row['fp'] == res['fp_metrics'][row['metric']] > 0
        assert abs(row['quantized'] - row['fp']) <= \
            W8A8_TOL[row['metric']] + EPS, \
            row
    for res in results.values():
        assert res['method'] == 'PSAQViT'
        assert (res['w_bits'], res['a_bits']) == (8, 8)
        assert res['num_images'] == 8 and res['image_size'] == [192, 192]
        assert len(res['checkpoint']['sha256']) == 64
        assert set(res['versions']) >= {'torch', 'mmcv', 'mmdet', 'mmseg',
                                        'dfq_dense'}
        assert sum(res['quantized_modules'].values()) > 50
        assert res['seconds']['synthesis'] > 0
        # Quantization took effect: every quantizer quantizes, and the
        # quantized backbone/neck features differ from FP.
        q = res['quantization']
        assert q['total']['quantizing'] == q['total']['quantizers'] > 100
        assert q['disabled'] == []
        assert q['output_change']['max_abs'] > 0
        assert 0 < q['output_change']['rel_l2'] < 0.5


def _rerun(work, name, tmp_path, *options):
    images = str(work / name / 'synthetic' / 'synthetic_images.pth')
    out = tmp_path / name
    code = dfq_test.main([
        osp.join(REPO, 'configs', 'demo', name + '.py'), '--work-dir',
        str(out), '--cfg-options', f'dfq.load_images={images}', *options])
    assert code == 0
    with open(out / 'dfq_results.json') as f:
        res = json.load(f)
    assert res['images_from'] == images
    assert not (out / 'synthetic').exists()
    return res


@pytest.mark.parametrize('name', sorted(MODELS))
def test_w16a16_matches_fp(demo_run, tmp_path, name):
    work, results, _ = demo_run
    res = _rerun(work, name, tmp_path, 'dfq.quantizer.w_bits=16',
                 'dfq.quantizer.a_bits=16')
    assert (res['w_bits'], res['a_bits']) == (16, 16)
    for key in MODELS[name]:
        fp = results[name]['fp_metrics'][key]
        assert abs(res['metrics'][key] - fp) <= W16A16_TOL[key] + EPS, key


def test_reused_images_reproduce_metrics(demo_run, tmp_path):
    work, results, _ = demo_run
    name = 'upernet_swin_demo_w8a8'
    res = _rerun(work, name, tmp_path)
    assert res['metrics'] == results[name]['metrics']
