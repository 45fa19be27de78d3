"""What a whole run of each real config costs: the run budget.

Measures nothing (``tools/benchmark.py budget`` prints it): it composes the
committed benchmark results
(``results/benchmarks/``: ``flops.json``, ``synthesis.json``, ``fit.json``)
with each real config's own schedule (its synthesizer's images, batch,
rounds and iterations; calibration on those images; evaluation on COCO
val2017, 5000 images, ADE20K val, 2000, or ImageNet val, 50000) into a
wall-time and memory budget per real model, on one GPU and on eight.

GPU times are **estimates**: no GPU has been measured.  Each stage's FLOPs
(``flops`` section: matmuls and convolutions; the elementwise work of the
priors' losses and of fake quantization is not counted) divided by an
assumed sustained throughput (``--tflops``, default :data:`TFLOPS`).  On
the CPU those uncounted parts are up to 12% of a synthesis iteration
(``synthesis``: MimiQ's inter-head similarity) and 6-13% of an evaluation forward (``fakequant``), so
the estimates are low by at least that.  Eight GPUs split the synthesis
batches (batch ``b`` on rank ``b % 8``), the calibration images and the
evaluation images (mmengine's distributed sampler) across ranks; a
method's adapter runs on every rank and is not in this budget.

Memory: the synthesis is the peak of a run.  "no options": the batch-1
row of the ``synthesis`` section (peak RSS on the CPU, Swin-T / Swin-S at
800x1333) times the configured batch; "16 GB options": the ``fit``
section's measured iteration at the configured batch with ``with_cp`` and
``micro_batch_size`` (Swin-S, 800x1333).  Models those rows do not cover
show ``-``.

    python tools/benchmark.py budget [--tflops 10]
"""
import json
import math
import os.path as osp

from .tables import ROOT as REPO
from .tables import markdown_table

#: The synthesis of each method fragment (V2's is PSAQ-ViT's, for its
#: start images).
SYNTH_NAMES = {'psaq_vit_v2': 'PSAQ-ViT V2 (start images)'}
#: The synthesis iterations of the benchmark, by its method keys.
METHODS = {
    'psaq_vit': 'PSAQ-ViT',
    'psaq_vit_v2': 'PSAQ-ViT V2 sample step',
    'mimiq': 'MimiQ',
    'spdfq': 'SPDFQ',
}

#: Assumed sustained throughput of one GPU (TFLOPS): about half of an
#: A100's FP32 peak of 19.5, PyTorch's default precision for matmuls.
TFLOPS = 10.0
#: Evaluation images of the real configs' test sets (COCO val2017, ADE20K
#: val, ImageNet-1k val).
EVAL_IMAGES = {'det': 5000, 'seg': 2000, 'cls': 50000}
GPUS = (1, 8)
#: synthesis.json backbones per real model (800x1333 rows only).
_SYNTH_BACKBONE = {'mask_rcnn_swin_t': 'swin_t', 'mask_rcnn_swin_t_1x':
                   'swin_t', 'mask_rcnn_swin_s': 'swin_s',
                   'cascade_mask_rcnn_swin_t': 'swin_t',
                   'cascade_mask_rcnn_swin_s': 'swin_s'}


def load_results(folder, name):
    """Section ``name`` of ``folder/<name>.json`` as the benchmark harness
    writes it, or None when the file is missing."""
    path = osp.join(folder, f'{name}.json')
    if not osp.exists(path):
        return None
    with open(path) as f:
        data = json.load(f)
    return data['sections'][name] if 'sections' in data else data


def _counts(synth_cfg):
    """(images, batch, iterations per image) of a synthesizer config, with
    the defaults of the class it builds (e.g. PSAQ-ViT's two rounds)."""
    from .. import registry
    synth = registry.build(registry.MODELS, dict(synth_cfg, progress=False))
    iters = int(getattr(synth, 'iterations', 0) or 0) * \
        int(getattr(synth, 'synth_rounds', 1) or 1)
    return int(synth.num_images), int(synth.batch_size), iters


