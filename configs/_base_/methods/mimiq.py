# MimiQ at backbone level: synthesis raises the inter-head similarity of the
# Swin window attention (q.k^T per window and query, min-max normalised, SSIM
# between the heads, averaged over the full H x H matrix of head pairs with
# the diagonal, as released), with a TV prior and cross-entropy to random
# targets over a fixed random projection of the pooled backbone features (the
# task-independent stand-in for MimiQ's random-label classifier loss).
# Synthesis settings of MimiQ: AdamW lr 0.1 (cosine to 1e-3), weight decay
# 1e-6, 2000 iterations, batch 16, roll jitter 8 then 16 px.  MimiQ's QAT
# part, the head-wise structural attention distillation of the calibrated
# student, is the adapter below (dfq_adapter = None: synthesis only).
# Earlier versions: weight_decay=0.01, head_pairs='distinct' (i < j only).
dfq_synthesizer = dict(
    type='MimiQ',
    num_images=32,
    batch_size=16,
    iterations=2000,
    lr=0.1,
    min_lr=1e-3,
    weight_decay=1e-6,
    jitter=(8, 16),
    head_pairs='all',
    img_size=None,  # None: the model's test scale (800x1333 COCO, 512 ADE)
    components=dict(head_similarity=True, pseudo_label=True, tv=True),
    seed=0)
# MimiQ's distillation (SGD Nesterov, lr 1e-6, weight decay 1e-4, 50 steps
# on the student's backbone weights; student_step=dict(...) overrides).
dfq_adapter = dict(type='MimiQDistill', seed=0)
