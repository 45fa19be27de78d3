# SPDFQ at backbone level: attention-priors alignment (random Gaussian-mixture
# maps per head, deeper half of the blocks, weighted by depth),
# multi-semantic reinforcement (up to 4 non-overlapping crops optimised with
# their own targets) and soft labels over a fixed random projection of the
# pooled backbone features (the stand-in for class logits).  32 images, Adam,
# 1000 iterations as in the paper.
dfq_synthesizer = dict(
    type='SPDFQ',
    num_images=32,
    batch_size=8,
    iterations=1000,
    img_size=None,
    components=dict(apa=True, msr=True, soft_label=True, tv=True),
    seed=0)
