"""Helpers of the table scripts (tools/quant_table.py, the matrix).
"""
import json
import os.path as osp

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))


def load_fragment(kind, name, var):
    """The variable ``var`` of ``configs/_base_/<kind>/<name>.py`` as a
    plain dict."""
    from mmengine.config import Config
    cfg = Config.fromfile(
        osp.join(ROOT, 'configs', '_base_', kind, name + '.py'))
    return cfg[var].to_dict()


def run_cell(config, work_dir, options, eval_fp=False):
    """One DFQ run (:func:`dfq_dense.engine.api.run_dfq`, what
    ``tools/dfq_test.py`` does) in this process with ``options`` (a
    ``--cfg-options`` dict whose values may be dicts); returns its
    ``dfq_results.json``."""
    from ..engine.api import run_dfq
    run_dfq(config, work_dir=work_dir, cfg_options=options, eval_fp=eval_fp)
    with open(osp.join(work_dir, 'dfq_results.json')) as f:
        return json.load(f)


def fmt_metric(key, value):
    """mIoU with one decimal, mAP with three."""
    return f'{value:.1f}' if key == 'mIoU' else f'{value:.3f}'


def markdown_table(header, rows):
    """A Markdown table (no trailing newline)."""
    lines = ['| ' + ' | '.join(header) + ' |',
             '|' + '|'.join('---' for _ in header) + '|']
    lines += ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]
    return '\n'.join(lines)


def replace_readme_section(name, text, path=osp.join(ROOT, 'README.md')):
    """Replace what lies between ``<!-- name:start -->`` and
    ``<!-- name:end -->`` in ``path`` by ``text`` (atomically)."""
    from ..utils.fileio import atomic_path
    start, end = f'<!-- {name}:start -->', f'<!-- {name}:end -->'
    with open(path) as f:
        readme = f.read()
    if start not in readme or end not in readme:
        raise SystemExit(f'{path} has no {start} ... {end} markers: add '
                         'them where the table goes')
    head, rest = readme.split(start, 1)
    _, tail = rest.split(end, 1)
    with atomic_path(path, '.md') as tmp:
        with open(tmp, 'w') as f:
            f.write(head + start + '\n' + text + end + tail)


def grid_markdown(title, note, corner, rows, bits, keys, cells,
                  fixed_rows=()):
    """One markdown table: ``**title** (note)``, then a row per ``(row_key,
    label)`` of ``rows`` and a column per bit setting; the cell of row
    ``r`` and bits ``b`` is ``cells['<r>_<b>']`` (a dict of metrics), its
    ``keys`` joined with ' / ' ('n/a' when missing).  ``fixed_rows`` are
    ``(label, text)`` rows put first with the same text in every column."""
    lines = [f'**{title}** ({note})', '',
             f'| {corner} | ' + ' | '.join(b.upper() for b in bits) + ' |',
             '|---|' + '---|' * len(bits)]
    for label, text in fixed_rows:
        lines.append(f'| {label} | ' + ' | '.join([text] * len(bits)) + ' |')
    for row, label in rows:
        out = []
        for b in bits:
            m = cells.get(f'{row}_{b}')
            out.append('n/a' if m is None else ' / '.join(
                fmt_metric(k, m[k]) for k in keys))
        lines.append(f'| {label} | ' + ' | '.join(out) + ' |')
    return '\n'.join(lines) + '\n'


#: The headline metrics of a results record, in the order shown.
HEADLINE = (('coco/bbox_mAP', 'box mAP'), ('coco/segm_mAP', 'mask mAP'),
            ('mIoU', 'mIoU'))


def cell_comparison_markdown(before, after, labels=('before', 'after')):
    """A table of the headline metrics of two exported matrix cells
    (``run_matrix.py --export`` JSON) of the same definition."""
    if before['cell']['hash'] != after['cell']['hash']:
        raise ValueError('the two cells differ in their definition: '
                         f'{before["cell"]["name"]} vs '
                         f'{after["cell"]["name"]}')
    rows = []
    for key, name in HEADLINE:
        a = before['results']['metrics'].get(key)
        b = after['results']['metrics'].get(key)
        if a is None or b is None:
            continue
        delta = f'{b - a:+.1f}' if name == 'mIoU' else f'{b - a:+.3f}'
        rows.append(f'| `{before["cell"]["name"]}` | {name} | '
                    f'{fmt_metric(name, a)} | {fmt_metric(name, b)} | '
                    f'{delta} |')
    head = (f'| cell | metric | {labels[0]} | {labels[1]} | delta |\n'
            '|---|---|---|---|---|')
    return '\n'.join([head] + rows) + '\n'
