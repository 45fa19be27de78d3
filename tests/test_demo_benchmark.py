"""The README's main job and what hangs on it, on the full demo val.

One run of ``tools/run_demo.py`` (the three demo models, PSAQ-ViT, W8A8,
``--eval-fp``) is shared by the tests below:

* data-free W8A8 stays within 0.02 mAP (box, mask), 1.0 mIoU and 1.5
  top-1 of FP;
* W16A16 on the same synthetic images matches FP within 0.002 mAP, 0.2
  mIoU and 0.5 top-1 (four of the 905 val crops): the wiring loses
  nothing (what W16A16 loses is activation clipping at the ranges
  calibrated on synthetic images: on the classifier it loses 3 crops, as
  many as its W8A8);
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
    'swin_cls_demo_w8a8': ('imagenet/top1', ),
}
W8A8_TOL = {'coco/bbox_mAP': 0.02, 'coco/segm_mAP': 0.02, 'mIoU': 1.0,
            'imagenet/top1': 1.5}
W16A16_TOL = {'coco/bbox_mAP': 0.002, 'coco/segm_mAP': 0.002, 'mIoU': 0.2,
              'imagenet/top1': 0.5}
# Synthesis size and the least quantized modules / quantizers per task
# (the classifier: 8 attentions, 36 linears, the patch embedding).
EXPECT = {'det': ([192, 192], 50, 100), 'seg': ([192, 192], 50, 100),
          'cls': ([56, 56], 40, 90)}
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
    assert len(summary) == 4
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
        size, n_modules, n_quantizers = EXPECT[res['task']]
        assert res['num_images'] == 8 and res['image_size'] == size
        assert len(res['checkpoint']['sha256']) == 64
        assert set(res['versions']) >= {'torch', 'mmcv', 'mmdet', 'mmseg',
                                        'timm', 'dfq_dense'}
        assert sum(res['quantized_modules'].values()) > n_modules
        assert res['seconds']['synthesis'] > 0
        # Quantization took effect: every quantizer quantizes, and the
        # quantized backbone/neck features differ from FP.
        q = res['quantization']
        assert q['total']['quantizing'] == q['total']['quantizers'] > \
            n_quantizers
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


class _Built(Exception):
    pass


def _loop_with_images(monkeypatch, name, images, tmp_path):
    """The DFQ loop of demo config ``name`` with ``dfq.load_images``, built
    through tools/dfq_test.py (every input check) and stopped before it
    runs."""
    from mmengine.runner import Runner
    seen = {}

    def build_only(self):
        seen['loop'] = self.build_test_loop(self._test_loop)
        raise _Built

    monkeypatch.setattr(Runner, 'test', build_only)
    args = dfq_test.parse_args([
        osp.join(REPO, 'configs', 'demo', name + '.py'), '--work-dir',
        str(tmp_path / name), '--cfg-options', f'dfq.load_images={images}'])
    with pytest.raises(_Built):
        dfq_test.run(args)
    loop = seen['loop']
    return loop, loop._get_images(loop._model)


def test_classifier_images_calibrate_the_dense_models(demo_run, monkeypatch,
                                                      tmp_path):
    """A real classification synthesis records where its images come from,
    and the demo UperNet takes them stretched to its 192x192."""
    import torch
    import torch.nn.functional as F

    from dfq_dense.utils.checkpoint import safe_torch_load
    work, _, _ = demo_run
    path = str(work / 'swin_cls_demo_w8a8' / 'synthetic' /
               'synthetic_images.pth')
    saved = safe_torch_load(path)
    meta = saved['meta']
    assert meta['task'] == 'cls' and meta['backbone_family'] == 'swin'
    assert meta['model'] == 'swin_tiny_patch4_window7_224'
    assert tuple(saved['images'].shape) == (8, 3, 56, 56)
    loop, images = _loop_with_images(monkeypatch, 'upernet_swin_demo_w8a8',
                                     path, tmp_path)
    src = loop.report['images_source']
    assert src['task'] == 'cls' and src['cross_task'] and src['resized']
    assert src['size'] == [56, 56] and src['resized_to'] == [192, 192]
    assert tuple(images.shape) == (8, 3, 192, 192)
    # pixels: the file's de-normalised images, bilinearly upsampled (no
    # antialias needed when growing), re-normalised with the segmentor's
    # mean / std (the same ImageNet statistics here)
    mean = torch.as_tensor(saved['mean']).view(1, 3, 1, 1)
    std = torch.as_tensor(saved['std']).view(1, 3, 1, 1)
    raw = saved['images'].double() * std + mean
    up = F.interpolate(raw, size=(192, 192), mode='bilinear',
                       align_corners=False)
    pre = loop._model.data_preprocessor
    want = (up - pre.mean.double().view(1, 3, 1, 1)) / \
        pre.std.double().view(1, 3, 1, 1)
    torch.testing.assert_close(images.double().cpu(), want, atol=1e-4,
                               rtol=0)


def test_detector_images_calibrate_the_segmentor(demo_run, monkeypatch,
                                                 tmp_path):
    """det -> seg reuse: the same backbone family at the same 192x192, so
    the images are only re-normalised (same statistics: unchanged)."""
    import torch

    from dfq_dense.utils.checkpoint import safe_torch_load
    work, _, _ = demo_run
    path = str(work / 'mask_rcnn_swin_demo_w8a8' / 'synthetic' /
               'synthetic_images.pth')
    saved = safe_torch_load(path)
    assert saved['meta']['task'] == 'det'
    assert saved['meta']['model'] == 'SwinTransformer'
    loop, images = _loop_with_images(monkeypatch, 'upernet_swin_demo_w8a8',
                                     path, tmp_path)
    src = loop.report['images_source']
    assert src['task'] == 'det' and src['cross_task']
    assert not src['resized'] and src['size'] == [192, 192]
    torch.testing.assert_close(images.float().cpu(), saved['images'].float(),
                               atol=1e-4, rtol=0)
