_base_ = [
    'mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py',
    './_base_/dfq_runtime.py',
    './_base_/methods/psaq_vit.py',  # data source
    './_base_/quantizers/naive.py',  # quantizer setting
    './_base_/bits/w4a8.py',  # bits
]
# Model-zoo checkpoint (FP ADE20K val mIoU 44.41).
# Offline: download it and pass its path as
# CHECKPOINT to tools/dfq_test.py.
load_from = 'https://download.openmmlab.com/mmsegmentation/v0.5/swin/upernet_swin_tiny_patch4_window7_512x512_160k_ade20k_pretrain_224x224_1K/upernet_swin_tiny_patch4_window7_512x512_160k_ade20k_pretrain_224x224_1K_20210531_112542-e380ad3e.pth'  # noqa
# Naive quantizer, as PSAQ-ViT / PSAQ-ViT V2 report W8A8 and W4A8.
