# A timm ImageNet-1k classifier on ImageNet val: the base of the model
# fragments beside it, each of which names its timm model (with the weights'
# tag) in model.model_name and test_dataloader.dataset.model_name, so that
# the eval transform (resize, crop_pct, interpolation) is that of the same
# weights (timm's pretrained_cfg of the model name).
_base_ = ['../datasets/imagenet_val.py']

model = dict(
    type='dfq_dense.TimmClassifier',
    model_name=None,
    num_classes=1000,
    checkpoint=None)
