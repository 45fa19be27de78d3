"""The benchmark harness (``tools/benchmark.py``), its ``synthesis`` section
on the demo's Swin backbone at 64x64 (seconds), and the JSON / Markdown it
writes.  Nothing here asserts a speed."""
import json
import os.path as osp
import subprocess
import sys

import pytest

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, osp.join(REPO, 'tools'))
import benchmark  # noqa: E402

from dfq_dense.bench import synthesis  # noqa: E402
from dfq_dense.bench.common import section_of  # noqa: E402

LOSSES = {
    'psaq_vit': ['pse', 'tv'],
    'psaq_vit_v2': ['entropy', 'discrepancy', 'tv'],
    'mimiq': ['head_similarity', 'pseudo_label', 'tv'],
    'spdfq': ['apa', 'soft_label', 'tv'],
}
REPEATS = 3


@pytest.fixture(scope='module')
def synthesis_run(tmp_path_factory):
    """Every method on the demo backbone at 64x64, batch 1 measured and
    batch 2 skipped (a memory limit below any need: batch 1 has nothing to
    extrapolate from and runs, batch 2 is extrapolated from it)."""
    out = tmp_path_factory.mktemp('bench') / 'synthesis.json'
    code = benchmark.main([
        'synthesis', '--backbones', 'demo', '--sizes', '64x64',
        '--batches', '1', '2', '--repeats', str(REPEATS), '--isolate',
        'none', '--memory-limit-gb', '0.001', '--device', 'cpu', '--out',
        str(out)])
    assert code == 0
    with open(out) as f:
        data = json.load(f)
    return section_of(data, 'synthesis')


def _ok(section):
    return [r for r in section['rows'] if r['status'] == 'ok']


def test_synthesis_json_schema(synthesis_run):
    sec = synthesis_run
    env = sec['environment']
    for key in ('device_name', 'host_cpu', 'torch_threads', 'torch', 'mmcv',
                'mmdet', 'mmseg', 'git_commit'):
        assert key in env, key
    assert env['device'] == 'cpu' and env['device_name'].startswith('CPU ')
    assert sec['repeats'] == REPEATS and sec['warmup'] == 1
    assert 'RSS' in sec['memory_measure']
    assert [(r['method'], r['batch']) for r in sec['rows']] == [
        (m, b) for m in synthesis.METHODS for b in (1, 2)]
    ok = _ok(sec)
    assert [r['method'] for r in ok] == list(synthesis.METHODS)
    for r in ok:
        names = [t['name'] for t in r['terms']]
        kinds = {t['name']: t['kind'] for t in r['terms']}
        assert [n for n in names if kinds[n] == 'loss'] == \
            LOSSES[r['method']] == r['loss_terms']
        assert {'forward', 'backward', 'step'} <= set(names)
        assert set(r['median_s']) == set(r['share']) == set(names)
        assert all(v >= 0 for v in r['median_s'].values())
        assert len(r['runs']['split']) == len(r['runs']['plain']) == REPEATS
        assert r['size'] == [64, 64] and r['batch'] == 1
        assert r['plain_iteration_s'] > 0 and r['iteration_s'] > 0
        assert r['memory']['peak_bytes'] is not None
        assert r['max_loss_term'] in r['loss_terms']
        assert isinstance(r['meets_loss_target'], bool)
        # the method's published settings were read
        assert r['settings']['source']
    spdfq = next(r for r in ok if r['method'] == 'spdfq')
    assert {'msr_crop_forward', 'msr_crop_backward'} <= set(spdfq['median_s'])
    v2 = next(r for r in ok if r['method'] == 'psaq_vit_v2')
    assert 'student_forward' in v2['median_s']
    psaq = next(r for r in ok if r['method'] == 'psaq_vit')
    assert psaq['settings']['bandwidth'] == 0.01
    assert psaq['settings']['num_points'] == 10


def test_split_terms_sum_to_the_whole_iteration(synthesis_run):
    for r in _ok(synthesis_run):
        names = [t['name'] for t in r['terms']]
        for run in r['runs']['split']:
            # the terms partition the split iteration
            assert sum(run[n] for n in names) == pytest.approx(
                run['iteration'], rel=1e-6, abs=1e-6)
        # (split and plain iterations are reported side by side, not
        # compared here: timings are not asserted)
        assert r['plain_iteration_s'] > 0
        assert abs(r['unattributed_s']) < 1e-6


