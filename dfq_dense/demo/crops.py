"""The demo's classification set: one square crop per object instance.

The demo classifier (``configs/demo/swin_cls_demo.py``) is a small timm
Swin trained on the eight *thing* classes of the demo scenes.  Its data are
cut from the generated detection dataset, so nothing new is rendered and
val crops come only from val scenes::

    <root>/cls/train/0_disc/train_00000_1.png     (<scene>_<annotation id>)
    <root>/cls/train/1_square/...
    ...
    <root>/cls/val/7_crescent/...
    <root>/cls/crops.json                         (what was generated)

Class folders are named ``<index>_<name>`` so that their sorted order, which
gives the labels (:func:`dfq_dense.cls.dataset.scan_class_folders`), is the
category order of the detection dataset (:data:`THING_CLASSES`).

Each crop is a square around the instance's box (the box of its visible
part): side ``max(w, h) * context`` (at least ``min_side`` pixels, at most
the scene), centred on the box and shifted to lie inside the scene (no
padding), resized to ``size`` x ``size`` with bilinear interpolation.
Neighbouring objects and clutter may show at the edges, as in any crop of a
real scene.
"""
import json
import os
import os.path as osp

import numpy as np

from ..utils.fileio import atomic_dir
from .dataset import SPLIT_DIRS, THING_CLASSES

CROPS_VERSION = 1
DEFAULT_CROPS = dict(size=56, context=1.25, min_side=16)
SPLITS = ('train', 'val')


def crop_box(bbox, image_hw, context=DEFAULT_CROPS['context'],
             min_side=DEFAULT_CROPS['min_side']):
    """``(x0, y0, side)`` of the square crop of a COCO ``bbox`` (x, y, w, h)
    in an image of ``image_hw``: see the module docstring."""
    x, y, w, h = bbox
    height, width = image_hw
    side = int(round(max(w, h) * context))
    side = min(max(side, min_side), height, width)
    cx, cy = x + w / 2., y + h / 2.
    x0 = int(round(cx - side / 2.))
    y0 = int(round(cy - side / 2.))
    x0 = min(max(x0, 0), width - side)
    y0 = min(max(y0, 0), height - side)
    return x0, y0, side


def class_folder(category_index):
    """``'3_star'``: the folder of a 0-based thing class index."""
    return f'{category_index}_{THING_CLASSES[category_index]}'


def _stamp(dataset_stamp, size, context, min_side):
    return dict(crops_version=CROPS_VERSION, dataset=dataset_stamp,
                size=size, context=context, min_side=min_side)


def generate_demo_crops(root, size=DEFAULT_CROPS['size'],
                        context=DEFAULT_CROPS['context'],
                        min_side=DEFAULT_CROPS['min_side'], force=False):
    """Write ``<root>/cls/{train,val}/<class>/*.png`` from the demo dataset
    at ``root`` (already generated), unless identical crops are there.

    Written into a temporary sibling folder and renamed into place, as the
    dataset itself, so an interrupted run leaves no half-written tree.
    Returns ``<root>/cls``.
    """
    import cv2
    out = osp.join(root, 'cls')
    with open(osp.join(root, 'dataset.json')) as f:
        stamp = _stamp(json.load(f), size, context, min_side)
    stamp_file = osp.join(out, 'crops.json')
    if not force and osp.isfile(stamp_file):
        with open(stamp_file) as f:
            found = json.load(f)
        found.pop('counts', None)
        if found == stamp:
            return out
    with atomic_dir(out, prefix='.crops-') as tmp:
        counts = {}
        for split in SPLITS:
            ann_file = osp.join(root, 'annotations', f'instances_{split}.json')
            if not osp.isfile(ann_file):  # a dataset generated without it
                continue
            with open(ann_file) as f:
                coco = json.load(f)
            img_dir = osp.join(root, 'images', SPLIT_DIRS[split])
            images = {im['id']: im for im in coco['images']}
            by_image = {}
            for ann in coco['annotations']:
                by_image.setdefault(ann['image_id'], []).append(ann)
            for index in range(len(THING_CLASSES)):
                os.makedirs(osp.join(tmp, split, class_folder(index)))
            n = 0
            for image_id in sorted(by_image):
                info = images[image_id]
                img = cv2.imread(osp.join(img_dir, info['file_name']),
                                 cv2.IMREAD_COLOR)
                stem = osp.splitext(info['file_name'])[0]
                for ann in by_image[image_id]:
                    x0, y0, side = crop_box(ann['bbox'], img.shape[:2],
                                            context, min_side)
                    crop = img[y0:y0 + side, x0:x0 + side]
                    crop = cv2.resize(crop, (size, size),
                                      interpolation=cv2.INTER_LINEAR)
                    name = f'{stem}_{ann["id"]}.png'
                    cv2.imwrite(osp.join(
                        tmp, split, class_folder(ann['category_id'] - 1),
                        name), np.ascontiguousarray(crop))
                    n += 1
            counts[split] = n
        with open(osp.join(tmp, 'crops.json'), 'w') as f:
            json.dump(dict(stamp, counts=counts), f)
    return out
