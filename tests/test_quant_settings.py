"""Quantizer settings: roles and overrides, RepQ reparameterisation, saved
quantization parameters, the percentile-search calibrator."""
import copy

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope

from dfq_dense.quant import (PercentileSearchObserver, Quantizer,
                             QuantWindowMSA, enable_calibration,
                             finish_calibration, iter_quantizers,
                             module_roles, quantize_model,
                             set_quantizers_enabled)
from dfq_dense.quant.io import (QuantParamsError, load_quant_params,
                                save_quant_params, snapshot_state)
from dfq_dense.quant.spec import QuantSetting, validate_setting

DEMO = {'det': 'configs/demo/mask_rcnn_swin_demo.py',
        'seg': 'configs/demo/upernet_swin_demo.py'}
POST_LN = {r: dict(act=dict(granularity='channel'))
           for r in ('qkv', 'fc1', 'reduction')}


def _demo_model(task):
    cfg = Config.fromfile(DEMO[task])
    init_default_scope(cfg.default_scope)
    if task == 'det':
        from mmdet.registry import MODELS
    else:
        from mmseg.registry import MODELS
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.eval()
    return model


@pytest.fixture(scope='module')
def det_model():
    return _demo_model('det')


@pytest.fixture(scope='module')
def seg_model():
    return _demo_model('seg')


# -------------------------------------------------------------------- roles
def test_roles_of_the_demo_models(det_model, seg_model):
    names = {n for n, _ in det_model.named_modules()} | \
        {n for n, _ in seg_model.named_modules()}
    roles = {}
    for n in names:
        for r in module_roles(n):
            roles.setdefault(r, set()).add(n)
    expect = {
        'patch_embed': 'backbone.patch_embed.projection',
        'qkv': 'backbone.stages.0.blocks.0.attn.w_msa.qkv',
        'proj': 'backbone.stages.0.blocks.0.attn.w_msa.proj',
        'fc1': 'backbone.stages.0.blocks.0.ffn.layers.0.0',
        'fc2': 'backbone.stages.0.blocks.0.ffn.layers.1',
        'reduction': 'backbone.stages.0.downsample.reduction',
        'neck': 'neck.lateral_convs.0.conv',
        'rpn': 'rpn_head.rpn_conv',
        'roi': 'roi_head.mask_head.upsample',
        'decode_head': 'decode_head.conv_seg',
        'pred': 'roi_head.bbox_head.fc_cls',
    }
    for role, name in expect.items():
        assert name in roles[role], role
    assert module_roles('backbone.stages.1.blocks.0.attn.w_msa.matmul2') \
        == ['matmul2']
    assert module_roles('rpn_head.rpn_reg') == ['rpn', 'pred']
    assert module_roles('decode_head.conv_seg') == ['decode_head', 'pred']
    # every leaf Linear / conv the converter touches has at most one layer
    # role and proj never catches the patch embedding's `projection`
    assert 'backbone.patch_embed.projection' not in roles.get('proj', ())


def _bits(model):
    out = {}
    for name, q in iter_quantizers(model):
        out[name] = q.bits
    return out


