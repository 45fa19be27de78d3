# Reproduces the published row `psaq-vit-v2_upernet_swin-s_w8a8` of
# configs/leaderboard/published.yaml: PSAQ-ViT V2, UperNet Swin-S
# 160k, 512x512, W8A8 on ADE20K val (quoted: miou 47.2).
# PSAQ-ViT V2 (data-free, naive quantizer).
# Official Swin checkpoint (mmseg 0.x key layout): download
# official_checkpoint, convert it and pass the converted file as CHECKPOINT:
#   python tools/convert_checkpoint.py upernet_swin_small_patch4_window7_512x512.pth \
#       upernet_swin_small_patch4_window7_512x512_converted.pth --model upernet_swin_s \
#       --check configs/reproduce/psaq-vit-v2_upernet_swin-s_w8a8.py
#   python tools/dfq_test.py configs/reproduce/psaq-vit-v2_upernet_swin-s_w8a8.py \
#       upernet_swin_small_patch4_window7_512x512_converted.pth
_base_ = [
    'mmseg::swin/swin-small-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py',
    '../_base_/dfq_runtime.py',
    '../_base_/methods/psaq_vit_v2.py',  # data source
    '../_base_/quantizers/naive.py',  # quantizer setting
    '../_base_/bits/w8a8.py',  # bits
]
# PSAQ-ViT V2 at the backbone level: V1 synthesis then its rounds
# (configs/_base_/methods/psaq_vit_v2.py), naive min/max quantizer as in
# PSAQ-ViT's W8A8 rows.  The paper's image count and round counts for dense
# prediction are not known here (see the registry entry's note).
official_checkpoint = 'https://github.com/SwinTransformer/storage/releases/download/v1.0.1/upernet_swin_small_patch4_window7_512x512.pth'  # noqa
load_from = None
