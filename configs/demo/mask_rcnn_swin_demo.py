# Tiny Swin Mask R-CNN for the embedded demo dataset (dfq_dense.demo).
# Same classes as the real model (mmdet SwinTransformer, FPN, RPNHead,
# StandardRoIHead); only widths, depths and the schedule are shrunk so it
# trains from scratch on 2 CPU cores.  Retrain with tools/train_demo.py.
_base_ = 'mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py'

# The dataset is generated on demand (tools/train_demo.py, tools/dfq_test.py).
demo_dataset = dict(root='data/dfq_demo', seed=2024, size=192)
data_root = 'data/dfq_demo/'
image_size = (192, 192)
# == dfq_dense.demo.dataset.THING_CLASSES (checked by the tests)
metainfo = dict(
    classes=('disc', 'square', 'triangle', 'star', 'ring', 'cross', 'hexagon',
             'crescent'))
num_classes = 8
norm_cfg = dict(type='GN', num_groups=8, requires_grad=True)

model = dict(
    backbone=dict(
        embed_dims=48,
        depths=[2, 2, 2, 2],
        num_heads=[3, 6, 12, 24],
        drop_path_rate=0.1,
        convert_weights=False,
        init_cfg=None),
    neck=dict(in_channels=[48, 96, 192, 384], out_channels=64,
              norm_cfg=norm_cfg),
    rpn_head=dict(
        in_channels=64,
        feat_channels=64,
        # 16-256 px anchors for the demo's 15-70 px objects
        anchor_generator=dict(scales=[4])),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=64),
        bbox_head=dict(
            type='Shared4Conv1FCBBoxHead',
            in_channels=64,
            conv_out_channels=64,
            fc_out_channels=256,
            norm_cfg=norm_cfg,
            num_classes=num_classes),
        mask_roi_extractor=dict(out_channels=64),
        mask_head=dict(
            in_channels=64,
            conv_out_channels=64,
            norm_cfg=norm_cfg,
            num_classes=num_classes)),
    train_cfg=dict(
        rpn_proposal=dict(nms_pre=1000, max_per_img=500),
        rcnn=dict(sampler=dict(num=128))),
    test_cfg=dict(
        rpn=dict(nms_pre=500, max_per_img=300),
        rcnn=dict(max_per_img=50)))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='RandomResize', scale=image_size, ratio_range=(0.8, 1.25),
         keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=image_size, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                    'scale_factor'))
]
train_dataloader = dict(
    batch_size=4,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(
        data_root=data_root,
        metainfo=metainfo,
        ann_file='annotations/instances_train.json',
        data_prefix=dict(img='images/training/'),
        filter_cfg=dict(filter_empty_gt=True, min_size=8),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(
        data_root=data_root,
        metainfo=metainfo,
        ann_file='annotations/instances_val.json',
        data_prefix=dict(img='images/validation/'),
        pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json')
test_evaluator = val_evaluator

max_iters = 4000
train_cfg = dict(
    _delete_=True, type='IterBasedTrainLoop', max_iters=max_iters,
    val_interval=max_iters + 1)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0,
         end=200),
    dict(type='CosineAnnealingLR', by_epoch=False, begin=200, end=max_iters,
         eta_min=1e-5)
]
optim_wrapper = dict(
    optimizer=dict(lr=1e-3, weight_decay=0.05),
    clip_grad=dict(max_norm=10, norm_type=2))
default_hooks = dict(
    logger=dict(interval=25),
    checkpoint=dict(by_epoch=False, interval=500, max_keep_ckpts=1))
log_processor = dict(by_epoch=False)
auto_scale_lr = dict(enable=False)
