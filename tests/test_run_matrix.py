"""tools/run_matrix.py: grid expansion, skip / re-run, sharding, image
reuse, --print, bad grids and one real two-cell run on the demo."""
import json
import os
import os.path as osp
import shlex
import subprocess
import sys

import pytest

from dfq_dense.report import matrix

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
SEG = 'configs/demo/upernet_swin_demo_w8a8.py'
DET = 'configs/demo/mask_rcnn_swin_demo_w8a8.py'

GRID = f"""
configs = ['{DET}', '{SEG}']
methods = dict(noise=dict(_delete_=True, type='GaussianNoise', batch_size=8),
               psaq=dict(type='PSAQViT', iterations=5),
               v2=dict(synthesizer=dict(_delete_=True, type='PSAQViTV2',
                                        iterations=5),
                       adapter=dict(type='PSAQViTV2Rounds',
                                    student_step=dict(iters=2, lr=1e-4))))
bits = ['w8a8', 'w6a6', 'w4a8', 'w4a4']
quantizer = 'percentile'
seeds = [0, 1, 2]
num_images = [1, 8]
options = {{'test_dataloader.dataset.indices': 4}}
work_dir = '{{work}}'
"""


def _grid(tmp_path, text=GRID, name='grid.py'):
    path = tmp_path / name
    path.write_text(text.replace('{work}', str(tmp_path / 'work')))
    return str(path)


def _cells(tmp_path, text=GRID):
    grid = matrix.load_grid(_grid(tmp_path, text))
    return grid, matrix.expand(grid)


def _tool(*args):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    return subprocess.run([sys.executable, 'tools/run_matrix.py', *args],
                          cwd=REPO, env=env, capture_output=True, text=True)


def test_expansion_counts_hashes_and_names(tmp_path):
    grid, cells = _cells(tmp_path)
    assert len(cells) == 2 * 3 * 4 * 3 * 2
    hashes = [c['hash'] for c in cells]
    assert len(set(hashes)) == len(cells)
    assert len({c['name'] for c in cells}) == len(cells)
    # one synthesis group per config x method x seed x num_images
    assert len({c['group'] for c in cells}) == 2 * 3 * 3 * 2
    c = cells[0]
    assert c['name'] == f'mask_rcnn_swin_demo-noise-w8a8-s0-n1-{c["hash"]}'
    assert c['work_dir'] == osp.join(str(tmp_path / 'work'), c['name'])
    assert len(c['hash']) == 10
    # stable: the same grid from another folder and another cwd
    other = tmp_path / 'other'
    other.mkdir()
    cwd = os.getcwd()
    try:
        os.chdir(other)
        _, again = _cells(other)
    finally:
        os.chdir(cwd)
    assert [x['hash'] for x in again] == hashes
    assert matrix.cell_hash(c['definition']) == c['hash']
    # any change to the definition changes the hash
    changed = dict(c['definition'], options={})
    assert matrix.cell_hash(changed) != c['hash']
    assert c['definition']['w_bits'] == 8 and c['definition']['a_bits'] == 8
    assert c['eval_fp'] and not cells[1]['eval_fp']
    assert sum(x['eval_fp'] for x in cells) == 2  # first cell per model


