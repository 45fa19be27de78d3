"""tools/dfq_test.py: configs, bad input, and the DFQ loop end to end."""
import copy
import glob
import os
import os.path as osp
import subprocess
import sys

import pytest
from mmengine.registry import init_default_scope

from dfq_dense.engine.dfq_config import DFQConfigError, parse_dfq_config
from dfq_dense.engine.runner import load_config

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, osp.join(REPO, 'tools'))
import dfq_test  # noqa: E402

REAL_CONFIGS = sorted(glob.glob(osp.join(REPO, 'configs', '*_w?a?.py')))


def run_cli(args, cwd=REPO):
    return subprocess.run(
        [sys.executable, osp.join(REPO, 'tools', 'dfq_test.py')] + args,
        capture_output=True, text=True, cwd=cwd,
        env=dict(os.environ, OMP_NUM_THREADS='1'))


def test_all_real_configs_exist():
    names = {osp.basename(p) for p in REAL_CONFIGS}
    for model in ('mask_rcnn_swin_s', 'mask_rcnn_swin_t', 'upernet_swin_s',
                  'upernet_swin_t'):
        for bits in ('w8a8', 'w6a6', 'w4a8', 'w4a4'):
            assert f'{model}_{bits}.py' in names


@pytest.mark.parametrize('path', REAL_CONFIGS, ids=osp.basename)
def test_real_config_builds(path):
    cfg = load_config(path)
    dfq = parse_dfq_config(cfg.dfq)
    bits = osp.basename(path)[-7:-3]
    assert f'w{dfq.quantizer.w_bits}a{dfq.quantizer.a_bits}' == bits
    assert cfg.test_cfg.type == 'dfq_dense.DFQTestLoop'
    if cfg.load_from is None:
        # The papers' Cascade models: only the official Swin checkpoints
        # exist; they are converted by tools/convert_checkpoint.py.
        assert cfg.official_checkpoint.startswith(
            'https://github.com/SwinTransformer/storage/')
    else:
        assert cfg.load_from.startswith('https://download.openmmlab.com/')
    if cfg.default_scope == 'mmdet':
        assert cfg.test_dataloader.dataset.data_root == 'data/coco/'
        assert cfg.test_dataloader.dataset.ann_file == \
            'annotations/instances_val2017.json'
        from mmdet.registry import MODELS
    else:
        assert cfg.test_dataloader.dataset.data_root == \
            'data/ade/ADEChallengeData2016'
        from mmseg.registry import MODELS
    init_default_scope(cfg.default_scope)
    model = MODELS.build(cfg.model)
    depth = sum(len(stage.blocks) for stage in model.backbone.stages)
    assert depth == (12 if '_swin_t_' in path else 24)  # S and B: 24


@pytest.mark.parametrize(
    'path', sorted(glob.glob(osp.join(REPO, 'configs', 'demo', '*_w?a?*.py'))),
    ids=osp.basename)
def test_demo_dfq_configs_parse(path):
    cfg = load_config(path)
    dfq = parse_dfq_config(cfg.dfq)
    expected = {'_noise.py': 'GaussianNoise', '_real.py': 'RealImages'}.get(
        path[path.rfind('_'):], 'PSAQViT')
    assert dfq.synthesizer.type == expected
    # the demo classifier loads its weights itself (timm's layout)
    weights = cfg.model.checkpoint if 'cls' in osp.basename(path) else \
        cfg.load_from
    assert weights.startswith('dfq_dense/demo/checkpoints/')
    assert cfg.test_cfg.type == 'dfq_dense.DFQTestLoop'


@pytest.mark.parametrize('override,message', [
    ('dfq.synthesizer.type=NoSuchMethod', 'unknown DFQ method'),
    ('dfq.quantizer.w_bits=17', 'bits must be an integer in 2-16'),
    ('dfq.quantizer.a_bits=1', 'bits must be an integer in 2-16'),
    ('dfq.quantizer.scope=neck', "use one of ('model', 'backbone')"),
    ('dfq.quantizer.matmul.granularity=channel', 'no channel axis'),
    ('dfq.quantizer.act.mode=log2', 'only valid for the post-softmax'),
    ('dfq.quantizer.act.observer.type=PercentileObserver '
     'dfq.quantizer.act.observer.percentile=0', 'percentile must be in'),
    ('dfq.quantizer.overrides.qkvv.a_bits=8', 'neither a role'),
    ('dfq.quantizer.first_last_bits=20', 'bits must be an integer'),
])
def test_bad_dfq_config_fails_before_work(tmp_path, capsys, override,
                                          message):
    work = tmp_path / 'work'
    code = dfq_test.main([
        osp.join(REPO, 'configs/demo/upernet_swin_demo_w8a8.py'),
        '--work-dir', str(work), '--cfg-options'] + override.split())
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert message in err and len(err.splitlines()) == 1
    assert not work.exists()


