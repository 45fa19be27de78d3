# Calibration-size sweep of the demo grid: PSAQ-ViT at W4A4 on 1, 2, 4 and
# 8 images, 3 seeds, both demo models.  Same work_dir and settings as
# configs/matrix/demo.py, so its 8-image cells are the same cells (same
# hash): finished there, skipped here.  2 x 4 x 3 = 24 cells (18 new), each
# its own synthesis group; about 1-2 hours on 2 CPU cores.
_base_ = './demo.py'
methods = dict(
    _delete_=True,
    psaq=dict(_delete_=True, type='PSAQViT', batch_size=8, synth_rounds=2,
              iterations=50))
bits = ['w4a4']
num_images = [1, 2, 4, 8]
