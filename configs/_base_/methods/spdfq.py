# SPDFQ at backbone level: attention-priors alignment (random Gaussian-mixture
# maps per head, deeper half of the blocks, weighted by depth, summed over
# the heads as in the paper), multi-semantic reinforcement (m in {1..4}
# non-overlapping crops per image, drawn every iteration, each optimised
# with its own target) and soft labels over a fixed random projection of the
# pooled backbone features (the stand-in for class logits).  32 images,
# Adam, 1000 iterations as in the paper.
# Earlier versions: msr_count='fixed' (always 4 crops, fixed for the batch),
# apa_heads='mean'.
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
    seed=0)
# SPDFQ's quantized-network learning: block-wise reconstruction of the
# calibrated student on the synthetic images (BRECQ-style, per Swin unit in
# forward order: patch embedding, blocks, patch merging), Adam lr 4e-5, 100
# iterations per unit on the quantizers' scales, batches of 32 (the paper's
# 32 images).  dfq_adapter = None switches it off.
dfq_adapter = dict(
    type='BlockReconstruction', iters=100, lr=4e-5, batch_size=32,
    params='qparams', seed=0)
