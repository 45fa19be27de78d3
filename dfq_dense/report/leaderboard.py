"""Leaderboard of a collected experiment matrix (``tools/run_matrix.py
--collect``) against the published figures (configs/leaderboard/).

Rows: per model (config, checkpoint, evaluation options) and bit setting,
per method (grid method name) and number of calibration images: the mean
and standard deviation over the seeds, the individual draws, the seed
count, the suite's own FP figure and the drop from it.  Beside them the
published entries of the same task, model, backbone and bits, with their
own FP reference and the deltas.  Units: COCO box/mask AP in AP points
(CocoMetric's 0-1 ``coco/bbox_mAP`` / ``coco/segm_mAP`` times 100, the
scale of the published figures); mIoU as mmseg reports it (0-100).
"""
import csv
import io
import json
import math
import os.path as osp
import re

SCHEMA = 'dfq-dense/leaderboard/1'
# suite metric key -> (published key, factor to the published scale)
METRICS = {'coco/bbox_mAP': ('box_ap', 100.0),
           'coco/segm_mAP': ('mask_ap', 100.0),
           'mIoU': ('miou', 1.0)}
UNITS = ('COCO box/mask AP in AP points: the suite\'s CocoMetric '
         'coco/bbox_mAP and coco/segm_mAP (0-1) times 100, the scale of the '
         'published figures; mIoU 0-100 in both')
SPREAD_RULE = ('std: sample standard deviation over the seeds (ddof=1; '
               'none with one seed). "within spread" of another row: '
               '|mean difference| <= the larger of the two stds (both rows '
               'need at least 2 seeds, else n/a). Compared with Gaussian '
               'noise (same model, bits and image count) and with the best '
               'mean of the model and bits.')
DELTA_RULE = ('delta = suite mean - published figure; drop = own FP - '
              'quantized (suite: its fp_metrics; published: its '
              'fp_reference); drop delta = suite drop - published drop. '
              'checkpoint differs: the suite checkpoint file is not the '
              'published entry\'s checkpoint.file (published entries carry '
              'no SHA-256; the suite one is listed)')
NOISE_TYPES = ('GaussianNoise', )


def _mean_std(values):
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var)


def within_spread(a, b):
    """The rule of :data:`SPREAD_RULE`: True / False, or None (n/a)."""
    if a['std'] is None or b['std'] is None:
        return None
    return abs(a['mean'] - b['mean']) <= max(a['std'], b['std'])


def _norm(name):
    return re.sub(r'[^a-z0-9]', '', str(name).lower())


def _model_key(cell, results):
    d = cell['definition']
    sha = (results.get('checkpoint') or {}).get('sha256')
    eval_opts = {k: v for k, v in (d.get('options') or {}).items()
                 if not k.startswith('dfq.')}
    return json.dumps([d['config'], sha, eval_opts], sort_keys=True)


def _published_fp(entries, checkpoint, wanted=None):
    """The published FP entry of the suite model: the id the grid named,
    else the FP entry of the checkpoint's file name."""
    if wanted:
        for e in entries:
            if e['id'] == wanted:
                return e
        return None
    name = osp.basename(str(checkpoint or '').split('?')[0])
    for e in entries:
        if e['bits'] == 'FP' and e['checkpoint']['file'] == name:
            return e
    return None


