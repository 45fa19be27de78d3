_base_ = [
    './mask_rcnn_swin_demo.py', '../_base_/dfq_runtime.py',
    '../_base_/methods/psaq_vit.py', '../_base_/quantizers/naive.py', '../_base_/bits/w8a8.py'
]
load_from = 'dfq_dense/demo/checkpoints/mask_rcnn_swin_demo.pth'
# Fewer images and iterations than on COCO: the demo (both models, FP and
# quantized evaluation) runs on 2 CPU cores in minutes.  The patch-similarity
# entropy is exact, as on the real configs.
dfq = dict(
    synthesizer=dict(
        num_images=8,
        batch_size=8,
        # demo budget: 2 rounds x 50 iterations (the official schedule's
        # 2 rounds x 500, scaled down; as many iterations as the earlier
        # 1 x 100 demo)
        synth_rounds=2,
        iterations=50))
