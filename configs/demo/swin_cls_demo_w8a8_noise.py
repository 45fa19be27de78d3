# The Gaussian-noise baseline on the same image count, size and seed as the
# PSAQ-ViT demo config swin_cls_demo_w8a8.py.
_base_ = [
    './swin_cls_demo.py', '../_base_/methods/gaussian_noise.py',
    '../_base_/quantizers/naive.py', '../_base_/bits/w8a8.py'
]
dfq_calib_batch_size = 4
dfq = dict(synthesizer=dict(num_images=8, batch_size=8))
