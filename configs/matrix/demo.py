# The demo leaderboard grid: both demo models x every data source x the four
# bit settings x 3 seeds, percentile quantizer, 8 images of 192x192.
#     python tools/run_matrix.py configs/matrix/demo.py --run
#     python tools/run_matrix.py configs/matrix/demo.py --collect \
#         work_dirs/matrix/demo/collected.json
# 2 x 6 x 4 x 3 = 144 cells in 36 synthesis groups (each group's first bit
# setting synthesizes, the other three reuse its images; PSAQ-ViT V2, MimiQ
# and SPDFQ still adapt per cell).  Cost on 2 CPU cores: 36 syntheses x
# 0.5-3 min, 144 evaluations x 0.2-0.5 min, 72 adaptations x 0.5-2.5 min
# (V2's two rounds: 2.5 min on the UperNet): about 4-6 hours sequentially;
# with Slurm (tools/slurm_matrix.sh) up to 36 tasks.
# The method settings are the demo scale (the
# configs/_base_/methods fragments hold the full-scale ones); seed and
# num_images come from the grid axes below.
# The adapters' budgets are those of the method fragments (student steps
# Adam 1e-5 x 50); V2 runs 2 rounds of 20 sample iterations (fragment: 4 x
# 50) at this scale.

configs = [
    'configs/demo/mask_rcnn_swin_demo_w8a8.py',
    'configs/demo/upernet_swin_demo_w8a8.py',
]
# A method is its data source (dfq.synthesizer) and what adapts the
# calibrated student (dfq.adapter, None for the others); the seeds axis
# sets both seeds.
methods = dict(
    noise=dict(_delete_=True, type='GaussianNoise', batch_size=8),
    real=dict(_delete_=True, type='RealImages', batch_size=8),
    psaq=dict(_delete_=True, type='PSAQViT', batch_size=8, synth_rounds=2,
              iterations=50),
    psaq_v2=dict(
        synthesizer=dict(_delete_=True, type='PSAQViTV2', batch_size=8,
                         synth_rounds=2, iterations=50),
        adapter=dict(_delete_=True, type='PSAQViTV2Rounds', batch_size=8,
                     rounds=2, sample_iters=20,
                     student_step=dict(params='weights', optimizer='adam',
                                       lr=1e-5, iters=50, batch_size=8))),
    mimiq=dict(
        synthesizer=dict(_delete_=True, type='MimiQ', batch_size=8,
                         iterations=100),
        adapter=dict(_delete_=True, type='MimiQDistill',
                     student_step=dict(optimizer='adam', lr=1e-5,
                                       iters=50))),
    # crops at half the input size (full-size crops would make SPDFQ
    # about 3.5x the cost of the other methods on 2 CPU cores); the
    # paper's block reconstruction at the demo's 8 images
    spdfq=dict(
        synthesizer=dict(_delete_=True, type='SPDFQ', batch_size=8,
                         iterations=100, crop_size=(96, 96)),
        adapter=dict(_delete_=True, type='BlockReconstruction', iters=100,
                     lr=4e-5, batch_size=8)),
)
bits = ['w8a8', 'w6a6', 'w4a8', 'w4a4']
quantizer = 'percentile'
seeds = [0, 1, 2]
num_images = [8]
options = {}
work_dir = 'work_dirs/matrix/demo'
# The FP model is evaluated once per model (its first cell).
eval_fp = 'first'
