"""Tests of MimiQ (losses, q k^T recorder, synthesizer, its distillation
adapter) and RealImages."""
import copy
import itertools
import math
import os
import os.path as osp

import numpy as np
import pytest
import torch

from dfq_dense.adapt import MimiQDistill, headwise_structure_loss
from dfq_dense.registry import ADAPTERS, MODELS, build
from dfq_dense.synth import (AttnLogitsRecorder, MimiQ, RealImages,
                             inter_head_similarity,
                             inter_head_similarity_loss, ssim_maps,
                             total_variation, valid_range)
from dfq_dense.synth.hooks import find_shift_window_msa

from tiny_models import MEAN, STD
from tiny_models import TinyModel as _TinyModel


def _swin(lib='mmdet', seed=0):
    if lib == 'mmdet':
        from mmdet.models.backbones import SwinTransformer
    else:
        from mmseg.models.backbones import SwinTransformer
    torch.manual_seed(seed)
    bb = SwinTransformer(embed_dims=24, depths=[2, 2], num_heads=[2, 4],
                         strides=(4, 2), out_indices=(0, 1), window_size=7)
    bb.eval()  # SwinTransformer.train() returns None
    return bb


class TinyModel(_TinyModel):
    """The shared tiny model with its backbone in eval mode."""

    def __init__(self, seed=0):
        super().__init__(seed)
        self.backbone.eval()  # SwinTransformer.train() returns None


@pytest.fixture(scope='module')
def tiny_model():
    return TinyModel()


# ------------------------------------------------------------------ numpy refs
def _np_ssim(a, b, c1=0.01**2, c2=0.03**2):
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b,
                                                         np.float64).ravel()
    ma, mb = a.mean(), b.mean()
    va, vb = ((a - ma)**2).mean(), ((b - mb)**2).mean()
    cov = ((a - ma) * (b - mb)).mean()
    return ((2 * ma * mb + c1) * (2 * cov + c2)) / (
        (ma**2 + mb**2 + c1) * (va + vb + c2))


def _brute_inter_head(logits, valid):
    """Loop version of MimiQ's inter-head loss of one layer."""
    logits = np.asarray(logits, np.float64)
    valid = np.asarray(valid, bool)
    B, nW, h, N, _ = logits.shape
    terms = []
    for b in range(B):
        for w in range(nW):
            keys = [k for k in range(N) if valid[b, w, k]]
            for q in range(N):
                if not valid[b, w, q]:
                    continue
                maps = []
                for hd in range(h):
                    v = logits[b, w, hd, q, keys]
                    maps.append((v - v.min()) / (v.max() - v.min()))
                pair = [1 - _np_ssim(maps[i], maps[j])**2
                        for i, j in itertools.combinations(range(h), 2)]
                terms.append(np.mean(pair))
    return float(np.mean(terms))


# ------------------------------------------------------------------- losses
def test_ssim_maps_vs_numpy():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 7, 7, generator=g, dtype=torch.float64)
    b = torch.rand(2, 3, 7, 7, generator=g, dtype=torch.float64)
    got = ssim_maps(a, b, dim=(-2, -1))
    assert got.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            ref = _np_ssim(a[i, j].numpy(), b[i, j].numpy())
            assert abs(got[i, j].item() - ref) < 1e-12
    # last dim only, other constants
    got1 = ssim_maps(a, b, c1=0.1, c2=0.2)
    ref1 = _np_ssim(a[1, 2, 3].numpy(), b[1, 2, 3].numpy(), 0.1, 0.2)
    assert abs(got1[1, 2, 3].item() - ref1) < 1e-12
    # identity, and a constant map against itself
    assert torch.allclose(ssim_maps(a, a, dim=(-2, -1)),
                          torch.ones(2, 3, dtype=torch.float64))
    assert ssim_maps(torch.zeros(5), torch.zeros(5)).item() == 1.
    # anti-correlated maps: SSIM < 0
    x = torch.linspace(0, 1, 9, dtype=torch.float64)
    assert ssim_maps(x, 1 - x).item() < 0


