"""Do the adapters move the quantized student?  Budgets measured on the demo.

    python tools/measure_student_steps.py [--work-dir DIR] [--models seg det]
        [--out results/demo/student_steps]

For each demo model at W4A4 (percentile quantizer, the demo grid's), the
images of each teacher-student method are made once at the demo scale of
configs/matrix/demo.py (8 images of 192x192, seed 0) and calibrated
without adaptation (the reference row); then every adapter budget below
runs on exactly those images and that calibration.  Each row records the
share of 4-bit weight codes the adapter changed, its own loss first / last
(``adaptation`` of dfq_results.json) and the metric on the full demo val.
One JSON per model in ``--out``; the README's budget table is rendered
from them (:func:`markdown`).
"""
import argparse
import os.path as osp
import sys
import time

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

MODELS = {
    'seg': ('configs/demo/upernet_swin_demo_w8a8.py', ('mIoU', )),
    'det': ('configs/demo/mask_rcnn_swin_demo_w8a8.py',
            ('coco/bbox_mAP', 'coco/segm_mAP')),
}
# The images each method's adapters start from (demo scale).
IMAGES = {
    'mimiq': dict(type='MimiQ', num_images=8, batch_size=8, iterations=100,
                  seed=0),
    'psaq_v2': dict(type='PSAQViTV2', num_images=8, batch_size=8,
                    synth_rounds=2, iterations=50, seed=0),
    'spdfq': dict(type='SPDFQ', num_images=8, batch_size=8, iterations=100,
                  crop_size=(96, 96), seed=0),
}
_V2 = dict(type='PSAQViTV2Rounds', batch_size=8, rounds=2, sample_iters=20,
           seed=0)
# (method, budget name, dfq.adapter); 'released' / 'paper' are the
# published optimiser settings, the others this suite's budgets.
BUDGETS = [
    ('mimiq', 'released: SGD Nesterov 1e-6, wd 1e-4, 50 steps',
     dict(type='MimiQDistill', seed=0)),
    ('mimiq', 'Adam 1e-5, 50 steps',
     dict(type='MimiQDistill', seed=0, student_step=dict(
         optimizer='adam', lr=1e-5, iters=50))),
    ('mimiq', 'Adam 1e-4, 20 steps (earlier demo grid)',
     dict(type='MimiQDistill', seed=0, student_step=dict(
         optimizer='adam', lr=1e-4, iters=20,
         batch_size=4))),
    ('psaq_v2', 'student Adam 1e-5, 50 steps per round (fragment)',
     dict(_V2, student_step=dict(params='weights', optimizer='adam',
                                 lr=1e-5, iters=50, batch_size=8))),
    ('psaq_v2', 'student Adam 1e-4, 20 steps per round (earlier demo grid)',
     dict(_V2, student_step=dict(params='weights', optimizer='adam',
                                 lr=1e-4, iters=20, batch_size=4))),
    ('spdfq', 'paper: Adam 4e-5, 100 steps per unit, scales',
     dict(type='BlockReconstruction', iters=100, lr=4e-5, batch_size=8,
          seed=0)),
]
# The budgets the method fragments (configs/_base_/methods) use.
FRAGMENT_BUDGETS = ('Adam 1e-5, 50 steps',
                    'student Adam 1e-5, 50 steps per round (fragment)',
                    'paper: Adam 4e-5, 100 steps per unit, scales')
QUANTIZER = 'percentile'


def _run(config, work_dir, options):
    from dfq_dense.engine.api import run_dfq
    return run_dfq(config, work_dir=work_dir, cfg_options=options)


