"""Quantizer settings x bit settings on the embedded demo, into the README.

    python tools/quant_table.py [--work-dir work_dirs/quant_table]
        [--settings naive percentile mse repq] [--bits w8a8 w6a6 w4a8 w4a4]
        [--models det seg] [--val-subset N] [--no-readme]

For each demo model the PSAQ-ViT images are synthesised once (the demo
config's method, size and seed); every cell then reuses them
(``dfq.load_images``), so the cells differ only in the quantizer: the
setting fragment ``configs/_base_/quantizers/<setting>.py`` and the bits
fragment ``configs/_base_/bits/<bits>.py``.  Each cell is a full
``tools/dfq_test.py`` run on the demo val split; its ``dfq_results.json``
stays in ``<work-dir>/<model>/<setting>_<bits>/``.  Writes
``<work-dir>/quant_table.json`` and, unless ``--no-readme``, replaces the
table between the ``quant-table`` markers of README.md.
"""
import argparse
import os.path as osp
import sys
import time

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SETTINGS = {
    'naive': 'naive (min/max)',
    'percentile': 'percentile 99.99 + OMSE weights',
    'mse': 'MSE act + OMSE weights',
    'repq': 'RepQ-style + log-sqrt2',
}
BITS = ('w8a8', 'w6a6', 'w4a8', 'w4a4')
MODELS = {
    'det': ('mask_rcnn_swin_demo', ('coco/bbox_mAP', 'coco/segm_mAP')),
    'seg': ('upernet_swin_demo', ('mIoU', )),
}


def markdown(table, settings, bits, models):
    from dfq_dense.report import fmt_metric, grid_markdown
    parts = []
    for model in models:
        name, keys = MODELS[model]
        fp = ' / '.join(fmt_metric(k, table[model]['fp'][k]) for k in keys)
        head = ' / '.join(k.split('/')[-1] for k in keys)
        parts.append(grid_markdown(
            name, f'{head}; FP {fp}', 'quantizer setting',
            [(s, SETTINGS[s]) for s in settings], bits, keys,
            table[model]['cells']))
    return '\n'.join(parts)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--work-dir',
                        default=osp.join('work_dirs', 'quant_table'))
    parser.add_argument('--settings', nargs='+', default=list(SETTINGS),
                        choices=list(SETTINGS))
    parser.add_argument('--bits', nargs='+', default=list(BITS),
                        choices=list(BITS))
    parser.add_argument('--models', nargs='+', default=list(MODELS),
                        choices=list(MODELS))
    parser.add_argument('--val-subset', type=int, default=None,
                        help='evaluate on the first N val images only')
    parser.add_argument('--no-readme', action='store_true')
    args = parser.parse_args(argv)

    from dfq_dense.report import (load_fragment, replace_readme_section,
                                  run_cell)
    from dfq_dense.utils.fileio import write_json_atomic

    table = dict(settings=args.settings, bits=args.bits,
                 val_subset=args.val_subset)
    for model in args.models:
        name, keys = MODELS[model]
        config = osp.join(ROOT, 'configs', 'demo', name + '_w8a8.py')
        base = {}
        if args.val_subset:
            base['test_dataloader.dataset.indices'] = args.val_subset
        entry = table[model] = dict(config=config, cells={}, seconds={})
        images = None
        for setting in args.settings:
            for bits in args.bits:
                cell = f'{setting}_{bits}'
                work = osp.join(args.work_dir, model, cell)
                quant = dict(_delete_=True,
                             **load_fragment('quantizers', setting,
                                             'dfq_quantizer'),
                             **load_fragment('bits', bits, 'dfq_bits'))
                options = dict(base, **{'dfq.quantizer': quant})
                if images is not None:
                    options['dfq.load_images'] = images
                start = time.time()
                res = run_cell(config, work, options,
                               eval_fp=images is None)
                if images is None:
                    # The first cell synthesised the images and ran FP.
                    images = osp.join(work, 'synthetic',
                                      'synthetic_images.pth')
                    entry['fp'] = {k: res['fp_metrics'][k] for k in keys}
                    entry['images'] = images
                    entry['synthesizer'] = res['synthesizer']
                entry['cells'][cell] = {k: res['metrics'][k] for k in keys}
                entry['seconds'][cell] = round(time.time() - start, 1)
                print(f'[quant_table] {name} {cell}: ' + ', '.join(
                    f'{k} {res["metrics"][k]:.4f}' for k in keys),
                    flush=True)
                write_json_atomic(
                    osp.join(args.work_dir, 'quant_table.json'), table)
    text = markdown(table, args.settings, args.bits, args.models)
    print(text)
    if not args.no_readme:
        replace_readme_section('quant-table', text)
    return 0


if __name__ == '__main__':
    sys.exit(main())
