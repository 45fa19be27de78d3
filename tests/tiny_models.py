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