def build(collected, entries=()):
    """The leaderboard as a dict (what leaderboard.json holds)."""
    models = {}
    for item in collected['cells']:
        cell, res = item['cell'], item['results']
        d = cell['definition']
        key = _model_key(cell, res)
        ck = res.get('checkpoint') or {}
        model = models.setdefault(key, dict(
            label=osp.splitext(osp.basename(d['config']))[0],
            config=d['config'], task=res.get('task'),
            checkpoint=dict(path=ck.get('path'), sha256=ck.get('sha256'),
                            file=osp.basename(str(ck.get('path') or ''))),
            eval_options={k: v for k, v in (d.get('options') or {}).items()
                          if not k.startswith('dfq.')},
            published_id=cell.get('published'),
            fp_draws={}, rows={}))
        for k, v in (res.get('fp_metrics') or {}).items():
            if k in METRICS:
                model['fp_draws'].setdefault(k, []).append(
                    v * METRICS[k][1])
        bits = f'W{d["w_bits"]}A{d["a_bits"]}'
        rkey = (bits, d['method'], d['num_images'])
        row = model['rows'].setdefault(rkey, dict(
            bits=bits, method=d['method'], method_type=res.get('method'),
            num_images=d['num_images'], quantizer=d.get('quantizer'),
            draws={}, seeds=[], cells=[]))
        if d['seed'] in row['seeds']:
            raise ValueError(f'two finished cells for {model["label"]} '
                             f'{bits} {d["method"]} {d["num_images"]} images '
                             f'seed {d["seed"]} (different definitions '
                             'under one method name)')
        row['seeds'].append(d['seed'])
        row['cells'].append(cell['name'])
        for k, v in res['metrics'].items():
            if k in METRICS:
                row['draws'].setdefault(k, []).append(v * METRICS[k][1])

    out = dict(schema=SCHEMA, units=UNITS, spread_rule=SPREAD_RULE,
               delta_rule=DELTA_RULE, grid=collected.get('grid'),
               num_cells=collected.get('num_cells'),
               missing=len(collected.get('missing') or []), models=[])
    for key in sorted(models):
        model = models[key]
        fp = {k: sum(v) / len(v) for k, v in model.pop('fp_draws').items()}
        rows = model.pop('rows')
        pub_fp = _published_fp(entries, model['checkpoint']['path'],
                               model.pop('published_id'))
        entry = dict(model, fp=fp,
                     published_fp=None if pub_fp is None else dict(
                         id=pub_fp['id'], file=pub_fp['checkpoint']['file'],
                         metrics=pub_fp['metrics']),
                     bits=[], curves=[])
        for bits in sorted({r[0] for r in rows},
                           key=lambda b: [-int(x) for x in
                                          re.findall(r'\d+', b)]):
            section = _section(bits, [r for k, r in rows.items()
                                      if k[0] == bits], fp, pub_fp,
                               entries, model['checkpoint']['file'])
            entry['bits'].append(section)
            entry['curves'] += _curves(bits, section['rows'])
        out['models'].append(entry)
    return out


def _section(bits, rows, fp, pub_fp, entries, ck_file):
    out_rows = []
    for row in sorted(rows, key=lambda r: (r['method'], r['num_images'])):
        order = sorted(range(len(row['seeds'])),
                       key=lambda i: row['seeds'][i])
        metrics = {}
        for k, draws in row['draws'].items():
            draws = [draws[i] for i in order]
            mean, std = _mean_std(draws)
            metrics[k] = dict(mean=mean, std=std, draws=draws,
                              drop=fp[k] - mean if k in fp else None)
        out_rows.append(dict(
            bits=bits, method=row['method'], method_type=row['method_type'],
            num_images=row['num_images'], quantizer=row['quantizer'],
            seeds=sorted(row['seeds']), n_seeds=len(row['seeds']),
            cells=[row['cells'][i] for i in order], metrics=metrics))
    for row in out_rows:
        for k, m in row['metrics'].items():
            peers = [r for r in out_rows if k in r['metrics']]
            noise = [r for r in peers if r['method_type'] in NOISE_TYPES
                     and r['num_images'] == row['num_images']]
            best = max(peers, key=lambda r: r['metrics'][k]['mean'])
            m['is_best'] = best is row
            m['best_method'] = best['method']
            m['within_spread_best'] = None if best is row else \
                within_spread(m, best['metrics'][k])
            m['within_spread_noise'] = None if not noise or \
                noise[0] is row else within_spread(m, noise[0]['metrics'][k])
    published = []
    if pub_fp is not None:
        for e in entries:
            if e['bits'] != bits or (e['task'], e['model'], e['backbone']) \
                    != (pub_fp['task'], pub_fp['model'], pub_fp['backbone']):
                continue
            pm = e['metrics']
            pfp = e['fp_reference'] or {}
            comparisons = []
            for row in out_rows:
                for k, m in row['metrics'].items():
                    pk = METRICS[k][0]
                    if pk not in pm:
                        continue
                    pdrop = pfp[pk] - pm[pk] if pk in pfp else None
                    comparisons.append(dict(
                        method=row['method'], num_images=row['num_images'],
                        metric=k, suite=m['mean'], published=pm[pk],
                        delta=m['mean'] - pm[pk], suite_drop=m['drop'],
                        published_drop=pdrop,
                        drop_delta=None if m['drop'] is None or pdrop is None
                        else m['drop'] - pdrop,
                        same_method=_norm(row['method_type']) ==
                        _norm(e['method'])))
            published.append(dict(
                id=e['id'], method=e['method'], venue=e['venue'],
                schedule=e['schedule'],
                checkpoint_file=e['checkpoint']['file'],
                checkpoint_differs=e['checkpoint']['file'] != ck_file,
                calibration=e['calibration'], metrics=pm,
                fp_reference=e['fp_reference'], note=e.get('note'),
                comparisons=comparisons))
    return dict(bits=bits, rows=out_rows, published=published)


