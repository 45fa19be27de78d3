"""tools/leaderboard.py on synthetic collected JSON: statistics, flags,
published rows and deltas, checkpoint flag, calibration-size curve and the
consistency of the three outputs."""
import csv
import io
import json
import os.path as osp
import subprocess
import sys

import numpy as np
import pytest

from dfq_dense.report import leaderboard as lb

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
ZOO = 'mask_rcnn_swin-t-p4-w7_fpn_ms-crop-3x_coco_20210906_131725-bacf6f7b.pth'

# (method name, type, bits, images, seed) -> (bbox, segm) on CocoMetric's
# 0-1 scale
DET = {
    ('noise', 'GaussianNoise', 4, 8, 0): (0.300, 0.280),
    ('noise', 'GaussianNoise', 4, 8, 1): (0.310, 0.282),
    ('noise', 'GaussianNoise', 4, 8, 2): (0.305, 0.290),
    ('psaq', 'PSAQViT', 4, 8, 0): (0.330, 0.300),
    ('psaq', 'PSAQViT', 4, 8, 1): (0.338, 0.301),
    ('psaq', 'PSAQViT', 4, 8, 2): (0.334, 0.305),
    ('v2', 'PSAQViTV2', 4, 8, 0): (0.332, 0.299),
    ('v2', 'PSAQViTV2', 4, 8, 1): (0.335, 0.303),
    ('psaq', 'PSAQViT', 4, 1, 0): (0.250, 0.240),
    ('psaq', 'PSAQViT', 4, 1, 1): (0.270, 0.250),
    ('psaq', 'PSAQViT', 4, 2, 0): (0.290, 0.260),
    ('psaq', 'PSAQViT', 4, 2, 1): (0.300, 0.270),
    ('psaq', 'PSAQViT', 6, 8, 0): (0.440, 0.400),
}
FP = {'coco/bbox_mAP': 0.460, 'coco/segm_mAP': 0.416}


def _cell(method, mtype, bits, n, seed, metrics, config, ckpt, sha,
          fp=None, task='instance_segmentation'):
    name = f'{method}-w{bits}a{bits}-s{seed}-n{n}'
    definition = dict(config=config, checkpoint=None, method=method,
                      synthesizer=dict(type=mtype), bits=f'w{bits}a{bits}',
                      w_bits=bits, a_bits=bits, quantizer='percentile',
                      quantizer_setting={}, seed=seed, num_images=n,
                      options={})
    return dict(cell=dict(name=name, hash=name, definition=definition,
                          published=None),
                results=dict(task=task, config=config, method=mtype,
                             checkpoint=dict(path=ckpt, sha256=sha),
                             w_bits=bits, a_bits=bits, seed=seed,
                             num_images=n, metrics=metrics, fp_metrics=fp))


def _collected(ckpt=f'/ckpts/{ZOO}'):
    cells = []
    for i, ((m, t, b, n, s), (box, mask)) in enumerate(DET.items()):
        cells.append(_cell(m, t, b, n, s, {'coco/bbox_mAP': box,
                                           'coco/segm_mAP': mask,
                                           'coco/bbox_mAP_50': 0.5},
                           'configs/mask_rcnn_swin_t_w8a8.py', ckpt,
                           'ab' * 32, fp=dict(FP) if i == 0 else None))
    cells.append(_cell('noise', 'GaussianNoise', 8, 8, 0, {'mIoU': 40.0},
                       'configs/demo/upernet_swin_demo_w8a8.py',
                       'dfq_dense/demo/checkpoints/upernet_swin_demo.pth',
                       'cd' * 32, fp={'mIoU': 41.5},
                       task='semantic_segmentation'))
    return dict(schema='dfq-dense/matrix-collect/1', grid='g.py',
                num_cells=len(cells) + 1, cells=cells, missing=['x'])


@pytest.fixture(scope='module')
def entries():
    from dfq_dense.zoo.published import load_published
    return load_published()


@pytest.fixture(scope='module')
def board(entries):
    return lb.build(_collected(), entries)


def _model(board, label):
    return next(m for m in board['models'] if m['label'] == label)


def _section(model, bits):
    return next(s for s in model['bits'] if s['bits'] == bits)


def _row(section, method, n=8):
    return next(r for r in section['rows']
                if r['method'] == method and r['num_images'] == n)


