"""Tests of dfq_dense.synth.spdfq: SPDFQ priors, APA, MSR, soft labels."""
import copy
import math

import pytest
import torch

from dfq_dense.registry import MODELS, build
from dfq_dense.synth import (SPDFQ, AttnProbRecorder,
                             attention_prior_alignment_loss, crop_and_resize,
                             gaussian_mixture_prior, msr_crops, msr_regions,
                             valid_range)
from dfq_dense.synth.feature_targets import (random_soft_targets,
                                             soft_cross_entropy)

from tiny_models import MEAN, STD, TinyModel


@pytest.fixture(scope='module')
def tiny_model():
    m = TinyModel()
    m.backbone.eval()
    return m


# ------------------------------------------------------------------ priors
def test_gaussian_mixture_prior_properties():
    g = torch.Generator().manual_seed(3)
    maps = gaussian_mixture_prior(6, (7, 7), 5, g)
    assert maps.shape == (6, 7, 7) and maps.dtype == torch.float32
    assert (maps >= 0).all()
    assert torch.allclose(maps.sum((1, 2)), torch.ones(6), atol=1e-6)
    # deterministic from the generator state, different across draws
    again = gaussian_mixture_prior(6, (7, 7), 5,
                                   torch.Generator().manual_seed(3))
    assert torch.equal(maps, again)
    assert not torch.allclose(maps, gaussian_mixture_prior(6, (7, 7), 5, g))
    # maps differ from each other (random centres) and are not uniform
    assert not torch.allclose(maps[0], maps[1])
    assert maps.amax((1, 2)).min() > 1.5 / 49
    # non-square windows and int hw
    assert gaussian_mixture_prior(2, (3, 5), 2, g).shape == (2, 3, 5)
    assert gaussian_mixture_prior(2, 4, 2, g).shape == (2, 4, 4)


def test_gaussian_mixture_prior_values():
    """Against a python evaluation of the documented formula and draws."""
    h, w, C = 4, 5, 2
    maps = gaussian_mixture_prior(3, (h, w), C,
                                  torch.Generator().manual_seed(11),
                                  sigma_range=(0.2, 0.4))
    g = torch.Generator().manual_seed(11)
    cy = (torch.rand(3, C, generator=g) * (h - 1)).tolist()
    cx = (torch.rand(3, C, generator=g) * (w - 1)).tolist()
    s = ((0.2 + 0.2 * torch.rand(3, C, generator=g)) * max(h, w)).tolist()
    wt = (0.1 + 0.9 * torch.rand(3, C, generator=g)).tolist()
    for m in range(3):
        ref = [[sum(wt[m][c] * math.exp(-((i - cy[m][c])**2 +
                                          (j - cx[m][c])**2) /
                                        (2 * s[m][c]**2)) for c in range(C))
                for j in range(w)] for i in range(h)]
        tot = sum(map(sum, ref))
        for i in range(h):
            for j in range(w):
                assert abs(maps[m, i, j].item() - ref[i][j] / tot) < 1e-6
    # sigma is 0.2..0.4 of the window side: one component peaks at its centre
    one = gaussian_mixture_prior(1, (7, 7), 1,
                                 torch.Generator().manual_seed(5))[0]
    g = torch.Generator().manual_seed(5)
    cy, cx = (torch.rand(1, 1, generator=g).item() * 6 for _ in range(2))
    iy, ix = divmod(int(one.argmax()), 7)
    assert (iy, ix) == (round(cy), round(cx))


# --------------------------------------------------------------------- APA
def _brute_apa(records, priors, L):
    total = 0.
    for rec in records:
        l = rec['depth']
        if not l > L / 2:
            continue
        P, V = rec['probs'].tolist(), rec['valid'].tolist()
        prior = priors[l - 1].reshape(priors[l - 1].shape[0], -1).tolist()
        B, nW, H, N = len(P), len(P[0]), len(P[0][0]), len(P[0][0][0])
        errs = []
        for b in range(B):
            for w in range(nW):
                vq = [i for i in range(N) if V[b][w][i]]
                for h in range(H):
                    a = [sum(P[b][w][h][q][k] for q in vq) / len(vq)
                         for k in range(N)]
                    sa = sum(a[k] for k in vq)
                    sp = sum(prior[h][k] for k in vq)
                    nv = len(vq)
                    e = sum((nv * (a[k] / sa - prior[h][k] / sp))**2
                            for k in vq) / nv
                    errs.append(e)
        total += l / L * sum(errs) / len(errs)
    return total


