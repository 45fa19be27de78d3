_base_ = [
    'mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py',
    './_base_/dfq_runtime.py',
    './_base_/methods/psaq_vit.py',  # data source
    './_base_/quantizers/percentile.py',  # quantizer setting
    './_base_/bits/w4a4.py',  # bits
]
# Model-zoo checkpoint (FP COCO val2017 box AP 42.7, mask AP 39.3).
# Offline: download it and pass its path as
# CHECKPOINT to tools/dfq_test.py.
load_from = 'https://download.openmmlab.com/mmdetection/v2.0/swin/mask_rcnn_swin-t-p4-w7_fpn_1x_coco/mask_rcnn_swin-t-p4-w7_fpn_1x_coco_20210902_120937-9d6b7cfa.pth'  # noqa
# Percentile activations + OMSE weights: the best W4A4 setting on the demo
# (README, quantizer table); naive min/max loses most at 4-bit activations.
