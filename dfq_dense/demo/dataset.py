"""Procedural demo dataset: cluttered scenes of textured shapes on textured ground.

One generator feeds both tasks, so the detector and the segmentor see the same
images:

* instance annotations in COCO format (``annotations/instances_{split}.json``)
  for the eight *thing* classes: boxes, RLE masks of the visible part,
  ``iscrowd=0``;
* semantic label maps in the ADE20K layout (``annotations/{training,validation}``,
  uint8 PNG).  Like ADE20K the maps use ``reduce_zero_label=True``: value 0 is
  "unlabelled" (the clutter strokes, which belong to no class) and is ignored;
  values 1..11 are the classes of :data:`SEG_CLASSES` (three *stuff* ground
  textures, then the eight things) and become 0..10 after the reduction.

Every image is a pure function of ``(seed, split, index)``, so the data can be
regenerated anywhere instead of being shipped, and val never overlaps train.
"""
import hashlib
import json
import os
import os.path as osp

import cv2
import numpy as np
import pycocotools.mask as mask_utils

from ..utils.fileio import atomic_dir

GENERATOR_VERSION = 1
DEFAULT_SEED = 2024
DEFAULT_SIZE = 192
DEFAULT_SPLITS = {'train': 1500, 'val': 200}
SPLIT_DIRS = {'train': 'training', 'val': 'validation'}

THING_CLASSES = ('disc', 'square', 'triangle', 'star', 'ring', 'cross',
                 'hexagon', 'crescent')
STUFF_CLASSES = ('grass', 'sand', 'water')
SEG_CLASSES = STUFF_CLASSES + THING_CLASSES
# Hue centres (OpenCV's 0-180 scale) are spread but jittered by +-22, so
# neighbouring classes overlap in colour and shape must disambiguate them.
_THING_HUES = (0, 22, 45, 67, 90, 112, 135, 157)
SEG_PALETTE = [[60, 140, 50], [200, 180, 120], [40, 90, 170], [220, 40, 40],
               [230, 160, 30], [200, 220, 40], [90, 200, 60], [40, 200, 170],
               [40, 120, 220], [130, 60, 220], [220, 60, 170]]


def demo_metainfo(task):
    """Metainfo dict for the demo dataset of ``task`` ('det' or 'seg')."""
    if task == 'det':
        return dict(classes=THING_CLASSES, palette=SEG_PALETTE[3:])
    if task == 'seg':
        return dict(classes=SEG_CLASSES, palette=SEG_PALETTE)
    raise ValueError(f"unknown demo task {task!r}; use 'det' or 'seg'")


def _smooth_noise(rng, size, scale):
    """Value noise: a coarse random grid upsampled bicubically."""
    cells = max(2, size // scale)
    grid = rng.random((cells + 1, cells + 1)).astype(np.float32)
    return cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC)