def _hand_records(L, depths, g, pad=True):
    recs = []
    for l in depths:
        B, nW, H, N = 2, 2, 2, 4
        probs = torch.rand(B, nW, H, N, N, generator=g,
                           dtype=torch.float64).softmax(-1)
        valid = torch.ones(B, nW, N, dtype=torch.bool)
        if pad:
            valid[:, 1, 3] = False  # a padded token in window 1
        recs.append(dict(probs=probs, valid=valid, depth=l, num_blocks=L))
    return recs


def _apa_mean(*args, **kw):
    # _brute_apa is the head *mean* of earlier versions (apa_heads='mean');
    # the paper's head sum (the default) is checked in
    # tests/test_fidelity_schedules.py
    return attention_prior_alignment_loss(*args, heads='mean', **kw)


def test_apa_loss_vs_brute_force():
    g = torch.Generator().manual_seed(0)
    L = 4
    recs = _hand_records(L, [1, 2, 3, 4], g)
    priors = [gaussian_mixture_prior(2, (2, 2), 3, g).double()
              for _ in range(L)]
    loss, per_block = _apa_mean(
        recs, priors, return_per_block=True)
    ref = _brute_apa(recs, priors, L)
    assert abs(loss.item() - ref) < 1e-10
    # only the deeper half (l = 3, 4), weighted by l / L
    assert sorted(per_block) == [3, 4]
    assert abs(loss.item() - (0.75 * per_block[3] + per_block[4]).item()) \
        < 1e-6
    # shallow blocks are ignored entirely (even without a prior)
    priors_none = [None, None] + priors[2:]
    assert torch.allclose(_apa_mean(recs, priors_none),
                          loss)
    # dict priors keyed by depth give the same
    assert torch.allclose(
        _apa_mean(recs, {3: priors[2], 4: priors[3]}),
        loss)
    # all blocks, unit weights
    full = _apa_mean(recs, priors, deeper_half=False,
                                          depth_weight=False)
    _, pb = _apa_mean(recs, priors, deeper_half=False,
                                           return_per_block=True)
    assert abs(full.item() - sum(v.item() for v in pb.values())) < 1e-6
    # odd L: l > L / 2 = 2.5 -> block 3 of 5 counts, block 2 does not
    recs5 = _hand_records(5, [2, 3], g)
    priors5 = [gaussian_mixture_prior(2, (2, 2), 3, g).double()
               for _ in range(5)]
    l5, pb5 = _apa_mean(recs5, priors5,
                                             return_per_block=True)
    assert sorted(pb5) == [3]
    assert abs(l5.item() - _brute_apa(recs5, priors5, 5)) < 1e-10


def test_apa_padding_and_zero_loss():
    """Padded query rows and padded key columns do not matter; attention
    equal to the prior on the valid keys gives zero loss."""
    g = torch.Generator().manual_seed(1)
    recs = _hand_records(2, [2], g)
    prior = gaussian_mixture_prior(2, (2, 2), 3, g).double()
    loss = attention_prior_alignment_loss(recs, [None, prior])
    # change the padded query row and the mass on the padded key
    r2 = copy.deepcopy(recs)
    r2[0]['probs'][:, 1, :, 3, :] = torch.tensor([0.7, 0.1, 0.1, 0.1])
    # halve every valid query's mass on the valid keys, the rest goes to
    # the padded key: the valid part keeps its shape
    p = r2[0]['probs'][:, 1, :, :3, :].clone()
    p[..., :3] *= 0.5
    p[..., 3] = 1 - p[..., :3].sum(-1)
    r2[0]['probs'][:, 1, :, :3, :] = p
    assert torch.allclose(attention_prior_alignment_loss(r2, [None, prior]),
                          loss)
    # attention = prior (every query row) -> 0
    pr = prior.reshape(2, 4)
    r3 = copy.deepcopy(recs)
    r3[0]['probs'][:] = pr[None, None, :, None, :]
    assert attention_prior_alignment_loss(r3, [None, prior]).item() < 1e-20
    # gradient flows to the probabilities
    probs = recs[0]['probs'].clone().requires_grad_(True)
    r4 = [dict(recs[0], probs=probs)]
    attention_prior_alignment_loss(r4, [None, prior]).backward()
    assert probs.grad.abs().sum() > 0
    assert (probs.grad[:, 1, :, 3] == 0).all()  # padded query row