def test_skipped_rows_are_reported_with_their_need(synthesis_run):
    skipped = [r for r in synthesis_run['rows'] if r['status'] != 'ok']
    assert [r['batch'] for r in skipped] == [2] * len(synthesis.METHODS)
    limit = synthesis_run['memory_limit_bytes']
    for r in skipped:
        assert r['status'] == 'skipped'
        assert r['reason'].startswith('skipped: needs ~')
        assert r['needs_bytes'] > limit
        est = r['estimate']
        assert est['from_row'] == dict(size=[64, 64], batch=1, probe=False)
        assert est['per_image_bytes'] >= 0
    md = synthesis.markdown(synthesis_run)
    assert md.count('skipped: needs ~') == len(skipped)


def test_markdown_renders_the_json(synthesis_run):
    md = synthesis.markdown(synthesis_run)
    head, table, sentence = md.split('\n\n')
    assert synthesis_run['environment']['device_name'] in head
    lines = table.splitlines()
    assert len(lines) == 2 + len(synthesis_run['rows'])
    assert lines[0].startswith('| method | backbone | size | batch |')
    for r, line in zip(synthesis_run['rows'], lines[2:]):
        assert line.startswith(f'| {r["method_name"]} | Swin demo | 64x64 '
                               f'| {r["batch"]} |')
        if r['status'] == 'ok':
            assert f'| {r["iteration_s"]:.3f} |' in line
            for n in r['loss_terms']:
                assert f'({100 * r["share"][n]:.1f}%)' in line
    assert sentence.startswith('Target: each prior loss at most 10%')
    assert 'No row at 800x1333' in sentence


def _row(method, size, batch, status='ok', shares=None, reason=None):
    shares = shares or {'pse': 0.05, 'tv': 0.01}
    row = dict(method=method, method_name=synthesis.METHODS[method],
               backbone='swin_t', backbone_name='Swin-T',
               config='configs/mask_rcnn_swin_t_w8a8.py', size=size,
               batch=batch, status=status)
    if status != 'ok':
        return dict(row, reason=reason)
    terms = [dict(name='forward', kind='forward', label='forward')] + [
        dict(name=n, kind='loss', label=synthesis.LABELS[n])
        for n in shares] + [
        dict(name='backward', kind='backward', label='backward'),
        dict(name='step', kind='step', label='step')]
    med = dict({n: s * 10 for n, s in shares.items()}, forward=4.,
               backward=5., step=0.1)
    top = max(shares, key=shares.get)
    return dict(row, terms=terms, median_s=med,
                share=dict(shares, forward=0.4, backward=0.5, step=0.01),
                iteration_s=10., plain_iteration_s=10.,
                loss_terms=list(shares), max_loss_term=top,
                max_loss_share=shares[top],
                meets_loss_target=max(shares.values()) <= 0.10,
                memory=dict(peak_bytes=3 * 2**30, baseline_bytes=2**30,
                            after_build_bytes=2**30))


def test_target_sentence_is_computed_from_the_rows():
    rows = [
        _row('psaq_vit', [800, 1333], 1),
        _row('mimiq', [800, 1333], 1,
             shares={'head_similarity': 0.31, 'pseudo_label': 0.01,
                     'tv': 0.002}),
        _row('psaq_vit', [800, 1333], 8, status='skipped',
             reason='skipped: needs ~30.0 GB (limit 12.0 GB)'),
        _row('psaq_vit', [224, 224], 1, shares={'pse': 0.5, 'tv': 0.1}),
    ]
    result = dict(rows=rows, repeats=3, warmup=1, memory_measure='m',
                  target=synthesis.TARGET, environment={})
    text = synthesis.target_sentence(result)
    assert 'Met by 1 of 2 measured rows: PSAQ-ViT Swin-T batch 1 ' \
        '(largest: PSE 5.0%)' in text
    assert 'Not met by 1: MimiQ Swin-T batch 1 (inter-head SSIM 31.0%)' \
        in text
    assert 'Not measured: PSAQ-ViT Swin-T batch 8 (skipped: needs ~30.0 GB' \
        in text
    assert '224x224' not in text  # only the target size counts
    md = synthesis.markdown(result)
    assert '| no (inter-head SSIM 31.0%) |' in md
    assert '| PSAQ-ViT | Swin-T | 800x1333 | 8 | skipped: needs ~30.0 GB ' \
        '(limit 12.0 GB) | - |' in md