def schedule(config):
    """The run's stages as counts, from the config: synthesis images,
    batch and iterations per image (of the synthesizer the config builds,
    its defaults included), PSAQ-ViT V2's sample steps (rounds x sample
    iterations x images per round), calibration and evaluation images."""
    from ..engine.runner import load_config, task_of
    cfg = load_config(osp.join(REPO, config))
    s = cfg.dfq.synthesizer
    task = task_of(cfg)
    images, batch, iters = _counts(s)
    if s['type'] == 'RealImages':
        iters = 0  # read from files
    adapter = cfg.dfq.get('adapter') or {}
    sample_iters = 0
    if adapter.get('type') == 'PSAQViTV2Rounds':
        per_round = adapter.get('images_per_round') or images
        sample_iters = int(adapter.get('rounds', 4)) * \
            int(adapter.get('sample_iters', 50)) * int(per_round)
    return dict(method=s['type'], num_images=images, batch_size=batch,
                iterations=iters, adapter=adapter.get('type'),
                sample_step_iterations=sample_iters, calib_images=images,
                task=task, eval_images=EVAL_IMAGES[task])


def _method_key(synth_type):
    return {'PSAQViT': 'psaq_vit', 'PSAQViTV2': 'psaq_vit',
            'MimiQ': 'mimiq', 'SPDFQ': 'spdfq'}.get(synth_type)


def estimate_run(flops, model, sched, tflops=TFLOPS):
    """Estimated seconds of each stage of a run of ``model`` (a key of the
    ``flops`` rows) with schedule ``sched`` (:func:`schedule`), on one GPU
    and on eight; a method without synthesis iterations (real images,
    noise) costs nothing there."""
    rate = tflops * 1e12
    method = _method_key(sched['method'])
    f_eval = next(r['flops'] for r in flops['rows']
                  if r['model'] == model and r['kind'] == 'eval')
    f_syn = 0
    if method is not None and sched['iterations']:
        f_syn = next(r['flops'] for r in flops['rows']
                     if r['model'] == model and r['kind'] == 'synthesis'
                     and r['method'] == method)
    # PSAQ-ViT V2's sample steps (image-iterations); every rank runs the
    # adapter, so they do not split.  Its student steps are not counted.
    f_sample = 0
    if sched.get('sample_step_iterations'):
        f_sample = next(r['flops'] for r in flops['rows']
                        if r['model'] == model and r['kind'] == 'synthesis'
                        and r['method'] == 'psaq_vit_v2')
    adapt = f_sample * sched.get('sample_step_iterations', 0) / rate
    batches = math.ceil(sched['num_images'] / sched['batch_size'])
    gpus = {}
    for g in GPUS:
        syn = f_syn * sched['iterations'] * sched['batch_size'] * \
            math.ceil(batches / g) / rate
        cal = f_eval * math.ceil(sched['calib_images'] / g) / rate
        ev = f_eval * math.ceil(sched['eval_images'] / g) / rate
        gpus[str(g)] = dict(synthesis_s=syn, adaptation_s=adapt,
                            calibration_s=cal, evaluation_s=ev,
                            total_s=syn + adapt + cal + ev)
    return dict(eval_gflop=f_eval / 1e9, synthesis_iteration_gflop=f_syn /
                1e9, gpus=gpus)


def compose(flops, synthesis=None, fit=None, tflops=TFLOPS, schedules=None):
    """Budget rows from the sections' results (dicts as written)."""
    rows = []
    per_image = {}
    for r in (synthesis or {}).get('rows', []):
        if r.get('status') == 'ok' and r['batch'] == 1 and \
                r['size'] == [800, 1333]:
            per_image[(r['backbone'], r['method'])] = \
                r['memory']['peak_bytes']
    fitted = {(r['backbone'], r['method']): r for r in
              (fit or {}).get('rows', []) if r.get('status') == 'ok'}
    for name, info in flops['models'].items():
        sched = (schedules or {}).get(name) or schedule(info['config'])
        method = _method_key(sched['method'])
        row = dict(model=name, config=info['config'], size=info['size'],
                   method=method, schedule=sched,
                   **estimate_run(flops, name, sched, tflops))
        bb = _SYNTH_BACKBONE.get(name)
        img = per_image.get((bb, method))
        row['memory_no_options_bytes'] = \
            img * sched['batch_size'] if img is not None else None
        fr = fitted.get((bb, method))
        row['memory_fit_bytes'] = fr['peak_bytes'] if fr is not None and \
            fr['batch'] == sched['batch_size'] else None
        row['fit_options'] = fr['options'] if fr is not None else None
        rows.append(row)
    return dict(tflops=tflops, rows=rows)


