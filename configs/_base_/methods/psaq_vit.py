# PSAQ-ViT (V1) at backbone level: maximise the patch-similarity entropy of
# the Swin attention outputs (+ a total-variation prior).  The teacher is the
# FP backbone alone: no labels, no task heads.
dfq_synthesizer = dict(
    type='PSAQViT',
    num_images=32,
    batch_size=8,
    iterations=500,
    img_size=None,  # None: the model's test scale (800x1333 COCO, 512 ADE)
    seed=0)
