# Tiny timm Swin classifier for the embedded demo (the classification track's
# demo model).  The same timm class as the real Swin-T / Swin-S configs
# (timm swin_tiny_patch4_window7_224: SwinTransformer, window 7), shrunk like
# the demo Mask R-CNN's and UperNet's mmdet / mmseg Swin (embed dims 48,
# depths 2-2-2-2, heads 3-6-12-24), on 56x56 crops of the demo's objects: the
# eight thing classes (dfq_dense/demo/crops.py cuts them from the generated
# scenes; val crops from val scenes only).  Trained from scratch on 2 CPU
# cores with mmengine's Runner by tools/train_demo.py cls.
_base_ = ['../cls/_base_/cls_runtime.py']

# The dataset is generated on demand (tools/train_demo.py, tools/dfq_test.py):
# the demo scenes, then their object crops.
demo_dataset = dict(
    root='data/dfq_demo', seed=2024, size=192,
    crops=dict(size=56, context=1.25, min_side=16))
crop_size = 56
num_classes = 8
model_name = 'swin_tiny_patch4_window7_224'
# 56x56 input, patch 4: 14x14 tokens, two 7x7 windows a side in stage 1, one
# window in stage 2, timm's clamped windows (4x4, 2x2) in stages 3 and 4.
model_kwargs = dict(
    img_size=crop_size,
    embed_dim=48,
    depths=(2, 2, 2, 2),
    num_heads=(3, 6, 12, 24),
    drop_path_rate=0.1)
# The crops are already the objects: no resize, no centre crop (crop_pct 1),
# ImageNet's mean / std (timm's default, also the demo detector's).
data_config = dict(input_size=(3, crop_size, crop_size), crop_pct=1.0,
                   interpolation='bilinear')
model = dict(
    type='dfq_dense.TimmClassifier',
    model_name=model_name,
    num_classes=num_classes,
    checkpoint='dfq_dense/demo/checkpoints/swin_cls_demo.pth',
    model_kwargs=model_kwargs,
    data_config=data_config)

crop_dataset = dict(
    type='dfq_dense.ImageNetValDataset',
    model_name=model_name,
    model_kwargs=model_kwargs,
    data_config=data_config,
    num_classes=num_classes)
train_dataloader = dict(
    batch_size=64,
    num_workers=0,
    persistent_workers=False,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(
        crop_dataset,
        data_root='data/dfq_demo/cls/train',
        test_mode=False,
        # timm's training transform: shapes are rotated and mirrored in the
        # scenes, so both flips; a mild crop and colour jitter (hue is
        # jittered in the scenes already, shape decides the class).
        train_transform=dict(scale=(0.6, 1.0), hflip=0.5, vflip=0.5,
                             color_jitter=0.2)))
val_dataloader = dict(
    batch_size=64,
    num_workers=0,
    persistent_workers=False,
    drop_last=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(crop_dataset, data_root='data/dfq_demo/cls/val'))
test_dataloader = val_dataloader
val_evaluator = dict(type='dfq_dense.ImageNetAccuracy')
test_evaluator = val_evaluator

max_iters = 2000
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters,
                 val_interval=max_iters + 1)
val_cfg = dict(type='ValLoop')
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0,
         end=100),
    dict(type='CosineAnnealingLR', by_epoch=False, begin=100, end=max_iters,
         eta_min=1e-5)
]
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-3, weight_decay=0.05),
    clip_grad=dict(max_norm=5, norm_type=2))
default_hooks = dict(
    logger=dict(type='LoggerHook', interval=50),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=500,
                    max_keep_ckpts=1))
log_processor = dict(by_epoch=False)
