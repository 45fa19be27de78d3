# MimiQ at backbone level: synthesis raises the inter-head similarity of the
# Swin window attention (q.k^T per window and query, min-max normalised, SSIM
# between every pair of heads), with a TV prior and cross-entropy to random
# targets over a fixed random projection of the pooled backbone features (the
# task-independent stand-in for MimiQ's random-label classifier loss).
# Settings from the paper: AdamW lr 0.1 cosine to 1e-3, 2000 iterations,
# batch 16, roll jitter 8 then 16 px.
dfq_synthesizer = dict(
    type='MimiQ',
    num_images=32,
    batch_size=16,
    iterations=2000,
    img_size=None,  # None: the model's test scale (800x1333 COCO, 512 ADE)
    components=dict(head_similarity=True, pseudo_label=True, tv=True),
    seed=0)