def test_inter_head_zero_when_heads_equal():
    g = torch.Generator().manual_seed(1)
    one = torch.randn(2, 3, 1, 9, 9, generator=g, dtype=torch.float64)
    valid = torch.ones(2, 3, 9, dtype=torch.bool)
    valid[:, 2, 6:] = False
    same = one.expand(2, 3, 4, 9, 9)
    assert abs(inter_head_similarity(same, valid).item()) < 1e-12
    # an affine change of a head's logits does not change its min-max map
    aff = torch.cat([one, 3 * one + 2], dim=2)
    assert abs(inter_head_similarity(aff, valid).item()) < 1e-12
    # padding keys are ignored: garbage there changes nothing
    junk = same.clone()
    junk[:, 2, :, :, 6:] = torch.randn(2, 4, 9, 3, generator=g,
                                       dtype=torch.float64) * 100
    junk[:, 2, :, 6:, :] = torch.randn(2, 4, 3, 9, generator=g,
                                       dtype=torch.float64) * 100
    assert abs(inter_head_similarity(junk, valid).item()) < 1e-12
    # a single head has no pair
    assert inter_head_similarity(one, valid).item() == 0


def test_inter_head_matches_brute_force():
    # _brute_inter_head averages over the pairs i < j (head_pairs=
    # 'distinct', earlier versions); the released H x H average (the
    # default) is checked in tests/test_fidelity_schedules.py
    g = torch.Generator().manual_seed(2)
    # 2 heads, 1 window, 4 tokens, the last one padding
    logits = torch.randn(1, 1, 2, 4, 4, generator=g, dtype=torch.float64)
    valid = torch.tensor([[[True, True, True, False]]])
    got = inter_head_similarity(logits, valid, pairs='distinct').item()
    ref = _brute_inter_head(logits.numpy(), valid.numpy())
    assert abs(got - ref) < 1e-12 and 0 < got < 1
    # 3 heads, 2 images x 2 windows with different padding
    logits = torch.randn(2, 2, 3, 4, 4, generator=g, dtype=torch.float64)
    valid = torch.tensor([[True, True, True, True], [True, False, True,
                                                     False]])
    valid = valid.unsqueeze(0).expand(2, 2, 4)
    got = inter_head_similarity(logits, valid, pairs='distinct').item()
    assert abs(got - _brute_inter_head(logits.numpy(), valid.numpy())) < 1e-12
    # no mask = all valid
    full = torch.ones(2, 2, 4, dtype=torch.bool)
    assert abs(inter_head_similarity(logits, pairs='distinct').item() -
               _brute_inter_head(logits.numpy(), full.numpy())) < 1e-12
    # layer mean, list and record inputs
    l2 = torch.randn(1, 1, 2, 4, 4, generator=g, dtype=torch.float64)
    loss, per = inter_head_similarity_loss(
        [dict(logits=logits, valid=valid), dict(logits=l2, valid=None)],
        return_per_layer=True, pairs='distinct')
    assert per.shape == (2, )
    assert abs(per[0].item() - got) < 1e-12
    assert abs(loss.item() - per.mean().item()) < 1e-12
    assert torch.allclose(inter_head_similarity_loss([logits, l2],
                                                     [valid, None],
                                                     pairs='distinct'), loss)
    with pytest.raises(ValueError, match='no logits'):
        inter_head_similarity_loss([])


def test_inter_head_gradient():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 2, 3, 9, 9, generator=g, requires_grad=True)
    valid = torch.ones(1, 2, 9, dtype=torch.bool)
    valid[0, 1, 8] = False
    inter_head_similarity(x, valid).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert x.grad[0, 1, :, :, 8].abs().sum() == 0  # padding keys
    assert x.grad[0, 1, :, 8, :].abs().sum() == 0  # padding queries


