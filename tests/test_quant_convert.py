"""Quantized modules and model conversion (CPU, tiny Swin backbones)."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn.bricks import wrappers as mmcv_wrappers

from dfq_dense.quant import (QuantConv2d, QuantConvTranspose2d, QuantLinear,
                             QuantMatMul, QuantWindowMSA, enable_calibration,
                             fake_quantize, finish_calibration,
                             iter_quantizers, quant_state_dict,
                             quantize_model, set_quantizers_enabled)


def _det_swin():
    from mmdet.models.backbones import SwinTransformer
    return SwinTransformer(embed_dims=24, depths=[2, 2], num_heads=[2, 4],
                           strides=(4, 2), out_indices=(0, 1), window_size=4)


def _seg_swin():
    from mmseg.models.backbones import SwinTransformer
    return SwinTransformer(embed_dims=24, depths=[2, 2], num_heads=[2, 4],
                           strides=(4, 2), out_indices=(0, 1), window_size=4)


SWINS = {'mmdet': _det_swin, 'mmseg': _seg_swin}
# patch_embed conv; 4 blocks x (qkv, proj, 2 ffn) + stage-0 downsample;
# one WindowMSA per block.
EXPECTED = {'Conv2d': 1, 'Linear': 17, 'WindowMSA': 4}


def _make(kind, seed=0):
    torch.manual_seed(seed)
    m = SWINS[kind]()
    m.init_weights()
    m.eval()  # mmdet's Swin.train() returns None: do not chain
    return m


def _inputs(seed=1):
    # 32x32 -> 8x8 tokens (4 windows of 4x4, shifted blocks use the mask)
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(
        seed))


@torch.no_grad()
def _run(model, x):
    return [o.clone() for o in model(x)]


def _rel_err(outs, refs):
    return max(float((o - r).norm() / r.norm()) for o, r in zip(outs, refs))


def _calibrated(kind, w_bits, a_bits, x):
    fp = _make(kind)
    qm = copy.deepcopy(fp)
    quantize_model(qm, w_bits, a_bits)
    enable_calibration(qm)
    calib_out = _run(qm, x)
    finish_calibration(qm)
    return fp, qm, calib_out


def _count_types(model):
    from dfq_dense.quant.convert import _window_msa_types
    counts = {}
    for m in model.modules():
        if isinstance(m, _window_msa_types()):
            name = 'WindowMSA'
        elif isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            name = type(m).__name__  # mmcv wrappers have the same names
        else:
            continue
        counts[name] = counts.get(name, 0) + 1
    return counts


@pytest.mark.parametrize('kind', ['mmdet', 'mmseg'])
def test_convert_swin_counts_and_fp_equivalence(kind):
    fp = _make(kind)
    assert _count_types(fp) == EXPECTED
    qm = copy.deepcopy(fp)
    keys_before = {k for k in fp.state_dict() if 'w_msa' in k and
                   ('relative_position' in k)}
    counts = quantize_model(qm, 8, 8)
    assert counts == EXPECTED
    # every supported module is wrapped exactly once
    n_lin = sum(isinstance(m, QuantLinear) for m in qm.modules())
    n_conv = sum(isinstance(m, QuantConv2d) for m in qm.modules())
    n_msa = sum(isinstance(m, QuantWindowMSA) for m in qm.modules())
    assert (n_lin, n_conv, n_msa) == (17, 1, 4)
    assert not any(isinstance(m.module, (QuantLinear, QuantConv2d))
                   for m in qm.modules() if isinstance(m, QuantLinear))
    assert isinstance(qm.stages[0].blocks[0].attn.w_msa.qkv, QuantLinear)
    # WindowMSA's own keys unchanged
    assert keys_before <= set(qm.state_dict())
    # converting again does nothing (no double wrapping)
    assert quantize_model(qm, 8, 8) == {}
    assert sum(isinstance(m, QuantLinear) for m in qm.modules()) == 17

    x = _inputs()
    refs = _run(fp, x)
    # fresh quantizers are disabled: bit-identical to FP
    for o, r in zip(_run(qm, x), refs):
        assert torch.equal(o, r)
    # calibration pass is FP as well
    enable_calibration(qm)
    for o, r in zip(_run(qm, x), refs):
        assert torch.equal(o, r)
    finish_calibration(qm)
    assert all(q.state == 'quantizing' for _, q in iter_quantizers(qm))
    assert _rel_err(_run(qm, x), refs) > 0
    set_quantizers_enabled(qm, False)
    for o, r in zip(_run(qm, x), refs):
        assert torch.equal(o, r)
    set_quantizers_enabled(qm, True)
    assert _rel_err(_run(qm, x), refs) > 0


@pytest.mark.parametrize('kind', ['mmdet', 'mmseg'])
def test_swin_w16a16_close_w4a4_far(kind):
    x = _inputs()
    fp, q16, _ = _calibrated(kind, 16, 16, x)
    refs = _run(fp, x)
    err16 = _rel_err(_run(q16, x), refs)
    assert 0 < err16 < 1e-3
    _, q4, _ = _calibrated(kind, 4, 4, x)
    err4 = _rel_err(_run(q4, x), refs)
    assert err4 > 0.05
    _, q8, _ = _calibrated(kind, 8, 8, x)
    err8 = _rel_err(_run(q8, x), refs)
    assert err16 < err8 < err4


def test_convert_skip_globs():
    fp = _make('mmdet')
    qm = copy.deepcopy(fp)
    counts = quantize_model(
        qm, 8, 8, skip=['patch_embed.*', '*.ffn.*',
                        'stages.1.blocks.0.attn.w_msa'])
    # skipped: the conv, all 8 ffn Linears, one WindowMSA (its qkv/proj are
    # matched individually and still converted)
    assert counts == {'Linear': 9, 'WindowMSA': 3}
    assert type(qm.patch_embed.projection) is nn.Conv2d
    assert isinstance(qm.stages[0].blocks[0].ffn.layers[1], nn.Linear)
    w_msa = qm.stages[1].blocks[0].attn.w_msa
    assert not isinstance(w_msa, QuantWindowMSA)
    assert isinstance(w_msa.qkv, QuantLinear)
    assert isinstance(qm.stages[1].blocks[1].attn.w_msa, QuantWindowMSA)
    x = _inputs()
    enable_calibration(qm)
    _run(qm, x)
    finish_calibration(qm)
    assert _rel_err(_run(qm, x), _run(fp, x)) > 0


class _TinyDetector(nn.Module):

    def __init__(self):
        super().__init__()
        self.backbone = _make('mmseg')
        self.neck = nn.Conv2d(48, 8, 1)
        self.fc_cls = nn.Linear(8, 3)


def test_convert_scope_backbone_and_names():
    model = _TinyDetector()
    counts = quantize_model(model, 8, 8, scope='backbone',
                            skip=['backbone.patch_embed.*'])
    assert counts == {'Linear': 17, 'WindowMSA': 4}
    assert type(model.neck) is nn.Conv2d and type(model.fc_cls) is nn.Linear
    assert type(model.backbone.patch_embed.projection) is nn.Conv2d

    model = _TinyDetector()
    counts = quantize_model(model, 8, 8, scope='model', skip=['*.fc_cls',
                                                              'fc_cls'])
    assert counts == {'Conv2d': 2, 'Linear': 17, 'WindowMSA': 4}
    assert type(model.fc_cls) is nn.Linear
    names = [n for n, _ in iter_quantizers(model)]
    assert 'neck.input_quantizer' in names
    assert 'backbone.stages.0.blocks.0.attn.w_msa.matmul2.quantizer_b' in \
        names
    # Naive strategy: the post-softmax attention operand stays FP.
    assert 'backbone.stages.0.blocks.0.attn.w_msa.matmul2.quantizer_a' not \
        in names


@pytest.mark.parametrize('bad', [dict(w_bits=1), dict(a_bits=17),
                                 dict(w_bits=8.0), dict(a_bits='4')])
def test_convert_invalid_bits(bad):
    args = dict(w_bits=8, a_bits=8)
    args.update(bad)
    name = next(iter(bad))
    with pytest.raises(ValueError, match=f'{name} must be an integer in '
                       '2-16'):
        quantize_model(nn.Linear(2, 2), **args)


def test_convert_invalid_scope():
    with pytest.raises(ValueError, match="'neck'"):
        quantize_model(nn.Sequential(nn.Linear(2, 2)), 8, 8, scope='neck')
    with pytest.raises(ValueError, match='backbone'):
        quantize_model(nn.Sequential(nn.Linear(2, 2)), 8, 8,
                       scope='backbone')


@pytest.mark.parametrize('kind', ['mmdet', 'mmseg'])
@pytest.mark.parametrize('with_mask', [False, True])
def test_quant_window_msa_matches_original(kind, with_mask):
    if kind == 'mmdet':
        from mmdet.models.backbones.swin import WindowMSA
    else:
        from mmseg.models.backbones.swin import WindowMSA
    torch.manual_seed(0)
    msa = WindowMSA(embed_dims=8, num_heads=2, window_size=(3, 3))
    nn.init.normal_(msa.relative_position_bias_table, std=0.5)
    msa.eval()
    nW, B, N = 2, 2, 9
    x = torch.randn(nW * B, N, 8)
    mask = None
    if with_mask:
        mask = torch.zeros(nW, N, N)
        mask[1, :4, 4:] = -100.
        mask[1, 4:, :4] = -100.
    with torch.no_grad():
        ref = msa(x, mask)
    q = QuantWindowMSA(msa, a_bits=8)
    # shared parameters / identical state-dict keys
    assert q.qkv is msa.qkv and q.proj is msa.proj
    assert q.relative_position_bias_table is msa.relative_position_bias_table
    assert set(msa.state_dict()) <= set(q.state_dict())
    with torch.no_grad():
        assert torch.equal(q(x, mask), ref)
    hooked = []
    q.matmul2.register_forward_hook(lambda m, i, o: hooked.append(o))
    enable_calibration(q)
    with torch.no_grad():
        assert torch.equal(q(x, mask), ref)
        finish_calibration(q)
        out = q(x, mask)
    assert len(hooked) == 2 and hooked[1].shape == (nW * B, 2, N, 4)
    assert not torch.equal(out, ref)
    assert torch.allclose(out, ref, atol=0.05)
    # naive strategy: the post-softmax attention operand is not quantized
    assert isinstance(q.matmul2.quantizer_a, nn.Identity)


def test_quant_matmul():
    mm = QuantMatMul(4)
    a, b = torch.randn(3, 4), torch.randn(4, 5)
    assert torch.equal(mm(a, b), a @ b)
    enable_calibration(mm)
    mm(a, b)
    finish_calibration(mm)
    qa = mm.quantizer_a
    ref = fake_quantize(a, qa.scale, qa.zero_point, 0, 15) @ fake_quantize(
        b, mm.quantizer_b.scale, mm.quantizer_b.zero_point, 0, 15)
    assert torch.equal(mm(a, b), ref)
    assert not torch.equal(ref, a @ b)


def _calibrate_module(m, *inputs):
    enable_calibration(m)
    with torch.no_grad():
        for x in inputs:
            m(x)
    finish_calibration(m)


def test_quant_conv_linear_match_manual():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1, groups=2,
                     padding_mode='reflect')
    x = torch.randn(2, 4, 7, 7)
    q = QuantConv2d(copy.deepcopy(conv), w_bits=4, a_bits=6)
    _calibrate_module(q, x)
    wq = q.weight_quantizer
    assert wq.scale.shape == (6, )
    w = fake_quantize(conv.weight, wq.scale, 0, -8, 7, ch_axis=0)
    xi = q.input_quantizer
    xq = fake_quantize(x, xi.scale, xi.zero_point, 0, 63)
    ref = F.conv2d(F.pad(xq, (1, 1, 1, 1), mode='reflect'), w, conv.bias, 2,
                   0, 1, 2)
    with torch.no_grad():
        assert torch.equal(q(x), ref)

    lin = nn.Linear(5, 3)
    ql = QuantLinear(copy.deepcopy(lin), w_bits=3, a_bits=8)
    xl = torch.randn(4, 5)
    _calibrate_module(ql, xl)
    w = fake_quantize(lin.weight, ql.weight_quantizer.scale, 0, -4, 3, 0)
    xq = fake_quantize(xl, ql.input_quantizer.scale,
                       ql.input_quantizer.zero_point, 0, 255)
    with torch.no_grad():
        assert torch.equal(ql(xl), F.linear(xq, w, lin.bias))
    assert ql.weight is ql.module.weight


def test_quant_conv_transpose_output_channel_axis():
    torch.manual_seed(0)
    deconv = nn.ConvTranspose2d(4, 6, 2, stride=2, groups=2)
    assert deconv.weight.shape == (4, 3, 2, 2)
    q = QuantConvTranspose2d(copy.deepcopy(deconv), w_bits=4, a_bits=8)
    x = torch.randn(1, 4, 3, 3)
    _calibrate_module(q, x)
    # per output channel within a group: axis 1 of the weight
    assert q.weight_quantizer.ch_axis == 1
    assert q.weight_quantizer.scale.shape == (3, )
    expected = deconv.weight.detach().abs().amax(dim=(0, 2, 3)) / 7.5
    assert torch.allclose(q.weight_quantizer.scale, expected)
    with torch.no_grad():
        out = q(x)
        out_sz = q(x, output_size=(7, 7))
    assert out.shape == (1, 6, 6, 6) and out_sz.shape == (1, 6, 7, 7)
    assert torch.allclose(out, deconv(x), atol=0.2)
    assert not torch.equal(out, deconv(x))


def test_mmcv_wrappers_empty_input():
    torch.manual_seed(0)
    model = nn.Module()
    model.conv = mmcv_wrappers.Conv2d(4, 6, 3, padding=1)
    model.deconv = mmcv_wrappers.ConvTranspose2d(6, 2, 2, stride=2)
    model.fc = mmcv_wrappers.Linear(5, 3)
    counts = quantize_model(model, 8, 8)
    assert counts == {'Conv2d': 1, 'ConvTranspose2d': 1, 'Linear': 1}
    assert isinstance(model.conv, QuantConv2d)
    assert isinstance(model.conv.module, mmcv_wrappers.Conv2d)
    enable_calibration(model)
    with torch.no_grad():
        model.conv(torch.zeros(0, 4, 5, 5))  # empty: nothing observed
        y = model.conv(torch.randn(2, 4, 5, 5))
        model.deconv(y)
        model.fc(torch.randn(3, 5))
    finish_calibration(model)
    assert model.conv.input_quantizer.state == 'quantizing'
    with torch.no_grad():
        out = model.conv(torch.zeros(0, 4, 5, 5))
        assert out.shape == (0, 6, 5, 5)
        assert model.deconv(torch.zeros(0, 6, 5, 5)).shape == (0, 2, 10, 10)
        assert model.fc(torch.zeros(0, 5)).shape == (0, 3)
        assert model.conv(torch.randn(1, 4, 5, 5)).shape == (1, 6, 5, 5)


def test_unobserved_quantizer_stays_fp_and_weights_still_calibrated():
    q = QuantLinear(nn.Linear(4, 2), w_bits=8, a_bits=8)
    enable_calibration(q)
    finish_calibration(q)  # never ran: input quantizer has no data
    assert q.input_quantizer.state == 'disabled'
    assert q.weight_quantizer.state == 'quantizing'
    assert torch.allclose(q.weight_quantizer.scale,
                          q.weight.detach().abs().amax(1) / 127.5)


def test_quant_state_dict_and_checkpoint_loading():
    x = _inputs()
    fp, qm, _ = _calibrated('mmdet', 8, 8, x)
    qsd = quant_state_dict(qm)
    # input + weight of 17 Linear and 1 Conv2d; q, k^T and v of 4 attentions
    # (the post-softmax operand stays FP in the naive strategy).
    n_quantizers = 2 * (17 + 1) + 3 * 4
    assert len(qsd) == n_quantizers
    entry = qsd['stages.0.blocks.0.attn.w_msa.qkv.weight_quantizer']
    assert entry['scale'].shape == (72, ) and entry['zero_point'].dtype == \
        torch.int32
    # a fresh converted model loads the quantized checkpoint (per-channel
    # shapes adopted) and reproduces the outputs
    other = _make('mmdet', seed=5)
    quantize_model(other, 8, 8)
    other.load_state_dict(qm.state_dict())
    set_quantizers_enabled(other, True)
    for o, r in zip(_run(other, x), _run(qm, x)):
        assert torch.equal(o, r)
    for k, v in quant_state_dict(other).items():
        assert torch.equal(v['scale'], qsd[k]['scale'])
    # an FP checkpoint loads into a converted model (keys remapped)
    fresh = _make('mmdet', seed=6)
    quantize_model(fresh, 8, 8)
    missing, unexpected = fresh.load_state_dict(fp.state_dict(),
                                                strict=False)
    assert not unexpected
    assert all(k.endswith(('.scale', '.zero_point')) for k in missing)
    for o, r in zip(_run(fresh, x), _run(fp, x)):
        assert torch.equal(o, r)


def test_multihead_attention_left_fp():
    model = nn.Module()
    model.mha = nn.MultiheadAttention(8, 2)
    model.fc = nn.Linear(8, 8)
    counts = quantize_model(model, 8, 8)
    assert counts == {'Linear': 1}
    assert type(model.mha.out_proj) is not QuantLinear
    x = torch.randn(3, 1, 8)
    assert model.mha(x, x, x)[0].shape == (3, 1, 8)
