# Reproduces the published row `repq-vit_mask-rcnn_swin-t_w6a6` of
# configs/leaderboard/published.yaml: RepQ-ViT, Mask R-CNN Swin-T
# 3x, W6A6 on COCO val2017 (quoted: box_ap 45.1, mask_ap 41.2).
# RepQ-ViT (real-data PTQ, RepQ-ViT quantizer, 1 calibration image).
# Official Swin checkpoint (mmdet 2.11 key layout): download
# official_checkpoint, convert it and pass the converted file as CHECKPOINT:
#   python tools/convert_checkpoint.py mask_rcnn_swin_tiny_patch4_window7.pth \
#       mask_rcnn_swin_tiny_patch4_window7_converted.pth --model mask_rcnn_swin_t \
#       --check configs/reproduce/repq-vit_mask-rcnn_swin-t_w6a6.py
#   python tools/dfq_test.py configs/reproduce/repq-vit_mask-rcnn_swin-t_w6a6.py \
#       mask_rcnn_swin_tiny_patch4_window7_converted.pth
_base_ = [
    'mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_ms-crop-3x_coco.py',
    '../_base_/dfq_runtime.py',
    '../_base_/methods/real_images_repq.py',  # data source
    '../_base_/quantizers/repq.py',  # quantizer setting
    '../_base_/bits/w6a6.py',  # bits
]
official_checkpoint = 'https://github.com/SwinTransformer/storage/releases/download/v1.0.2/mask_rcnn_swin_tiny_patch4_window7.pth'  # noqa
load_from = None
