_base_ = [
    './_base_/models/swin_tiny_patch4_window7_224.py',
    './_base_/dfq_cls_runtime.py',
    '../_base_/methods/spdfq.py',  # data source (+ block reconstruction)
    '../_base_/quantizers/naive.py',  # quantizer setting
    '../_base_/bits/w4a8.py',  # bits
]
# Swin-T (timm swin_tiny_patch4_window7_224.ms_in1k, FP top-1 81.2) on ImageNet val
# (data/imagenet/val/<wnid>/*.JPEG), SPDFQ synthesis at 224x224.  Weights:
# pass the file as CHECKPOINT to tools/dfq_test.py (or model.checkpoint, or
# timm's cache).
# The classifier's logits exist on this track: SPDFQ's soft-label loss is
# the soft cross-entropy of the classifier's logits (images and MSR crops)
# to softmax(Z) targets over its 1000 classes, as in the SPDFQ paper
# (label_head='projection' is the backbone-level stand-in of the dense
# configs).
# crop_size=None: each MSR crop is resized to the input size, the paper's
# form.  The method fragment's crop_size='native' forwards a crop at its own
# pixel size, which a dense Swin backbone accepts; a timm Swin classifier
# has a fixed input size (224x224: its patch embedding checks the size and
# its windows / attention masks are built for the 56x56 token map), so a
# native crop (about 112x112) would be refused.
dfq = dict(synthesizer=dict(label_head='classifier', crop_size=None))
# Naive quantizer, as the other configs/cls leaf configs.
work_dir = './work_dirs/cls/swin_t_w4a8_spdfq'
