# RepQ-ViT's calibration data for COCO: one real image of val2017.
# RepQ-ViT calibrates on the first image of the unshuffled COCO val2017
# test loader (zkkli/RepQ-ViT detection/tools/test.py).  Here: one val2017
# image picked by the seed (RealImages lists the folder sorted and draws
# with the seed), so the image may differ from theirs.  Used by the
# reproduction configs of RepQ-ViT's published rows (configs/reproduce/).
_base_ = ['./real_images.py']
dfq_synthesizer = dict(num_images=1, batch_size=1,
                       data_root='data/coco/val2017/')
