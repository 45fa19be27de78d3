# Cascade Mask R-CNN, Swin-S, FPN, 3x: the Swin-T model with depths
# 2-2-18-2 (official config cascade_mask_rcnn_swin_small_patch4_window7_
# mstrain_480-800_giou_4conv1f_adamw_3x_coco.py; drop_path_rate 0.2 as
# there).
_base_ = './cascade_mask_rcnn_swin_t_fpn_3x.py'
pretrained = 'https://github.com/SwinTransformer/storage/releases/download/v1.0.0/swin_small_patch4_window7_224.pth'  # noqa
model = dict(
    backbone=dict(
        depths=[2, 2, 18, 2],
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)))
