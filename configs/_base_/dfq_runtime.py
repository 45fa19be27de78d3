# Shared by every DFQ config.  The leaf config sets
# test_cfg = dict(type='dfq_dense.DFQTestLoop') (a base cannot: mmdet's and
# mmseg's bases define test_cfg already): the DFQ loop synthesizes
# calibration images, quantizes and calibrates the model, then runs the
# config's own test loop and metric.
custom_imports = dict(imports=['dfq_dense'], allow_failed_imports=False)
# Images per calibration forward through the full model.
dfq_calib_batch_size = 4
