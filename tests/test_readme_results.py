"""The README's demo result tables are renderings of committed JSON
(results/demo/...) by the scripts that measured them."""
import glob
import json
import os.path as osp
import sys

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, osp.join(REPO, 'tools'))


def _block(name):
    with open(osp.join(REPO, 'README.md')) as f:
        text = f.read()
    start = text.index(f'<!-- {name}:start -->\n') + len(
        f'<!-- {name}:start -->\n')
    return text[start:text.index(f'<!-- {name}:end -->')]


def test_student_steps_table_matches_its_json():
    import measure_student_steps as tool
    results = []
    for model in tool.MODELS:  # seg, det: the order the tool writes
        path = osp.join(REPO, 'results', 'demo', 'student_steps',
                        f'{model}.json')
        if osp.isfile(path):
            with open(path) as f:
                results.append(json.load(f))
    assert results, 'results/demo/student_steps/ holds no measurement'
    assert _block('student-steps') == tool.markdown(results)
    for res in results:
        # what makes the figures reproducible is recorded
        assert res['threads'] >= 1 and res['torch'] and res['git'][0]
        rows = res['rows']
        assert {r['method'] for r in rows} == set(tool.IMAGES)
        for row in rows:
            assert len(row['checkpoint']) == 64 and row['seed'] == 0
            assert 0.0 <= row['weight_codes_changed'] <= 1.0
            if row['adapter'] is None:
                assert row['weight_codes_changed'] == 0.0


def test_demo_leaderboard_matches_the_committed_cells():
    """The README's demo leaderboard is tools/leaderboard.py --readme of
    the committed matrix cells (results/demo/matrix/)."""
    from dfq_dense.report import leaderboard, matrix
    from dfq_dense.zoo.published import load_published
    folder = osp.join(REPO, 'results', 'demo', 'matrix')
    collected = matrix.load_exported(folder)
    assert collected['cells'], 'no committed matrix cells'
    board = leaderboard.build(collected, load_published())
    assert _block('demo-leaderboard') == leaderboard.compact_markdown(board)
    grid = matrix.load_grid(osp.join(REPO, 'configs', 'matrix', 'demo.py'))
    hashes = {c['hash'] for c in matrix.expand(grid)}
    for item in collected['cells']:
        # every committed cell is a cell of the demo grid, with what makes
        # it reproducible
        assert item['cell']['hash'] in hashes
        res = item['results']
        assert len(res['checkpoint']['sha256']) == 64
        assert res['threads'] >= 1 and res['versions']['torch']
        assert res['cell']['hash'] == item['cell']['hash']
    assert len(glob.glob(osp.join(folder, '*.json'))) == \
        len(collected['cells'])


def test_demo_leaderboard_against_the_earlier_table():
    from dfq_dense.report import leaderboard, matrix
    from dfq_dense.zoo.published import load_published
    board = leaderboard.build(
        matrix.load_exported(osp.join(REPO, 'results', 'demo', 'matrix')),
        load_published())
    with open(osp.join(REPO, 'results', 'demo', 'earlier',
                       'method_table_5198c7d.json')) as f:
        earlier = json.load(f)
    assert _block('demo-leaderboard-earlier') == \
        leaderboard.comparison_markdown(board, earlier)


def test_mimiq_rerun_table_matches_the_two_cells():
    """The re-run of one demo cell after MimiQ's loss got its written-out
    gradient, beside the committed matrix cell (same definition)."""
    from dfq_dense.report import cell_comparison_markdown
    name = 'mask_rcnn_swin_demo-mimiq-w4a4-s0-n8-55fd5ae213.json'
    with open(osp.join(REPO, 'results', 'demo', 'matrix', name)) as f:
        before = json.load(f)
    with open(osp.join(REPO, 'results', 'demo', 'mimiq_fused_ssim',
                       name)) as f:
        after = json.load(f)
    assert _block('mimiq-rerun') == cell_comparison_markdown(
        before, after, ('autograd form (matrix)', 'written-out gradient'))
