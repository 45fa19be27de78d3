"""Cross-task reuse of synthetic images (dfq.load_images): the images of a
classification run (a timm Swin) calibrate a Swin detector, resized to the
detector's synthesis size by the documented rule
(dfq_dense/engine/image_reuse.py); another backbone family or a file that
is not a synthetic-images file stops with one line.
"""
import os.path as osp
import sys

import numpy as np
import pytest
import torch

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, osp.join(REPO, 'tools'))
import dfq_test  # noqa: E402

DET = osp.join(REPO, 'configs/demo/mask_rcnn_swin_demo_w8a8.py')
DET_CKPT = osp.join(REPO, 'dfq_dense/demo/checkpoints/mask_rcnn_swin_demo.pth')
SWIN = 'swin_tiny_patch4_window7_224.ms_in1k'
# The classification file's normalisation: deliberately not the detector's
# (ImageNet mean/std x 255), so that re-normalising is tested too.
CLS_MEAN = torch.tensor([127.5, 120.0, 110.0])
CLS_STD = torch.tensor([127.5, 60.0, 50.0])
DET_MEAN = np.array([123.675, 116.28, 103.53])
DET_STD = np.array([58.395, 57.12, 57.375])


def _cls_file(path, family='swin', model=SWIN, with_std=True, h=12, w=16):
    """A tiny synthetic-images file as a classification run writes it."""
    from dfq_dense.synth.base import save_images
    g = torch.Generator().manual_seed(0)
    raw = torch.rand((2, 3, h, w), generator=g) * 255
    x = (raw - CLS_MEAN.view(1, 3, 1, 1)) / CLS_STD.view(1, 3, 1, 1)
    meta = dict(synthesizer=dict(type='PSAQViT', img_size=(h, w)),
                run_id='20261130-000000-cafe0001', task='cls', model=model)
    if family is not None:
        meta['backbone_family'] = family
    out = save_images(x, CLS_MEAN, CLS_STD, str(path), meta=meta)
    if not with_std:
        saved = torch.load(out)
        del saved['std']
        torch.save(saved, out)
    return out, raw


def _bilinear(img, H, W):
    """Half-pixel bilinear upsampling of (C, h, w), written out in numpy
    (the ``align_corners=False`` convention)."""
    c, h, w = img.shape

    def taps(n_out, n_in):
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0)
        i0 = np.floor(src).astype(int)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, src - i0

    y0, y1, fy = taps(H, h)
    x0, x1, fx = taps(W, w)
    top = img[:, y0][:, :, x0] * (1 - fx) + img[:, y0][:, :, x1] * fx
    bot = img[:, y1][:, :, x0] * (1 - fx) + img[:, y1][:, :, x1] * fx
    return top * (1 - fy)[:, None] + bot * fy[:, None]


class Reached(Exception):
    pass


@pytest.fixture
def det_loop(monkeypatch, demo_data_root):
    """Build the demo Mask R-CNN's DFQ loop through tools/dfq_test.py (all
    input checks) and stop before Runner.test runs it."""
    from mmengine.runner import Runner
    seen = {}

    def fake_test(self):
        seen['loop'] = self.build_test_loop(self._test_loop)
        raise Reached

    monkeypatch.setattr(Runner, 'test', fake_test)

    def build(tmp_path, images):
        args = dfq_test.parse_args([
            DET, DET_CKPT, '--work-dir', str(tmp_path / 'work'),
            '--cfg-options', f'dfq.load_images={images}'])
        with pytest.raises(Reached):
            dfq_test.run(args)
        return seen['loop']

    return build