def _curves(bits, rows):
    """Metric vs number of images for a method with several image counts."""
    out = []
    for method in sorted({r['method'] for r in rows}):
        mine = sorted((r for r in rows if r['method'] == method),
                      key=lambda r: r['num_images'])
        if len(mine) < 2:
            continue
        for k in mine[0]['metrics']:
            out.append(dict(bits=bits, method=method, metric=k, points=[
                dict(num_images=r['num_images'],
                     mean=r['metrics'][k]['mean'],
                     std=r['metrics'][k]['std'], n_seeds=r['n_seeds'])
                for r in mine if k in r['metrics']]))
    return out


# ------------------------------------------------------------------ output
def fmt(value, digits=2):
    return '' if value is None else f'{value:.{digits}f}'


def _flag(value):
    return {True: 'yes', False: 'no', None: 'n/a'}[value]


CSV_FIELDS = ('kind', 'model', 'checkpoint_file', 'checkpoint_sha256', 'bits',
              'method', 'method_type', 'num_images', 'metric', 'fp', 'mean',
              'std', 'n_seeds', 'seeds', 'draws', 'drop',
              'within_spread_noise', 'within_spread_best', 'is_best',
              'published_id', 'published_method', 'published',
              'published_fp', 'delta', 'published_drop', 'drop_delta',
              'checkpoint_differs')


def csv_rows(board):
    """One 'suite' row per (model, bits, method, images, metric) and one
    'published' row per (suite row, published entry, metric)."""
    out = []
    for model in board['models']:
        base = dict(model=model['label'],
                    checkpoint_file=model['checkpoint']['file'],
                    checkpoint_sha256=model['checkpoint']['sha256'])
        for section in model['bits']:
            for row in section['rows']:
                for k, m in row['metrics'].items():
                    out.append(dict(
                        base, kind='suite', bits=section['bits'],
                        method=row['method'], method_type=row['method_type'],
                        num_images=row['num_images'], metric=k,
                        fp=model['fp'].get(k), mean=m['mean'], std=m['std'],
                        n_seeds=row['n_seeds'],
                        seeds=';'.join(map(str, row['seeds'])),
                        draws=';'.join(repr(v) for v in m['draws']),
                        drop=m['drop'],
                        within_spread_noise=m['within_spread_noise'],
                        within_spread_best=m['within_spread_best'],
                        is_best=m['is_best']))
            for pub in section['published']:
                for c in pub['comparisons']:
                    pk = METRICS[c['metric']][0]
                    out.append(dict(
                        base, kind='published', bits=section['bits'],
                        method=c['method'], num_images=c['num_images'],
                        metric=c['metric'], fp=model['fp'].get(c['metric']),
                        mean=c['suite'], drop=c['suite_drop'],
                        published_id=pub['id'],
                        published_method=pub['method'],
                        published=c['published'],
                        published_fp=(pub['fp_reference'] or {}).get(pk),
                        delta=c['delta'], published_drop=c['published_drop'],
                        drop_delta=c['drop_delta'],
                        checkpoint_differs=pub['checkpoint_differs']))
    return out


def to_csv(board):
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator='\n')
    writer.writeheader()
    for row in csv_rows(board):
        writer.writerow({k: '' if v is None else v for k, v in row.items()})
    return buf.getvalue()


def _short(k):
    return {'coco/bbox_mAP': 'box AP', 'coco/segm_mAP': 'mask AP',
            'mIoU': 'mIoU'}.get(k, k)