def _torch_loop_inter_head(logits, valid, pairs, total=None):
    """MimiQ's inter-head loss of one layer written query by query from its
    definition with plain torch ops (autograd gives its gradient):
    min-max map of each head over the valid keys, global SSIM of every head
    pair, mean of 1 - SSIM^2 over pairs and valid queries."""
    c1, c2 = 0.01**2, 0.03**2
    B, nW, h, N, _ = logits.shape
    terms = []
    for b in range(B):
        for w in range(nW):
            keys = valid[b, w].nonzero()[:, 0]
            for q in range(N):
                if not valid[b, w, q]:
                    continue
                maps = []
                for hd in range(h):
                    v = logits[b, w, hd, q, keys]
                    maps.append((v - v.amin()) / (v.amax() - v.amin()))
                pair = []
                for i, j in pairs(h):
                    a, c = maps[i], maps[j]
                    ma, mc = a.mean(), c.mean()
                    va, vc = ((a - ma)**2).mean(), ((c - mc)**2).mean()
                    cov = ((a - ma) * (c - mc)).mean()
                    ssim = ((2 * ma * mc + c1) * (2 * cov + c2)) / (
                        (ma**2 + mc**2 + c1) * (va + vc + c2))
                    pair.append(1 - ssim**2)
                terms.append(torch.stack(pair).mean())
    count = len(terms) if total is None else len(terms) / B * total
    return torch.stack(terms).sum() / count


@pytest.mark.parametrize('pairs', ['all', 'distinct'])
def test_inter_head_gradient_vs_loop_reference(pairs):
    """The written-out backward against autograd through the query-by-query
    definition: padding keys and queries, tied min / max keys (saturated
    tokens), a micro-batch's share (total)."""
    pair_fn = (lambda h: itertools.product(range(h), range(h))) \
        if pairs == 'all' else \
        (lambda h: itertools.combinations(range(h), 2))
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(2, 3, 3, 6, 6, generator=g, dtype=torch.float64)
    # ties: identical keys (saturated tokens), at the min and at the max
    logits[0, 0, :, :, 4] = logits[0, 0, :, :, 2]
    logits[1, 2, :, :, 1] = logits[1, 2].amax(-1)
    logits[1, 2, :, :, 3] = logits[1, 2].amax(-1)
    valid = torch.ones(2, 3, 6, dtype=torch.bool)
    valid[:, 1, 5] = False
    valid[1, 2, 0] = False
    for total in (None, 5):
        x1 = logits.clone().requires_grad_()
        x2 = logits.clone().requires_grad_()
        got = inter_head_similarity(x1, valid, pairs=pairs, total=total)
        ref = _torch_loop_inter_head(x2, valid, pair_fn, total)
        assert abs(got.item() - ref.item()) < 1e-12
        got.backward()
        ref.backward()
        assert torch.allclose(x1.grad, x2.grad, rtol=1e-9, atol=1e-14)
        assert x1.grad[:, 1, :, :, 5].abs().sum() == 0  # padding keys
        assert x1.grad[1, 2, :, 0, :].abs().sum() == 0  # padding queries


def test_inter_head_gradcheck():
    """Against finite differences (no ties), float64."""
    g = torch.Generator().manual_seed(12)
    x = torch.randn(1, 2, 3, 5, 5, generator=g, dtype=torch.float64,
                    requires_grad=True)
    valid = torch.ones(1, 2, 5, dtype=torch.bool)
    valid[0, 1, 4] = False
    assert torch.autograd.gradcheck(
        lambda t: inter_head_similarity(t, valid), (x, ))
    assert torch.autograd.gradcheck(
        lambda t: inter_head_similarity(t, pairs='distinct', total=3), (x, ))


def _np_structure(t, s, valid, c2=0.03**2):
    """(windows, C) structure terms over the valid tokens, numpy loop."""
    W, N, C = t.shape
    out = np.zeros((W, C))
    for w in range(W):
        idx = [n for n in range(N) if valid[w, n]]
        for c in range(C):
            a, b = t[w, idx, c], s[w, idx, c]
            cov = ((a - a.mean()) * (b - b.mean())).mean()
            out[w, c] = (2 * cov + c2) / (a.var() + b.var() + c2)
    return out