def test_memory_estimate_extrapolates_per_image():
    done = [dict(_row('spdfq', [224, 224], 1), memory=dict(
        peak_bytes=100, baseline_bytes=1000, after_build_bytes=5000))]
    spec = dict(method='spdfq', backbone='swin_t', size=[224, 224], batch=8)
    est = synthesis.estimate_need(spec, done)
    assert est['per_image_bytes'] == 100
    assert est['needs_bytes'] == 5000 + 8 * 100
    # another size: scaled by the pixels
    est = synthesis.estimate_need(dict(spec, size=[448, 448], batch=1), done)
    assert est['per_image_bytes'] == 400
    # nothing measured for that method: no estimate
    assert synthesis.estimate_need(dict(spec, method='mimiq'), done) is None
    row = synthesis.skipped(spec, est, 2**30)
    assert row['status'] == 'skipped' and 'limit 1.0 GB' in row['reason']


def test_a_row_in_its_own_process(tmp_path):
    """The CPU default: every row in a fresh process, peak RSS there."""
    out = tmp_path / 's.json'
    assert benchmark.main([
        'synthesis', '--methods', 'psaq_vit', '--backbones', 'demo',
        '--sizes', '64x64', '--batches', '1', '--repeats', '1',
        '--device', 'cpu', '--out', str(out)]) == 0
    with open(out) as f:
        sec = section_of(json.load(f), 'synthesis')
    assert sec['isolation'] == 'process'
    assert 'fresh process' in sec['memory_measure']
    row, = sec['rows']
    assert row['status'] == 'ok' and row['memory']['peak_bytes'] >= 0


def test_sections_share_one_file_and_old_layouts_read(tmp_path):
    from dfq_dense.bench.common import write_result
    path = str(tmp_path / 'b.json')
    write_result(path, 'a', dict(x=1), dict(torch='t'))
    write_result(path, 'b', dict(y=2), dict(torch='t'))
    with open(path) as f:
        data = json.load(f)
    assert section_of(data, 'a')['x'] == 1
    assert section_of(data, 'b')['environment'] == dict(torch='t')
    # the flat files of the former scripts
    with open(osp.join(REPO, 'results', 'benchmarks', 'pse.json')) as f:
        assert 'results' in section_of(json.load(f), 'pse')


def test_fit_runs_each_method_at_its_configured_batch(tmp_path):
    """The ``fit`` section runs the package's own synthesis (V2: its
    adapter's sample step) at the fragments' batch with the memory options
    for 16 GB: every row measured, micro-batched as configured."""
    from dfq_dense.bench import fit
    out = tmp_path / 'fit.json'
    assert benchmark.main(['fit', '--backbones', 'demo', '--size', '32x32',
                           '--isolate', 'none', '--device', 'cpu', '--out',
                           str(out)]) == 0
    with open(out) as f:
        section = section_of(json.load(f), 'fit')
    rows = {r['method']: r for r in section['rows']}
    assert set(rows) == set(LOSSES) and section['complete']
    for method, row in rows.items():
        assert row['status'] == 'ok', row.get('reason')
        assert row['batch'] == fit._fragment(method)['batch_size']
        assert row['options'] == fit.FIT_OPTIONS[method]
        assert row['peak_bytes'] is not None and row['iteration_s'] > 0
        # the phases partition the iteration (V2: the sample step's own
        # iteration; its selection passes are 'other')
        parts = sum(v for k, v in row['phases'].items() if k != 'other')
        assert parts <= row['iteration_s'] + 1e-6
    # micro-batching took effect: MimiQ's 16 images in forwards of 4
    assert rows['mimiq']['batch'] == 16
    assert rows['mimiq']['phase_calls']['forward'] == 16 // 4
    assert rows['mimiq']['phase_calls']['step'] == 1
    table = fit.markdown(section)
    assert table.count('| Swin demo |') == 4