def to_markdown(board):
    lines = ['# Leaderboard', '',
             f'Grid `{board["grid"]}`: {board["num_cells"]} cells, '
             f'{board["missing"]} not finished.', '',
             f'- Units: {board["units"]}.',
             f'- Spread: {board["spread_rule"]}',
             f'- Published: {board["delta_rule"]}.', '',
             'Cells: mean ± std (n seeds) [draws]; flags: ~noise / ~best = '
             'within spread of Gaussian noise / of the best row, * = best.',
             '']
    for model in board['models']:
        keys = [k for k in METRICS if k in model['fp'] or any(
            k in r['metrics'] for s in model['bits'] for r in s['rows'])]
        ck = model['checkpoint']
        lines += [f'## {model["label"]}', '',
                  f'config `{model["config"]}`, checkpoint `{ck["file"]}` '
                  f'(sha256 {str(ck["sha256"])[:12]})'
                  + (f', eval options {json.dumps(model["eval_options"])}'
                     if model['eval_options'] else '')
                  + '; suite FP: ' + (', '.join(
                      f'{_short(k)} {fmt(model["fp"][k])}' for k in keys
                      if k in model['fp']) or 'not evaluated')
                  + ('; published FP (' + model['published_fp']['id'] + '): '
                     + ', '.join(f'{a} {b}' for a, b in
                                 model['published_fp']['metrics'].items())
                     if model['published_fp'] else
                     '; no published FP entry for this checkpoint'), '']
        for section in model['bits']:
            lines += [f'### {section["bits"]}', '',
                      '| method | images | ' + ' | '.join(
                          f'{_short(k)} | drop | flags' for k in keys) + ' |',
                      '|---|---|' + '---|---|---|' * len(keys)]
            for row in section['rows']:
                cells = []
                for k in keys:
                    m = row['metrics'].get(k)
                    if m is None:
                        cells += ['', '', '']
                        continue
                    flags = []
                    if m['is_best']:
                        flags.append('*')
                    if m['within_spread_noise']:
                        flags.append('~noise')
                    if m['within_spread_best']:
                        flags.append('~best')
                    cells += [f'{fmt(m["mean"])} ± {fmt(m["std"]) or "n/a"} '
                              f'({row["n_seeds"]}) ['
                              + ', '.join(fmt(v) for v in m['draws']) + ']',
                              fmt(m['drop']), ' '.join(flags)]
                lines.append(f'| {row["method"]} ({row["method_type"]}) | '
                             f'{row["num_images"]} | ' + ' | '.join(cells)
                             + ' |')
            lines.append('')
            for pub in section['published']:
                lines += [
                    f'Published **{pub["method"]}** ({pub["venue"]}, '
                    f'`{pub["id"]}`): ' + ', '.join(
                        f'{a} {b} (FP '
                        f'{(pub["fp_reference"] or {}).get(a, "n/a")})'
                        for a, b in pub['metrics'].items())
                    + f'; checkpoint `{pub["checkpoint_file"]}`'
                    + (' **differs from the suite\'s**'
                       if pub['checkpoint_differs'] else ' (same file)')
                    + f'; calibration {pub["calibration"]["data"]}, '
                    f'{pub["calibration"]["images"]} images.', '',
                    '| method | images | metric | suite | published | delta '
                    '| suite drop | published drop | drop delta |',
                    '|---|---|---|---|---|---|---|---|---|']
                for c in pub['comparisons']:
                    lines.append(
                        f'| {c["method"]} | {c["num_images"]} | '
                        f'{_short(c["metric"])} | {fmt(c["suite"])} | '
                        f'{fmt(c["published"])} | {fmt(c["delta"])} | '
                        f'{fmt(c["suite_drop"])} | '
                        f'{fmt(c["published_drop"])} | '
                        f'{fmt(c["drop_delta"])} |')
                lines.append('')
        for curve in model['curves']:
            lines += [f'Calibration size, {curve["bits"]} {curve["method"]} '
                      f'({_short(curve["metric"])}): ' + '; '.join(
                          f'{p["num_images"]} images {fmt(p["mean"])} ± '
                          f'{fmt(p["std"]) or "n/a"} ({p["n_seeds"]})'
                          for p in curve['points']), '']
    return '\n'.join(lines)


