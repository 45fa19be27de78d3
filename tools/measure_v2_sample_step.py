"""PSAQ-ViT V2's sample step on the demo: does it raise the
teacher-student discrepancy?

    python tools/measure_v2_sample_step.py [--work-dir DIR]

Runs PSAQ-ViT V2 at the demo scale of configs/matrix/demo.py (8 images,
V1 start of 2 x 50 iterations, 2 rounds of 20 sample and 20 student
iterations) on the demo UperNet at W4A4 (naive quantizer), evaluating on 4
val images only (the metric is not the point: the discrepancy per round is,
in ``adaptation.rounds`` of dfq_results.json), and prints that record.
"""
import argparse
import json
import os.path as osp
import sys

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, osp.join(ROOT, 'tools'))

SYNTH = dict(_delete_=True, type='PSAQViTV2', num_images=8, batch_size=8,
             synth_rounds=2, iterations=50, seed=0)
ADAPTER = dict(_delete_=True, type='PSAQViTV2Rounds', batch_size=8, rounds=2,
               sample_iters=20,
               student_step=dict(params='weights', optimizer='adam', lr=1e-4,
                                 iters=20, batch_size=4), seed=0)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--work-dir',
                        default=osp.join('work_dirs', 'v2_sample_step'))
    args = parser.parse_args(argv)
    import dfq_test
    run = dfq_test.parse_args([
        osp.join(ROOT, 'configs/demo/upernet_swin_demo_w8a8.py'),
        '--work-dir', args.work_dir])
    run.cfg_options = {'test_dataloader.dataset.indices': 4,
                       'dfq.synthesizer': SYNTH, 'dfq.adapter': ADAPTER,
                       'dfq.quantizer.w_bits': 4, 'dfq.quantizer.a_bits': 4}
    res = dfq_test.run(run)
    print(json.dumps(res['adaptation'], indent=1))
    return 0


if __name__ == '__main__':
    sys.exit(main())
