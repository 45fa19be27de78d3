_base_ = [
    './_base_/models/deit_small_patch16_224.py',
    './_base_/dfq_cls_runtime.py',
    '../_base_/methods/spdfq.py',  # data source (+ block reconstruction)
    '../_base_/quantizers/naive.py',  # quantizer setting
    '../_base_/bits/w4a8.py',  # bits
]
# DeiT-S (timm deit_small_patch16_224.fb_in1k, FP top-1 79.8) on ImageNet val
# (data/imagenet/val/<wnid>/*.JPEG), SPDFQ synthesis at 224x224.  Weights:
# pass the file as CHECKPOINT to tools/dfq_test.py (or model.checkpoint, or
# timm's cache).
# APA in the paper's DeiT form: per head of blocks 7..12 (the deeper half,
# weighted l / 12), the CLS token's attention to the 14x14 patch grid
# (renormalised over the patches) against a random Gaussian-mixture map over
# that grid.
# The classifier's logits exist on this track: SPDFQ's soft-label loss is
# the soft cross-entropy of the classifier's logits (images and MSR crops)
# to softmax(Z) targets over its 1000 classes, as in the SPDFQ paper.
# crop_size=None: each MSR crop is resized to the input size, the paper's
# form; DeiT takes 224x224 inputs only (its position embedding is built for
# the 14x14 grid), so the fragment's crop_size='native' is refused.
dfq = dict(synthesizer=dict(label_head='classifier', crop_size=None))
# The fragment's block-wise reconstruction follows: on DeiT its units are
# the patch embedding (with the CLS token and position embedding), the 12
# blocks and the head against the FP logits.
# Naive quantizer, as the other configs/cls leaf configs.
work_dir = './work_dirs/cls/deit_s_w4a8_spdfq'
