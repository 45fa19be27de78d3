_base_ = [
    './upernet_swin_demo.py', '../_base_/dfq_runtime.py',
    '../_base_/methods/psaq_vit.py', '../_base_/bits/w8a8.py'
]
load_from = 'dfq_dense/demo/checkpoints/upernet_swin_demo.pth'
# Fewer images and iterations than on COCO: the demo runs on 2 CPU cores.
test_cfg = dict(type='dfq_dense.DFQTestLoop')
dfq = dict(
    synthesizer=dict(
        _base_.dfq_synthesizer, num_images=16, batch_size=16, iterations=200),
    quantizer=_base_.dfq_quantizer,
    calib_batch_size=_base_.dfq_calib_batch_size)
