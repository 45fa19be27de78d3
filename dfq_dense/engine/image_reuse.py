"""Reusing the synthetic images of another run (``dfq.load_images``), also
across tasks.

A run records where its images come from in the ``meta`` of
``synthetic/synthetic_images.pth``: the task (``det``, ``seg``, ``cls``),
the model (the timm model name of a classifier, the backbone type of a
detector / segmentor) and its backbone family (:func:`backbone_family`).
A later run of another task may reuse them when the backbone family is the
same: e.g. the 224x224 images a timm Swin classifier synthesized calibrate a
Swin Mask R-CNN or UperNet.  They are brought to the reusing run's
synthesis size by one rule, :data:`RESIZE_RULE`:

* de-normalised with the mean / std stored in the file (RGB, 0-255);
* resized with bilinear interpolation (``align_corners=False``,
  anti-aliased where a side shrinks) to the target synthesis size
  ``(H, W)`` exactly, **stretched**: the aspect ratio is not kept (a
  224x224 image becomes 800x1333 for COCO, 512x512 for ADE20K).  Keeping
  the ratio would need either padding (a constant block over 40% of an
  800x1333 image, windows that calibrate nothing) or a crop (40% of the
  synthesized content thrown away); stretching keeps every synthesized
  pixel and fills the whole input, at the cost of a 1.67x horizontal
  distortion for COCO (none for the square ADE20K crop);
* re-normalised with the reusing model's own ``data_preprocessor``
  mean / std.

Same-task reuse is unchanged (images used as they are, at their size).  A
file without a recorded task (written before the task was recorded) is
taken as a same-task file.  Refused with one line: another backbone family
(DeiT images for a Swin detector), a cross-task file that does not record
its backbone family or lacks its mean / std, and a file that is not a
synthetic-images file at all.
"""
import os.path as osp

import torch
import torch.nn.functional as F

__all__ = ['RESIZE_RULE', 'ImageReuseError', 'backbone_family',
           'image_provenance', 'check_image_source', 'resize_images',
           'prepare_loaded_images']

#: The cross-task resize rule, as recorded in the results.
RESIZE_RULE = ('de-normalise with the file\'s mean/std, bilinear resize '
               '(align_corners=False, anti-aliased where a side shrinks) to '
               'the target synthesis (H, W), stretched (aspect ratio not '
               'kept), re-normalise with the target model\'s mean/std')


SCOPES = ('mmdet', 'mmseg', 'mmpretrain', 'mmcls', 'mmengine', 'dfq_dense')


class ImageReuseError(ValueError):
    """A ``dfq.load_images`` file that this run cannot use: one line."""


def backbone_family(name):
    """The backbone family of a timm model name or an mmdet / mmseg backbone
    type: ``'swin'`` (Swin Transformer V1: timm ``swin_*``, mmdet / mmseg
    ``SwinTransformer``), ``'swinv2'``, ``'vit'`` (ViT and DeiT: timm
    ``vit_*`` / ``deit_*``, ``VisionTransformer``), else the lower-cased name
    up to its first ``_`` (``'ResNet'`` -> ``'resnet'``); None for no name.
    """
    if not isinstance(name, str) or not name:
        return None
    n = name
    if n.split('.')[0] in SCOPES:  # registry scope: mmdet.SwinTransformer
        n = n.split('.', 1)[1]
    n = n.split('.')[0].lower()  # a timm tag: 'swin_tiny_..._224.ms_in1k'
    if n.startswith('swinv2') or 'swintransformerv2' in n:
        return 'swinv2'
    if n.startswith('swin') or 'swintransformer' in n:
        return 'swin'
    if n.startswith(('deit', 'vit_')) or n == 'vit' or \
            'visiontransformer' in n:
        return 'vit'
    return n.split('_')[0]


def image_provenance(cfg):
    """``dict(task, model, backbone_family)`` of the run of ``cfg``: what
    its synthetic-images file records."""
    from .dfq_loop import is_classifier_cfg, task_of_cfg
    model_cfg = cfg.get('model') or {}
    if is_classifier_cfg(cfg):
        model = model_cfg.get('model_name')
    else:
        model = (model_cfg.get('backbone') or {}).get('type')
    return dict(task=task_of_cfg(cfg), model=model,
                backbone_family=backbone_family(model))


def _not_synthetic(path, why):
    return ImageReuseError(
        f'dfq.load_images: {path} is not a synthetic_images.pth of dfq_test '
        f'({why}); point it at the synthetic images of an earlier run')