def method_rows(flops, model='mask_rcnn_swin_s', tflops=TFLOPS):
    """Synthesis alone of each method on one model with the schedule of
    its fragment (``configs/_base_/methods/``; the synthesizer's defaults
    included), one GPU and eight."""
    from mmengine.config import Config
    rate = tflops * 1e12
    out = []
    for method in flops['methods']:
        frag = Config.fromfile(osp.join(
            REPO, 'configs', '_base_', 'methods',
            f'{method}.py')).to_dict()['dfq_synthesizer']
        images, batch, iters = _counts(frag)
        # V2's synthesis is PSAQ-ViT's (its sample step is its adapter's)
        key = 'psaq_vit' if method == 'psaq_vit_v2' else method
        f = next((r['flops'] for r in flops['rows']
                  if r['model'] == model and r['kind'] == 'synthesis' and
                  r['method'] == key), None)
        if f is None:
            continue
        batches = math.ceil(images / batch)
        out.append(dict(
            method=method, images=images, batch_size=batch,
            iterations=iters, iteration_gflop=f / 1e9,
            seconds={str(g): f * iters * batch * math.ceil(batches / g) /
                     rate for g in GPUS}))
    return out


def budget(folder, tflops=TFLOPS):
    """The budget from the benchmark results in ``folder``."""
    flops = load_results(folder, 'flops')
    if flops is None:
        raise FileNotFoundError(
            f'no {osp.join(folder, "flops.json")}: run `python '
            f'tools/benchmark.py flops --out {osp.join(folder, "flops.json")}'
            '` first')
    result = compose(flops, load_results(folder, 'synthesis'),
                     load_results(folder, 'fit'), tflops)
    result['methods'] = method_rows(flops, tflops=tflops)
    return result


def _t(seconds):
    if seconds >= 3600:
        return f'{seconds / 3600:.1f} h'
    if seconds >= 60:
        return f'{seconds / 60:.0f} min'
    return f'{seconds:.0f} s'


def _gb(nbytes):
    return '-' if nbytes is None else f'{nbytes / 2**30:.0f} GB'


def markdown(result):
    t = result['tflops']
    lines = [f'Estimated (not measured): FLOPs / {t:g} TFLOPS sustained per '
             'GPU; elementwise work not counted.', '']
    table = []
    for r in result['rows']:
        s = r['schedule']
        one, eight = r['gpus']['1'], r['gpus']['8']
        table.append([
            r['model'], f'{r["size"][0]}x{r["size"][1]}',
            f'{METHODS[r["method"]]}, {s["num_images"]} x '
            f'{s["iterations"]} it', _t(one['synthesis_s']),
            _t(one['calibration_s']), _t(one['evaluation_s']),
            _t(one['total_s']), _t(eight['total_s']),
            _gb(r['memory_no_options_bytes']), _gb(r['memory_fit_bytes'])])
    lines.append(markdown_table(
        ['model', 'size', 'synthesis', 'synthesis 1 GPU',
         'calibration 1 GPU', 'evaluation 1 GPU', 'total 1 GPU',
         'total 8 GPUs', 'synthesis memory, no options',
         'synthesis memory, 16 GB options'], table))
    if result.get('methods'):
        lines += ['', 'Synthesis alone on Mask R-CNN Swin-S (800x1333) '
                  'with each method fragment\'s schedule (adapters not '
                  'included):', '']
        lines.append(markdown_table(
            ['method', 'images x iterations', 'iteration GFLOP / image',
             '1 GPU', '8 GPUs'],
            [[SYNTH_NAMES.get(m['method'], METHODS[m['method']]),
              f'{m["images"]} x {m["iterations"]}',
              f'{m["iteration_gflop"]:.0f}', _t(m['seconds']['1']),
              _t(m['seconds']['8'])] for m in result['methods']]))
    return '\n'.join(lines)
