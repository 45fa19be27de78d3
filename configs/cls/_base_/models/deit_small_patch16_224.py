# timm deit_small_patch16_224: the official DeiT release (tag fb_in1k);
# published top-1 79.8, measured with DeiT's crop 0.875, where timm's cfg crops
# 0.9.
# Weights: model.checkpoint=PATH, a local copy of the release .pth (timm's
# pretrained_cfg url) or of the Hugging Face hub file of
# timm/deit_small_patch16_224.fb_in1k; left None, timm's cache is used if it
# holds the file, else the build stops with one line naming what to download.

_base_ = ['./timm_classifier.py']

model_name = 'deit_small_patch16_224.fb_in1k'
model = dict(model_name=model_name)
test_dataloader = dict(dataset=dict(model_name=model_name))