def check_image_source(saved, path, target):
    """Check a loaded ``dfq.load_images`` file against the reusing run.

    Args:
        saved: what the file holds (a dict from
            :func:`~dfq_dense.synth.base.load_images`).
        path: the file, for the messages.
        target: :func:`image_provenance` of the reusing run.

    Returns:
        ``dict(file, run_id, task, model, backbone_family, size,
        cross_task)``: where the images come from.

    Raises:
        ImageReuseError: one line, see the module doc.
    """
    if not isinstance(saved, dict):
        raise _not_synthetic(path, 'not a dict')
    images = saved.get('images')
    if not torch.is_tensor(images) or images.dim() != 4 or \
            images.shape[1] != 3 or images.shape[0] < 1 or \
            not images.is_floating_point():
        raise _not_synthetic(path, 'no float "images" tensor (N, 3, H, W)')
    meta = saved.get('meta', {})
    if not isinstance(meta, dict):
        raise _not_synthetic(path, 'a malformed "meta" entry')
    src_task = meta.get('task')
    info = dict(file=path, run_id=meta.get('run_id'), task=src_task,
                model=meta.get('model'),
                backbone_family=meta.get('backbone_family'),
                size=[int(s) for s in images.shape[-2:]],
                cross_task=src_task is not None and
                src_task != target['task'])
    src_family = info['backbone_family']
    tgt_family = target.get('backbone_family')
    if info['cross_task'] and not src_family:
        raise ImageReuseError(
            f'dfq.load_images: {path} comes from a {src_task} run that '
            'records no backbone family; images are reused across tasks '
            'only within one backbone family: synthesize them again')
    if src_family and tgt_family and src_family != tgt_family:
        raise ImageReuseError(
            f'dfq.load_images: {path} holds images synthesized from '
            f'{info["model"]} ({src_family} family, task {src_task}); this '
            f'{target["task"]} run has a {target.get("model")} backbone '
            f'({tgt_family} family): images are reused only within one '
            'backbone family')
    if info['cross_task']:
        for key in ('mean', 'std'):
            t = saved.get(key)
            if not torch.is_tensor(t) or t.numel() not in (1, 3) or \
                    not bool(torch.isfinite(t).all()) or \
                    (key == 'std' and not bool((t > 0).all())):
                raise _not_synthetic(
                    path, f'no valid "{key}" to de-normalise its images '
                    'for another task')
    return info


def resize_images(images, src_mean, src_std, dst_mean, dst_std, size):
    """:data:`RESIZE_RULE` on normalised ``(N, 3, h, w)`` images: returns
    ``(N, 3, H, W)`` normalised with ``dst_mean`` / ``dst_std``."""
    def col(t):
        return torch.as_tensor(t).float().reshape(1, -1, 1, 1).to(
            images.device)

    H, W = (int(size), int(size)) if isinstance(size, int) else \
        (int(size[0]), int(size[1]))
    raw = images.float() * col(src_std) + col(src_mean)
    shrink = H < raw.shape[-2] or W < raw.shape[-1]
    out = F.interpolate(raw, size=(H, W), mode='bilinear',
                        align_corners=False, antialias=shrink)
    return (out - col(dst_mean)) / col(dst_std)


def prepare_loaded_images(saved, path, target, size, mean, std):
    """The images of a loaded ``dfq.load_images`` file, ready for this run,
    and the record of where they come from.

    Same-task (or unrecorded-task) files: the images as they are.  Files of
    another task (same backbone family): resized by :data:`RESIZE_RULE` to
    ``size`` and re-normalised with ``mean`` / ``std`` (the reusing model's
    preprocessor).

    Returns:
        ``(images, record)``; ``record`` is :func:`check_image_source`'s
        dict with ``resized`` (bool) and, when resized, ``resized_to`` and
        ``resize_rule``.
    """
    info = check_image_source(saved, path, target)
    images = saved['images']
    info['resized'] = False
    if info['cross_task']:
        hw = (size, size) if isinstance(size, int) else tuple(size)
        images = resize_images(images, saved['mean'], saved['std'], mean,
                               std, hw)
        info.update(resized=list(hw) != info['size'],
                    resized_to=[int(s) for s in hw],
                    renormalised=True, resize_rule=RESIZE_RULE)
    info['file'] = osp.abspath(path) if isinstance(path, str) else path
    return images, info
