# Reproduces the published row `psaq-vit-v2_imagenet_swin-s_w8a8` of
# configs/leaderboard/published.yaml: PSAQ-ViT V2, Swin-S, W8A8 on
# ImageNet-1k val (quoted: top-1 82.13; the abstract gives no FP reference).
# PSAQ-ViT V2 on the classifier: V1 start images without category guidance
# (the paper's "no category guidance"), then its adaptive teacher-student
# rounds, the discrepancy the KL divergence of the FP teacher's and the
# quantized student's class probabilities (the adapter's measure=None on a
# classifier); naive min/max quantizer.  The paper's image count and round
# counts are not known here (see the registry entry's note): the method
# fragment's.  Eval transform: timm's for the Swin release (bicubic, crop 0.9,
# as PSAQ-ViT's code).  The official weights file is used as it is:
#   python tools/dfq_test.py configs/reproduce/psaq-vit-v2_imagenet_swin-s_w8a8.py \
#       swin_small_patch4_window7_224.pth
_base_ = [
    '../cls/_base_/models/swin_small_patch4_window7_224.py',
    '../cls/_base_/dfq_cls_runtime.py',
    '../_base_/methods/psaq_vit_v2.py',  # data source (+ its rounds)
    '../_base_/quantizers/naive.py',  # quantizer setting
    '../_base_/bits/w8a8.py',  # bits
]
official_checkpoint = 'https://github.com/SwinTransformer/storage/releases/download/v1.0.0/swin_small_patch4_window7_224.pth'  # noqa
