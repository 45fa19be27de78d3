# Tiny Swin UperNet for the embedded demo dataset (dfq_dense.demo).
# Same classes as the real model (mmseg SwinTransformer, UPerHead, FCNHead);
# widths, depths and schedule shrunk; GroupNorm instead of SyncBN because a
# tiny UperNet with BatchNorm at batch 4 collapsed to all-background.
_base_ = 'mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py'

demo_dataset = dict(root='data/dfq_demo', seed=2024, size=192)
data_root = 'data/dfq_demo'
crop_size = (192, 192)
# == dfq_dense.demo.dataset.SEG_CLASSES (checked by the tests).  The label
# maps follow ADE20K: 0 is "unlabelled" and reduce_zero_label=True maps it to
# 255 (ignored) and class k to k - 1.
metainfo = dict(
    classes=('grass', 'sand', 'water', 'disc', 'square', 'triangle', 'star',
             'ring', 'cross', 'hexagon', 'crescent'))
num_classes = 11
norm_cfg = dict(type='GN', num_groups=8, requires_grad=True)

model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(
        embed_dims=48,
        depths=[2, 2, 2, 2],
        num_heads=[3, 6, 12, 24],
        drop_path_rate=0.1,
        init_cfg=None),
    decode_head=dict(
        in_channels=[48, 96, 192, 384],
        channels=64,
        num_classes=num_classes,
        norm_cfg=norm_cfg),
    auxiliary_head=dict(
        in_channels=192,
        channels=32,
        num_classes=num_classes,
        norm_cfg=norm_cfg))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomResize', scale=crop_size, ratio_range=(0.75, 1.5),
         keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=crop_size, keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs')
]
dataset_cfg = dict(
    type='BaseSegDataset',
    data_root=data_root,
    metainfo=metainfo,
    img_suffix='.png',
    seg_map_suffix='.png',
    reduce_zero_label=True)
train_dataloader = dict(
    batch_size=8,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(
        _delete_=True,
        data_prefix=dict(
            img_path='images/training', seg_map_path='annotations/training'),
        pipeline=train_pipeline,
        **dataset_cfg))
val_dataloader = dict(
    batch_size=1,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(
        _delete_=True,
        data_prefix=dict(
            img_path='images/validation',
            seg_map_path='annotations/validation'),
        pipeline=test_pipeline,
        **dataset_cfg))
test_dataloader = val_dataloader

max_iters = 3000
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters,
                 val_interval=max_iters + 1)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0,
         end=150),
    dict(type='CosineAnnealingLR', by_epoch=False, begin=150, end=max_iters,
         eta_min=1e-5)
]
optim_wrapper = dict(
    optimizer=dict(lr=6e-4, weight_decay=0.01),
    clip_grad=dict(max_norm=5, norm_type=2))
default_hooks = dict(
    logger=dict(interval=25, log_metric_by_epoch=False),
    checkpoint=dict(by_epoch=False, interval=500, max_keep_ckpts=1))
