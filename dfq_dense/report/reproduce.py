"""How to reproduce each published row: the README's guide table.

For every quantized row of ``configs/leaderboard/published.yaml`` the
config that reproduces it (``configs/reproduce/<id>.py``: the row's model,
method, quantizer and bits, its official checkpoint as
``official_checkpoint``), the conversion and test commands, the quoted
figure, and the estimated time of the run on one GPU and on eight from the
benchmark's FLOP counts (:func:`dfq_dense.report.budget.estimate_run`).
Rows without a config say so.
"""
import os.path as osp

from ..zoo.published import load_published
# _t: the budget's rounding of a time (h, min, and s under a minute: the
# smaller classifiers, RepQ-ViT on eight GPUs)
from .budget import TFLOPS, _t, estimate_run, load_results, schedule
from .tables import ROOT as REPO
from .tables import markdown_table

#: (model, backbone) of a published row -> its model in the FLOP counts and
#: the converter's --model (the dense models; a classifier's file is read
#: as it is, its key is its timm model's).
MODELS = {
    ('Mask R-CNN', 'Swin-T'): 'mask_rcnn_swin_t',
    ('Mask R-CNN', 'Swin-S'): 'mask_rcnn_swin_s',
    ('Cascade Mask R-CNN', 'Swin-T'): 'cascade_mask_rcnn_swin_t',
    ('Cascade Mask R-CNN', 'Swin-S'): 'cascade_mask_rcnn_swin_s',
    ('UperNet', 'Swin-T'): 'upernet_swin_t',
    ('UperNet', 'Swin-S'): 'upernet_swin_s',
    ('UperNet', 'Swin-B'): 'upernet_swin_b',
    ('DeiT-T classifier', 'DeiT-T'): 'deit_tiny_patch16_224',
    ('DeiT-S classifier', 'DeiT-S'): 'deit_small_patch16_224',
    ('DeiT-B classifier', 'DeiT-B'): 'deit_base_patch16_224',
    ('Swin-T classifier', 'Swin-T'): 'swin_tiny_patch4_window7_224',
    ('Swin-S classifier', 'Swin-S'): 'swin_small_patch4_window7_224',
}


def config_of(entry):
    """``configs/reproduce/<id>.py`` (relative to the repository) or None."""
    path = osp.join('configs', 'reproduce', f'{entry["id"]}.py')
    return path if osp.exists(osp.join(REPO, path)) else None


def _figure(entry):
    m = entry['metrics']
    if 'box_ap' in m:
        text = f'box {m["box_ap"]} / mask {m.get("mask_ap", "-")}'
    elif 'miou' in m:
        text = f'mIoU {m["miou"]}'
    else:
        text = ', '.join(f'{k} {v}' for k, v in m.items())
    fp = entry.get('fp_reference')
    if fp:
        ref = '/'.join(str(v) for v in fp.values())
        text += f' (FP {ref})'
    return text


def _what(entry):
    """``Mask R-CNN Swin-T W4A4``; ``Swin-S classifier W8A8`` (the model
    already names its backbone)."""
    model, backbone = entry['model'], entry['backbone']
    if not model.startswith(backbone):
        model = f'{model} {backbone}'
    return f'{model} {entry["bits"]}'


def guide_rows(entries=None, flops=None, tflops=TFLOPS):
    entries = load_published() if entries is None else entries
    if flops is None:
        flops = load_results(osp.join(REPO, 'results', 'benchmarks'),
                             'flops')
    rows = []
    for e in entries:
        if e['bits'] == 'FP':
            continue
        config = config_of(e)
        model = MODELS.get((e['model'], e['backbone']))
        row = dict(id=e['id'], method=e['method'], task=e['task'],
                   what=_what(e),
                   figure=_figure(e), checkpoint=e['checkpoint']['file'],
                   config=config, model=model, estimate=None)
        if config is not None and flops is not None and model is not None:
            sched = schedule(config)
            row['schedule'] = sched
            row['estimate'] = estimate_run(flops, model, sched, tflops)
        rows.append(row)
    return rows


def _not_counted(sched):
    """What of the run the estimate leaves out (its adapter's steps that
    have no FLOP count)."""
    if sched.get('adapter') == 'PSAQViTV2Rounds':
        return ' + student steps'
    return ' + adapter' if sched.get('adapter') else ''


def markdown(rows, tflops=TFLOPS):
    table = []
    for r in rows:
        if r['config'] is None:
            table.append([f'`{r["id"]}`', r['method'], r['what'],
                          r['figure'], f'`{r["checkpoint"]}`',
                          'no config yet', '-', '-'])
            continue
        est = r['estimate']
        extra = _not_counted(r['schedule']) if est else ''
        # A timm classifier reads the official release file as it is
        # (timm's own key filter); the dense models' files are converted.
        how = '(as it is)' if r['task'] == 'classification' else \
            f'(convert: `--model {r["model"]}`)'
        table.append([
            f'`{r["id"]}`', r['method'], r['what'], r['figure'],
            f'`{r["checkpoint"]}` {how}', f'`{r["config"]}`',
            _t(est['gpus']['1']['total_s']) + extra if est else '-',
            _t(est['gpus']['8']['total_s']) + extra if est else '-'])
    return markdown_table(
        ['published row', 'method', 'model, bits', 'quoted figure',
         'official checkpoint', 'config', f'1 GPU (estimate, {tflops:g} '
         'TFLOPS)', '8 GPUs (estimate)'], table)