def test_budget_composes_flops_with_the_schedule():
    """The budget's arithmetic against a hand count: FLOPs x iterations x
    images / throughput; eight GPUs split batches and images by rank."""
    from dfq_dense.report import budget
    flops = dict(
        models={'mask_rcnn_swin_s': dict(config='configs/x.py',
                                         size=[800, 1333])},
        methods=['psaq_vit'],
        rows=[dict(kind='eval', model='mask_rcnn_swin_s', flops=1e12),
              dict(kind='synthesis', model='mask_rcnn_swin_s',
                   method='psaq_vit', flops=2e12)])
    sched = dict(method='PSAQViT', num_images=32, batch_size=8,
                 iterations=1000, calib_images=32, task='det',
                 eval_images=5000)
    synthesis = dict(rows=[dict(status='ok', batch=1, size=[800, 1333],
                                backbone='swin_s', method='psaq_vit',
                                memory=dict(peak_bytes=3e9))])
    fit = dict(rows=[dict(status='ok', backbone='swin_s', method='psaq_vit',
                          batch=8, peak_bytes=12e9, options={})])
    out = budget.compose(flops, synthesis, fit, tflops=10,
                         schedules={'mask_rcnn_swin_s': sched})
    row, = out['rows']
    one, eight = row['gpus']['1'], row['gpus']['8']
    # 4 batches of 8 images x 1000 iterations x 2 TFLOP at 10 TFLOPS
    assert one['synthesis_s'] == pytest.approx(2e12 * 1000 * 32 / 1e13)
    assert one['calibration_s'] == pytest.approx(1e12 * 32 / 1e13)
    assert one['evaluation_s'] == pytest.approx(1e12 * 5000 / 1e13)
    # 8 ranks: one batch each (4 idle), 4 calibration and 625 test images
    assert eight['synthesis_s'] == pytest.approx(2e12 * 1000 * 8 / 1e13)
    assert eight['calibration_s'] == pytest.approx(1e12 * 4 / 1e13)
    assert eight['evaluation_s'] == pytest.approx(1e12 * 625 / 1e13)
    assert row['memory_no_options_bytes'] == pytest.approx(24e9)
    assert row['memory_fit_bytes'] == 12e9
    # the real config's schedule is read from the config
    real = budget.schedule('configs/mask_rcnn_swin_s_w8a8.py')
    assert real == dict(method='PSAQViT', num_images=32, batch_size=8,
                        iterations=1000, adapter=None,
                        sample_step_iterations=0, calib_images=32,
                        task='det', eval_images=5000)
    # PSAQ-ViT V2: its start images (2 rounds x 500, the class default)
    # and its sample steps, 4 rounds x 50 iterations on all 32 images
    v2 = budget.schedule('configs/reproduce/'
                         'psaq-vit-v2_cascade_swin-s_w8a8.py')
    assert v2['iterations'] == 1000 and v2['adapter'] == 'PSAQViTV2Rounds'
    assert v2['sample_step_iterations'] == 4 * 50 * 32
    flops['rows'].append(dict(kind='synthesis', model='mask_rcnn_swin_s',
                              method='psaq_vit_v2', flops=5e12))
    est = budget.estimate_run(flops, 'mask_rcnn_swin_s', dict(
        sched, sample_step_iterations=6400), tflops=10)
    # the adapter runs on every rank: the same on 8 GPUs
    assert est['gpus']['1']['adaptation_s'] == pytest.approx(5e12 * 6400 /
                                                             1e13)
    assert est['gpus']['8']['adaptation_s'] == \
        est['gpus']['1']['adaptation_s']
    assert budget.schedule('configs/upernet_swin_b_w8a8.py')[
        'eval_images'] == 2000


def test_flops_counts_a_known_layer():
    """The FLOP count is torch's counter: 2 per multiply-add, forward and
    the backward that runs."""
    import torch

    from dfq_dense.bench.flops import count
    lin = torch.nn.Linear(16, 32, bias=False)
    x = torch.randn(4, 16, requires_grad=True)
    assert count(lambda: lin(x)) == 2 * 4 * 16 * 32
    # backward to the input and the weight: two more matmuls of that size
    assert count(lambda: lin(x).sum().backward()) == 3 * 2 * 4 * 16 * 32
    # the fused attention of timm's DeiT on the CPU: q k^T and attn v
    q = torch.randn(2, 3, 10, 8)
    assert count(lambda: torch.nn.functional.scaled_dot_product_attention(
        q, q, q)) == 2 * (2 * 2 * 3 * 10 * 10 * 8)


