# Baseline data source: Gaussian noise in the normalised pixel space.
dfq_synthesizer = dict(
    type='GaussianNoise', num_images=32, batch_size=8, img_size=None, seed=0)
# No adaptation of the calibrated student.
dfq_adapter = None
