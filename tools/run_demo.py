"""The main job on the embedded demo: both demo models, data-free W8A8.

    python tools/run_demo.py [--bits w8a8|w4a8] [--method psaq|noise]
                             [--work-dir work_dirs/demo]

Runs tools/dfq_test.py with --eval-fp on the demo Mask R-CNN and UperNet
(PSAQ-ViT calibration images by default, or the Gaussian-noise baseline) and
prints one table with the FP and quantized figures.  Each run's
dfq_results.json lands in <work-dir>/<config name>/.
"""
import argparse
import json
import os.path as osp
import sys

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, osp.join(ROOT, 'tools'))

# --method -> suffix of the demo config (configs/demo/<model>_<bits><suffix>).
METHODS = {'psaq': '', 'noise': '_noise'}
KEYS = {'det': ['coco/bbox_mAP', 'coco/segm_mAP'], 'seg': ['mIoU']}
LABELS = {'coco/bbox_mAP': 'box mAP', 'coco/segm_mAP': 'mask mAP',
          'mIoU': 'mIoU'}


def run_name(results):
    """``mask_rcnn_swin_demo_w8a8`` etc.: the config's file name."""
    return osp.splitext(osp.basename(results['config']))[0]


def _fmt(key, value):
    return f'{value:.2f}' if key == 'mIoU' else f'{value:.3f}'


def markdown(results):
    """The README's main-job table from the runs' dfq_results.json
    (FP and quantized metric, delta, seconds of the whole run)."""
    lines = ['| run | metric | FP | quantized | delta | seconds |',
             '|---|---|---|---|---|---|']
    for res in results:
        for key in KEYS[res['task']]:
            fp, q = res['fp_metrics'][key], res['metrics'][key]
            lines.append(
                f"| {run_name(res)} | {LABELS[key]} | {_fmt(key, fp)} | "
                f"{_fmt(key, q)} | {q - fp:+.{2 if key == 'mIoU' else 3}f}"
                f" | {res['seconds']['total']:.1f} |")
    return '\n'.join(lines)


def comparison_markdown(first, second, names):
    """FP and two data sources side by side (same models and bits)."""
    lines = [f'| model | metric | FP | {names[0]} | {names[1]} |',
             '|---|---|---|---|---|']
    for a, b in zip(first, second):
        for key in KEYS[a['task']]:
            lines.append(
                f"| {run_name(a).rsplit('_', 1)[0]} | {LABELS[key]} | "
                f"{_fmt(key, a['fp_metrics'][key])} | "
                f"{_fmt(key, a['metrics'][key])} | "
                f"{_fmt(key, b['metrics'][key])} |")
    return '\n'.join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--bits', default='w8a8', choices=['w8a8', 'w4a8'])
    parser.add_argument('--method', default='psaq', choices=list(METHODS))
    parser.add_argument('--work-dir', default=osp.join('work_dirs', 'demo'))
    args = parser.parse_args()

    import dfq_test

    from dfq_dense.utils.fileio import write_json_atomic
    rows, results = [], []
    for model in ('mask_rcnn_swin_demo', 'upernet_swin_demo'):
        run_name = f'{model}_{args.bits}' + METHODS[args.method]
        work_dir = osp.join(args.work_dir, run_name)
        code = dfq_test.main([
            osp.join('configs', 'demo', run_name + '.py'), '--work-dir',
            work_dir, '--eval-fp'])
        if code:
            return code
        with open(osp.join(work_dir, 'dfq_results.json')) as f:
            res = json.load(f)
        results.append(res)
        for key in KEYS[res['task']]:
            rows.append((run_name, key, res['fp_metrics'][key],
                         res['metrics'][key], res['seconds']['total']))
    summary = [dict(run=r, metric=k, fp=fp, quantized=q, seconds=sec)
               for r, k, fp, q, sec in rows]
    write_json_atomic(
        osp.join(args.work_dir, f'summary_{args.bits}_{args.method}.json'),
        summary)
    print('\nDemo summary (FP vs data-free quantized):')
    print(f'{"config":34s} {"metric":15s} {"FP":>8s} {"quant":>8s} '
          f'{"delta":>8s} {"seconds":>8s}')
    for name, key, fp, q, sec in rows:
        print(f'{name:34s} {key:15s} {fp:8.4f} {q:8.4f} {q - fp:+8.4f} '
              f'{sec:8.1f}')
    print('\n' + markdown(results))
    return 0


if __name__ == '__main__':
    sys.exit(main())