def test_cls_images_resized_for_the_detector(tmp_path, det_loop):
    path, raw = _cls_file(tmp_path / 'cls' / 'synthetic')
    loop = det_loop(tmp_path, path)
    images = loop._get_images(loop._model)
    # the demo detector synthesizes at its test scale, 192x192
    assert tuple(images.shape) == (2, 3, 192, 192)
    want = np.stack([_bilinear(r.double().numpy(), 192, 192)
                     for r in raw])
    want = (want - DET_MEAN[None, :, None, None]) / \
        DET_STD[None, :, None, None]
    np.testing.assert_allclose(images.double().numpy(), want, atol=2e-4,
                               rtol=0)
    src = loop.report['images_source']
    assert src['file'] == osp.abspath(path)
    assert src['run_id'] == '20261130-000000-cafe0001'
    assert src['task'] == 'cls' and src['model'] == SWIN
    assert src['backbone_family'] == 'swin' and src['cross_task']
    assert src['size'] == [12, 16] and src['resized']
    assert src['resized_to'] == [192, 192] and 'stretched' in \
        src['resize_rule']
    assert loop.report['images_from'] == path
    assert loop.report['image_size'] == [192, 192]


def test_provenance_of_the_configs():
    from dfq_dense.engine.image_reuse import backbone_family, \
        image_provenance
    from dfq_dense.engine.runner import load_config
    det = image_provenance(load_config(DET))
    assert det == dict(task='det', model='SwinTransformer',
                       backbone_family='swin')
    for leaf, model, family in (('swin_t_w4a8.py', SWIN, 'swin'),
                                ('deit_s_w4a8.py',
                                 'deit_small_patch16_224.fb_in1k', 'vit')):
        cfg = load_config(osp.join(REPO, 'configs', 'cls', leaf))
        assert image_provenance(cfg) == dict(task='cls', model=model,
                                             backbone_family=family)
    assert backbone_family('mmseg.VisionTransformer') == 'vit'
    assert backbone_family('swinv2_tiny_window8_256') == 'swinv2'
    assert backbone_family('ResNet') == 'resnet'


def _one_line(capsys, argv):
    code = dfq_test.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    return err[0]


def test_cross_task_refusals_are_one_line(tmp_path, capsys, demo_data_root):
    base = [DET, DET_CKPT, '--work-dir', str(tmp_path / 'w'),
            '--cfg-options']
    # DeiT images for a Swin detector
    deit, _ = _cls_file(tmp_path / 'deit', family='vit',
                        model='deit_small_patch16_224.fb_in1k')
    line = _one_line(capsys, base + [f'dfq.load_images={deit}'])
    assert 'deit_small_patch16_224.fb_in1k (vit family, task cls)' in line
    assert 'SwinTransformer backbone (swin family)' in line
    # a classification file that does not say its backbone family
    nofam, _ = _cls_file(tmp_path / 'nofam', family=None)
    line = _one_line(capsys, base + [f'dfq.load_images={nofam}'])
    assert 'records no backbone family' in line
    # no std to de-normalise with
    nostd, _ = _cls_file(tmp_path / 'nostd', with_std=False)
    line = _one_line(capsys, base + [f'dfq.load_images={nostd}'])
    assert 'is not a synthetic_images.pth' in line and '"std"' in line
    # not a synthetic-images file at all: a checkpoint
    line = _one_line(capsys, base + [f'dfq.load_images={DET_CKPT}'])
    assert 'is not a synthetic_images.pth' in line
    assert not osp.exists(tmp_path / 'w')


def test_loop_refuses_another_family(tmp_path):
    """The loop's own check (runs that build the loop without the tool)."""
    from dfq_dense.engine.image_reuse import (ImageReuseError,
                                              prepare_loaded_images)
    from dfq_dense.synth.base import load_images
    deit, _ = _cls_file(tmp_path / 'deit', family='vit', model='deit_tiny')
    target = dict(task='seg', model='SwinTransformer',
                  backbone_family='swin')
    with pytest.raises(ImageReuseError, match='only within one backbone'):
        prepare_loaded_images(load_images(deit), deit, target, (64, 64),
                              DET_MEAN, DET_STD)
    with pytest.raises(ImageReuseError, match='not a synthetic_images'):
        prepare_loaded_images({'state_dict': {}}, 'x.pth', target,
                              (64, 64), DET_MEAN, DET_STD)
    # same task: the images as they are, nothing resized
    same, _ = _cls_file(tmp_path / 'same')
    saved = load_images(same)
    images, info = prepare_loaded_images(
        saved, same, dict(task='cls', model=SWIN, backbone_family='swin'),
        (64, 64), DET_MEAN, DET_STD)
    assert images is saved['images'] and not info['resized']
    assert not info['cross_task']