def test_headwise_structure_loss_vs_numpy():
    g = torch.Generator().manual_seed(4)
    t = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)
    s = t + 0.5 * torch.randn(3, 5, 4, generator=g, dtype=torch.float64)
    valid = torch.ones(3, 5, dtype=torch.bool)
    valid[2, 3:] = False
    ref = _np_structure(t.numpy(), s.numpy(), valid.numpy())
    loss = headwise_structure_loss(t, s, num_heads=2, valid=valid)
    assert abs(loss.item() - (1 - ref.mean())) < 1e-12
    st = headwise_structure_loss(t, s, 2, valid=valid, reduction='none')
    assert st.shape == (3, 2, 2)
    np.testing.assert_allclose(st.reshape(3, 4).numpy(), ref, rtol=1e-12)
    # no mask: all tokens; (B, nW, N, C) layout gives the same
    ref_all = _np_structure(t.numpy(), s.numpy(), np.ones((3, 5), bool))
    assert abs(headwise_structure_loss(t, s, 4).item() -
               (1 - ref_all.mean())) < 1e-12
    assert torch.allclose(
        headwise_structure_loss(t.reshape(1, 3, 5, 4), s.reshape(1, 3, 5, 4),
                                2, valid=valid.reshape(1, 3, 5)), loss)
    # student = teacher + per-channel shift: zero loss; gradient flows
    assert abs(headwise_structure_loss(t, t + 3., 2).item()) < 1e-12
    s_req = s.clone().requires_grad_(True)
    headwise_structure_loss(t, s_req, 2, valid=valid).backward()
    assert s_req.grad[2, 3:].abs().sum() == 0 and s_req.grad.abs().sum() > 0
    # list of records: mean over layers
    recs_t = [dict(feat=t.reshape(1, 3, 5, 4), valid=valid.reshape(1, 3, 5)),
              dict(feat=t, valid=None)]
    recs_s = [dict(feat=s.reshape(1, 3, 5, 4)), dict(feat=s)]
    both = headwise_structure_loss(recs_t, recs_s, [2, 4])
    assert abs(both.item() - (2 - ref.mean() - ref_all.mean()) / 2) < 1e-12
    with pytest.raises(ValueError, match='heads'):
        headwise_structure_loss(t, s, 3)


# ------------------------------------------------------------------- hooks
def _manual_logits(qkv_out, heads, scale):
    """Per-head (q * scale) @ k^T from the qkv output, by slicing."""
    C = qkv_out.shape[-1] // 3
    d = C // heads
    out = []
    for h in range(heads):
        q = qkv_out[..., h * d:(h + 1) * d]
        k = qkv_out[..., C + h * d:C + (h + 1) * d]
        out.append((q * scale) @ k.transpose(-1, -2))
    return torch.stack(out, 1)  # (B*nW, heads, N, N)