def test_role_and_glob_overrides(det_model):
    model = copy.deepcopy(det_model)
    overrides = {
        'qkv': dict(a_bits=5), 'proj': dict(w_bits=5), 'fc1': dict(w_bits=6),
        'fc2': dict(a_bits=7), 'reduction': dict(w_bits=3),
        'patch_embed': dict(a_bits=3),  # first_last_bits comes first
        'matmul1': dict(a_bits=6), 'matmul2': dict(
            a_bits=5, softmax=dict(mode='log2')),
        'neck': dict(w_bits=7), 'rpn': dict(a_bits=6),
        'roi': dict(w_bits=5), 'pred': dict(a_bits=7),
        'backbone.stages.3.*': dict(w_bits=2),  # globs come last
    }
    quantize_model(model, 4, 4, first_last_bits=8, overrides=overrides)
    b = _bits(model)
    blk = 'backbone.stages.0.blocks.0.attn.w_msa.'
    assert b[blk + 'qkv.input_quantizer'] == 5
    assert b[blk + 'qkv.weight_quantizer'] == 4
    assert b[blk + 'proj.weight_quantizer'] == 5
    assert b[blk + 'matmul1.quantizer_a'] == 6
    assert b[blk + 'matmul1.quantizer_b'] == 6
    assert b[blk + 'matmul2.quantizer_b'] == 5
    sm = model.get_submodule(blk + 'matmul2.quantizer_a')
    assert sm.mode == 'log2' and sm.bits == 5
    ffn = 'backbone.stages.0.blocks.0.ffn.layers.'
    assert b[ffn + '0.0.weight_quantizer'] == 6
    assert b[ffn + '1.input_quantizer'] == 7
    assert b['backbone.stages.0.downsample.reduction.weight_quantizer'] == 3
    # patch_embed: role override (a_bits=3) after first_last_bits=8
    assert b['backbone.patch_embed.projection.weight_quantizer'] == 8
    assert b['backbone.patch_embed.projection.input_quantizer'] == 3
    assert b['neck.lateral_convs.0.conv.weight_quantizer'] == 7
    assert b['rpn_head.rpn_conv.input_quantizer'] == 6
    # pred after rpn / roi: first_last 8 then rpn a6 then pred a7
    assert b['rpn_head.rpn_cls.input_quantizer'] == 7
    assert b['rpn_head.rpn_cls.weight_quantizer'] == 8
    assert b['roi_head.bbox_head.fc_cls.weight_quantizer'] == 8
    assert b['roi_head.mask_head.upsample.weight_quantizer'] == 5
    assert b['roi_head.mask_head.conv_logits.input_quantizer'] == 7
    s3 = 'backbone.stages.3.blocks.0.'
    assert b[s3 + 'attn.w_msa.qkv.weight_quantizer'] == 2
    assert b[s3 + 'ffn.layers.1.weight_quantizer'] == 2
    assert b[s3 + 'attn.w_msa.qkv.input_quantizer'] == 5  # role a_bits


def test_skip_override_and_unmatched_glob(seg_model):
    model = copy.deepcopy(seg_model)
    quantize_model(model, 4, 4, overrides={'decode_head': dict(skip=True),
                                           'matmul1': dict(skip=True)})
    names = [n for n, _ in iter_quantizers(model)]
    assert names and not any(n.startswith('decode_head.') for n in names)
    assert not any('matmul1' in n for n in names)
    assert any('matmul2.quantizer_b' in n for n in names)
    with pytest.raises(ValueError, match='match no quantizable module'):
        quantize_model(copy.deepcopy(seg_model), 4, 4, dry_run=True,
                       overrides={'backbone.stage.*': dict(w_bits=8)})
    # a glob that reaches a matmul with per-channel: error at dry run
    with pytest.raises(ValueError, match='no channel axis'):
        quantize_model(copy.deepcopy(seg_model), 4, 4, dry_run=True,
                       overrides={'*.matmul1': dict(
                           act=dict(granularity='channel'))})


@pytest.mark.parametrize('setting,msg', [
    (dict(matmul=dict(granularity='channel')), 'no channel axis'),
    (dict(act=dict(mode='log2')), 'only valid for the post-softmax'),
    (dict(act=dict(observer=dict(type='PercentileObserver',
                                 percentile=0))), r'percentile must be in'),
    (dict(act=dict(observer=dict(type='PercentileObserver',
                                 percentile=100.5))), r'percentile must be'),
    (dict(softmax=dict(mode='log3')), 'unknown softmax quantizer mode'),
    (dict(overrides=dict(qkvv=dict(a_bits=8))), 'neither a role'),
    (dict(overrides=dict(qkv=dict(bits=8))), 'unknown key'),
    (dict(overrides=dict(matmul1=dict(act=dict(granularity='channel')))),
     'no channel axis'),
    (dict(overrides=dict(fc1=dict(softmax=dict(mode='log2')))),
     "set it under 'matmul2'"),
    (dict(weight=dict(granularity='token')), 'for activations'),
    (dict(weight=dict(bits=4)), 'w_bits / a_bits'),
    (dict(first_last_bits=1), 'bits must be an integer'),
    (dict(act=dict(observer=dict(type='NoSuchObserver'))),
     'unknown observer type'),
])
def test_invalid_settings(setting, msg):
    with pytest.raises(ValueError, match=msg):
        validate_setting(setting)


def test_setting_resolution_merges_dicts():
    spec = QuantSetting(4, 4, act=dict(observer=dict(type='MSEObserver')),
                        overrides=POST_LN)
    args = spec.resolve('backbone.stages.0.blocks.0.attn.w_msa.qkv', 'layer')
    assert args['input_quantizer'] == dict(
        observer=dict(type='MSEObserver'), granularity='channel')
    args = spec.resolve('backbone.stages.0.blocks.0.attn.w_msa.matmul2',
                        'matmul')
    assert args['softmax'] is None and args['bits'] == 4