def test_flops_merge_keeps_the_other_models_rows(tmp_path):
    """``flops --merge``: the rows of the models not counted again stay as
    they were (with the commit they were counted at); a classifier gets
    its eval row and PSAQ-ViT's and V2's iterations only."""
    from dfq_dense.bench.common import write_result
    out = str(tmp_path / 'flops.json')
    old = dict(models={'upernet_swin_t': dict(config='configs/x.py',
                                              size=[512, 512])},
               methods=['psaq_vit', 'mimiq'], seed=0, wall_seconds=5.,
               rows=[dict(kind='eval', model='upernet_swin_t', flops=7),
                     dict(kind='synthesis', model='upernet_swin_t',
                          method='mimiq', flops=3)])
    write_result(out, 'flops', old, dict(git_commit='abc', git_dirty=False,
                                         time='t0'))
    assert benchmark.main(['flops', '--merge', '--models',
                           'deit_tiny_patch16_224', '--methods', 'psaq_vit',
                           'psaq_vit_v2', 'mimiq', '--device', 'cpu',
                           '--out', out]) == 0
    with open(out) as f:
        new = section_of(json.load(f), 'flops')
    assert list(new['models']) == ['upernet_swin_t', 'deit_tiny_patch16_224']
    assert new['methods'] == ['psaq_vit', 'mimiq', 'psaq_vit_v2']
    kept = new['rows'][:2]
    assert [dict(r, counted_at=None) for r in kept] == [
        dict(r, counted_at=None) for r in old['rows']]
    assert kept[0]['counted_at'] == dict(commit='abc', dirty=False,
                                         time='t0')
    rows = {(r['kind'], r.get('method')): r['flops'] for r in new['rows'][2:]}
    assert set(rows) == {('eval', None), ('synthesis', 'psaq_vit'),
                         ('synthesis', 'psaq_vit_v2')}
    # DeiT-T: 1.3 GMACs a forward (timm's model card)
    assert rows[('eval', None)] / 1e9 == pytest.approx(2.5, abs=0.05)
    assert rows[('synthesis', 'psaq_vit')] > 2 * rows[('eval', None)]
    # V2's sample step: teacher and student, forward and backward each
    assert rows[('synthesis', 'psaq_vit_v2')] > \
        4 * rows[('eval', None)]
    from dfq_dense.bench import flops
    assert 'counted earlier, at commit abc' in flops.markdown(new)


def test_cli_lists_the_sections_and_the_old_names_remain():
    parser = benchmark.build_parser()
    text = parser.format_help()
    for name in ('synthesis', 'fit', 'flops', 'calibration', 'pse',
                 'fakequant', 'budget', 'all'):
        assert name in text
    args = benchmark.parse_args(['calibration', '--images', '1'])
    assert args.section == 'calibration' and args.images == 1
    assert benchmark.parse_args([]).section == 'fakequant'
    for old, option in (('benchmark_calibration.py', '--settings'),
                        ('benchmark_pse.py', '--chunk')):
        proc = subprocess.run(
            [sys.executable, osp.join(REPO, 'tools', old), '--help'],
            capture_output=True, text=True, cwd=REPO)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert option in proc.stdout


def test_resume_keeps_the_rows_already_measured(tmp_path):
    out = str(tmp_path / 's.json')
    base = ['synthesis', '--backbones', 'demo', '--sizes', '64x64',
            '--batches', '1', '--repeats', '1', '--isolate', 'none',
            '--device', 'cpu', '--out', out]
    assert benchmark.main(base + ['--methods', 'psaq_vit']) == 0
    with open(out) as f:
        first = section_of(json.load(f), 'synthesis')
    assert first['complete'] and first['resumed'] == 0
    assert benchmark.main(base + ['--methods', 'psaq_vit', 'spdfq',
                                  '--resume']) == 0
    with open(out) as f:
        second = section_of(json.load(f), 'synthesis')
    assert [r['method'] for r in second['rows']] == ['psaq_vit', 'spdfq']
    assert second['resumed'] == 1
    assert second['rows'][0]['runs'] == first['rows'][0]['runs']
    assert second['rows'][1]['status'] == 'ok'
