# PSAQ-ViT V2 at backbone level: V1 synthesis for the initial images
# (dfq_synthesizer), then rounds (dfq_adapter) of (a) a sample step raising
# the patch-similarity entropy of the FP teacher and the teacher-student
# discrepancy of the multi-scale backbone features (hard samples for the
# current student) and (b) a student step lowering that discrepancy through
# the straight-through fake quantizers.  The adapted student is evaluated.
# The paper gives no counts for dense prediction: these are this suite's
# choices (see PSAQViTV2Rounds' docstring).
dfq_synthesizer = dict(
    type='PSAQViTV2',
    num_images=32,
    batch_size=8,
    iterations=500,  # V1 iterations per round of the initial images (2 rounds)
    img_size=None,
    seed=0)
# Memory of the V1 synthesis (see psaq_vit.py): for 800x1333 in 16 GB add
# with_cp=True, micro_batch_size=4 to dfq_synthesizer.
# The rounds change the student (and the images): the (adapt) stage.  Its
# patch-similarity entropy and TV prior take V1's settings by the same names
# (bandwidth, tv_weight, ...; defaults as PSAQViT's): set them here too when
# changing them for the synthesis.
dfq_adapter = dict(
    type='PSAQViTV2Rounds',
    batch_size=8,
    rounds=4,
    sample_iters=50,
    # sample step: each term's pixel gradient rescaled per image to a common
    # norm, the shares are the fractions of the update (None: the former
    # plain sum entropy_weight*L_ent - disc_weight*disc + TV, under which the
    # discrepancy falls during the sample step)
    balance='grad_norm',
    sample_shares=dict(entropy=1.0, discrepancy=1.0, tv=1.0),
    # None: 'mse' on the backbone's feature maps (detectors, segmentors),
    # 'kl' on a classifier's logits (the classification track); 'kl' on
    # feature maps compares softened channel distributions
    measure=None,
    include_neck=False,
    components=dict(entropy=True, discrepancy=True, student_step=True,
                    tv=True),
    student_step=dict(params='weights', optimizer='adam', lr=1e-5, iters=50,
                      batch_size=8),
    seed=0)
# Memory of the sample step (teacher and student forwards and backwards;
# the same images, see PSAQViTV2Rounds): Swin-S at 800x1333 keeps ~10 GB
# per image, ~4 GB with with_cp=True; for 16 GB add with_cp=True,
# micro_batch_size=2 to dfq_adapter.
