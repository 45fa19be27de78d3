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
# No adaptation of the calibrated student (yet).
dfq_adapter = None
