# ImageNet-1k val as class folders, data/imagenet/val/<wnid>/*.JPEG (label =
# sorted folder position, the order of timm's ImageNet-1k heads).  The
# transform is timm's eval transform of the model: the model base that
# inherits this file sets dataset.model_name (and model_kwargs /
# data_config, when it changes them, must be given to both).
test_dataloader = dict(
    batch_size=64,
    num_workers=4,
    persistent_workers=True,
    drop_last=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type='dfq_dense.ImageNetValDataset',
        data_root='data/imagenet/val',
        model_name=None,
        num_classes=1000))
test_evaluator = dict(type='dfq_dense.ImageNetAccuracy')
