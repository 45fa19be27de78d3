# Reproduces the published row `psaq-vit-v2_cascade_swin-s_w8a8` of
# configs/leaderboard/published.yaml: PSAQ-ViT V2, Cascade Mask R-CNN Swin-S
# 3x, W8A8 on COCO val2017 (quoted: box_ap 50.9, mask_ap 44.1).
# PSAQ-ViT V2 (data-free, naive quantizer).
# Official Swin checkpoint (mmdet 2.11 key layout): download
# official_checkpoint, convert it and pass the converted file as CHECKPOINT:
#   python tools/convert_checkpoint.py cascade_mask_rcnn_swin_small_patch4_window7.pth \
#       cascade_mask_rcnn_swin_small_patch4_window7_converted.pth --model cascade_mask_rcnn_swin_s \
#       --check configs/reproduce/psaq-vit-v2_cascade_swin-s_w8a8.py
#   python tools/dfq_test.py configs/reproduce/psaq-vit-v2_cascade_swin-s_w8a8.py \
#       cascade_mask_rcnn_swin_small_patch4_window7_converted.pth
_base_ = [
    '../_base_/models/cascade_mask_rcnn_swin_s_fpn_3x.py',
    '../_base_/dfq_runtime.py',
    '../_base_/methods/psaq_vit_v2.py',  # data source
    '../_base_/quantizers/naive.py',  # quantizer setting
    '../_base_/bits/w8a8.py',  # bits
]
# PSAQ-ViT V2 at the backbone level: V1 synthesis then its rounds
# (configs/_base_/methods/psaq_vit_v2.py), naive min/max quantizer as in
# PSAQ-ViT's W8A8 rows.  The paper's image count and round counts for dense
# prediction are not known here (see the registry entry's note).
official_checkpoint = 'https://github.com/SwinTransformer/storage/releases/download/v1.0.2/cascade_mask_rcnn_swin_small_patch4_window7.pth'  # noqa
load_from = None
