"""Experiment matrix: a grid of ``tools/dfq_test.py`` runs.

A grid is a small mmengine config file::

    configs = ['configs/demo/upernet_swin_demo_w8a8.py', ...]
    methods = dict(noise=dict(type='GaussianNoise'), ...)
    bits = ['w8a8', 'w4a4']          # configs/_base_/bits fragments
    quantizer = 'percentile'         # configs/_base_/quantizers fragment
    seeds = [0, 1, 2]
    num_images = [8]
    options = {'test_dataloader.dataset.indices': 4}
    work_dir = 'work_dirs/matrix/demo'

It expands into cells (config x method x seed x num_images x bits); each cell
is one ``dfq_test`` run in ``<work_dir>/<readable prefix>-<hash>``, the hash
being a short SHA-256 of the cell's full definition (:func:`cell_hash`).
Cells that differ only in the bits form a *synthesis group*: the first
cell of a group synthesizes, the others pass ``dfq.load_images=<its work
dir>``.  The images of every method are made by the FP model alone (the
teacher-student methods PSAQ-ViT V2 and MimiQ too: their adaptation runs
after calibration and still runs, per cell, on loaded images; see
``DFQTestLoop._get_images``), so sharing them changes no result; a grid
with ``share_images = False`` (or a list of the method names to share)
synthesizes per cell instead.

This module never imports ``tools/``: the command-line tool passes the
function that runs one ``dfq_test`` argv (:func:`run_cells`).
"""
import hashlib
import json
import os
import os.path as osp
import re
import shlex
import time
import traceback

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
RESULTS = 'dfq_results.json'
CELL_FILE = 'cell.json'
SYNTH_FILE = osp.join('synthetic', 'synthetic_images.pth')
SCHEMA = 'dfq-dense/matrix-cell/1'
COLLECT_SCHEMA = 'dfq-dense/matrix-collect/1'

GRID_KEYS = ('configs', 'methods', 'bits', 'quantizer', 'seeds',
             'num_images', 'options', 'work_dir', 'eval_fp', 'share_images')
REQUIRED_KEYS = ('configs', 'methods', 'bits')
# --cfg-options keys the grid axes own.
AXIS_KEYS = ('dfq.synthesizer.seed', 'dfq.synthesizer.num_images',
             'dfq.quantizer.w_bits', 'dfq.quantizer.a_bits',
             'dfq.load_images', 'dfq.quantizer', 'dfq.synthesizer',
             'dfq.adapter', 'dfq.adapter.seed')
NAME_RE = re.compile(r'^[A-Za-z0-9][A-Za-z0-9_.-]*$')


class GridError(ValueError):
    """A bad grid file: one line."""


# ----------------------------------------------------------------- options
def _encode(value, where):
    """``value`` as the text of one ``--cfg-options`` value."""
    if value is None:
        return 'None'
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        inner = ','.join(_encode(v, where) for v in value)
        if isinstance(value, tuple):
            return f'({inner}{"," if len(value) == 1 else ""})'
        return f'[{inner}]'
    raise GridError(f'{where}: {type(value).__name__} values cannot be '
                    'passed on the command line')


def flatten(prefix, value, out):
    """Dotted ``--cfg-options`` pairs of ``value`` (dicts are walked,
    ``_delete_`` kept) into the dict ``out``."""
    if isinstance(value, dict):
        if not value:
            raise GridError(f'{prefix}: an empty dict cannot be passed on '
                            'the command line')
        for key, sub in value.items():
            flatten(f'{prefix}.{key}', sub, out)
    else:
        out[prefix] = value
    return out


def _parse_options(pairs):
    """What ``dfq_test --cfg-options`` makes of ``pairs`` (mmengine's
    ``DictAction``)."""
    import argparse

    from mmengine.config import DictAction
    parser = argparse.ArgumentParser()
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    return parser.parse_args(['--cfg-options', *pairs]).cfg_options