def test_cell_options_and_load_images_chain(tmp_path):
    grid, cells = _cells(tmp_path)
    group = [c for c in cells if c['group'] == cells[0]['group']]
    assert [c['definition']['bits'] for c in group] == \
        ['w8a8', 'w6a6', 'w4a8', 'w4a4']
    sources = matrix.image_sources(cells)
    assert sources[group[0]['name']] is None
    for c in group[1:]:
        assert sources[c['name']] == group[0]['work_dir']
    argv = matrix.cell_argv(group[2], grid, sources[group[2]['name']])
    pairs = argv[argv.index('--cfg-options') + 1:]
    opts = matrix._parse_options(pairs)
    assert opts['dfq.load_images'] == group[0]['work_dir']
    assert opts['dfq.synthesizer._delete_'] is True
    assert opts['dfq.synthesizer.type'] == 'GaussianNoise'
    assert opts['dfq.synthesizer.seed'] == 0
    assert opts['dfq.synthesizer.num_images'] == 1
    assert (opts['dfq.quantizer.w_bits'], opts['dfq.quantizer.a_bits']) == \
        (4, 8)
    assert opts['dfq.quantizer._delete_'] is True
    assert opts['dfq.quantizer.act.observer.type'] == 'PercentileObserver'
    assert opts['dfq.quantizer.skip'] == []
    assert opts['test_dataloader.dataset.indices'] == 4
    assert argv[:3] == [DET, '--work-dir', group[2]['work_dir']]
    # merged (no _delete_) method: only its keys
    psaq = next(c for c in cells if c['definition']['method'] == 'psaq')
    opts = matrix.cell_options(psaq, grid)
    assert 'dfq.synthesizer._delete_' not in opts
    assert opts['dfq.synthesizer.iterations'] == 5
    # a method without adapter runs without one, whatever the config's
    # fragment says
    assert opts['dfq.adapter'] is None
    # the applied config: the synthesizer, adapter and quantizer of the
    # cell (the seeds axis seeds the adapter too)
    from dfq_dense.engine.runner import load_config
    v2 = next(c for c in cells if c['definition']['method'] == 'v2')
    cfg = load_config(osp.join(REPO, SEG), matrix._parse_options(
        matrix.cell_argv(v2, grid)[matrix.cell_argv(v2, grid).index(
            '--cfg-options') + 1:]))
    assert cfg.dfq.synthesizer.to_dict() == dict(
        type='PSAQViTV2', iterations=5, seed=0, num_images=1)
    assert cfg.dfq.adapter.to_dict() == dict(
        type='PSAQViTV2Rounds', seed=0, student_step=dict(iters=2, lr=1e-4))
    opts = matrix.cell_options(
        next(c for c in cells if c['definition']['method'] == 'v2' and
             c['definition']['seed'] == 2), grid)
    assert opts['dfq.adapter.seed'] == opts['dfq.synthesizer.seed'] == 2
    assert cfg.dfq.quantizer.w_bits == 8
    assert 'percentile' in str(cfg.dfq.quantizer.act.observer).lower()


def test_share_images_off(tmp_path):
    grid, cells = _cells(tmp_path, GRID + "share_images = ['psaq']\n")
    sources = matrix.image_sources(cells)
    for c in cells:
        if c['definition']['method'] != 'psaq':
            assert sources[c['name']] is None


def _fake_results(c, stamp=True, **over):
    d = c['definition']
    res = dict(config=d['config'], w_bits=d['w_bits'], a_bits=d['a_bits'],
               seed=d['seed'], num_images=d['num_images'],
               metrics={'mIoU': 50.0})
    if stamp:
        res['cell'] = dict(hash=c['hash'])
    res.update(over)
    os.makedirs(c['work_dir'], exist_ok=True)
    with open(osp.join(c['work_dir'], 'dfq_results.json'), 'w') as f:
        json.dump(res, f)


def test_skip_finished_and_rerun_killed(tmp_path):
    grid, cells = _cells(tmp_path)
    done, stamped_other, killed, printed_run = cells[:4]
    _fake_results(done)
    _fake_results(stamped_other, cell=dict(hash='0123456789'))
    os.makedirs(osp.join(killed['work_dir'], 'synthetic', 'batches'))
    _fake_results(printed_run, stamp=False)  # run from a --print command
    assert matrix.is_finished(done)
    assert not matrix.is_finished(stamped_other)
    assert not matrix.is_finished(killed)
    assert matrix.is_finished(printed_run)
    _fake_results(cells[4], stamp=False, seed=7)
    assert not matrix.is_finished(cells[4])

    calls = []

    def fake_run(argv):
        work = argv[argv.index('--work-dir') + 1]
        calls.append(argv)
        cell = next(c for c in cells if c['work_dir'] == work)
        _fake_results(cell, stamp=False)
        if not any(a.startswith('dfq.load_images=') for a in argv):
            os.makedirs(osp.join(work, 'synthetic'), exist_ok=True)
            open(osp.join(work, matrix.SYNTH_FILE), 'w').close()
        return 0

    summary = matrix.run_cells(grid, cells[:6], fake_run, log=lambda s: None)
    assert summary['skipped'] == [done['name'], printed_run['name']]
    assert summary['ran'] == [stamped_other['name'], killed['name'],
                              cells[4]['name'], cells[5]['name']]
    # the skipped first cell had no images: the first cell that ran made
    # them, the later ones load them
    ran = {a[a.index('--work-dir') + 1]: a for a in calls}
    assert not any('dfq.load_images' in x
                   for x in ran[stamped_other['work_dir']])
    assert f'dfq.load_images={stamped_other["work_dir"]}' in \
        ran[killed['work_dir']]
    with open(osp.join(killed['work_dir'], 'cell.json')) as f:
        record = json.load(f)
    assert record['hash'] == killed['hash']
    assert record['images_from'] == stamped_other['work_dir']
    assert record['definition'] == killed['definition']
    with open(osp.join(killed['work_dir'], 'dfq_results.json')) as f:
        assert json.load(f)['cell']['hash'] == killed['hash']
    # second call: everything finished
    calls.clear()
    summary = matrix.run_cells(grid, cells[:6], fake_run, log=lambda s: None)
    assert not calls and len(summary['skipped']) == 6
    # a failing cell is reported; the next one runs
    summary = matrix.run_cells(grid, cells[6:8], lambda argv: 3,
                               log=lambda s: None)
    assert summary['failed'] == [cells[6]['name'], cells[7]['name']]

    out = matrix.collect(grid, cells)
    assert len(out['cells']) == 6 and len(out['missing']) == len(cells) - 6
    assert out['cells'][0]['cell']['definition'] == done['definition']