def test_mean_std_against_numpy(board):
    det = _model(board, 'mask_rcnn_swin_t_w8a8')
    w4 = _section(det, 'W4A4')
    for method in ('noise', 'psaq', 'v2'):
        row = _row(w4, method)
        draws = [v for k, v in DET.items() if k[0] == method and k[2] == 4
                 and k[3] == 8]
        assert row['n_seeds'] == len(draws)
        assert row['seeds'] == sorted(k[4] for k in DET if k[0] == method
                                      and k[2] == 4 and k[3] == 8)
        for j, key in enumerate(('coco/bbox_mAP', 'coco/segm_mAP')):
            x = 100 * np.array([d[j] for d in draws])
            m = row['metrics'][key]
            assert m['draws'] == pytest.approx(list(x))
            assert m['mean'] == pytest.approx(x.mean())
            assert m['std'] == pytest.approx(x.std(ddof=1))
            assert m['drop'] == pytest.approx(100 * FP[key] - x.mean())
        assert 'coco/bbox_mAP_50' not in row['metrics']
    single = _row(_section(det, 'W6A6'), 'psaq')
    assert single['n_seeds'] == 1
    assert single['metrics']['coco/bbox_mAP']['std'] is None
    assert det['fp'] == {k: pytest.approx(100 * v) for k, v in FP.items()}
    # bit sections ordered from high to low bits
    assert [s['bits'] for s in det['bits']] == ['W6A6', 'W4A4']


def test_within_spread_flag(board):
    w4 = _section(_model(board, 'mask_rcnn_swin_t_w8a8'), 'W4A4')
    noise, psaq, v2 = (_row(w4, m) for m in ('noise', 'psaq', 'v2'))
    key = 'coco/bbox_mAP'
    assert psaq['metrics'][key]['is_best']
    assert psaq['metrics'][key]['within_spread_best'] is None
    # hand-computed: psaq 33.4 +- 0.4, v2 33.35 +- 0.212, noise 30.5 +- 0.5
    assert v2['metrics'][key]['within_spread_best'] is True
    assert psaq['metrics'][key]['within_spread_noise'] is False
    assert noise['metrics'][key]['within_spread_noise'] is None
    assert noise['metrics'][key]['within_spread_best'] is False
    assert v2['metrics'][key]['best_method'] == 'psaq'
    a = dict(mean=1.0, std=0.5)
    assert lb.within_spread(a, dict(mean=1.5, std=0.1)) is True
    assert lb.within_spread(a, dict(mean=1.51, std=0.1)) is False
    assert lb.within_spread(a, dict(mean=1.0, std=None)) is None
    assert '|mean difference| <= the larger of the two stds' in \
        board['spread_rule']


def test_published_rows_and_deltas(board):
    det = _model(board, 'mask_rcnn_swin_t_w8a8')
    assert det['published_fp']['id'] == 'fp_mmdet_mask-rcnn_swin-t_3x'
    w4 = _section(det, 'W4A4')
    (pub, ) = w4['published']
    assert pub['id'] == 'repq-vit_mask-rcnn_swin-t_w4a4'
    assert pub['metrics'] == dict(box_ap=36.1, mask_ap=36.0)
    # the RepQ-ViT figure is on the official checkpoint, the suite ran the
    # mmdet-zoo one
    assert pub['checkpoint_differs'] is True
    c = next(c for c in pub['comparisons'] if c['method'] == 'psaq' and
             c['num_images'] == 8 and c['metric'] == 'coco/bbox_mAP')
    assert c['suite'] == pytest.approx(33.4)
    assert c['delta'] == pytest.approx(33.4 - 36.1)
    assert c['suite_drop'] == pytest.approx(46.0 - 33.4)
    assert c['published_drop'] == pytest.approx(46.0 - 36.1)
    assert c['drop_delta'] == pytest.approx((46.0 - 33.4) - (46.0 - 36.1))
    assert c['same_method'] is False
    mask = next(c for c in pub['comparisons'] if c['method'] == 'noise' and
                c['metric'] == 'coco/segm_mAP')
    assert mask['delta'] == pytest.approx(
        100 * np.mean([0.280, 0.282, 0.290]) - 36.0)
    assert _section(det, 'W6A6')['published'][0]['id'] == \
        'repq-vit_mask-rcnn_swin-t_w6a6'
    # the demo model has no published entry
    seg = _model(board, 'upernet_swin_demo_w8a8')
    assert seg['published_fp'] is None
    assert all(not s['published'] for s in seg['bits'])
    assert seg['fp'] == {'mIoU': 41.5}
    assert _row(seg['bits'][0], 'noise')['metrics']['mIoU']['mean'] == 40.0