def compact_markdown(board):
    """The README's form of the leaderboard: per model one table, a row
    per method (and image count) and a column per bit setting, each cell
    ``mean ± std`` per metric (``*``: best mean of the column; ``~``:
    within the spread of the best; std ``-`` with one seed), then how many
    seeds each row has."""
    lines = []
    for model in board['models']:
        keys = [k for k in METRICS if k in model['fp'] or any(
            k in r['metrics'] for s in model['bits'] for r in s['rows'])]
        bits = [s['bits'] for s in model['bits']]
        table = {}
        for sec in model['bits']:
            for row in sec['rows']:
                table.setdefault((row['method'], row['method_type'],
                                  row['num_images']), {})[sec['bits']] = row
        fp = ' / '.join(fmt(model['fp'].get(k), 1) for k in keys)
        names = ' / '.join(_short(k) for k in keys)
        lines += [f'**{model["label"]}** ({names}; suite FP {fp})', '',
                  '| method | images | ' + ' | '.join(bits) + ' | seeds |',
                  '|---|---|' + '---|' * len(bits) + '---|']
        for (method, mtype, num), cells in table.items():
            out, seeds = [], set()
            for b in bits:
                row = cells.get(b)
                if row is None:
                    out.append('n/a')
                    continue
                seeds.add(row['n_seeds'])
                parts = []
                for k in keys:
                    m = row['metrics'].get(k)
                    if m is None:
                        parts.append('n/a')
                        continue
                    std = '' if m['std'] is None else \
                        f' ± {fmt(m["std"], 1)}'
                    mark = '*' if m['is_best'] else (
                        '~' if m['within_spread_best'] else '')
                    parts.append(f'{fmt(m["mean"], 1)}{std}{mark}')
                out.append(' / '.join(parts))
            lines.append(f'| {method} ({mtype}) | {num} | ' + ' | '.join(out)
                         + f' | {"/".join(str(n) for n in sorted(seeds))} |')
        lines.append('')
    lines.append('Mean ± sample std over the seeds (no std with one seed); '
                 '`*` best mean of the column, `~` within the spread of the '
                 'best (|mean difference| <= the larger std; needs two '
                 'seeds).  COCO AP in points.')
    return '\n'.join(lines) + '\n'


def comparison_markdown(board, earlier):
    """``earlier`` (a record of an earlier method table: ``models ->
    method -> bits -> [metric values]``, ``metrics -> model -> keys``)
    beside the board's means: per model a row per method and a column per
    bit setting, ``earlier -> now (delta)`` of the first metric (box AP,
    mIoU).  Cells the board lacks show the earlier figure and ``n/a``."""
    lines = []
    for model in board['models']:
        name = next((k for k in earlier['models']
                     if model['label'].startswith(k)), None)
        if name is None:
            continue
        key = earlier['metrics'][name][0]
        bits = [s['bits'] for s in model['bits']]
        now = {(r['method'], s['bits']): r['metrics'].get(key, {}).get(
            'mean') for s in model['bits'] for r in s['rows']}
        lines += [f'**{name}** ({_short(key)}: earlier -> now)', '',
                  '| method | ' + ' | '.join(bits) + ' |',
                  '|---|' + '---|' * len(bits)]
        for method, row in earlier['models'][name].items():
            if method == 'fp':
                continue
            out = []
            for b in bits:
                old = row.get(b, [None])[0]
                new = now.get((method, b))
                if old is None or new is None:
                    out.append(f'{fmt(old, 1) or "n/a"} -> '
                               f'{fmt(new, 1) or "n/a"}')
                else:
                    delta = round(new - old, 1) + 0.0  # no '-0.0'
                    out.append(f'{fmt(old, 1)} -> {fmt(new, 1)} '
                               f'({delta:+.1f})')
            lines.append(f'| {method} | ' + ' | '.join(out) + ' |')
        lines.append('')
    return '\n'.join(lines)


def write(board, out_dir):
    """leaderboard.{md,csv,json} in ``out_dir`` (atomically)."""
    from ..utils.fileio import atomic_path, write_json_atomic
    write_json_atomic(osp.join(out_dir, 'leaderboard.json'), board)
    for name, text in (('leaderboard.csv', to_csv(board)),
                       ('leaderboard.md', to_markdown(board))):
        with atomic_path(osp.join(out_dir, name), osp.splitext(name)[1]) \
                as tmp:
            with open(tmp, 'w') as f:
                f.write(text)
    return [osp.join(out_dir, n) for n in
            ('leaderboard.md', 'leaderboard.csv', 'leaderboard.json')]
