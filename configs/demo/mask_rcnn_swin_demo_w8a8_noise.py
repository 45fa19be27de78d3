# The Gaussian-noise baseline on the same images count, size and seed as the
# PSAQ-ViT demo config it inherits.
_base_ = './mask_rcnn_swin_demo_w8a8.py'
dfq = dict(
    synthesizer=dict(
        _delete_=True, type='GaussianNoise', num_images=8, batch_size=8,
        img_size=None, seed=0))