def test_logits_recorder_vs_manual_with_padding(tiny_model):
    bb = tiny_model.backbone
    msas = [m for _, m in find_shift_window_msa(bb)]
    qkv_outs, soft_outs = [], []
    handles = [m.w_msa.qkv.register_forward_hook(
        lambda mod, a, o: qkv_outs.append(o)) for m in msas]
    handles += [m.w_msa.softmax.register_forward_hook(
        lambda mod, a, o: soft_outs.append(o)) for m in msas]
    x = torch.randn(2, 3, 60, 60)  # 15x15 tokens -> 21x21 (9 windows)
    try:
        with AttnLogitsRecorder(bb, record_probs=True) as rec, \
                torch.no_grad():
            assert len(rec) == 4
            bb(x)
            records = list(rec.records)
        assert not rec.records and not rec._handles
    finally:
        for h in handles:
            h.remove()
    assert len(records) == 4
    # stage 2: 15x15 -> merged (padded) 8x8 tokens -> 14x14 (4 windows)
    expected = [(15, 15, 9, 0), (15, 15, 9, 3), (8, 8, 4, 0), (8, 8, 4, 3)]
    for r, (H, W, nW, shift), m, qo, so in zip(records, expected, msas,
                                               qkv_outs, soft_outs):
        heads = m.w_msa.num_heads
        assert r['hw_shape'] == (H, W) and r['shift_size'] == shift
        assert r['num_heads'] == heads and r['window_size'] == 7
        assert r['logits'].shape == (2, nW, heads, 49, 49)
        assert r['probs'].shape == (2, nW, heads, 49, 49)
        assert r['valid'].shape == (2, nW, 49)
        assert r['valid'].sum().item() == 2 * H * W
        man = _manual_logits(qo, heads, m.w_msa.scale)
        assert torch.allclose(r['logits'].reshape(-1, heads, 49, 49), man,
                              atol=1e-6)
        assert torch.equal(r['probs'].reshape(-1, heads, 49, 49), so)
    # unshifted block: probs = softmax(logits + relative position bias)
    w = msas[0].w_msa
    bias = w.relative_position_bias_table[
        w.relative_position_index.view(-1)].view(49, 49, -1).permute(2, 0, 1)
    assert torch.allclose((records[0]['logits'] + bias).softmax(-1),
                          records[0]['probs'], atol=1e-6)
    # the loss runs on the records
    loss = inter_head_similarity_loss(records)
    assert 0 < loss.item() < 1


def test_logits_recorder_options_and_errors(tiny_model):
    bb = tiny_model.backbone
    with AttnLogitsRecorder(bb, record_logits=False, record_probs=True,
                            average_heads_probs=True) as rec, \
            torch.no_grad():
        bb(torch.randn(1, 3, 28, 28))
        assert 'logits' not in rec.records[0]
        p = rec.probs()
        assert p[0].shape == (1, 1, 49, 49) and p[2].shape == (1, 1, 49, 49)
        assert torch.allclose(p[0].sum(-1), torch.ones(1, 1, 49))
    with pytest.raises(ValueError, match='ShiftWindowMSA'):
        AttnLogitsRecorder(torch.nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match='nothing to record'):
        AttnLogitsRecorder(bb, record_logits=False)


def test_logits_recorder_mmseg_and_quantized():
    """mmseg's Swin, then the same model converted to QuantWindowMSA /
    QuantLinear (quantizers disabled: must give the FP logits)."""
    from dfq_dense.quant.convert import quantize_model
    from dfq_dense.quant.modules import QuantWindowMSA
    bb = _swin('mmseg')
    x = torch.randn(1, 3, 36, 44)
    with AttnLogitsRecorder(bb, record_probs=True) as rec, torch.no_grad():
        bb(x)
        fp = [(r['logits'], r['probs']) for r in rec.records]
    assert fp[0][0].shape == (1, 4, 2, 49, 49)  # 9x11 tokens -> 14x14
    qbb = copy.deepcopy(bb)
    quantize_model(qbb, w_bits=8, a_bits=8)
    assert isinstance(qbb.stages[0].blocks[0].attn.w_msa, QuantWindowMSA)
    assert type(qbb.stages[0].blocks[0].attn.w_msa.qkv).__name__ == \
        'QuantLinear'
    for m in qbb.modules():  # fresh quantizers: pass-through
        if hasattr(m, 'state') and type(m).__name__ == 'Quantizer':
            assert m.state == 'disabled'
    with AttnLogitsRecorder(qbb, record_probs=True) as rec, torch.no_grad():
        qbb(x)
        q = [(r['logits'], r['probs']) for r in rec.records]
    assert len(q) == len(fp) == 4
    for (lf, pf), (lq, pq) in zip(fp, q):
        assert torch.allclose(lf, lq, atol=1e-5)
        assert torch.allclose(pf, pq, atol=1e-6)


