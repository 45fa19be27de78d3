# Reproduces the published row `psaq-vit_imagenet_swin-s_w8a8` of
# configs/leaderboard/published.yaml: PSAQ-ViT, Swin-S, W8A8 on
# ImageNet-1k val (quoted: top-1 76.64, FP 83.2).
# The official code's recipe (zkkli/PSAQ-ViT, generate_data.py and
# test_quant.py): one batch of 32 images synthesized with the cross-entropy
# to random labels on, Adam lr 0.25 (Swin), min/max quantizer (naive.py: the
# official weight and activation observers, at this suite's placement: see
# the README's fidelity table);
# its eval transform: bicubic resize of the shorter side to
# floor(224 / crop_pct), centre crop 224, crop_pct 0.9 (Swin).
# The official weights file is used as it is (timm converts its keys):
#   python tools/dfq_test.py configs/reproduce/psaq-vit_imagenet_swin-s_w8a8.py \
#       swin_small_patch4_window7_224.pth
_base_ = [
    '../cls/_base_/models/swin_small_patch4_window7_224.py',
    '../cls/_base_/dfq_cls_runtime.py',
    '../_base_/methods/psaq_vit.py',  # data source
    '../_base_/quantizers/naive.py',  # quantizer setting
    '../_base_/bits/w8a8.py',  # bits
]
official_checkpoint = 'https://github.com/SwinTransformer/storage/releases/download/v1.0.0/swin_small_patch4_window7_224.pth'  # noqa
data_config = dict(crop_pct=0.9, interpolation='bicubic')
model = dict(data_config=data_config)
test_dataloader = dict(dataset=dict(data_config=data_config))
dfq = dict(
    synthesizer=dict(
        label_head='classifier', num_images=32, batch_size=32, lr=0.25))
