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
# Memory (the same images; see dfq_dense/synth/loop.py).  Swin-S at 800x1333
# keeps ~6 GB per image (mostly the head similarity's SSIM statistics on the
# q.k logits of every block; batch 16: ~100 GB).  with_cp=True checkpoints
# the Swin blocks and recomputes the SSIM statistics in backward (~2 GB per
# image, +~30% time, bit-identical images); for 16 GB add with_cp=True and
# micro_batch_size=4 (4 images per forward, the one AdamW step on the
# batch; same images to float rounding).  Defaults: micro_batch_size=None
# (the whole batch), with_cp=False.
# MimiQ's distillation (its QAT part) of the calibrated student.  The
# released optimiser (SGD Nesterov lr 1e-6, weight decay 1e-4: the class
# defaults, `student_step=dict(optimizer='sgd', lr=1e-6)` here) leaves the
# 4-bit student as it is within any budget that runs here (demo UperNet
# W4A4: 0.001% of the weight codes change, the loss does not fall;
# results/demo/student_steps/); Adam lr 1e-5 for 50 steps moves it (2.4%
# of the codes, distillation loss -24%).
dfq_adapter = dict(
    type='MimiQDistill',
    student_step=dict(optimizer='adam', lr=1e-5, iters=50),
    seed=0)
