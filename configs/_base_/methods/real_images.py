# Upper bound: real images instead of synthetic ones.  data_root=None takes
# the config's training images (data/coco/train2017/ for COCO,
# data/ade/ADEChallengeData2016/images/training for ADE20K); the seed picks
# the files.
dfq_synthesizer = dict(
    type='RealImages',
    num_images=32,
    batch_size=8,
    img_size=None,
    data_root=None,
    seed=0)
# No adaptation of the calibrated student.
dfq_adapter = None
