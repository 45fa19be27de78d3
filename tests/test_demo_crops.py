"""The demo classifier's data: object crops of the demo scenes
(dfq_dense/demo/crops.py), checked against the COCO annotations and the
scenes themselves."""
import json
import os
import os.path as osp

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dfq_dense.cls.dataset import ImageNetValDataset
from dfq_dense.demo import THING_CLASSES, generate_demo_crops
from dfq_dense.demo.crops import DEFAULT_CROPS, crop_box


def _annotations(root, split):
    with open(osp.join(root, 'annotations', f'instances_{split}.json')) as f:
        coco = json.load(f)
    return coco, {a['id']: a for a in coco['annotations']}


@pytest.mark.parametrize('bbox', [
    (0, 0, 10, 10), (180, 185, 12, 7), (50, 60, 40, 20), (90, 0, 3, 80),
    (0, 100, 74, 74), (10, 20, 0.5, 0.5)])
def test_crop_box_is_a_square_around_the_box_inside_the_scene(bbox):
    x, y, w, h = bbox
    x0, y0, side = crop_box(bbox, (192, 192))
    expected = min(max(int(round(max(w, h) * 1.25)), 16), 192)
    assert side == expected
    assert 0 <= x0 <= 192 - side and 0 <= y0 <= 192 - side
    # The whole box is in the crop (context >= 1).
    assert x0 <= x + 1e-9 and x + w <= x0 + side + 1e-9
    assert y0 <= y + 1e-9 and y + h <= y0 + side + 1e-9
    # Centred on the box to the pixel, unless the scene's edge is in the way.
    for lo, centre in ((x0, x + w / 2), (y0, y + h / 2)):
        if 0 < lo < 192 - side:
            assert abs(lo + side / 2 - centre) <= 0.5


def test_crops_cover_every_instance_with_its_class(demo_data_root):
    root = osp.join(demo_data_root, 'cls')
    with open(osp.join(root, 'crops.json')) as f:
        stamp = json.load(f)
    for split in ('train', 'val'):
        coco, anns = _annotations(demo_data_root, split)
        folders = sorted(os.listdir(osp.join(root, split)))
        # Sorted folder order (the labels) is the detection category order.
        assert folders == [f'{i}_{n}' for i, n in enumerate(THING_CLASSES)]
        seen = {}
        for label, folder in enumerate(folders):
            for name in os.listdir(osp.join(root, split, folder)):
                scene, ann_id = osp.splitext(name)[0].rsplit('_', 1)
                ann = anns[int(ann_id)]
                assert ann['category_id'] - 1 == label
                assert scene.startswith(split + '_')  # no train scene in val
                seen[int(ann_id)] = scene
        assert sorted(seen) == sorted(anns)  # one crop per instance
        assert stamp['counts'][split] == len(anns)


def test_crop_pixels_are_the_scene_region_resized(demo_data_root):
    size = DEFAULT_CROPS['size']
    coco, anns = _annotations(demo_data_root, 'val')
    files = {im['id']: im['file_name'] for im in coco['images']}
    checked = 0
    for ann in coco['annotations'][:40]:
        scene = cv2.imread(osp.join(demo_data_root, 'images', 'validation',
                                    files[ann['image_id']]))
        x0, y0, side = crop_box(ann['bbox'], scene.shape[:2])
        region = torch.from_numpy(
            scene[y0:y0 + side, x0:x0 + side].astype(np.float32))
        # torch's bilinear resize (half-pixel centres, no antialias) as
        # the independent reference of OpenCV's INTER_LINEAR.
        ref = F.interpolate(region.permute(2, 0, 1)[None], size=(size, size),
                            mode='bilinear', align_corners=False)[0]
        ref = ref.permute(1, 2, 0).round().clamp(0, 255).numpy()
        folder = f'{ann["category_id"] - 1}_' \
            f'{THING_CLASSES[ann["category_id"] - 1]}'
        stem = osp.splitext(files[ann['image_id']])[0]
        crop = cv2.imread(osp.join(demo_data_root, 'cls', 'val', folder,
                                   f'{stem}_{ann["id"]}.png'))
        assert crop.shape == (size, size, 3)
        assert np.abs(crop.astype(np.float32) - ref).max() <= 1
        checked += 1
    assert checked == 40


def test_crops_are_regenerated_only_when_asked_differently(tmp_path):
    from dfq_dense.demo import generate_demo_dataset
    root = generate_demo_dataset(str(tmp_path / 'demo'),
                                 splits=dict(train=2, val=8))
    out = generate_demo_crops(root)
    stamp = osp.join(out, 'crops.json')
    before = os.stat(stamp).st_mtime_ns
    assert generate_demo_crops(root) == out
    assert os.stat(stamp).st_mtime_ns == before  # identical: kept
    generate_demo_crops(root, size=32)
    with open(stamp) as f:
        assert json.load(f)['size'] == 32
    crop = cv2.imread(next(
        osp.join(dp, f) for dp, _, fs in os.walk(osp.join(out, 'val'))
        for f in fs))
    assert crop.shape == (32, 32, 3)
    # No half-written sibling left behind.
    assert not [d for d in os.listdir(root) if d.startswith('.crops-')]


def test_val_crops_load_as_a_class_folder_tree(demo_data_root):
    ds = ImageNetValDataset(
        data_root=osp.join(demo_data_root, 'cls', 'val'),
        model_name='swin_tiny_patch4_window7_224',
        model_kwargs=dict(img_size=56, embed_dim=48, depths=(2, 2, 2, 2),
                          num_heads=(3, 6, 12, 24)),
        data_config=dict(input_size=(3, 56, 56), crop_pct=1.0,
                         interpolation='bilinear'),
        num_classes=len(THING_CLASSES))
    sample = ds[0]
    assert sample['inputs'].shape == (3, 56, 56)
    assert sample['inputs'].dtype == torch.uint8
    # crop_pct 1 at the crops' own size: the eval transform is the identity.
    path = sample['data_samples'].img_path
    rgb = cv2.imread(path)[..., ::-1]
    assert torch.equal(sample['inputs'],
                       torch.from_numpy(rgb.copy()).permute(2, 0, 1))
    assert int(sample['data_samples'].gt_label) == int(
        osp.basename(osp.dirname(path)).split('_')[0])


def test_an_interrupted_regeneration_keeps_the_old_crops(tmp_path,
                                                         monkeypatch):
    """The crops are built in a temporary sibling folder
    (``utils.fileio.atomic_dir``): a write that fails half-way leaves the
    crops that were there, and no temporary folder."""
    from dfq_dense.demo import generate_demo_dataset
    root = generate_demo_dataset(str(tmp_path / 'demo'),
                                 splits=dict(train=2, val=8))
    out = generate_demo_crops(root)
    with open(osp.join(out, 'crops.json')) as f:
        old = json.load(f)
    files = sorted(f for _, _, fs in os.walk(out) for f in fs)
    written, imwrite = [], cv2.imwrite

    def failing_imwrite(path, img):
        if len(written) == 3:
            raise OSError('disk full')
        written.append(path)
        return imwrite(path, img)

    monkeypatch.setattr(cv2, 'imwrite', failing_imwrite)
    with pytest.raises(OSError, match='disk full'):
        generate_demo_crops(root, size=32)
    assert len(written) == 3  # it did write into the temporary tree
    with open(osp.join(out, 'crops.json')) as f:
        assert json.load(f) == old
    assert sorted(f for _, _, fs in os.walk(out) for f in fs) == files
    assert not [d for d in os.listdir(root) if d.startswith('.crops-')]
