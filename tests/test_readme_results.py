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
    hashes = set()
    for name in ('demo.py', 'demo_sweep.py'):
        grid = matrix.load_grid(osp.join(REPO, 'configs', 'matrix', name))
        hashes |= {c['hash'] for c in matrix.expand(grid)}
    # the demo grid and its calibration-size sweep, every cell committed
    assert {item['cell']['hash'] for item in collected['cells']} == hashes
    for item in collected['cells']:
        # with what makes it reproducible
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


def test_demo_leaderboard_statements_hold():
    """The README's statements under the demo leaderboard, against the
    committed cells (3 seeds; "beyond" = the mean difference exceeds the
    larger std, "within" = it does not)."""
    from dfq_dense.report import leaderboard, matrix
    from dfq_dense.zoo.published import load_published
    board = leaderboard.build(matrix.load_exported(
        osp.join(REPO, 'results', 'demo', 'matrix')), load_published())

    def cells(label, key):
        m = next(m for m in board['models'] if label in m['label'])
        out = {}
        for sec in m['bits']:
            for r in sec['rows']:
                assert r['n_seeds'] == 3, (sec['bits'], r['method'])
                s = r['metrics'][key]
                out[(sec['bits'], r['method'], r['num_images'])] = (
                    s['mean'], s['std'])
        return out

    def beyond(a, b):  # a above b by more than the larger std
        return a[0] - b[0] > max(a[1], b[1])

    def within(a, b):
        return abs(a[0] - b[0]) <= max(a[1], b[1])

    det = cells('mask_rcnn', 'coco/bbox_mAP')
    seg = cells('upernet', 'mIoU')
    free = ['psaq', 'psaq_v2', 'mimiq', 'spdfq']
    bits = ['W8A8', 'W6A6', 'W4A8', 'W4A4']
    # Mask R-CNN
    for b in bits:
        for m in free:
            assert beyond(det[(b, m, 8)], det[(b, 'noise', 8)]), (b, m)
            gap = det[(b, m, 8)][0] - det[(b, 'noise', 8)][0]
            assert 0.65 <= gap <= 1.85, (b, m, gap)  # +0.7 to +1.8
    for b in ('W8A8', 'W6A6', 'W4A4'):
        assert within(det[(b, 'psaq_v2', 8)], det[(b, 'psaq', 8)]), b
    assert beyond(det[('W4A8', 'psaq', 8)], det[('W4A8', 'psaq_v2', 8)])
    assert beyond(det[('W6A6', 'real', 8)], det[('W6A6', 'psaq', 8)])
    assert within(det[('W8A8', 'real', 8)], det[('W8A8', 'psaq', 8)])
    for b in ('W4A8', 'W4A4'):
        assert beyond(det[(b, 'psaq', 8)], det[(b, 'real', 8)]), b
    # UperNet
    for m in free:
        assert beyond(seg[('W4A4', 'noise', 8)], seg[('W4A4', m, 8)]), m
    for m in ('psaq', 'psaq_v2', 'spdfq'):
        assert beyond(seg[('W4A8', 'noise', 8)], seg[('W4A8', m, 8)]), m
    assert within(seg[('W4A8', 'mimiq', 8)], seg[('W4A8', 'noise', 8)])
    for b in ('W8A8', 'W6A6'):
        for m in ('mimiq', 'spdfq'):
            assert beyond(seg[(b, m, 8)], seg[(b, 'noise', 8)]), (b, m)
        for m in ('psaq', 'psaq_v2'):
            assert beyond(seg[(b, 'noise', 8)], seg[(b, m, 8)]), (b, m)
    # calibration size, PSAQ-ViT W4A4
    assert beyond(det[('W4A4', 'psaq', 2)], det[('W4A4', 'psaq', 8)])
    for n in (1, 4):
        assert within(det[('W4A4', 'psaq', n)], det[('W4A4', 'psaq', 8)])
    for n in (2, 8):
        assert beyond(seg[('W4A4', 'psaq', 1)], seg[('W4A4', 'psaq', n)])