def option_pairs(flat, where='options'):
    """``k=v`` texts of the flat option dict, checked to parse back to the
    same values."""
    pairs = [f'{k}={_encode(v, f"{where}: {k}")}' for k, v in flat.items()]
    if pairs:
        parsed = _parse_options(pairs)
        for key, value in flat.items():
            if parsed.get(key) != value or \
                    type(parsed.get(key)) is not type(value):
                raise GridError(
                    f'{where}: {key}={value!r} does not survive '
                    f'--cfg-options (it parses as {parsed.get(key)!r})')
    return pairs


# ----------------------------------------------------------------- grid
def _repo_path(path):
    """``path`` relative to the repository root where it lies inside it
    (so that the cell hash does not depend on the current directory)."""
    full = osp.abspath(path)
    if not osp.exists(full) and not osp.isabs(path):
        full = osp.join(ROOT, path)
    rel = osp.relpath(full, ROOT)
    return full, (full if rel.startswith('..') else rel)


def load_fragment(kind, name, var):
    """The variable ``var`` of ``configs/_base_/<kind>/<name>.py`` as a
    plain dict; :class:`GridError` if there is none."""
    from mmengine.config import Config
    folder = osp.join(ROOT, 'configs', '_base_', kind)
    path = osp.join(folder, f'{name}.py')
    known = sorted(osp.splitext(f)[0] for f in os.listdir(folder)
                   if f.endswith('.py'))
    if not isinstance(name, str) or not osp.isfile(path):
        raise GridError(f'{kind}: unknown fragment {name!r} (one of '
                        f'{", ".join(known)})')
    cfg = Config.fromfile(path)
    if var not in cfg:
        raise GridError(f'{kind}: {name!r} holds no {var} (not a '
                        f'{kind} setting)')
    return cfg[var].to_dict()


def _list(grid, key, default, kind, where=None):
    value = grid.get(key, default)
    if not isinstance(value, (list, tuple)) or not value:
        raise GridError(f'{where or key} must be a non-empty list, got '
                        f'{value!r}')
    for v in value:
        if kind is int and (isinstance(v, bool) or not isinstance(v, int)):
            raise GridError(f'{key}: {v!r} is not an integer')
    if len(set(map(str, value))) != len(value):
        raise GridError(f'{key} lists a value twice: {list(value)}')
    return list(value)


def _configs(grid):
    out = []
    for item in _list(grid, 'configs', None, None):
        if isinstance(item, str):
            item = dict(config=item)
        elif isinstance(item, (list, tuple)) and len(item) == 2:
            item = dict(config=item[0], checkpoint=item[1])
        if not isinstance(item, dict) or 'config' not in item or \
                not set(item) <= {'config', 'checkpoint', 'published'}:
            raise GridError(
                f'configs: {item!r} is not a config path, a (config, '
                'checkpoint) pair or dict(config=..., checkpoint=..., '
                'published=<published.yaml FP entry id>)')
        full, rel = _repo_path(item['config'])
        if not osp.isfile(full):
            raise GridError(f'configs: config not found: {item["config"]}')
        entry = dict(config=rel, config_path=full,
                     checkpoint=item.get('checkpoint'),
                     published=item.get('published'))
        if entry['checkpoint'] and '://' not in entry['checkpoint']:
            ck_full, ck_rel = _repo_path(entry['checkpoint'])
            if not osp.isfile(ck_full):
                raise GridError(
                    f'configs: checkpoint not found: {entry["checkpoint"]}')
            entry['checkpoint'] = ck_rel
        out.append(entry)
    return out