# ---------------------------------------------------------------- MimiQ
def _mimiq(**kw):
    cfg = dict(type='MimiQ', num_images=2, batch_size=2, img_size=(36, 44),
               iterations=3, seed=0, log_interval=1, progress=False)
    cfg.update(kw)
    return build(MODELS, cfg)


def test_mimiq_build_deterministic(tiny_model):
    from mmengine.logging import MessageHub
    bb = tiny_model.backbone
    grads = [p.requires_grad for p in bb.parameters()]
    s = _mimiq()
    assert isinstance(s, MimiQ)
    assert s.components == dict(head_similarity=True, pseudo_label=True,
                                tv=True)
    assert not hasattr(s, 'adapt')  # the distillation is MimiQDistill
    x = s.generate(tiny_model)
    assert x.shape == (2, 3, 36, 44) and torch.isfinite(x).all()
    lo, hi = valid_range(torch.tensor(MEAN), torch.tensor(STD))
    assert (x >= lo - 1e-5).all() and (x <= hi + 1e-5).all()
    assert [p.requires_grad for p in bb.parameters()] == grads
    assert not bb.stages[0].blocks[0].attn._forward_hooks  # hooks removed
    assert len(s.history) == 3
    h = s.history[0]
    assert set(h) == {'batch', 'iter', 'lr', 'loss', 'loss_head_sim',
                      'loss_ce', 'loss_tv'}
    assert h['loss_head_sim'] > 0 and h['loss_ce'] > 0 and h['loss_tv'] > 0
    assert abs(h['loss'] - h['loss_head_sim'] - h['loss_ce'] -
               h['loss_tv']) < 1e-4
    hub = MessageHub.get_current_instance()
    assert hub.get_scalar('synth/loss_head_sim').current() == pytest.approx(
        s.history[-1]['loss_head_sim'])
    # same seed -> same images; another seed -> others
    assert torch.equal(x, _mimiq().generate(tiny_model))
    assert not torch.equal(x, _mimiq(seed=1).generate(tiny_model))


def test_mimiq_head_similarity_decreases(tiny_model):
    s = _mimiq(iterations=6, img_size=56, lr=0.1, jitter=0, flip=False,
               noise_std=0., color_jitter=0.,
               components=dict(pseudo_label=False, tv=False))
    s.generate(tiny_model)
    hs = [h['loss_head_sim'] for h in s.history]
    assert hs[-1] < hs[0]
    assert all(h['loss_ce'] == 0 and h['loss_tv'] == 0 for h in s.history)


def test_mimiq_components_and_check_model(tiny_model):
    with pytest.raises(ValueError, match='head_similarity, pseudo_label, tv'):
        _mimiq(components=dict(entropy=True))
    with pytest.raises(ValueError, match='switched off'):
        _mimiq(components=dict(head_similarity=False, pseudo_label=False,
                               tv=False))
    assert _mimiq(components=['tv', 'pseudo_label']).components == dict(
        head_similarity=False, pseudo_label=True, tv=True)
    # the distillation is not a synthesis component any more
    with pytest.raises(ValueError, match="unknown component 'distill'"):
        _mimiq(components=dict(distill=False))
    with pytest.raises(ValueError, match='known components'):
        _mimiq(components=['head_sim'])
    s = _mimiq()
    s.check_model(tiny_model)
    bad = torch.nn.Module()
    bad.backbone = torch.nn.Conv2d(3, 3, 1)
    with pytest.raises(ValueError, match='Swin'):
        s.check_model(bad)
    with pytest.raises(ValueError, match='backbone'):
        s.check_model(torch.nn.Conv2d(3, 3, 1))
    # pseudo-label + TV only: no recorder needed, still optimises
    s = _mimiq(iterations=2, components=dict(head_similarity=False))
    x = s.generate(tiny_model)
    assert torch.isfinite(x).all()
    assert all(h['loss_head_sim'] == 0 and h['loss_ce'] > 0
               for h in s.history)