# ---------------------------------------------------------------- reparam
def _tiny_swin(kind):
    if kind == 'mmdet':
        from mmdet.models.backbones import SwinTransformer
    else:
        from mmseg.models.backbones import SwinTransformer
    torch.manual_seed(0)
    m = SwinTransformer(embed_dims=24, depths=[2, 2], num_heads=[2, 4],
                        strides=(4, 2), out_indices=(0, 1), window_size=7)
    m.init_weights()
    m.eval()
    # Trained LayerNorms are far from (1, 0): make the channels differ.
    g = torch.Generator().manual_seed(3)
    for mod in m.modules():
        if isinstance(mod, torch.nn.LayerNorm):
            mod.weight.data = torch.rand(mod.weight.shape, generator=g) * 3
            mod.bias.data = torch.randn(mod.bias.shape, generator=g) * 0.5
    return m


def _calibrated(m, x, reparam, **setting):
    enable_calibration(m)
    with torch.no_grad():
        m(x)
    return finish_calibration(m, reparam=reparam)


@pytest.mark.parametrize('kind', ['mmdet', 'mmseg'])
def test_reparam_keeps_fp_outputs(kind):
    fp = _tiny_swin(kind)
    # 60x76 -> 15x19 tokens: padded windows in both stages, shifted blocks.
    x = torch.randn(2, 3, 60, 76, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = [o.clone() for o in fp(x)]
    plain, rep = copy.deepcopy(fp), copy.deepcopy(fp)
    for m in (plain, rep):
        quantize_model(m, 4, 4, overrides=POST_LN,
                       softmax=dict(mode='log_sqrt2'))
    assert _calibrated(plain, x, False) == []
    folded = _calibrated(rep, x, True)
    assert len(folded) == 9  # 4 qkv, 4 fc1, 1 reduction
    for name in folded:
        q = rep.get_submodule(name).input_quantizer
        assert q.granularity == 'tensor' and q.scale.dim() == 0
        assert plain.get_submodule(name).input_quantizer.scale.dim() == 1
    # LayerNorms and Linears really changed
    assert not torch.allclose(rep.stages[0].blocks[0].norm1.weight,
                              fp.stages[0].blocks[0].norm1.weight)
    set_quantizers_enabled(rep, False)
    set_quantizers_enabled(plain, False)
    with torch.no_grad():
        out_rep, out_plain = rep(x), plain(x)
    for a, b, r in zip(out_rep, out_plain, ref):
        torch.testing.assert_close(b, r, rtol=0, atol=0)
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4)
    # Without restoring the padding tokens the folding is not exact.
    for mod in rep.modules():
        if isinstance(mod, QuantWindowMSA):
            mod.pad_value = None
    with torch.no_grad():
        broken = rep(x)
    assert max(float((a - r).abs().max()) for a, r in zip(broken, ref)) > 1e-2


@torch.no_grad()
def test_reparam_quantized_matches_per_channel_integers():
    """After folding, per-tensor quantization of the new LayerNorm output
    gives the per-channel quantization of the old one (the RepQ identity),
    checked on one LayerNorm -> Linear pair with torch's kernels."""
    fp = _tiny_swin('mmdet')
    x = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(2))
    m = copy.deepcopy(fp)
    quantize_model(m, 8, 4, overrides=POST_LN)
    enable_calibration(m)
    m(x)
    # finish the activations only, keep a copy of the per-channel params
    blk = m.stages[0].blocks[0]
    fc1 = blk.ffn.layers[0][0]
    finish_calibration(m, reparam=False)
    s, z = fc1.input_quantizer.scale.clone(), \
        fc1.input_quantizer.zero_point.clone()
    y = torch.randn(5, 24, generator=torch.Generator().manual_seed(4)) * 2
    ln_out = blk.norm2(y)
    ref = torch.fake_quantize_per_channel_affine(ln_out, s, z, 1, 0, 15)
    ref = ref @ fc1.module.weight.t() + fc1.module.bias
    # now the folded model, on the same LayerNorm input
    m2 = copy.deepcopy(fp)
    quantize_model(m2, 8, 4, overrides=POST_LN)
    enable_calibration(m2)
    m2(x)
    finish_calibration(m2, reparam=True)
    blk2 = m2.stages[0].blocks[0]
    fc1b = blk2.ffn.layers[0][0]
    q = fc1b.input_quantizer
    out = torch.fake_quantize_per_tensor_affine(
        blk2.norm2(y), float(q.scale), int(q.zero_point), 0, 15)
    out = out @ fc1b.module.weight.t() + fc1b.module.bias
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------- saved parameters
SETTING = dict(overrides=POST_LN, reparam=True,
               softmax=dict(mode='log_sqrt2'),
               act=dict(observer=dict(type='PercentileObserver',
                                      percentile=99.9)))


