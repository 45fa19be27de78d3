_base_ = [
    './_base_/models/swin_tiny_patch4_window7_224.py',
    './_base_/dfq_cls_runtime.py',
    '../_base_/methods/mimiq.py',  # data source (+ its distillation adapter)
    '../_base_/quantizers/naive.py',  # quantizer setting
    '../_base_/bits/w4a8.py',  # bits
]
# Swin-T (timm swin_tiny_patch4_window7_224.ms_in1k, FP top-1 81.2) on ImageNet val
# (data/imagenet/val/<wnid>/*.JPEG), MimiQ synthesis at 224x224.  Weights:
# pass the file as CHECKPOINT to tools/dfq_test.py (or model.checkpoint, or
# timm's cache).
# The classifier's logits exist on this track: MimiQ's pseudo-label loss is
# the cross-entropy of the classifier's logits to random labels over its
# 1000 classes, as in the MimiQ paper (label_head='projection' is the
# backbone-level stand-in of the dense configs).  Batch 16 and 2000
# iterations as the method fragment (MimiQ's settings); its adapter
# (MimiQDistill) distils the calibrated student.
dfq = dict(synthesizer=dict(label_head='classifier'))
# Naive quantizer, as the other configs/cls leaf configs.
work_dir = './work_dirs/cls/swin_t_w4a8_mimiq'