def measure(model, work_root, log=print):
    from dfq_dense.report import load_fragment
    import torch

    from dfq_dense.utils.environment import cpu_model, git_state
    config, keys = MODELS[model]
    quant = dict(load_fragment('quantizers', QUANTIZER, 'dfq_quantizer'),
                 _delete_=True, w_bits=4, a_bits=4)
    rows = []
    for method, synth in IMAGES.items():
        base_dir = osp.join(work_root, model, method, 'none')
        opts = {'dfq.synthesizer': dict(synth, _delete_=True),
                'dfq.adapter': None, 'dfq.quantizer': quant}
        res = _run(config, base_dir, opts)
        rows.append(dict(method=method, budget='none (calibration only)',
                         adapter=None, metrics=res['metrics'],
                         weight_codes_changed=0.0, checkpoint=res[
                             'checkpoint']['sha256'], seed=res['seed'],
                         seconds=res['seconds']))
        images = osp.join(base_dir, 'synthetic', 'synthetic_images.pth')
        for m, name, adapter in BUDGETS:
            if m != method:
                continue
            log(f'{model} {method}: {name}')
            work = osp.join(work_root, model, method,
                            name.split(':')[0].replace(' ', '_')
                            .replace(',', '')[:40])
            res = _run(config, work, {
                'dfq.synthesizer': dict(synth, _delete_=True),
                'dfq.load_images': images,
                'dfq.adapter': dict(adapter, _delete_=True),
                'dfq.quantizer': quant})
            ad = res['adaptation']
            rows.append(dict(
                method=method, budget=name, adapter=ad['adapter'],
                metrics=res['metrics'],
                weight_codes_changed=ad['weight_codes_changed'],
                student_loss=ad.get('student_loss'),
                reconstruction=ad.get('reconstruction'),
                rounds=ad.get('rounds'),
                checkpoint=res['checkpoint']['sha256'], seed=res['seed'],
                seconds=res['seconds']))
    return dict(model=model, config=config, bits='w4a4',
                quantizer=QUANTIZER, metric_keys=list(keys), rows=rows,
                cpu=cpu_model(), threads=torch.get_num_threads(),
                torch=torch.__version__, git=git_state())


def _loss_text(row):
    if row.get('student_loss'):
        s = row['student_loss']
        return f'{s["first"]:.4g} -> {s["last"]:.4g}'
    if row.get('reconstruction'):
        units = row['reconstruction']
        before = sum(u['loss_before'] for u in units)
        after = sum(u['loss_after'] for u in units)
        return (f'{before:.4g} -> {after:.4g} (sum over {len(units)} '
                'units)')
    return '-'


def markdown(results):
    """The budget table of the README from the JSON of :func:`measure`."""
    from dfq_dense.report import fmt_metric
    lines = []
    for res in results:
        keys = res['metric_keys']
        lines += [f'**{osp.basename(res["config"])[:-8]}** '
                  f'({res["bits"].upper()}, quantizer `{res["quantizer"]}`;'
                  f' {" / ".join(k.split("/")[-1] for k in keys)})', '',
                  '| method | adapter budget | weight codes changed | '
                  'adapter loss first -> last | metric |',
                  '|---|---|---|---|---|']
        for row in res['rows']:
            metric = ' / '.join(fmt_metric(k, row['metrics'][k])
                                for k in keys)
            lines.append(
                f'| {row["method"]} | {row["budget"]} | '
                f'{100 * row["weight_codes_changed"]:.3f}% | '
                f'{_loss_text(row)} | {metric} |')
        ref = {r['method']: r for r in res['rows'] if r['adapter'] is None}
        deltas = [
            f'{r["method"]} {r["metrics"][k] - ref[r["method"]]["metrics"][k]:+.{1 if k == "mIoU" else 3}f}'  # noqa: E501
            for r in res['rows'] if r['budget'] in FRAGMENT_BUDGETS
            for k in keys[:1]]
        lines += ['', f'At the fragments\' budgets, against calibration '
                  f'alone ({keys[0].split("/")[-1]}): {", ".join(deltas)}.',
                  '']
    return '\n'.join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--work-dir',
                        default=osp.join('work_dirs', 'student_steps'))
    parser.add_argument('--models', nargs='+', default=list(MODELS),
                        choices=list(MODELS))
    parser.add_argument('--out', default=osp.join('results', 'demo',
                                                  'student_steps'))
    args = parser.parse_args(argv)
    from dfq_dense.utils.fileio import write_json_atomic
    for model in args.models:
        start = time.time()
        res = measure(model, args.work_dir)
        res['seconds'] = round(time.time() - start, 1)
        path = osp.join(args.out, f'{model}.json')
        write_json_atomic(path, res)
        print(markdown([res]))
        print(f'wrote {path}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