def _stuff_texture(rng, kind, size):
    """RGB float texture in [0, 1] for one of the stuff classes."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    fine = rng.random((size, size)).astype(np.float32)
    if kind == 0:  # grass: green, blotchy, fine speckle
        n = 0.6 * _smooth_noise(rng, size, 12) + 0.4 * fine
        base = np.array([0.25, 0.55, 0.2]) * rng.uniform(0.7, 1.2)
        tex = base[None, None] * (0.55 + 0.7 * n[..., None])
    elif kind == 1:  # sand: warm, smooth with fine grain
        n = 0.7 * _smooth_noise(rng, size, 40) + 0.3 * fine
        base = np.array([0.8, 0.7, 0.5]) * rng.uniform(0.8, 1.1)
        tex = base[None, None] * (0.75 + 0.35 * n[..., None])
    else:  # water: blue with oriented waves
        theta = rng.uniform(0, np.pi)
        freq = rng.uniform(0.15, 0.35)
        wave = np.sin(freq * (xx * np.cos(theta) + yy * np.sin(theta)) +
                      3 * _smooth_noise(rng, size, 30))
        base = np.array([0.15, 0.35, 0.7]) * rng.uniform(0.8, 1.2)
        tex = base[None, None] * (0.8 + 0.25 * wave[..., None] +
                                  0.1 * fine[..., None])
    return np.clip(tex, 0, 1)


def _ground(rng, size):
    """Partition the canvas into 2-3 stuff regions with wavy borders."""
    kinds = rng.choice(3, size=rng.integers(2, 4), replace=False)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    warp = 25 * (_smooth_noise(rng, size, 48) - 0.5)
    centres = rng.uniform(0, size, size=(len(kinds), 2))
    dist = np.stack([np.hypot(xx + warp - cx, yy - warp - cy)
                     for cx, cy in centres])
    region = dist.argmin(0)
    img = np.zeros((size, size, 3), np.float32)
    labels = np.zeros((size, size), np.uint8)
    for i, kind in enumerate(kinds):
        sel = region == i
        img[sel] = _stuff_texture(rng, kind, size)[sel]
        labels[sel] = kind + 1
    return img, labels


def _shape_polygon(cls, rng, r):
    """Outline of a thing class centred at the origin, radius ``r`` px."""
    t = rng.uniform(0, 2 * np.pi)

    def ngon(n, rad, phase=0.0):
        a = t + phase + np.arange(n) * 2 * np.pi / n
        return np.stack([rad * np.cos(a), rad * np.sin(a)], 1)

    name = THING_CLASSES[cls]
    if name == 'disc':
        aspect = rng.uniform(0.75, 1.0)
        p = ngon(48, r)
        p[:, 1] *= aspect
        return [p]
    if name == 'square':
        p = ngon(4, r)
        p[:, 1] *= rng.uniform(0.6, 1.0)
        return [_rotate(p, t)]
    if name == 'triangle':
        return [ngon(3, r)]
    if name == 'star':
        outer, inner = ngon(5, r), ngon(5, r * 0.42, np.pi / 5)
        return [np.stack([outer, inner], 1).reshape(-1, 2)]
    if name == 'ring':
        return [ngon(48, r), ngon(48, r * rng.uniform(0.45, 0.6))]
    if name == 'cross':
        w = r * 0.33
        arm = np.array([[-w, -r], [w, -r], [w, -w], [r, -w], [r, w], [w, w],
                        [w, r], [-w, r], [-w, w], [-r, w], [-r, -w],
                        [-w, -w]])
        return [_rotate(arm, t)]
    if name == 'hexagon':
        return [ngon(6, r)]
    if name == 'crescent':
        return [ngon(48, r), ngon(48, r * 0.85) + r * 0.45 *
                np.array([np.cos(t), np.sin(t)])]
    raise ValueError(name)


def _rotate(p, t):
    c, s = np.cos(t), np.sin(t)
    return p @ np.array([[c, s], [-s, c]])


def _thing_mask(cls, rng, size, cx, cy, r):
    polys = _shape_polygon(cls, rng, r)
    mask = np.zeros((size, size), np.uint8)
    cv2.fillPoly(mask, [np.round(polys[0] + (cx, cy)).astype(np.int32)], 1)
    if len(polys) > 1:  # ring hole / crescent bite
        cv2.fillPoly(mask, [np.round(polys[1] + (cx, cy)).astype(np.int32)],
                     0)
    return mask.astype(bool)


def _thing_texture(rng, cls, size):
    hue = (_THING_HUES[cls] + rng.integers(-22, 23)) % 180
    sat, val = rng.integers(150, 256), rng.integers(140, 256)
    hsv = np.array([[[hue, sat, val]]], np.uint8)
    rgb = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32) / 255
    shade = 0.75 + 0.25 * _smooth_noise(rng, size, 16)
    if rng.random() < 0.5:  # stripes at a random angle
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        a = rng.uniform(0, np.pi)
        stripes = np.sin(rng.uniform(0.3, 0.8) *
                         (xx * np.cos(a) + yy * np.sin(a)))
        shade = shade * (0.85 + 0.15 * np.sign(stripes))
    return rgb[None, None] * shade[..., None]


def _clutter(rng, img, labels, size):
    """Random strokes and blobs that belong to no class (label 0)."""
    canvas = (img * 255).astype(np.uint8).copy()
    mask = np.zeros((size, size), np.uint8)
    for _ in range(rng.integers(3, 9)):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        pts = rng.integers(0, size, (2, 2))
        thick = int(rng.integers(1, 4))
        if rng.random() < 0.7:
            cv2.line(canvas, tuple(map(int, pts[0])), tuple(map(int, pts[1])),
                     colour, thick)
            cv2.line(mask, tuple(map(int, pts[0])), tuple(map(int, pts[1])),
                     1, thick)
        else:
            rad = int(rng.integers(2, 6))
            cv2.circle(canvas, tuple(map(int, pts[0])), rad, colour, -1)
            cv2.circle(mask, tuple(map(int, pts[0])), rad, 1, -1)
    labels[mask > 0] = 0
    return canvas.astype(np.float32) / 255


def render_scene(seed, split, index, size=DEFAULT_SIZE):
    """Render one scene.

    Returns ``(rgb uint8 HxWx3, semantic uint8 HxW, instances)`` where each
    instance is ``dict(category=int, mask=bool HxW)`` of its visible part.
    """
    key = f'{seed}-{split}-{index}'.encode()
    rng = np.random.default_rng(
        int.from_bytes(hashlib.sha256(key).digest()[:8], 'little'))
    img, labels = _ground(rng, size)
    img = _clutter(rng, img, labels, size)

    # Object radii 8-35 px at 192 px: 15-70 px objects, overlapping.
    scale = size / DEFAULT_SIZE
    placed = []
    for _ in range(rng.integers(2, 8)):
        cls = int(rng.integers(len(THING_CLASSES)))
        r = rng.uniform(8, 35) * scale
        cx, cy = rng.uniform(r * 0.5, size - r * 0.5, 2)
        m = _thing_mask(cls, rng, size, cx, cy, r)
        if m.sum() < 20:
            continue
        tex = _thing_texture(rng, cls, size)
        img[m] = tex[m]
        for other in placed:  # later objects occlude earlier ones
            other['mask'] &= ~m
        labels[m] = len(STUFF_CLASSES) + cls + 1
        placed.append(dict(category=cls, mask=m, full=m.sum()))

    # Drop objects hidden to less than a third of their area.
    instances = []
    for p in placed:
        if p['mask'].sum() >= max(20, p['full'] / 3):
            instances.append(dict(category=p['category'], mask=p['mask']))
        else:
            labels[p['mask']] = 0
    img = img + rng.normal(0, 0.02, img.shape).astype(np.float32)
    rgb = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
    return rgb, labels, instances


def _coco_annotation(inst, ann_id, image_id):
    rle = mask_utils.encode(np.asfortranarray(inst['mask'].astype(np.uint8)))
    x, y, w, h = mask_utils.toBbox(rle).tolist()
    rle['counts'] = rle['counts'].decode('ascii')
    return dict(id=ann_id, image_id=image_id, category_id=inst['category'] + 1,
                segmentation=rle, area=float(mask_utils.area(rle)),
                bbox=[x, y, w, h], iscrowd=0)


def _stamp(seed, size, splits):
    return dict(generator_version=GENERATOR_VERSION, seed=seed, size=size,
                splits=dict(splits))


def generate_demo_dataset(root, seed=DEFAULT_SEED, size=DEFAULT_SIZE,
                          splits=None, force=False):
    """Write the demo dataset under ``root`` unless an identical one is there.

    The dataset is written into a temporary sibling folder and renamed into
    place, so an interrupted run never leaves a half-written dataset behind.
    Returns ``root``.
    """
    splits = dict(DEFAULT_SPLITS if splits is None else splits)
    stamp = _stamp(seed, size, splits)
    stamp_file = osp.join(root, 'dataset.json')
    if not force and osp.isfile(stamp_file):
        with open(stamp_file) as f:
            if json.load(f) == stamp:
                return root
    with atomic_dir(root, prefix='.demo-') as tmp:
        categories = [dict(id=i + 1, name=n, supercategory='shape')
                      for i, n in enumerate(THING_CLASSES)]
        for split, count in splits.items():
            sub = SPLIT_DIRS[split]
            os.makedirs(osp.join(tmp, 'images', sub))
            os.makedirs(osp.join(tmp, 'annotations', sub))
            images, annotations = [], []
            for idx in range(count):
                rgb, labels, instances = render_scene(seed, split, idx, size)
                name = f'{split}_{idx:05d}.png'
                cv2.imwrite(osp.join(tmp, 'images', sub, name),
                            rgb[..., ::-1])
                cv2.imwrite(osp.join(tmp, 'annotations', sub, name), labels)
                images.append(dict(id=idx + 1, file_name=name, width=size,
                                   height=size))
                for inst in instances:
                    annotations.append(_coco_annotation(
                        inst, len(annotations) + 1, idx + 1))
            with open(osp.join(tmp, 'annotations',
                               f'instances_{split}.json'), 'w') as f:
                json.dump(dict(images=images, annotations=annotations,
                               categories=categories), f)
        with open(osp.join(tmp, 'dataset.json'), 'w') as f:
            json.dump(stamp, f)
    return root