def _method(name, over):
    """A grid method as ``dict(synthesizer=..., adapter=...)``.

    The long form names both the data source (``dfq.synthesizer``) and
    what adapts the student after calibration (``dfq.adapter``: None or a
    dict); a plain synthesizer dict is short for ``adapter=None``.  The
    adapter is always explicit in a cell, so that a method never runs
    with the adapter of the config's own method fragment by accident."""
    if not isinstance(over, dict):
        raise GridError(f'methods.{name} must be a dict, got {over!r}')
    if 'synthesizer' in over or 'adapter' in over:
        extra = sorted(set(over) - {'synthesizer', 'adapter', '_delete_'})
        if extra:
            raise GridError(f'methods.{name}: unknown key(s) {extra} '
                            '(synthesizer, adapter)')
        synth, adapter = over.get('synthesizer'), over.get('adapter')
    else:
        synth, adapter = over, None
    if not isinstance(synth, dict) or 'type' not in synth:
        raise GridError(f'methods.{name}: the synthesizer must be a dict '
                        f'with a type (dfq.synthesizer settings), got '
                        f'{synth!r}')
    if adapter is not None and (not isinstance(adapter, dict) or
                                'type' not in adapter):
        raise GridError(f'methods.{name}: the adapter must be None or a '
                        f'dict with a type (dfq.adapter settings), got '
                        f'{adapter!r}')
    for key, axis in (('seed', 'seeds'), ('num_images', 'num_images')):
        if key in synth or (key == 'seed' and adapter and key in adapter):
            raise GridError(f'methods.{name} sets {key}: the grid\'s '
                            f'{axis} sets it')
    return dict(synthesizer=synth, adapter=adapter)


def load_grid(path, work_dir=None):
    """Read and check the grid file; returns a plain dict with every key
    filled in.  :class:`GridError` (one line) on a bad grid."""
    from mmengine.config import Config
    if not osp.isfile(path):
        raise GridError(f'grid not found: {path}')
    try:
        raw = Config.fromfile(path).to_dict()
    except Exception as err:  # noqa: BLE001  (a syntax error, ...)
        raise GridError(f'cannot read grid {path}: '
                        f'{" ".join(str(err).split())}') from None
    raw = {k: v for k, v in raw.items() if not k.startswith('_')}
    unknown = sorted(set(raw) - set(GRID_KEYS))
    if unknown:
        raise GridError(f'{path}: unknown key(s) {", ".join(unknown)} '
                        f'(known: {", ".join(GRID_KEYS)})')
    missing = [k for k in REQUIRED_KEYS if k not in raw]
    if missing:
        raise GridError(f'{path}: missing key(s) {", ".join(missing)}')
    grid = dict(path=path)
    grid['configs'] = _configs(raw)
    methods = raw['methods']
    if not isinstance(methods, dict) or not methods:
        raise GridError('methods must be a non-empty dict name -> '
                        'dict(synthesizer=..., adapter=...)')
    grid['methods'] = {}
    for name, over in methods.items():
        if not NAME_RE.match(str(name)):
            raise GridError(f'methods: bad name {name!r} (letters, digits, '
                            '_ . -)')
        grid['methods'][str(name)] = _method(name, over)
    grid['bits'] = {}
    for name in _list(raw, 'bits', None, str):
        setting = load_fragment('bits', name, 'dfq_bits')
        grid['bits'][name] = dict(w_bits=setting['w_bits'],
                                  a_bits=setting['a_bits'])
    grid['quantizer'] = raw.get('quantizer')
    grid['quantizer_setting'] = None if grid['quantizer'] is None else \
        load_fragment('quantizers', grid['quantizer'], 'dfq_quantizer')
    grid['seeds'] = _list(raw, 'seeds', [0], int)
    grid['num_images'] = _list(raw, 'num_images', [8], int)
    if any(n < 1 for n in grid['num_images']):
        raise GridError(f'num_images must be positive: {grid["num_images"]}')
    options = raw.get('options') or {}
    if not isinstance(options, dict):
        raise GridError(f'options must be a dict of --cfg-options, got '
                        f'{options!r}')
    for key in options:
        if key in AXIS_KEYS:
            raise GridError(f'options: {key} is set by the grid (methods, '
                            'bits, quantizer, seeds, num_images)')
    grid['options'] = options
    grid['work_dir'] = work_dir or raw.get('work_dir') or osp.join(
        'work_dirs', 'matrix', osp.splitext(osp.basename(path))[0])
    eval_fp = raw.get('eval_fp', 'first')
    if eval_fp not in ('first', True, False):
        raise GridError(f"eval_fp must be 'first', True or False, got "
                        f'{eval_fp!r}')
    grid['eval_fp'] = eval_fp
    share = raw.get('share_images', True)
    if isinstance(share, (list, tuple)):
        bad = [m for m in share if m not in grid['methods']]
        if bad:
            raise GridError(f'share_images: unknown method(s) {bad}')
    elif not isinstance(share, bool):
        raise GridError(f'share_images must be True, False or a list of '
                        f'method names, got {share!r}')
    grid['share_images'] = share
    return grid


