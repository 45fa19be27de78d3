"""The tiny Swin model the synthesizer tests share (not a test module)."""
import torch

MEAN = [123.675, 116.28, 103.53]
STD = [58.395, 57.12, 57.375]


class TinyModel(torch.nn.Module):
    """mmdet Swin (2 stages, window 7) + DetDataPreprocessor, optional FPN.

    Weights come from ``seed``.  Left in training mode like a freshly built
    model: the synthesizers switch the backbone to eval themselves.
    """

    def __init__(self, seed=0, neck=False):
        super().__init__()
        from mmdet.models.backbones import SwinTransformer
        from mmdet.models.data_preprocessors import DetDataPreprocessor
        torch.manual_seed(seed)
        self.backbone = SwinTransformer(
            embed_dims=24, depths=[2, 2], num_heads=[2, 4], strides=(4, 2),
            out_indices=(0, 1), window_size=7)
        if neck:
            from mmdet.models.necks import FPN
            self.neck = FPN(in_channels=[24, 48], out_channels=16,
                            num_outs=2)
        self.data_preprocessor = DetDataPreprocessor(
            mean=MEAN, std=STD, bgr_to_rgb=True)


# -------------------------------------------------------------- timm models
# The classification track's tests share these tiny timm classifiers.
TIMM_SWIN = 'swin_tiny_patch4_window7_224'
TIMM_DEIT = 'deit_tiny_patch16_224'
#: 32x32 input: 8x8 tokens, 4x4 windows; stage 1 has a shifted block
#: (shift 2).
TINY_TIMM_SWIN = dict(embed_dim=16, depths=(2, 1), num_heads=(2, 2),
                      window_size=4, img_size=32)
#: 32x32 input, 8 px patches: a 4x4 patch grid behind the CLS token.
TINY_TIMM_DEIT = dict(embed_dim=32, depth=2, num_heads=2, img_size=32,
                      patch_size=8)


def tiny_timm(name, num_classes=3, seed=0, **kwargs):
    """``timm.create_model(name, pretrained=False, ...)`` with the weights
    of ``seed``, in eval mode."""
    import timm
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, num_classes=num_classes,
                             **kwargs).eval()


class Wrap(torch.nn.Module):
    """What the synthesizers and quantizers see of a TimmClassifier: the
    timm model at ``.backbone`` (so module names are the pipeline's,
    ``backbone.layers.0...``)."""

    def __init__(self, net):
        super().__init__()
        self.backbone = net

    def forward(self, x):
        return self.backbone(x)


#: Three ImageNet class folders for the tiny classifiers' val trees.
WNIDS = ['n01440764', 'n01443537', 'n01484850']


def write_class_folders(root, per_class=2, seed=0):
    """A tiny ImageNet-style val tree ``root/<wnid>/img_<j>.JPEG`` (random
    pixels, a different size per file, so the eval transform resizes);
    returns the random state for further images."""
    import os

    import numpy as np
    from PIL import Image
    rng = np.random.RandomState(seed)
    for i, wnid in enumerate(WNIDS):
        os.makedirs(os.path.join(root, wnid))
        for j in range(per_class):
            arr = rng.randint(0, 256, (40 + 7 * j, 36 + 5 * i, 3),
                              dtype=np.uint8)
            Image.fromarray(arr).save(
                os.path.join(root, wnid, f'img_{j}.JPEG'))
    return rng


def tiny_cls_overrides(model_name, model_kwargs, val_root,
                       num_classes=len(WNIDS)):
    """Config lines that put a tiny timm classifier (32x32 input) and the
    val tree of :func:`write_class_folders` into a classification config."""
    kwargs = repr(dict(model_kwargs))
    return f"""
data_config = dict(input_size=(3, 32, 32))
model = dict(model_name='{model_name}', num_classes={num_classes},
             model_kwargs={kwargs}, data_config=data_config)
test_dataloader = dict(
    batch_size=3, num_workers=0, persistent_workers=False,
    dataset=dict(data_root='{val_root}', model_name='{model_name}',
                 model_kwargs={kwargs}, data_config=data_config,
                 num_classes={num_classes}))
"""