def test_checkpoint_differs_flag(entries):
    # the suite on the official checkpoint file: same file as RepQ-ViT's
    official = 'mask_rcnn_swin_tiny_patch4_window7.pth'
    board = lb.build(_collected(ckpt=f'/x/{official}'), entries)
    det = _model(board, 'mask_rcnn_swin_t_w8a8')
    assert det['published_fp']['id'] == 'fp_official_mask-rcnn_swin-t_3x'
    pub = _section(det, 'W4A4')['published'][0]
    assert pub['checkpoint_differs'] is False
    # a renamed (converted) checkpoint: matched through the grid's id
    data = _collected(ckpt='/x/converted.pth')
    for item in data['cells']:
        if 'mask_rcnn' in item['cell']['definition']['config']:
            item['cell']['published'] = 'fp_official_mask-rcnn_swin-t_3x'
    det = _model(lb.build(data, entries), 'mask_rcnn_swin_t_w8a8')
    assert _section(det, 'W4A4')['published'][0]['checkpoint_differs']
    assert det['checkpoint']['file'] == 'converted.pth'


def test_calibration_size_curve(board):
    det = _model(board, 'mask_rcnn_swin_t_w8a8')
    curves = {(c['bits'], c['method'], c['metric']): c
              for c in det['curves']}
    assert set(curves) == {('W4A4', 'psaq', 'coco/bbox_mAP'),
                           ('W4A4', 'psaq', 'coco/segm_mAP')}
    pts = curves[('W4A4', 'psaq', 'coco/bbox_mAP')]['points']
    assert [p['num_images'] for p in pts] == [1, 2, 8]
    assert pts[0]['mean'] == pytest.approx(26.0)
    assert pts[0]['std'] == pytest.approx(np.std([25.0, 27.0], ddof=1))
    assert pts[2]['n_seeds'] == 3


def test_outputs_consistent(tmp_path, board):
    col = tmp_path / 'collected.json'
    col.write_text(json.dumps(_collected()))
    proc = subprocess.run(
        [sys.executable, 'tools/leaderboard.py', str(col), '--out',
         str(tmp_path / 'lb')], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / 'lb' / 'leaderboard.json').read_text())
    assert data == json.loads(json.dumps(board))
    rows = list(csv.DictReader(io.StringIO(
        (tmp_path / 'lb' / 'leaderboard.csv').read_text())))
    md = (tmp_path / 'lb' / 'leaderboard.md').read_text()
    suite = [r for r in rows if r['kind'] == 'suite']
    n_suite = sum(len(r['metrics']) for m in data['models']
                  for s in m['bits'] for r in s['rows'])
    assert len(suite) == n_suite
    n_pub = sum(len(p['comparisons']) for m in data['models']
                for s in m['bits'] for p in s['published'])
    assert len(rows) - len(suite) == n_pub
    for r in suite:
        model = next(m for m in data['models'] if m['label'] == r['model'])
        row = _row(_section(model, r['bits']), r['method'],
                   int(r['num_images']))
        m = row['metrics'][r['metric']]
        assert float(r['mean']) == pytest.approx(m['mean'])
        assert (r['std'] == '') == (m['std'] is None)
        assert [float(x) for x in r['draws'].split(';')] == \
            pytest.approx(m['draws'])
        # the Markdown cell shows the same figures
        text = (f'{m["mean"]:.2f} ± {lb.fmt(m["std"]) or "n/a"} '
                f'({row["n_seeds"]})')
        assert text in md
    for r in rows:
        if r['kind'] == 'published':
            assert f'| {r["method"]} | {r["num_images"]} |' in md
            assert f'{float(r["delta"]):.2f} |' in md
            assert r['checkpoint_differs'] == 'True'
    assert lb.UNITS in md and lb.SPREAD_RULE in md
    assert 'differs from the suite' in md
    assert 'Calibration size, W4A4 psaq (box AP): 1 images 26.00 ± 1.41 (2)'\
        in md
    assert data['units'] == lb.UNITS


def test_bad_input_one_line(tmp_path):
    bad = tmp_path / 'bad.json'
    bad.write_text('{"nope": 1}')
    proc = subprocess.run(
        [sys.executable, 'tools/leaderboard.py', str(bad), '--out',
         str(tmp_path / 'lb')], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith('leaderboard: error:')
    assert proc.stderr.count('\n') == 1
