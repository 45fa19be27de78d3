"""Every benchmark figure in the README is the rendering of a committed
JSON file by the script that measured it."""
import json
import os.path as osp
import sys

import pytest

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, osp.join(REPO, 'tools'))


def _block(name):
    with open(osp.join(REPO, 'README.md')) as f:
        text = f.read()
    start = text.index(f'<!-- {name}:start -->\n') + len(
        f'<!-- {name}:start -->\n')
    return text[start:text.index(f'\n<!-- {name}:end -->')]


def _json(name):
    with open(osp.join(REPO, 'results', 'benchmarks', name)) as f:
        return json.load(f)


@pytest.mark.parametrize('block,section,name', [
    ('bench-calibration', 'calibration', 'calibration.json'),
    ('bench-pse', 'pse', 'pse.json'),
    ('bench-synthesis', 'synthesis', 'synthesis.json'),
    ('bench-flops', 'flops', 'flops.json'),
    ('bench-fit', 'fit', 'fit.json'),
])
def test_readme_benchmark_tables_match_their_json(block, section, name):
    """``tools/benchmark.py <section>`` renders the committed JSON into the
    README block (the section's own renderer, dfq_dense/bench/)."""
    import importlib

    from dfq_dense.bench.common import section_of
    mod = importlib.import_module(f'dfq_dense.bench.{section}')
    assert _block(block) == mod.markdown(section_of(_json(name), section))


def _runs(folder, names):
    out = []
    for name in names:
        with open(osp.join(REPO, 'results', 'demo', folder,
                           name + '.json')) as f:
            out.append(json.load(f))
    return out


def test_readme_demo_fp_tables_match_the_manifest():
    """The FP figures of the shipped demo checkpoints in the README are
    the manifest's (which tests/test_fp_eval.py reproduces)."""
    from dfq_dense.demo import DEMO_MODELS, load_manifest
    manifest = load_manifest()
    with open(osp.join(REPO, 'README.md')) as f:
        lines = f.read().splitlines()
    # (name, [(column index after the model's, manifest key, decimals)])
    columns = {
        'mask_rcnn_swin_demo': [(2, 'coco/bbox_mAP', 3),
                                (3, 'coco/segm_mAP', 3)],
        'upernet_swin_demo': [(4, 'mIoU', 2)],
        'swin_cls_demo': [(2, 'imagenet/top1', 2), (3, 'imagenet/top5', 2)],
    }
    assert set(columns) == set(DEMO_MODELS)
    for name, cols in columns.items():
        rows = [line for line in lines
                if line.startswith('|') and f'`{name}.pth`' in line]
        assert len(rows) == 1, name
        cells = [c.strip() for c in rows[0].strip('|').split('|')]
        for col, key, decimals in cols:
            value = manifest[name]['fp_metrics'][key]
            assert cells[col] == f'{value:.{decimals}f}', (name, key)


def test_readme_main_job_table_matches_the_committed_runs():
    import run_demo
    runs = _runs('main_job', [f'{m}_w8a8' for m in run_demo.MODELS])
    assert _block('main-job') == run_demo.markdown(runs)
    for res in runs:  # what makes the figures reproducible is recorded
        assert len(res['checkpoint']['sha256']) == 64
        assert res['seed'] == 0 and res['threads'] >= 1
        assert {'torch', 'timm', 'dfq_dense'} <= set(res['versions'])
        if res['task'] != 'cls':
            assert {'mmdet', 'mmseg'} <= set(res['versions'])
        assert res['quantization']['total']['disabled'] == 0


def test_readme_w4a8_table_matches_the_committed_runs():
    import run_demo
    psaq = _runs('w4a8', [f'{m}_w4a8' for m in run_demo.MODELS])
    noise = _runs('w4a8', [f'{m}_w4a8_noise' for m in run_demo.MODELS])
    assert [r['method'] for r in psaq + noise] == ['PSAQViT'] * 3 + [
        'GaussianNoise'] * 3
    cross = _runs('w4a8', [f'{m}_w4a8_cls_images' for m in run_demo.MODELS
                           if m != run_demo.CLASSIFIER])
    for res in cross:  # the classifier's images, stretched to 192x192
        src = res['images_source']
        assert src['task'] == 'cls' and src['cross_task']
        assert src['size'] == [56, 56] and src['resized_to'] == [192, 192]
        assert res['method'] == 'PSAQViT'
    assert _block('w4a8') == run_demo.comparison_markdown(
        [psaq, noise, cross], ('W4A8 PSAQ-ViT', 'W4A8 Gaussian noise',
                               'W4A8 classifier\'s PSAQ-ViT images'))


@pytest.mark.parametrize('block,name', [
    ('bench-fakequant', 'fakequant.json'),
    ('bench-fakequant-r5', 'fakequant_mask_rcnn_r5.json')])
def test_readme_fakequant_tables_match_their_json(block, name):
    from dfq_dense.bench import fakequant
    rows = _json(name)['sections']['fakequant']['rows']
    assert all(r['identical_to_old'] for r in rows)
    assert _block(block) == fakequant.markdown_rows(rows)


def test_readme_v2_sample_step_figures_match_the_committed_run():
    res = _runs('v2_sample_step', ['upernet_swin_demo_psaq_v2_w4a4'])[0]
    rounds = res['adaptation']['rounds']
    with open(osp.join(REPO, 'README.md')) as f:
        text = ' '.join(f.read().split())
    quoted = ' and '.join(f"{r['disc_before']:.3f} -> {r['disc_after']:.3f}"
                          for r in rounds)
    assert f'sample step {quoted}, student step back to ' + ' and '.join(
        f"{r['disc_end']:.3f}" for r in rounds) in text
    assert all(r['disc_after'] > r['disc_before'] for r in rounds)


def test_readme_budget_is_composed_from_the_committed_results():
    """The run budget (tools/benchmark.py budget) of the committed
    benchmark files, at the default assumed throughput."""
    from dfq_dense.report import budget
    folder = osp.join(REPO, 'results', 'benchmarks')
    assert _block('bench-budget') == budget.markdown(budget.budget(folder))
