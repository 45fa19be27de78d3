"""The main job on the embedded demo: the three demo models, data-free W8A8.

    python tools/run_demo.py [--bits w8a8|w4a8]
                             [--method psaq|noise|cls_images]
                             [--work-dir work_dirs/demo]

Runs tools/dfq_test.py with --eval-fp on the demo Mask R-CNN, UperNet and
timm Swin classifier (PSAQ-ViT calibration images by default, or the
Gaussian-noise baseline) and prints one table with the FP and quantized figures.  Each run's
dfq_results.json lands in <work-dir>/<config name>/.

``--method cls_images`` calibrates the demo Mask R-CNN and UperNet with the
demo classifier's PSAQ-ViT images (cross-task reuse, ``dfq.load_images``:
the 56x56 images stretched to the dense models' 192x192), taken from the
classifier's PSAQ-ViT run of the same bits in the work dir (run first when
it is not there); their runs land in <work-dir>/<config name>_cls_images/.
"""
import argparse
import json
import os.path as osp
import sys

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, osp.join(ROOT, 'tools'))

# --method -> suffix of the demo config (configs/demo/<model>_<bits><suffix>).
METHODS = {'psaq': '', 'noise': '_noise', 'cls_images': ''}
CLASSIFIER = 'swin_cls_demo'
KEYS = {'det': ['coco/bbox_mAP', 'coco/segm_mAP'], 'seg': ['mIoU'],
        'cls': ['imagenet/top1']}
LABELS = {'coco/bbox_mAP': 'box mAP', 'coco/segm_mAP': 'mask mAP',
          'mIoU': 'mIoU', 'imagenet/top1': 'top-1'}
# Percent metrics (2 decimals) against the COCO mAPs on a 0-1 scale (3).
PERCENT = ('mIoU', 'imagenet/top1')
MODELS = ('mask_rcnn_swin_demo', 'upernet_swin_demo', 'swin_cls_demo')


def run_name(results):
    """``mask_rcnn_swin_demo_w8a8`` etc.: the config's file name."""
    return osp.splitext(osp.basename(results['config']))[0]


def _fmt(key, value):
    return f'{value:.2f}' if key in PERCENT else f'{value:.3f}'


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
                f"{_fmt(key, q)} | {q - fp:+.{2 if key in PERCENT else 3}f}"
                f" | {res['seconds']['total']:.1f} |")
    return '\n'.join(lines)


def comparison_markdown(columns, names):
    """FP and several data sources side by side (same bits): ``columns``
    holds one list of runs per source, in the order of ``names``; a model
    missing from a source (the classifier has no cross-task column) is
    ``-``."""
    by_model = [{next(m for m in MODELS if run_name(r).startswith(m + '_')):
                 r for r in runs} for runs in columns]
    lines = ['| model | metric | FP | ' + ' | '.join(names) + ' |',
             '|---|---|---|' + '---|' * len(names)]
    for model in MODELS:
        first = next(runs[model] for runs in by_model if model in runs)
        for key in KEYS[first['task']]:
            cells = [_fmt(key, runs[model]['metrics'][key])
                     if model in runs else '-' for runs in by_model]
            lines.append(
                f"| {model} | {LABELS[key]} | "
                f"{_fmt(key, first['fp_metrics'][key])} | "
                + ' | '.join(cells) + ' |')
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
    models, extra = MODELS, []
    if args.method == 'cls_images':
        # The classifier's images of the same bits; made first if missing.
        images = osp.join(args.work_dir, f'{CLASSIFIER}_{args.bits}',
                          'synthetic', 'synthetic_images.pth')
        if not osp.isfile(images):
            code = dfq_test.main([
                osp.join('configs', 'demo', f'{CLASSIFIER}_{args.bits}.py'),
                '--work-dir', osp.dirname(osp.dirname(images))])
            if code:
                return code
        models = [m for m in MODELS if m != CLASSIFIER]
        extra = ['--cfg-options', f'dfq.load_images={images}']
    for model in models:
        config = f'{model}_{args.bits}' + METHODS[args.method]
        run_name = config + ('_cls_images' if extra else '')
        work_dir = osp.join(args.work_dir, run_name)
        code = dfq_test.main([
            osp.join('configs', 'demo', config + '.py'), '--work-dir',
            work_dir, '--eval-fp', *extra])
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