def _digest(obj, n=10):
    text = json.dumps(obj, sort_keys=True, separators=(',', ':'))
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def cell_hash(definition):
    """Short SHA-256 of a cell's definition (canonical JSON)."""
    return _digest(definition)


def _stem(config):
    stem = osp.splitext(osp.basename(config))[0]
    return re.sub(r'_w\d+a\d+$', '', stem)


def expand(grid):
    """The cells of the grid, in a fixed order (config, method, seed,
    num_images, bits): each a dict with ``definition`` (what the hash
    covers), ``hash``, ``group`` (the hash without the bits), ``name``,
    ``work_dir``, ``index``, ``group_index``, ``eval_fp``, ``share``."""
    cells, groups, models = [], {}, set()
    for entry in grid['configs']:
        for method, over in grid['methods'].items():
            for seed in grid['seeds']:
                for num in grid['num_images']:
                    for bits, wa in grid['bits'].items():
                        definition = dict(
                            config=entry['config'],
                            checkpoint=entry['checkpoint'],
                            method=method,
                            synthesizer=over['synthesizer'],
                            adapter=over['adapter'],
                            bits=bits, **wa,
                            quantizer=grid['quantizer'],
                            quantizer_setting=grid['quantizer_setting'],
                            seed=seed, num_images=num,
                            options=grid['options'])
                        group_def = {k: v for k, v in definition.items()
                                     if k not in ('bits', 'w_bits',
                                                  'a_bits')}
                        h, g = cell_hash(definition), cell_hash(group_def)
                        groups.setdefault(g, len(groups))
                        model = (entry['config'], entry['checkpoint'])
                        eval_fp = grid['eval_fp'] is True or (
                            grid['eval_fp'] == 'first' and
                            model not in models)
                        models.add(model)
                        share = grid['share_images']
                        name = (f'{_stem(entry["config"])}-{method}-{bits}'
                                f'-s{seed}-n{num}-{h}')
                        cells.append(dict(
                            definition=definition, hash=h, group=g,
                            name=name, index=len(cells),
                            group_index=groups[g],
                            work_dir=osp.join(grid['work_dir'], name),
                            eval_fp=eval_fp,
                            published=entry['published'],
                            share=share is True or (
                                isinstance(share, (list, tuple)) and
                                method in share)))
    return cells


def parse_shard(text):
    """``'i/n'`` -> ``(i, n)``, 0 <= i < n."""
    m = re.match(r'^(\d+)/(\d+)$', str(text))
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise GridError(f'--shard must be i/n with 0 <= i < n, got {text!r}')
    return int(m.group(1)), int(m.group(2))


def shard_cells(cells, shard):
    """The cells of shard ``(i, n)``: synthesis group ``g`` (in expansion
    order) goes to shard ``g % n``, so a group never spans shards."""
    if shard is None:
        return list(cells)
    i, n = shard
    return [c for c in cells if c['group_index'] % n == i]


