import json
import os.path as osp

import cv2
import numpy as np
import pycocotools.mask as mask_utils
from mmengine.config import Config
from pycocotools.coco import COCO

from dfq_dense.demo import (SEG_CLASSES, THING_CLASSES, generate_demo_dataset,
                            render_scene)
from dfq_dense.demo.dataset import STUFF_CLASSES


def test_render_is_deterministic_and_splits_differ():
    a = render_scene(2024, 'train', 3)
    b = render_scene(2024, 'train', 3)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    val = render_scene(2024, 'val', 3)
    assert not np.array_equal(a[0], val[0])
    other_seed = render_scene(7, 'train', 3)
    assert not np.array_equal(a[0], other_seed[0])


def test_scene_content_is_cluttered_and_consistent():
    n_classes, n_instances = set(), 0
    for idx in range(20):
        rgb, labels, instances = render_scene(2024, 'train', idx)
        assert rgb.shape == (192, 192, 3) and rgb.dtype == np.uint8
        assert labels.max() <= len(SEG_CLASSES)
        # Textured ground: many distinct colours, not a flat background.
        assert len(np.unique(rgb.reshape(-1, 3), axis=0)) > 2000
        for inst in instances:
            cls_label = len(STUFF_CLASSES) + inst['category'] + 1
            # The semantic map agrees with every visible instance mask.
            assert (labels[inst['mask']] == cls_label).all()
            n_classes.add(inst['category'])
        n_instances += len(instances)
    assert n_classes == set(range(len(THING_CLASSES)))
    assert n_instances >= 50


def test_generated_files_are_valid_coco_and_ade(tmp_path):
    root = generate_demo_dataset(str(tmp_path / 'demo'),
                                 splits=dict(train=6, val=3))
    coco = COCO(osp.join(root, 'annotations', 'instances_val.json'))
    assert len(coco.getImgIds()) == 3
    assert [c['name'] for c in coco.loadCats(coco.getCatIds())] == \
        list(THING_CLASSES)
    rgb, labels, instances = render_scene(2024, 'val', 0)
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[1]))
    assert len(anns) == len(instances)
    for ann, inst in zip(anns, instances):
        assert ann['iscrowd'] == 0 and ann['category_id'] == \
            inst['category'] + 1
        assert np.array_equal(coco.annToMask(ann).astype(bool), inst['mask'])
        x, y, w, h = ann['bbox']
        ys, xs = np.nonzero(inst['mask'])
        assert (x, y, w, h) == (xs.min(), ys.min(), xs.max() - xs.min() + 1,
                                ys.max() - ys.min() + 1)
        assert ann['area'] == mask_utils.area(ann['segmentation'])
    png = cv2.imread(osp.join(root, 'annotations', 'validation',
                              'val_00000.png'), cv2.IMREAD_UNCHANGED)
    assert png.dtype == np.uint8 and np.array_equal(png, labels)
    img = cv2.imread(osp.join(root, 'images', 'validation', 'val_00000.png'))
    assert np.array_equal(img[..., ::-1], rgb)


def test_regeneration_is_skipped_when_identical(tmp_path):
    root = str(tmp_path / 'demo')
    generate_demo_dataset(root, splits=dict(train=2, val=1))
    stamp = osp.join(root, 'dataset.json')
    marker = osp.join(root, 'images', 'training', 'train_00000.png')
    mtime = osp.getmtime(marker)
    generate_demo_dataset(root, splits=dict(train=2, val=1))
    assert osp.getmtime(marker) == mtime
    with open(stamp) as f:
        assert json.load(f)['splits'] == dict(train=2, val=1)
    # No temporary folders left beside it.
    assert sorted(p.name for p in tmp_path.iterdir()) == ['demo']


def test_demo_configs_match_dataset_classes(repo_root):
    det = Config.fromfile(
        osp.join(repo_root, 'configs/demo/mask_rcnn_swin_demo.py'))
    seg = Config.fromfile(
        osp.join(repo_root, 'configs/demo/upernet_swin_demo.py'))
    assert tuple(det.metainfo.classes) == THING_CLASSES
    assert det.model.roi_head.bbox_head.num_classes == len(THING_CLASSES)
    assert tuple(seg.metainfo.classes) == SEG_CLASSES
    assert seg.model.decode_head.num_classes == len(SEG_CLASSES)
    # Same SwinTransformer class as the real configs, shrunk.
    assert det.model.backbone.type == seg.model.backbone.type == \
        'SwinTransformer'
    assert det.default_scope == 'mmdet' and seg.default_scope == 'mmseg'
