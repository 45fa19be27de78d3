# timm swin_small_patch4_window7_224: the official Swin release trained on
# ImageNet-1k only (tag ms_in1k), the Swin-S of the data-free quantization
# papers; published top-1 83.2.  Pinned: timm's default tag for this name is
# the ImageNet-22k fine-tuned ms_in22k_ft_in1k.
# Weights: model.checkpoint=PATH, a local copy of the release .pth (timm's
# pretrained_cfg url) or of the Hugging Face hub file of
# timm/swin_small_patch4_window7_224.ms_in1k; left None, timm's cache is used
# if it holds the file, else the build stops with one line naming what to
# download.

_base_ = ['./timm_classifier.py']

model_name = 'swin_small_patch4_window7_224.ms_in1k'
model = dict(model_name=model_name)
test_dataloader = dict(dataset=dict(model_name=model_name))
