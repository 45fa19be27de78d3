# Mask R-CNN Swin-S on COCO, W8A8, with the example method instead of
# PSAQ-ViT (the suite's leaderboard config, inherited by scope).
_base_ = 'dfq_dense::mask_rcnn_swin_s_w8a8.py'

custom_imports = dict(imports=['example_dfq'], allow_failed_imports=False)

dfq = dict(synthesizer=dict(type='SmoothPSAQViT', init_sigma=2.0))
