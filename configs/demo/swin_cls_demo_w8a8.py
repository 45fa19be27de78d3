_base_ = [
    './swin_cls_demo.py', '../_base_/methods/psaq_vit.py',
    '../_base_/quantizers/naive.py', '../_base_/bits/w8a8.py'
]
# The demo classifier (configs/demo/swin_cls_demo.py, the classification
# track's demo): PSAQ-ViT images, the demo budget of the detection and
# segmentation demos (8 images, 2 rounds x 50 iterations), at the model's
# 56x56 input.  Its runtime is the classification track's (dfq_dense scope,
# timm's weights loading), with the images per calibration forward of
# configs/_base_/dfq_runtime.py (which cannot be a second base here: it
# repeats the runtime's custom_imports).
dfq_calib_batch_size = 4
dfq = dict(
    synthesizer=dict(
        num_images=8,
        batch_size=8,
        synth_rounds=2,
        iterations=50,
        # The classifier's logits exist: PSAQ-ViT's cross-entropy to random
        # labels over the 8 classes, as in the paper (label_head=None: the
        # backbone-level variant of the dense demos).
        label_head='classifier',
        # The official 15 / 30 px roll at 224x224, scaled to 56x56.
        jitter=(4, 8)))
