_base_ = [
    './swin_cls_demo.py', '../_base_/methods/real_images.py',
    '../_base_/quantizers/naive.py', '../_base_/bits/w8a8.py'
]
# The real-image baseline (the upper bound) on the same image count, size
# and seed as the PSAQ-ViT demo config swin_cls_demo_w8a8.py: 8 of the demo
# classifier's training crops, never its val crops.  data_root is given
# rather than taken from the train dataloader: --data-root points every
# dataloader of a config at one folder.  The crops get the classifier's eval
# transform (RealImages resize='center_crop', filled in by the DFQ loop from
# the model's data config: 56x56, crop_pct 1, so they are read as they are)
# and its mean / std.
dfq_calib_batch_size = 4
dfq = dict(
    synthesizer=dict(
        num_images=8, batch_size=8, data_root='data/dfq_demo/cls/train'))