# ----------------------------------------------------------------- commands
def cell_options(cell, grid, load_images=None):
    """The flat ``--cfg-options`` dict of a cell."""
    d = cell['definition']
    flat = {}
    flatten('dfq.synthesizer', d['synthesizer'], flat)
    flat['dfq.synthesizer.seed'] = d['seed']
    flat['dfq.synthesizer.num_images'] = d['num_images']
    if d['adapter'] is None:
        flat['dfq.adapter'] = None
    else:
        # whatever the config's own method fragment adapts with
        flatten('dfq.adapter', dict(d['adapter'], _delete_=True), flat)
        flat['dfq.adapter.seed'] = d['seed']
    if d['quantizer_setting'] is not None:
        flatten('dfq.quantizer', dict(d['quantizer_setting'],
                                      _delete_=True), flat)
    flat['dfq.quantizer.w_bits'] = d['w_bits']
    flat['dfq.quantizer.a_bits'] = d['a_bits']
    for key, value in d['options'].items():
        flatten(key, value, flat)
    if load_images:
        flat['dfq.load_images'] = load_images
    return flat


def cell_argv(cell, grid, load_images=None):
    """The ``tools/dfq_test.py`` argv of a cell (without the script)."""
    d = cell['definition']
    argv = [d['config']]
    if d['checkpoint']:
        argv.append(d['checkpoint'])
    argv += ['--work-dir', cell['work_dir']]
    if cell['eval_fp']:
        argv.append('--eval-fp')
    argv += ['--cfg-options',
             *option_pairs(cell_options(cell, grid, load_images),
                           f'cell {cell["name"]}')]
    return argv


def check_grid_options(grid, cells):
    """Every cell's options survive the command line (one GridError
    otherwise); checked once per group and bit setting."""
    seen = set()
    for cell in cells:
        key = (cell['definition']['method'], cell['definition']['bits'])
        if key not in seen:
            seen.add(key)
            option_pairs(cell_options(cell, grid, 'x'), f'cell '
                         f'{cell["name"]}')


def image_sources(cells):
    """``{cell name: work dir whose images it loads, or None}`` for the
    planned chain: the first cell of every sharing group synthesizes."""
    first, out = {}, {}
    for cell in cells:
        if not cell['share']:
            out[cell['name']] = None
            continue
        src = first.setdefault(cell['group'], cell)
        out[cell['name']] = None if src is cell else src['work_dir']
    return out


def has_images(work_dir):
    return osp.isfile(osp.join(work_dir, SYNTH_FILE))


# ----------------------------------------------------------------- state
def read_results(cell):
    path = osp.join(cell['work_dir'], RESULTS)
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def is_finished(cell, results=None):
    """A finished cell has a ``dfq_results.json`` that records its hash
    (stamped by :func:`run_cells`), or -- run from a printed command --
    records none but the cell's bits, seed, image count and config."""
    results = read_results(cell) if results is None else results
    if not isinstance(results, dict):
        return False
    stamp = results.get('cell')
    if isinstance(stamp, dict):
        return stamp.get('hash') == cell['hash']
    d = cell['definition']
    try:
        return (results['w_bits'], results['a_bits'], results['seed'],
                results['num_images']) == (d['w_bits'], d['a_bits'],
                                           d['seed'], d['num_images']) and \
            _repo_path(results['config'])[1] == d['config']
    except (KeyError, TypeError):
        return False


def export(collected, out_dir):
    """Write every cell of ``collected`` (what :func:`collect` returns) as
    ``<out_dir>/<cell name>.json`` (``{cell, results}``), so that a matrix
    is committed cell by cell as it finishes; returns the paths written."""
    from ..utils.fileio import write_json_atomic
    paths = []
    for item in collected['cells']:
        path = osp.join(out_dir, item['cell']['name'] + '.json')
        write_json_atomic(path, item)
        paths.append(path)
    return paths


def load_exported(folder):
    """The cells exported by :func:`export` into ``folder``, as a
    collected dict (in the grid's cell order); GridError on a file that is
    not an exported cell."""
    cells = []
    for name in sorted(os.listdir(folder)):
        if not name.endswith('.json'):
            continue
        with open(osp.join(folder, name)) as f:
            item = json.load(f)
        if not isinstance(item, dict) or set(item) != {'cell', 'results'} \
                or item['cell'].get('schema') != SCHEMA:
            raise GridError(f'{osp.join(folder, name)} is not an exported '
                            'matrix cell')
        cells.append(item)
    cells.sort(key=lambda c: c['cell']['index'])
    return dict(schema=COLLECT_SCHEMA, grid=None, work_dir=None,
                num_cells=len(cells), cells=cells, missing=[])