def _quantized_seg(seg_model, x, w_bits=4, a_bits=4):
    m = copy.deepcopy(seg_model)
    quantize_model(m, w_bits, a_bits, **SETTING)
    snap = snapshot_state(m)
    enable_calibration(m)
    with torch.no_grad():
        m.backbone(x)  # only the backbone sees data: heads stay FP
    folded = finish_calibration(m, reparam=True)
    return m, snap, folded


def test_saved_params_reload_bit_identical(seg_model, tmp_path):
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    qm, snap, folded = _quantized_seg(seg_model, x)
    assert folded
    cfg = dict(w_bits=4, a_bits=4, **SETTING)
    path = str(tmp_path / 'quant_params.pth')
    save_quant_params(path, qm, snap, cfg, reparam=folded)
    # a fresh FP copy, converted with the same config, then loaded
    fresh = copy.deepcopy(seg_model)
    quantize_model(fresh, 4, 4, **SETTING)
    meta = load_quant_params(path, fresh, cfg)
    assert meta['reparam'] == folded
    # heads saw no data: those quantizers stayed disabled, also after load
    states = {n: q.state for n, q in iter_quantizers(qm)}
    assert {n: q.state for n, q in iter_quantizers(fresh)} == states
    assert 'disabled' in states.values() and 'quantizing' in states.values()
    with torch.no_grad():
        a = qm.backbone(x)
        b = fresh.backbone(x)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    for key, value in qm.state_dict().items():
        assert torch.equal(value, fresh.state_dict()[key]), key


def test_saved_params_mismatch_errors(seg_model, det_model, tmp_path):
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    qm, snap, folded = _quantized_seg(seg_model, x)
    cfg = dict(w_bits=4, a_bits=4, **SETTING)
    path = str(tmp_path / 'qp.pth')
    save_quant_params(path, qm, snap, cfg, reparam=folded)
    other = copy.deepcopy(seg_model)
    quantize_model(other, 8, 8, **SETTING)
    with pytest.raises(QuantParamsError, match='W4A4.*W8A8'):
        load_quant_params(path, other, dict(cfg, w_bits=8, a_bits=8))
    det = copy.deepcopy(det_model)
    quantize_model(det, 4, 4, **SETTING)
    with pytest.raises(QuantParamsError, match='belongs to a'):
        load_quant_params(path, det, cfg)
    with pytest.raises(FileNotFoundError, match='not found'):
        load_quant_params(str(tmp_path / 'none.pth'), other, cfg)
    torch.save(dict(meta=dict(format='x'), tensors={}),
               str(tmp_path / 'bad.pth'))
    with pytest.raises(QuantParamsError, match='not a dfq_dense'):
        load_quant_params(str(tmp_path / 'bad.pth'), other, cfg)


# ------------------------------------------------------ percentile search
def test_percentile_search_vs_brute_force():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(3, 500, generator=gen)
    x[0, :4] = torch.tensor([30., -25., 20., 18.])  # clipping pays off
    obs = PercentileSearchObserver(granularity='channel', ch_axis=0,
                                   max_samples=None)
    obs.observe(x)
    scale, zp, qmin, qmax = obs.compute_qparams(4, False)
    xs = x.double().numpy()
    for c in range(3):
        best = None
        for p in (99.9, 99.99, 99.999, 100.0):
            lo = min(np.percentile(xs[c], 100 - p), 0.0)
            hi = max(np.percentile(xs[c], p), 0.0)
            s = np.float32(np.float32(hi) - np.float32(lo)) / np.float32(15)
            z = int(min(max(round(float(np.float32(-lo) / s)), 0), 15))
            xq = torch.fake_quantize_per_tensor_affine(
                x[c], float(s), z, 0, 15)
            err = float((xq.double() - x[c].double()).pow(2).mean())
            if best is None or err < best[0]:
                best = (err, float(s), z)
        assert float(scale[c]) == pytest.approx(best[1], rel=1e-5)
        assert int(zp[c]) == best[2]
    q = Quantizer(bits=4, granularity='channel', ch_axis=0,
                  observer=dict(type='PercentileSearchObserver'))
    q.enable_calibration()
    q(x)
    q.finish_calibration()
    assert torch.equal(q(x), torch.fake_quantize_per_channel_affine(
        x, q.scale, q.zero_point, 0, 0, 15))
