# Runtime of the classification track's DFQ configs: the FP runtime
# (cls_runtime.py: dfq_dense scope, mmengine's test loop, which the DFQ loop
# replaces) with what configs/_base_/dfq_runtime.py gives the detection and
# segmentation configs.  Run a leaf config with
#   python tools/dfq_test.py configs/cls/swin_t_w8a8.py [WEIGHTS.pth]
# (WEIGHTS: the timm / official weights file; without it, model.checkpoint
# or timm's cache).
_base_ = ['./cls_runtime.py']
custom_imports = dict(imports=['dfq_dense'], allow_failed_imports=False)
# Images per calibration forward through the classifier.
dfq_calib_batch_size = 4
