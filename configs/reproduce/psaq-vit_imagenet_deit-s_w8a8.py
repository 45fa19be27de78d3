# Reproduces the published row `psaq-vit_imagenet_deit-s_w8a8` of
# configs/leaderboard/published.yaml: PSAQ-ViT, DeiT-S, W8A8 on
# ImageNet-1k val (quoted: top-1 76.92, FP 79.85).
# The official code's recipe (zkkli/PSAQ-ViT, generate_data.py and
# test_quant.py): one batch of 32 images synthesized with the cross-entropy
# to random labels on, Adam lr 0.20 (DeiT), min/max quantizer (naive.py: the
# official weight and activation observers, at this suite's placement: see
# the README's fidelity table);
# its eval transform: bicubic resize of the shorter side to
# floor(224 / crop_pct), centre crop 224, crop_pct 0.875 (DeiT).
# The official weights file is used as it is (timm converts its keys):
#   python tools/dfq_test.py configs/reproduce/psaq-vit_imagenet_deit-s_w8a8.py \
#       deit_small_patch16_224-cd65a155.pth
_base_ = [
    '../cls/_base_/models/deit_small_patch16_224.py',
    '../cls/_base_/dfq_cls_runtime.py',
    '../_base_/methods/psaq_vit.py',  # data source
    '../_base_/quantizers/naive.py',  # quantizer setting
    '../_base_/bits/w8a8.py',  # bits
]
official_checkpoint = 'https://dl.fbaipublicfiles.com/deit/deit_small_patch16_224-cd65a155.pth'  # noqa
data_config = dict(crop_pct=0.875, interpolation='bicubic')
model = dict(data_config=data_config)
test_dataloader = dict(dataset=dict(data_config=data_config))
dfq = dict(
    synthesizer=dict(
        label_head='classifier', num_images=32, batch_size=32, lr=0.20))
