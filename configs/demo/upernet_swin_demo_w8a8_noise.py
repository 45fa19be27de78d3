# The Gaussian-noise baseline on the same image count, size and seed as the
# PSAQ-ViT demo config upernet_swin_demo_w8a8.py.
_base_ = [
    './upernet_swin_demo.py', '../_base_/dfq_runtime.py',
    '../_base_/methods/gaussian_noise.py', '../_base_/quantizers/naive.py',
    '../_base_/bits/w8a8.py'
]
load_from = 'dfq_dense/demo/checkpoints/upernet_swin_demo.pth'
dfq = dict(synthesizer=dict(num_images=8, batch_size=8))
