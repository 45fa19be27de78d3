# SPDFQ at backbone level: attention-priors alignment (random Gaussian-mixture
# maps per head, deeper half of the blocks, weighted by depth, summed over
# the heads as in the paper), multi-semantic reinforcement (m in {1..4}
# non-overlapping crops per image, drawn every iteration, each optimised
# with its own target) and soft labels over a fixed random projection of the
# pooled backbone features (the stand-in for class logits).  32 images,
# Adam, 1000 iterations as in the paper.
# MSR crops at their own pixel size (crop_size='native'): the paper
# (ImageNet, 224x224) resizes each patch to the classifier's input size;
# what MSR needs is that each patch is seen as an image of its own with its
# own target, and a Swin backbone takes any size, so at dense resolution the
# crop (a quarter of the image) is forwarded as it is: its content at the
# scale it has in the image, no 2x upsampling, and all crops of an image
# together cost at most one forward of the image instead of up to 4
# full-size ones.  crop_size=None is the paper's resize to the input size.
# Earlier versions: msr_count='fixed' (always 4 crops, fixed for the batch),
# apa_heads='mean', crop_size=None.
dfq_synthesizer = dict(
    type='SPDFQ',
    num_images=32,
    batch_size=8,
    iterations=1000,
    img_size=None,
    num_patches=4,
    msr_count='random',
    apa_heads='sum',
    components=dict(apa=True, msr=True, soft_label=True, tv=True),
    crop_size='native',  # None: each crop resized to the input size (paper)
    seed=0)
# Memory (the same images; see dfq_dense/synth/loop.py).  Swin-S at 800x1333
# keeps ~3 GB per image in the images pass (batch 8: ~25 GB; a native crop
# about a quarter of that).  For 16 GB add with_cp=True (~1.7 GB per image,
# +~30% time, bit-identical images) and micro_batch_size=4 (4 images, or 4
# crops of one size, per forward, the one Adam step on the batch; same
# images to float rounding).  Defaults: micro_batch_size=None, with_cp=False.
# SPDFQ's quantized-network learning: block-wise reconstruction of the
# calibrated student on the synthetic images (BRECQ-style, per Swin unit in
# forward order: patch embedding, blocks, patch merging), Adam lr 4e-5, 100
# iterations per unit on the quantizers' scales, batches of 32 (the paper's
# 32 images).  dfq_adapter = None switches it off.
dfq_adapter = dict(
    type='BlockReconstruction', iters=100, lr=4e-5, batch_size=32,
    params='qparams', seed=0)