# ---------------------------------------------------------------- recorder
def _manual_probs(wmsa, x, mask):
    B, N, C = x.shape
    nh = wmsa.num_heads
    qkv = wmsa.qkv(x).reshape(B, N, 3, nh, C // nh).permute(2, 0, 3, 1, 4)
    q, k = qkv[0] * wmsa.scale, qkv[1]
    logits = q @ k.transpose(-2, -1)
    ws = wmsa.window_size
    bias = wmsa.relative_position_bias_table[
        wmsa.relative_position_index.view(-1)].view(ws[0] * ws[1],
                                                    ws[0] * ws[1], -1)
    logits = logits + bias.permute(2, 0, 1)[None]
    if mask is not None:
        nW = mask.shape[0]
        logits = (logits.view(B // nW, nW, nh, N, N) +
                  mask[None, :, None]).view(B, nh, N, N)
    e = torch.exp(logits - logits.amax(-1, keepdim=True))
    return e / e.sum(-1, keepdim=True)


def test_recorder_matches_manual_softmax(tiny_model):
    bb = tiny_model.backbone
    inputs = []
    rec = AttnProbRecorder(bb)
    handles = [
        m.w_msa.register_forward_pre_hook(
            lambda mod, args, kw: inputs.append(
                (mod, args[0], kw.get('mask', args[1] if len(args) > 1
                                      else None))), with_kwargs=True)
        for _, m in rec.modules
    ]
    x = torch.randn(2, 3, 60, 60)  # 15x15 tokens -> 21x21; 8x8 -> 14x14
    try:
        with rec, torch.no_grad():
            assert len(rec) == 4 and rec.block_specs() == [(2, 7), (2, 7),
                                                           (4, 7), (4, 7)]
            bb(x)
            records = list(rec.records)
        assert not rec._handles
    finally:
        for h in handles:
            h.remove()
    assert len(records) == 4 and len(inputs) == 4
    expected = [((15, 15), 9, 2, 0), ((15, 15), 9, 2, 3),
                ((8, 8), 4, 4, 0), ((8, 8), 4, 4, 3)]
    for l, (r, (hw, nW, nh, shift), (mod, xin, mask)) in enumerate(
            zip(records, expected, inputs), 1):
        assert r['depth'] == l and r['num_blocks'] == 4
        assert r['hw_shape'] == hw and r['shift_size'] == shift
        assert r['probs'].shape == (2, nW, nh, 49, 49)
        assert r['valid'].shape == (2, nW, 49)
        assert r['valid'].sum().item() == 2 * hw[0] * hw[1]
        assert (mask is not None) == (shift > 0)
        with torch.no_grad():
            ref = _manual_probs(mod, xin, mask)
        assert torch.allclose(r['probs'].reshape(-1, nh, 49, 49), ref,
                              atol=1e-6)
        # padded tokens are exactly the zero rows of the w_msa input
        assert torch.equal(r['valid'].reshape(-1),
                           ~(xin == 0).all(-1).reshape(-1))


def test_recorder_with_quant_window_msa(tiny_model):
    from dfq_dense.quant.modules import QuantWindowMSA
    model = copy.deepcopy(tiny_model)
    bb = model.backbone
    x = torch.randn(1, 3, 60, 60)
    with AttnProbRecorder(bb) as rec, torch.no_grad():
        bb(x)
        fp = [r['probs'] for r in rec.records]
    for st in bb.stages:
        for blk in st.blocks:
            blk.attn.w_msa = QuantWindowMSA(blk.attn.w_msa)
    with AttnProbRecorder(bb) as rec, torch.no_grad():
        bb(x)
        q = [r['probs'] for r in rec.records]
    assert len(q) == 4
    for a, b in zip(fp, q):
        assert torch.allclose(a, b, atol=1e-6)


def test_recorder_disabled_and_non_swin(tiny_model):
    with AttnProbRecorder(tiny_model.backbone) as rec, torch.no_grad():
        rec.enabled = False
        tiny_model.backbone(torch.randn(1, 3, 28, 28))
        assert rec.records == []
    with pytest.raises(ValueError, match='ShiftWindowMSA'):
        AttnProbRecorder(torch.nn.Conv2d(3, 3, 1))


# --------------------------------------------------------------------- MSR
def test_msr_crops_gradients_and_regions():
    H, W = 20, 24
    x = torch.randn(2, 3, H, W, requires_grad=True)
    crops, boxes = msr_crops(x, 4, torch.Generator().manual_seed(0))
    assert crops.shape == (8, 3, H, W) and boxes.shape == (8, 5)
    cover = torch.zeros(2, H, W, dtype=torch.long)
    for i, (b, y0, y1, x0, x1) in enumerate(boxes.tolist()):
        assert 0 <= y0 < y1 <= H and 0 <= x0 < x1 <= W
        cover[b, y0:y1, x0:x1] += 1
        grad, = torch.autograd.grad(crops[i].sum(), x)
        inside = torch.zeros_like(grad, dtype=torch.bool)
        inside[b, :, y0:y1, x0:x1] = True
        assert (grad[~inside] == 0).all()
        assert (grad[inside] != 0).all()  # upsampling uses every pixel
        # the crop is the region resized
        ref = torch.nn.functional.interpolate(
            x[b:b + 1, :, y0:y1, x0:x1].detach(), size=(H, W),
            mode='bilinear', align_corners=False)
        assert torch.allclose(crops[i:i + 1].detach(), ref)
    # 4 of the 2x2 cells: no overlap, the whole image covered
    assert (cover == 1).all()
    assert [b for b in boxes[:, 0].tolist()] == [0] * 4 + [1] * 4
    # fewer patches: still disjoint, random subsets, deterministic
    b2 = msr_regions(3, (H, W), 2, torch.Generator().manual_seed(1))
    assert b2.shape == (6, 5)
    assert torch.equal(b2, msr_regions(3, (H, W), 2,
                                       torch.Generator().manual_seed(1)))
    for img in range(3):
        c = torch.zeros(H, W, dtype=torch.long)
        for _, y0, y1, x0, x1 in b2[b2[:, 0] == img].tolist():
            c[y0:y1, x0:x1] += 1
        assert c.max() == 1 and 0 < c.sum() < H * W
    # cut lines stay within the jitter range around the middle
    for _, y0, y1, x0, x1 in b2.tolist():
        assert all(v in (0, H) or 8 <= v <= 12 for v in (y0, y1))
        assert all(v in (0, W) or 10 <= v <= 14 for v in (x0, x1))
    # up to num_patches: capped by the grid
    assert msr_regions(1, (H, W), 9).shape == (4, 5)
    # custom crop size
    assert crop_and_resize(x, boxes[:2], (8, 6)).shape == (2, 3, 8, 6)


# ------------------------------------------------------------- soft labels
def test_soft_targets_and_cross_entropy():
    g = torch.Generator().manual_seed(2)
    t = random_soft_targets(5, 7, g)
    assert t.shape == (5, 7) and torch.allclose(t.sum(-1), torch.ones(5))
    top = t.max(-1).values
    # softmax of one entry z in [5, 10] among 6 zeros
    lo, hi = math.exp(5) / (math.exp(5) + 6), math.exp(10) / (math.exp(10) +
                                                             6)
    assert ((top >= lo - 1e-6) & (top <= hi + 1e-6)).all()
    logits = torch.randn(5, 7, generator=g, dtype=torch.float64)
    ref = 0.
    for b in range(5):
        z = logits[b].tolist()
        lse = math.log(sum(math.exp(v) for v in z))
        ref -= sum(t[b, k].item() * (z[k] - lse) for k in range(7))
    assert abs(soft_cross_entropy(logits, t).item() - ref / 5) < 1e-6


# ------------------------------------------------------------- synthesizer
def _spdfq(**kw):
    cfg = dict(type='SPDFQ', num_images=2, batch_size=2, img_size=56,
               iterations=4, seed=0, log_interval=1, progress=False,
               num_classes=10)
    cfg.update(kw)
    return build(MODELS, cfg)


def test_spdfq_tiny(tiny_model):
    bb = tiny_model.backbone
    grads = [p.requires_grad for p in bb.parameters()]
    s = _spdfq()
    assert isinstance(s, SPDFQ) and s.iterations == 4
    assert s.components == dict(apa=True, msr=True, soft_label=True, tv=True)
    s.check_model(tiny_model)
    x = s.generate(tiny_model)
    assert x.shape == (2, 3, 56, 56) and torch.isfinite(x).all()
    lo, hi = valid_range(torch.tensor(MEAN), torch.tensor(STD))
    assert (x >= lo - 1e-5).all() and (x <= hi + 1e-5).all()
    assert [p.requires_grad for p in bb.parameters()] == grads
    # hooks removed
    for st in bb.stages:
        for blk in st.blocks:
            assert not blk.attn.w_msa.softmax._forward_hooks
            assert not blk.attn._forward_pre_hooks
    # every term logged every iteration
    assert len(s.history) == 4
    h0 = s.history[0]
    for k in ('loss_apa', 'loss_sl_img', 'loss_sl_crops', 'loss_tv'):
        assert h0[k] > 0
    assert abs(h0['loss'] - (h0['loss_apa'] + h0['loss_sl'] +
                             h0['loss_tv'])) < 1e-4
    assert abs(h0['loss_sl'] - h0['loss_sl_img'] - h0['loss_sl_crops']) \
        < 1e-5
    # reproducible, seed-dependent
    assert torch.equal(x, _spdfq().generate(tiny_model))
    assert not torch.equal(x, _spdfq(seed=1).generate(tiny_model))


def test_spdfq_lowers_loss(tiny_model):
    s = _spdfq(iterations=6, jitter=0, flip=False, lr=0.1, warmup_iters=0)
    s.generate(tiny_model)
    first, last = s.history[0], s.history[-1]
    assert last['loss'] < first['loss']
    assert last['loss_sl'] < first['loss_sl']
    assert last['loss_apa'] < first['loss_apa']


def test_spdfq_components(tiny_model):
    s = _spdfq(iterations=1, components=dict(apa=False, msr=False, tv=False))
    s.generate(tiny_model)
    h = s.history[0]
    assert h['loss_apa'] == 0 and h['loss_sl_crops'] == 0 and \
        h['loss_tv'] == 0 and h['loss_sl_img'] > 0
    # APA alone (no labels, crops or TV) moves the pixels and lowers L_APA
    s = _spdfq(iterations=5, jitter=0, flip=False, lr=0.1, warmup_iters=0,
               label_weight=0., components=dict(msr=False, tv=False))
    s.generate(tiny_model)
    assert all(h['loss_sl'] == 0 and h['loss_tv'] == 0 for h in s.history)
    assert s.history[-1]['loss_apa'] < s.history[0]['loss_apa']
    assert s.history[-1]['loss'] == pytest.approx(s.history[-1]['loss_apa'])
    # hard labels without SL: one-hot targets
    s = _spdfq(iterations=1, components=dict(soft_label=False))
    t = s._targets(3, torch.Generator().manual_seed(0))
    assert set(t.unique().tolist()) == {0., 1.} and (t.sum(-1) == 1).all()
    with pytest.raises(ValueError, match="known components.*'apa'"):
        _spdfq(components=dict(apa=True, foo=False))


def test_spdfq_rejects_non_swin():
    model = torch.nn.Module()
    model.backbone = torch.nn.Conv2d(3, 3, 1)
    s = _spdfq(iterations=1)
    with pytest.raises(ValueError, match='ShiftWindowMSA'):
        s.check_model(model)
    with pytest.raises(ValueError, match='ShiftWindowMSA'):
        s.generate(model)
    with pytest.raises(ValueError, match='backbone'):
        s.check_model(torch.nn.Conv2d(3, 3, 1))