@pytest.mark.parametrize('n', [1, 2, 3, 5, 7])
def test_shards_partition_and_keep_groups(tmp_path, n):
    _, cells = _cells(tmp_path)
    shards = [matrix.shard_cells(cells, (i, n)) for i in range(n)]
    names = [c['name'] for s in shards for c in s]
    assert sorted(names) == sorted(c['name'] for c in cells)
    owner = {}
    for i, s in enumerate(shards):
        for c in s:
            assert owner.setdefault(c['group'], i) == i
    # deterministic
    assert [c['name'] for c in matrix.shard_cells(cells, (0, n))] == \
        [c['name'] for c in shards[0]]


def test_print_output(tmp_path):
    grid = _grid(tmp_path)
    _, cells = _cells(tmp_path)
    _fake_results(cells[0])
    proc = _tool(grid, '--print', '--shard', '1/4')
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    mine = matrix.shard_cells(cells, (1, 4))
    assert len(lines) == len(mine)
    first = shlex.split(lines[0])
    assert first[:3] == ['python', 'tools/dfq_test.py', DET]
    assert first[first.index('--work-dir') + 1] == mine[0]['work_dir']
    assert f'dfq.load_images={mine[0]["work_dir"]}' in shlex.split(lines[1])
    # shard 0 holds the finished first cell: commented out
    proc = _tool(grid, '--print', '--shard', '0/4')
    assert proc.stdout.splitlines()[0].startswith('# finished: python ')
    assert not proc.stdout.splitlines()[1].startswith('#')


@pytest.mark.parametrize('text,message', [
    (GRID + 'colour = 1\n', 'unknown key(s) colour'),
    (GRID.replace("'w6a6'", "'w5a5'"), "bits: unknown fragment 'w5a5'"),
    (GRID.replace("'w6a6'", "'first_last_8bit'"), 'holds no dfq_bits'),
    (GRID.replace(SEG, 'configs/demo/nope.py'),
     'config not found: configs/demo/nope.py'),
    (GRID.replace("quantizer = 'percentile'", "quantizer = 'best'"),
     "quantizers: unknown fragment 'best'"),
    (GRID.replace('seeds = [0, 1, 2]', 'seeds = [0, 0]'), 'twice'),
    (GRID + "options = {'dfq.synthesizer.seed': 3}\n", 'set by the grid'),
    (GRID.replace('iterations=5)', 'iterations=5, seed=1)'),
     'methods.psaq sets seed'),
    (GRID + "options = {'a.b': '1,2'}\n", 'does not survive'),
    ('bits = []\n', 'missing key(s) configs, methods'),
    (GRID.replace("adapter=dict(type='PSAQViTV2Rounds',",
                  "adapter=dict(type='PSAQViTV2Rounds', seed=3,"),
     'methods.v2 sets seed'),
    (GRID.replace("adapter=dict(type=", "adaptor=dict(type="),
     "methods.v2: unknown key(s) ['adaptor']"),
    (GRID.replace("adapter=dict(type='PSAQViTV2Rounds',",
                  "adapter=dict(rounds=1,"),
     'the adapter must be None or a dict with a type'),
])
def test_bad_grid_one_line(tmp_path, text, message):
    proc = _tool(_grid(tmp_path, text), '--list')
    assert proc.returncode == 2
    assert proc.stderr.count('\n') == 1, proc.stderr
    assert proc.stderr.startswith('run_matrix: error: ')
    assert message in proc.stderr


