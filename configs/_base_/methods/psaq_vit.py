# PSAQ-ViT (V1) at backbone level: maximise the patch-similarity entropy of
# the Swin attention outputs (+ a total-variation prior).  The teacher is the
# FP backbone alone: no labels, no task heads.
# Schedule of the official code (generate_data.py of zkkli/PSAQ-ViT):
# 2 rounds x 500 iterations, each round with 100 warm-up iterations then
# cosine to 0; roll jitter 15 px (round 1) and 30 px (round 2), one offset
# for both axes; flip p=0.5; one Adam (lr 0.25, betas (0.5, 0.9)) for both
# rounds; TV target tau ~ U(2500, 3000) drawn once per batch, TV taken on
# the jittered images.  `iterations` counts the iterations of ONE round.
# The schedule of earlier versions: synth_rounds=1, jitter=15,
# jitter_shift='independent', tau_per='iteration', tv_on='raw'.
dfq_synthesizer = dict(
    type='PSAQViT',
    num_images=32,
    batch_size=8,
    synth_rounds=2,
    iterations=500,  # per round
    jitter=(15, 30),  # max roll per round (px)
    jitter_shift='shared',
    tau_per='run',
    tv_on='augmented',
    img_size=None,  # None: the model's test scale (800x1333 COCO, 512 ADE)
    seed=0)
# Memory (the same images; see dfq_dense/synth/loop.py).  Swin-S at 800x1333
# keeps ~3 GB of activations per image (batch 8: ~25 GB).  For 16 GB add
# with_cp=True (activation checkpointing of the frozen Swin blocks: ~1.5 GB
# per image, +~30% time, bit-identical images) and micro_batch_size=4 (4
# images per forward, the one Adam step on the batch; +1 no-grad forward per
# iteration for the batch-wide KDE grid; same images to float rounding).
# Defaults: micro_batch_size=None (the whole batch), with_cp=False.
# Synthesis only: the calibrated student is evaluated as it is.
dfq_adapter = None