def cell_record(cell, load_images=None):
    """What ``cell.json`` holds."""
    return dict(schema=SCHEMA, name=cell['name'], hash=cell['hash'],
                group=cell['group'], index=cell['index'],
                work_dir=cell['work_dir'], eval_fp=cell['eval_fp'],
                published=cell['published'], images_from=load_images,
                definition=cell['definition'])


def print_commands(grid, cells, python='python'):
    """Shell lines of the cells; finished ones commented out."""
    sources = image_sources(cells)
    lines = []
    for cell in cells:
        argv = cell_argv(cell, grid, sources[cell['name']])
        line = shlex.join([python, 'tools/dfq_test.py', *argv])
        lines.append(('# finished: ' if is_finished(cell) else '') + line)
    return lines


def run_cells(grid, cells, run_argv, log=print):
    """Run the cells one after another in this process.

    ``run_argv(argv)`` runs one ``dfq_test`` argv and returns its exit code
    (0: done).  Finished cells are skipped; a cell killed earlier re-runs
    in its work dir (its synthesis resumes from the finished batches).  A
    group's images come from the first cell of the group that has them;
    where none has, the cell synthesizes itself.  A failed cell is logged
    and the next one runs.  Returns ``dict(ran, skipped, failed)`` (cell
    names).
    """
    from ..utils.fileio import write_json_atomic
    source = {}
    summary = dict(ran=[], skipped=[], failed=[])
    for pos, cell in enumerate(cells, 1):
        src = source.get(cell['group']) if cell['share'] else None
        if is_finished(cell):
            log(f'[run_matrix] {pos}/{len(cells)} {cell["name"]}: finished, '
                'skipped')
            summary['skipped'].append(cell['name'])
            if cell['share'] and src is None and has_images(cell['work_dir']):
                source[cell['group']] = cell['work_dir']
            continue
        load = src if src and has_images(src) else None
        argv = cell_argv(cell, grid, load)
        write_json_atomic(osp.join(cell['work_dir'], CELL_FILE),
                          cell_record(cell, load))
        log(f'[run_matrix] {pos}/{len(cells)} {cell["name"]}: '
            + shlex.join(['tools/dfq_test.py', *argv]))
        start = time.time()
        try:
            code = run_argv(argv)
        except Exception:  # noqa: BLE001  (one cell; the grid goes on)
            log(traceback.format_exc())
            code = 1
        results = read_results(cell)
        if code == 0 and isinstance(results, dict):
            results['cell'] = dict(hash=cell['hash'], name=cell['name'],
                                   group=cell['group'])
            write_json_atomic(osp.join(cell['work_dir'], RESULTS), results)
            summary['ran'].append(cell['name'])
            log(f'[run_matrix] {cell["name"]}: done in '
                f'{time.time() - start:.0f}s')
        else:
            summary['failed'].append(cell['name'])
            log(f'[run_matrix] {cell["name"]}: FAILED (exit {code})')
        if cell['share'] and load is None and has_images(cell['work_dir']):
            source.setdefault(cell['group'], cell['work_dir'])
    return summary


def collect(grid, cells):
    """Every finished cell's ``dfq_results.json`` with its definition."""
    out = dict(schema=COLLECT_SCHEMA, grid=grid['path'],
               work_dir=grid['work_dir'], num_cells=len(cells), cells=[],
               missing=[])
    for cell in cells:
        results = read_results(cell)
        if not is_finished(cell, results):
            out['missing'].append(cell['name'])
            continue
        out['cells'].append(dict(cell=cell_record(
            cell, results.get('images_from')), results=results))
    return out