def test_missing_dataset_one_line_no_traceback(tmp_path):
    # Run from an empty folder: data/coco/ is absent there.
    work = tmp_path / 'work'
    proc = run_cli([osp.join(REPO, 'configs/mask_rcnn_swin_t_w8a8.py'),
                    'ckpt.pth', '--work-dir', str(work)], cwd=str(tmp_path))
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert err[-1].startswith('dfq_test: error: dataset')
    assert 'data/coco/annotations/instances_val2017.json' in err[-1]
    assert 'download COCO' in err[-1]
    assert 'Traceback' not in proc.stderr
    assert not work.exists()


def test_missing_checkpoint_one_line_no_traceback(tmp_path, demo_data_root):
    work = tmp_path / 'work'
    proc = run_cli([osp.join(REPO, 'configs/demo/upernet_swin_demo_w8a8.py'),
                    str(tmp_path / 'missing.pth'), '--work-dir', str(work)])
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert err[-1].startswith('dfq_test: error: checkpoint not found')
    assert 'missing.pth' in err[-1]
    assert 'Traceback' not in proc.stderr
    assert not work.exists()


def test_unknown_dfq_key_is_rejected():
    with pytest.raises(DFQConfigError, match='unknown dfq.quantizer key'):
        parse_dfq_config(dict(synthesizer=dict(type='PSAQViT'),
                              quantizer=dict(w_bits=8, a_bits=8, wbits=4)))


def _json(path):
    import json
    with open(path) as f:
        return json.load(f)


def test_save_and_load_quantized_identical_metrics(tmp_path, demo_data_root):
    """A RepQ-style W4A4 run writes quant_params.pth; --load-quantized
    rebuilds the model without synthesis or calibration: same metrics."""
    from dfq_dense.report import load_fragment
    demo = osp.join(REPO, 'configs/demo/upernet_swin_demo_w8a8.py')
    quant = dict(load_fragment('quantizers', 'repq', 'dfq_quantizer'),
                 **load_fragment('bits', 'w4a4', 'dfq_bits'))
    opts = ['test_dataloader.dataset.indices=12',
            'dfq.synthesizer.num_images=2', 'dfq.synthesizer.batch_size=2',
            'dfq.synthesizer.iterations=2']
    first = tmp_path / 'first'
    args = dfq_test.parse_args([demo, '--work-dir', str(first),
                                '--cfg-options'] + opts)
    args.cfg_options['dfq.quantizer'] = dict(quant, _delete_=True)
    res1 = dfq_test.run(args)
    assert res1['reparameterized'] > 0
    params = first / 'quant_params.pth'
    assert res1['quant_params'] == str(params) and params.is_file()

    second = tmp_path / 'second'
    args = dfq_test.parse_args([demo, '--work-dir', str(second),
                                '--load-quantized', str(params),
                                '--cfg-options'] + opts)
    args.cfg_options['dfq.quantizer'] = dict(quant, _delete_=True)
    res2 = dfq_test.run(args)
    assert res2['quant_params_from'] == str(params)
    assert res2['seconds']['synthesis'] == 0.0
    assert not (second / 'synthetic').exists()
    assert res2['metrics'] == res1['metrics']
    assert _json(second / 'dfq_results.json')['metrics'] == res1['metrics']

    # the same file with another bit setting: one line, exit 2
    work = tmp_path / 'third'
    code = dfq_test.main([demo, '--work-dir', str(work), '--load-quantized',
                          str(params)])
    assert code == 2
    missing = dfq_test.main([demo, '--work-dir', str(work),
                             '--load-quantized', str(tmp_path / 'no.pth')])
    assert missing == 2


