_base_ = [
    'mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_ms-crop-3x_coco.py',
    './_base_/dfq_runtime.py',
    './_base_/methods/psaq_vit.py',  # data source
    './_base_/quantizers/naive.py',  # quantizer setting
    './_base_/bits/w6a6.py',  # bits
]
# Model-zoo checkpoint (FP COCO val2017 box AP 46.0, mask AP 41.6).
# Offline: download it and pass its path as
# CHECKPOINT to tools/dfq_test.py.
load_from = 'https://download.openmmlab.com/mmdetection/v2.0/swin/mask_rcnn_swin-t-p4-w7_fpn_ms-crop-3x_coco/mask_rcnn_swin-t-p4-w7_fpn_ms-crop-3x_coco_20210906_131725-bacf6f7b.pth'  # noqa
# Naive min/max: the best W6A6 setting on the demo (README, quantizer table).
