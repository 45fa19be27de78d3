# FP ImageNet val top-1 / top-5 of timm swin_small_patch4_window7_224.ms_in1k
# (see _base_/models/swin_small_patch4_window7_224.py):
# data/imagenet/val/<wnid>/*.JPEG, weights from model.checkpoint or timm's
# cache; runs with mmengine's Runner (see _base_/cls_runtime.py).
_base_ = [
    './_base_/models/swin_small_patch4_window7_224.py',
    './_base_/cls_runtime.py',
]
work_dir = './work_dirs/cls/swin_s_fp'
