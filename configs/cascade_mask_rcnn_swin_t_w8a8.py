_base_ = [
    './_base_/models/cascade_mask_rcnn_swin_t_fpn_3x.py',
    './_base_/dfq_runtime.py',
    './_base_/methods/psaq_vit.py',  # data source
    './_base_/quantizers/naive.py',  # quantizer setting
    './_base_/bits/w8a8.py',  # bits
]
# Official Swin detection checkpoint (FP COCO val2017 box AP 50.4, mask
# AP 43.7); mmdet 3's model zoo has no Cascade Swin.  It has the
# mmdet 2.11 key layout: download official_checkpoint, convert it and pass
# the converted file as CHECKPOINT:
#   python tools/convert_checkpoint.py \
#       cascade_mask_rcnn_swin_tiny_patch4_window7.pth \
#       cascade_mask_rcnn_swin_tiny_patch4_window7_mmdet3.pth \
#       --model cascade_mask_rcnn_swin_t
#   python tools/dfq_test.py configs/cascade_mask_rcnn_swin_t_w8a8.py \
#       cascade_mask_rcnn_swin_tiny_patch4_window7_mmdet3.pth
official_checkpoint = 'https://github.com/SwinTransformer/storage/releases/download/v1.0.2/cascade_mask_rcnn_swin_tiny_patch4_window7.pth'  # noqa
load_from = None
# Naive quantizer, as PSAQ-ViT / PSAQ-ViT V2 report W8A8 and W4A8.