def test_mimiq_schedule_and_tv():
    s = MimiQ(iterations=101, progress=False)
    assert s.lr_at(0) == pytest.approx(0.1)
    assert s.lr_at(50) == pytest.approx((0.1 + 1e-3) / 2)
    assert s.lr_at(100) == pytest.approx(1e-3)
    assert s.jitter_at(0) == 8 and s.jitter_at(50) == 8
    assert s.jitter_at(51) == 16 and s.jitter_at(100) == 16
    assert MimiQ(jitter=5, progress=False).jitter == (5, 5)
    # TV: tv_weight * TV at the reference size, scaled by sqrt(ref / pixels)
    g = torch.Generator().manual_seed(5)
    s = MimiQ(tv_weight=0.5, tv_ref_pixels=2 * 8 * 8, progress=False)
    x = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    assert s.tv_loss(x).item() == pytest.approx(0.5 * total_variation(x))
    x4 = torch.randn(2, 3, 16, 16, generator=g, dtype=torch.float64)
    assert s.tv_loss(x4).item() == pytest.approx(0.25 * total_variation(x4))
    # PSAQ-style target
    s = MimiQ(tv_weight=0.05, tv_tau_range=(10., 10.), tv_ref_pixels=128,
              progress=False)
    assert s.tv_loss(x).item() == pytest.approx(
        0.05 * abs(total_variation(x).item() - 10.))


# ------------------------------------------------------------ RealImages
class _DummyModel(torch.nn.Module):

    def __init__(self):
        super().__init__()
        from mmdet.models.data_preprocessors import DetDataPreprocessor
        self.backbone = torch.nn.Identity()
        self.data_preprocessor = DetDataPreprocessor(
            mean=MEAN, std=STD, bgr_to_rgb=True)


@pytest.fixture
def image_dir(tmp_path):
    import cv2
    rng = np.random.RandomState(0)
    root = tmp_path / 'imgs'
    os.makedirs(root / 'sub')
    sizes = {'a.png': (4, 10), 'b.PNG': (16, 20), 'sub/c.png': (8, 10),
             'sub/d.jpg': (8, 5), 'e.png': (6, 7)}
    for name, (h, w) in sizes.items():
        img = rng.randint(0, 256, (h, w, 3)).astype(np.uint8)
        assert cv2.imwrite(str(root / name), img)
    (root / 'notes.txt').write_text('not an image')
    return str(root)


def _manual(path, hw, mode):
    import cv2
    bgr = cv2.imread(path)
    rgb = bgr[:, :, ::-1].astype(np.float64)
    H, W = hw
    if mode == 'stretch':
        rgb = cv2.resize(np.ascontiguousarray(bgr), (W, H))[:, :, ::-1]
    out = np.zeros((H, W, 3))
    norm = (rgb - np.array(MEAN)) / np.array(STD)
    if mode == 'stretch':
        return norm.transpose(2, 0, 1)
    out[:norm.shape[0], :norm.shape[1]] = norm
    return out.transpose(2, 0, 1)