def test_override_glob_checked_against_the_model(tmp_path, capsys,
                                                 demo_data_root):
    # A user config with a mistyped module-name glob (stage, not stages).
    cfg = tmp_path / 'typo.py'
    cfg.write_text(
        f"_base_ = '{REPO}/configs/demo/upernet_swin_demo_w8a8.py'\n"
        "dfq = dict(quantizer=dict(overrides={'backbone.stage.*': "
        "dict(w_bits=8)}))\n")
    work = tmp_path / 'work'
    code = dfq_test.main([str(cfg), '--work-dir', str(work)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith('dfq_test: error:')
    assert "['backbone.stage.*'] match no quantizable module" in err[-1]
    assert not (work / 'dfq_results.json').exists()
    assert not (work / 'synthetic').exists()


def test_teacher_student_method_end_to_end(tmp_path, demo_data_root):
    """PSAQ-ViT V2 through the DFQ loop: the student is adapted after
    calibration, its changed weights are saved and --load-quantized
    rebuilds the same model."""
    demo = osp.join(REPO, 'configs/demo/upernet_swin_demo_w8a8.py')
    synth = dict(_delete_=True, type='PSAQViTV2', num_images=2, batch_size=2,
                 iterations=2, max_samples=2000, seed=0)
    adapter = dict(_delete_=True, type='PSAQViTV2Rounds', batch_size=2,
                   rounds=1, sample_iters=2, max_samples=2000,
                   student_step=dict(iters=2, batch_size=2, lr=1e-4), seed=0)
    opts = {'test_dataloader.dataset.indices': 8, 'dfq.synthesizer': synth,
            'dfq.adapter': adapter,
            'dfq.quantizer.w_bits': 4, 'dfq.quantizer.a_bits': 4}
    first = tmp_path / 'first'
    args = dfq_test.parse_args([demo, '--work-dir', str(first)])
    args.cfg_options = dict(opts)
    res1 = dfq_test.run(args)
    assert res1['method'] == 'PSAQViTV2'
    assert res1['adaptation']['adapter']['type'] == 'PSAQViTV2Rounds'
    assert res1['seconds']['adaptation'] > 0
    # how much the student step moved the 4-bit weight codes is reported
    assert 0 < res1['adaptation']['weight_codes_changed'] < 1
    assert res1['adaptation']['images_changed'] is True
    rounds = res1['adaptation']['rounds']
    assert [r['round'] for r in rounds] == [0]
    assert rounds[0]['disc_before'] > 0 and rounds[0]['disc_after'] > 0
    # the sample steps changed the images: both sets are kept
    assert (first / 'synthetic' / 'synthetic_images.pth').is_file()
    assert (first / 'synthetic' / 'adapted' / 'synthetic_images.pth').is_file()
    import torch
    saved = torch.load(str(first / 'quant_params.pth'), weights_only=True)
    changed = saved['meta']['changed']
    assert any(k.startswith('backbone.') and k.endswith('module.weight')
               for k in changed)
    second = tmp_path / 'second'
    args = dfq_test.parse_args([demo, '--work-dir', str(second),
                                '--load-quantized',
                                str(first / 'quant_params.pth')])
    args.cfg_options = dict(opts)
    res2 = dfq_test.run(args)
    assert res2['metrics'] == res1['metrics']


def test_real_images_default_to_the_training_split(tmp_path, demo_data_root):
    demo = osp.join(REPO, 'configs/demo/upernet_swin_demo_w8a8.py')
    args = dfq_test.parse_args([demo, '--work-dir', str(tmp_path / 'w')])
    args.cfg_options = {
        'test_dataloader.dataset.indices': 4,
        'dfq.synthesizer': dict(_delete_=True, type='RealImages',
                                num_images=3, batch_size=3, seed=1)}
    res = dfq_test.run(args)
    assert osp.samefile(res['synthesizer']['data_root'],
                        osp.join(demo_data_root, 'images/training'))
    assert res['num_images'] == 3
    args = dfq_test.parse_args([demo, '--work-dir', str(tmp_path / 'x')])
    args.cfg_options = {'dfq.synthesizer': dict(
        _delete_=True, type='RealImages', data_root=str(tmp_path / 'none'))}
    from dfq_dense.engine.dfq_config import DFQConfigError
    with pytest.raises(DFQConfigError, match='does not exist'):
        dfq_test.run(args)


def _user_config(tmp_path, body):
    cfg = tmp_path / 'user_cfg.py'
    cfg.write_text(
        f"_base_ = '{REPO}/configs/demo/upernet_swin_demo_w8a8.py'\n" + body)
    return str(cfg)


@pytest.mark.parametrize('where,method,component', [
    ('synthesizer', 'SPDFQ', 'no_such_part'),
    ('synthesizer', 'MimiQ', 'attention'),
    ('adapter', 'PSAQViTV2Rounds', 'labels')])
def test_unknown_component_fails_before_work(tmp_path, capsys, where, method,
                                             component, demo_data_root):
    cfg = _user_config(
        tmp_path, f"dfq = dict({where}=dict(_delete_=True, "
        f"type='{method}', components=dict({component}=True)))\n")
    work = tmp_path / 'work'
    code = dfq_test.main([cfg, '--work-dir', str(work)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith(f'dfq_test: error: dfq.{where} {method}')
    assert 'unknown component' in err[-1] and repr(component) in err[-1]
    assert not (work / 'synthetic').exists()


@pytest.mark.parametrize('method', ['PSAQViT', 'PSAQViTV2', 'MimiQ',
                                    'SPDFQ'])
def test_attention_method_on_a_non_swin_backbone(tmp_path, capsys, method,
                                                 demo_data_root):
    cfg = _user_config(
        tmp_path, "model = dict(backbone=dict(_delete_=True, "
        "type='ResNetV1c', depth=18))\n"
        f"dfq = dict(synthesizer=dict(_delete_=True, type='{method}'))\n")
    code = dfq_test.main([cfg, '--work-dir', str(tmp_path / 'w')])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith(f'dfq_test: error: dfq.synthesizer {method}')
    assert 'Swin' in err[-1]


def test_same_seed_same_images_and_metrics(tmp_path, demo_data_root):
    """Two runs of a synthesis + distillation method with one seed: the
    same synthetic images, the same student, the same metrics."""
    import torch
    demo = osp.join(REPO, 'configs/demo/upernet_swin_demo_w8a8.py')
    synth = dict(_delete_=True, type='MimiQ', num_images=2, batch_size=2,
                 iterations=3, seed=3)
    adapter = dict(_delete_=True, type='MimiQDistill', seed=3,
                   student_step=dict(optimizer='adam', lr=1e-4, iters=2,
                                     batch_size=2))
    out = []
    for run in ('a', 'b'):
        args = dfq_test.parse_args([demo, '--work-dir', str(tmp_path / run)])
        args.cfg_options = {'test_dataloader.dataset.indices': 8,
                            'dfq.synthesizer': dict(synth),
                            'dfq.adapter': dict(adapter),
                            'dfq.quantizer.a_bits': 4}
        res = dfq_test.run(args)
        images = torch.load(
            str(tmp_path / run / 'synthetic' / 'synthetic_images.pth'),
            weights_only=True)['images']
        params = torch.load(str(tmp_path / run / 'quant_params.pth'),
                            weights_only=True)['tensors']
        out.append((res['metrics'], images, params))
    assert out[0][0] == out[1][0]
    assert torch.equal(out[0][1], out[1][1])
    assert out[0][2].keys() == out[1][2].keys()
    for key, value in out[0][2].items():
        assert torch.equal(value, out[1][2][key]), key


def test_fragments_compose_in_one_line(tmp_path):
    """Swapping the data source, the quantizer setting or the bits is one
    line of a config; the first/last-layer fragment adds to any of them."""
    cfg = tmp_path / 'compose.py'
    cfg.write_text(
        "_base_ = [\n"
        f"    '{REPO}/configs/upernet_swin_t_w8a8.py',\n"
        f"    '{REPO}/configs/_base_/bits/first_last_8bit.py',\n"
        "]\n"
        "dfq = dict(quantizer=dict(_delete_=True, **_base_.dfq_quantizer,\n"
        "                          **_base_.dfq_bits, "
        "**_base_.dfq_first_last))\n")
    dfq = parse_dfq_config(load_config(str(cfg)).dfq)
    assert dfq.quantizer.first_last_bits == 8
    assert dfq.quantizer.w_bits == 8 and dfq.synthesizer.type == 'PSAQViT'
    for method, expected in [('mimiq', 'MimiQ'), ('spdfq', 'SPDFQ'),
                             ('psaq_vit_v2', 'PSAQViTV2'),
                             ('real_images', 'RealImages'),
                             ('gaussian_noise', 'GaussianNoise')]:
        text = open(osp.join(REPO, 'configs/upernet_swin_t_w4a4.py')).read()
        text = text.replace('methods/psaq_vit.py', f'methods/{method}.py')
        text = text.replace("'./_base_/", f"'{REPO}/configs/_base_/")
        path = tmp_path / f'{method}.py'
        path.write_text(text)
        dfq = parse_dfq_config(load_config(str(path)).dfq)
        assert dfq.synthesizer.type == expected
        assert dfq.quantizer.a_bits == 4
        assert dfq.quantizer.act.observer.type == 'PercentileObserver'


LEAVES = sorted(glob.glob(osp.join(REPO, 'configs', '*.py')) +
                glob.glob(osp.join(REPO, 'configs', 'demo', '*_w*.py')))


@pytest.mark.parametrize('path', LEAVES, ids=osp.basename)
def test_leaf_config_is_bases_plus_what_differs(path):
    """No leaf repeats the loop / dfq tail: the loader joins the fragments."""
    with open(path) as f:
        text = f.read()
    assert 'test_cfg' not in text and '_base_.dfq_' not in text, path
    cfg = load_config(path)
    assert cfg.test_cfg.type == 'dfq_dense.DFQTestLoop'
    assert cfg.dfq.quantizer.w_bits == cfg.dfq_bits.w_bits
    assert cfg.dfq.synthesizer.type == cfg.dfq_synthesizer.type or \
        path.endswith('_noise.py')


def _fragments_cfg(dfq=None):
    from mmengine.config import Config
    cfg = Config(dict(
        dfq_synthesizer=dict(type='MimiQ', num_images=32, iterations=500,
                             components=dict(tv=True)),
        dfq_quantizer=dict(scope='model', skip=[], weight=dict(
            observer=dict(type='MinMaxObserver'))),
        dfq_bits=dict(w_bits=8, a_bits=8), dfq_calib_batch_size=4,
        test_cfg=dict(type='TestLoop')))
    if dfq is not None:
        cfg.dfq = dfq
    return cfg


def test_assemble_dfq_merges_like_mmengine():
    from dfq_dense.engine.dfq_config import assemble_dfq
    cfg = assemble_dfq(_fragments_cfg(dict(
        synthesizer=dict(num_images=8),
        quantizer=dict(w_bits=4, weight=dict(_delete_=True, observer=dict(
            type='MSEObserver'))))))
    assert cfg.test_cfg == dict(type='dfq_dense.DFQTestLoop')
    assert cfg.dfq.synthesizer == dict(
        type='MimiQ', num_images=8, iterations=500,
        components=dict(tv=True))
    assert cfg.dfq.quantizer == dict(
        scope='model', skip=[], weight=dict(observer=dict(
            type='MSEObserver')), w_bits=4, a_bits=8)
    assert cfg.dfq.calib_batch_size == 4
    # idempotent
    again = copy.deepcopy(cfg.dfq.to_dict())
    assert assemble_dfq(cfg).dfq.to_dict() == again
    parse_dfq_config(cfg.dfq)


def test_assemble_dfq_type_switch_replaces_another_method():
    from dfq_dense.engine.dfq_config import assemble_dfq
    from dfq_dense.registry import MODELS
    from dfq_dense.synth import MimiQ
    # another method: the fragment's MimiQ settings do not carry over
    cfg = assemble_dfq(_fragments_cfg(dict(
        synthesizer=dict(type='GaussianNoise', batch_size=2))))
    assert cfg.dfq.synthesizer == dict(type='GaussianNoise', batch_size=2)
    # a variant (subclass) of the fragment's method keeps its settings
    if 'MyMimiQ' not in MODELS.module_dict:
        MODELS.register_module('MyMimiQ', module=type('MyMimiQ', (MimiQ,),
                                                       {}))
    cfg = assemble_dfq(_fragments_cfg(dict(
        synthesizer=dict(type='MyMimiQ', batch_size=2))))
    assert cfg.dfq.synthesizer == dict(
        type='MyMimiQ', num_images=32, iterations=500,
        components=dict(tv=True), batch_size=2)
    # an explicit _delete_ replaces the fragment whole
    cfg = assemble_dfq(_fragments_cfg(dict(synthesizer=dict(
        _delete_=True, type='MyMimiQ', num_images=3))))
    assert cfg.dfq.synthesizer == dict(type='MyMimiQ', num_images=3)


def test_adapter_over_a_fragment_without_one(tmp_path):
    """A config whose method fragment has no adapter (dfq_adapter = None)
    takes one from the leaf or from --cfg-options."""
    from dfq_dense.engine.dfq_config import assemble_dfq
    cfg = _fragments_cfg(dict(adapter=dict(type='MimiQDistill', seed=1)))
    cfg.dfq_adapter = None
    assert assemble_dfq(cfg).dfq.adapter == dict(type='MimiQDistill', seed=1)
    path = osp.join(REPO, 'configs', 'demo', 'upernet_swin_demo_w8a8.py')
    assert load_config(path).dfq.adapter is None
    cfg = load_config(path, {'dfq.adapter.type': 'BlockReconstruction',
                             'dfq.adapter.iters': 2})
    assert cfg.dfq.adapter == dict(type='BlockReconstruction', iters=2)
    assert parse_dfq_config(cfg.dfq).adapter.iters == 2
