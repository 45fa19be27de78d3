# FP ImageNet val top-1 / top-5 of timm deit_tiny_patch16_224.fb_in1k (see
# _base_/models/deit_tiny_patch16_224.py): data/imagenet/val/<wnid>/*.JPEG,
# weights from model.checkpoint or timm's cache; runs with mmengine's Runner
# (see _base_/cls_runtime.py).
_base_ = [
    './_base_/models/deit_tiny_patch16_224.py',
    './_base_/cls_runtime.py',
]
work_dir = './work_dirs/cls/deit_t_fp'