def test_real_images(image_dir, tmp_path):
    model = _DummyModel()
    cfg = dict(type='RealImages', data_root=image_dir, num_images=3,
               batch_size=2, img_size=(8, 10), seed=0, progress=False,
               resize='stretch')
    s = build(MODELS, cfg)
    assert isinstance(s, RealImages)
    x = s.generate(model)
    assert x.shape == (3, 3, 8, 10) and x.dtype == torch.float32
    files = sorted(['a.png', 'b.PNG', 'e.png', 'sub/c.png', 'sub/d.jpg'])
    perm = torch.randperm(5, generator=torch.Generator().manual_seed(0))
    picked = [osp.join(image_dir, files[i]) for i in perm[:3].tolist()]
    assert s.selected_files == picked
    for i, f in enumerate(picked):
        np.testing.assert_allclose(x[i].numpy(),
                                   _manual(f, (8, 10), 'stretch'),
                                   atol=1e-5)
    assert torch.equal(x, build(MODELS, cfg).generate(model))
    other = build(MODELS, dict(cfg, seed=3))
    other.generate(model)
    assert other.selected_files != picked
    # keep_ratio: exact placement (a: 4x10 fits unscaled, b: 16x20 -> 8x10)
    s = RealImages(data_root=image_dir, num_images=5, batch_size=5,
                   img_size=(8, 10), seed=0, progress=False)
    xk = s.generate(model)
    for i, f in enumerate(s.selected_files):
        if f.endswith(('a.png', 'sub/c.png')):
            np.testing.assert_allclose(xk[i].numpy(),
                                       _manual(f, (8, 10), 'keep'), atol=1e-5)
        if f.endswith('a.png'):
            assert (xk[i, :, 4:] == 0).all()
        if f.endswith('d.jpg'):  # 8x5: unscaled, right half padded
            assert (xk[i, :, :, 5:] == 0).all()
            assert (xk[i, :, :, :5] != 0).any()
        if f.endswith('b.PNG'):
            np.testing.assert_allclose(xk[i].numpy(),
                                       _manual(f, (8, 10), 'stretch'),
                                       atol=1e-5)
    s.save(xk, str(tmp_path / 'out'))
    from dfq_dense.synth import load_images
    meta = load_images(str(tmp_path / 'out'))['meta']
    assert meta['synthesizer'] == 'RealImages' and len(meta['files']) == 5


def test_real_images_errors(image_dir, tmp_path):
    model = _DummyModel()
    missing = str(tmp_path / 'nope')
    with pytest.raises(FileNotFoundError, match='nope'):
        RealImages(data_root=missing, img_size=8,
                   progress=False).generate(model)
    with pytest.raises(ValueError, match='fewer than num_images=6'):
        RealImages(data_root=image_dir, num_images=6, img_size=8,
                   progress=False).generate(model)
    with pytest.raises(ValueError, match='data_root'):
        RealImages(progress=False)
    with pytest.raises(ValueError, match='resize'):
        RealImages(data_root=image_dir, resize='crop')
    assert math.isfinite(
        RealImages(data_root=image_dir, num_images=1, img_size=8,
                   progress=False).generate(model).sum().item())


def test_mimiq_distillation_adapts_the_student(tiny_model):
    """MimiQDistill: head-wise structural distillation of the calibrated
    student (through the fake quantizers) lowers its loss."""
    import copy

    from dfq_dense.quant import (enable_calibration, finish_calibration,
                                 quantize_model)
    synth = _mimiq(iterations=2)
    adapter = build(ADAPTERS, dict(type='MimiQDistill', student_step=dict(
        optimizer='adam', lr=1e-3, iters=6, batch_size=2, log_interval=1)))
    assert isinstance(adapter, MimiQDistill)
    assert adapter.student_step.loss == 'mimiq'
    adapter.check_model(tiny_model)
    images = synth.generate(tiny_model)
    teacher = copy.deepcopy(tiny_model)
    student = copy.deepcopy(tiny_model)
    quantize_model(student, 4, 4, scope='backbone')
    enable_calibration(student)
    with torch.no_grad():
        student.backbone(images)
    finish_calibration(student)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    out = adapter.run(teacher, student, images)
    assert torch.equal(out, images)
    hist = adapter.student_step.history
    assert len(hist) == 6 and hist[-1]['loss'] < hist[0]['loss']
    assert adapter.history == hist
    changed = [k for k, v in student.state_dict().items()
               if not torch.equal(v, before[k])]
    assert any(k.endswith('module.weight') for k in changed)
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, tiny_model.state_dict()[k])
    # MimiQ's QAT defaults (SGD Nesterov, lr 1e-6, weight decay 1e-4)
    step = MimiQDistill(seed=3).student_step
    assert (step.optimizer, step.lr, step.momentum, step.nesterov,
            step.weight_decay, step.iters, step.seed) == \
        ('sgd', 1e-6, 0.9, True, 1e-4, 50, 3)
