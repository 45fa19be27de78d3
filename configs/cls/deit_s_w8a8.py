_base_ = [
    './_base_/models/deit_small_patch16_224.py',
    './_base_/dfq_cls_runtime.py',
    '../_base_/methods/psaq_vit.py',  # data source
    '../_base_/quantizers/naive.py',  # quantizer setting
    '../_base_/bits/w8a8.py',  # bits
]
# DeiT-S (timm deit_small_patch16_224.fb_in1k, FP top-1 79.8) on ImageNet val
# (data/imagenet/val/<wnid>/*.JPEG), synthesis at 224x224.  Weights: pass
# the file as CHECKPOINT to tools/dfq_test.py (or model.checkpoint, or
# timm's cache).
# The classifier's logits exist on this track: PSAQ-ViT's one-hot loss
# (cross-entropy to random labels) is on, as in the paper;
# label_head=None is the backbone-level variant of the dense configs.
# Adam lr 0.20 on DeiT (0.25 on Swin), as the official generate_data.py.
dfq = dict(synthesizer=dict(label_head='classifier', lr=0.20))
# Naive quantizer, as PSAQ-ViT reports W8A8 and W4A8.
work_dir = './work_dirs/cls/deit_s_w8a8'