def test_bad_shard(tmp_path):
    proc = _tool(_grid(tmp_path), '--print', '--shard', '4/4')
    assert proc.returncode == 2 and 'shard' in proc.stderr


def test_demo_grids_expand():
    grid = matrix.load_grid(osp.join(REPO, 'configs/matrix/demo.py'))
    cells = matrix.expand(grid)
    assert len(cells) == 2 * 6 * 4 * 3
    assert {c['definition']['synthesizer']['type'] for c in cells} == {
        'GaussianNoise', 'RealImages', 'PSAQViT', 'PSAQViTV2', 'MimiQ',
        'SPDFQ'}
    assert {(c['definition']['method'], (c['definition']['adapter'] or {})
             .get('type')) for c in cells} == {
        ('noise', None), ('real', None), ('psaq', None),
        ('psaq_v2', 'PSAQViTV2Rounds'), ('mimiq', 'MimiQDistill'),
        ('spdfq', 'BlockReconstruction')}
    # every cell's settings are valid for its config (one-line errors)
    from dfq_dense.engine.dfq_config import parse_dfq_config
    from dfq_dense.engine.runner import load_config
    for c in cells[::4]:
        opts = matrix.cell_options(c, grid)
        parse_dfq_config(load_config(osp.join(REPO, c['definition'][
            'config']), matrix._parse_options(
                matrix.option_pairs(opts))).dfq)
    matrix.check_grid_options(grid, cells)
    sweep = matrix.expand(matrix.load_grid(
        osp.join(REPO, 'configs/matrix/demo_sweep.py')))
    assert len(sweep) == 2 * 4 * 3
    # the sweep's 8-image cells are the main grid's cells
    assert {c['hash'] for c in sweep if c['definition']['num_images'] == 8} \
        <= {c['hash'] for c in cells}


def test_real_two_cells_skip_and_reuse(tmp_path, demo_data_root):
    text = f"""
configs = ['{SEG}']
methods = dict(noise=dict(_delete_=True, type='GaussianNoise', batch_size=2))
bits = ['w8a8', 'w4a8']
seeds = [0]
num_images = [2]
options = {{'test_dataloader.dataset.indices': 4}}
eval_fp = False
work_dir = '{{work}}'
"""
    grid = _grid(tmp_path, text)
    proc = _tool(grid, '--run')
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert '2 ran, 0 already finished, 0 failed' in proc.stdout
    _, cells = _cells(tmp_path, text)
    first, second = cells
    res = [json.load(open(osp.join(c['work_dir'], 'dfq_results.json')))
           for c in cells]
    assert [r['cell']['hash'] for r in res] == [first['hash'],
                                                second['hash']]
    assert [(r['w_bits'], r['a_bits']) for r in res] == [(8, 8), (4, 8)]
    assert 'images_from' not in res[0]
    assert res[1]['images_from'] == osp.join(first['work_dir'],
                                             matrix.SYNTH_FILE)
    assert res[1]['num_images'] == 2 and res[1]['seed'] == 0
    assert osp.isfile(osp.join(second['work_dir'], 'cell.json'))
    proc = _tool(grid, '--run', '--collect', str(tmp_path / 'all.json'))
    assert proc.returncode == 0, proc.stderr
    assert '0 ran, 2 already finished' in proc.stdout
    out = json.load(open(tmp_path / 'all.json'))
    assert [c['results']['run_id'] for c in out['cells']] == \
        [r['run_id'] for r in res]
    # exported cell by cell (what results/ commits), read back as the
    # collected file, and the leaderboard reads the folder
    proc = _tool(grid, '--export', str(tmp_path / 'cells'))
    assert proc.returncode == 0 and 'exported 2 of 2' in proc.stdout
    assert sorted(os.listdir(tmp_path / 'cells')) == sorted(
        c['name'] + '.json' for c in cells)
    back = matrix.load_exported(str(tmp_path / 'cells'))
    assert back['cells'] == out['cells']
    board = subprocess.run(
        [sys.executable, osp.join(REPO, 'tools', 'leaderboard.py'),
         str(tmp_path / 'cells'), '--out', str(tmp_path / 'board')],
        capture_output=True, text=True, cwd=REPO)
    assert board.returncode == 0, board.stderr
    assert osp.isfile(tmp_path / 'board' / 'leaderboard.md')
    (tmp_path / 'cells' / 'junk.json').write_text('{}')
    with pytest.raises(matrix.GridError, match='not an exported'):
        matrix.load_exported(str(tmp_path / 'cells'))
