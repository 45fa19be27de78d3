# Reproduces the published row `repq-vit_cascade_swin-s_w4a4` of
# configs/leaderboard/published.yaml: RepQ-ViT, Cascade Mask R-CNN Swin-S
# 3x, W4A4 on COCO val2017 (quoted: box_ap 49.3, mask_ap 43.1).
# RepQ-ViT (real-data PTQ, RepQ-ViT quantizer, 1 calibration image).
# Official Swin checkpoint (mmdet 2.11 key layout): download
# official_checkpoint, convert it and pass the converted file as CHECKPOINT:
#   python tools/convert_checkpoint.py cascade_mask_rcnn_swin_small_patch4_window7.pth \
#       cascade_mask_rcnn_swin_small_patch4_window7_converted.pth --model cascade_mask_rcnn_swin_s \
#       --check configs/reproduce/repq-vit_cascade_swin-s_w4a4.py
#   python tools/dfq_test.py configs/reproduce/repq-vit_cascade_swin-s_w4a4.py \
#       cascade_mask_rcnn_swin_small_patch4_window7_converted.pth
_base_ = [
    '../_base_/models/cascade_mask_rcnn_swin_s_fpn_3x.py',
    '../_base_/dfq_runtime.py',
    '../_base_/methods/real_images_repq.py',  # data source
    '../_base_/quantizers/repq.py',  # quantizer setting
    '../_base_/bits/w4a4.py',  # bits
]
official_checkpoint = 'https://github.com/SwinTransformer/storage/releases/download/v1.0.2/cascade_mask_rcnn_swin_small_patch4_window7.pth'  # noqa
load_from = None
