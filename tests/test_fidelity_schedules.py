"""Published schedules of the synthesizers, checked against references
written from the official code or the paper text (not from this suite's
formulas).

Sources:

* PSAQ-ViT: ``generate_data.py`` of github.com/zkkli/PSAQ-ViT (commit
  d2c726f): ``optim.Adam([img], lr=0.25 (Swin), betas=[0.5, 0.9])`` created
  once (l. 52-53); ``var_pred = random.uniform(2500, 3000)`` drawn once per
  run (l. 57); ``for lr_it in range(2)`` rounds of 500 iterations with
  ``lim = 15`` then ``30`` (l. 62-68); ``lr_cosine_policy(args.lr, 100,
  500)`` per round (l. 70, l. 170-178); ``off = random.randint(-lim, lim)``,
  ``torch.roll(img, shifts=(off, off), dims=(2, 3))`` (l. 81-82); flip with
  ``random.random() > 0.5`` (l. 84-86); ``get_image_prior_losses(img_jit)``
  (l. 95: the TV sees the jittered image).
* MimiQ (AAAI 2025, arXiv 2407.20021): synthesis with AdamW lr 0.1, weight
  decay 1e-6, cosine to 1e-3, roll jitter 8 then 16 px; the inter-head
  similarity averaged over the full H x H matrix of head pairs (diagonal
  included).  github.com/iamkanghyunchoi/mimiq holds a README only, so these
  come from the project's reference notes (shared/reference/seed-methods.md).
* SPDFQ / SARDFQ (arXiv 2412.16553): MSR picks ``m in {1, ..., K_MSR}``
  (``K_MSR = 4``) non-overlapping patches; ``L_APA = sum_{l=S}^{L}
  sum_{h=1}^{H} (l / L) L_{l,h}`` with ``L_{l,h} = MSE(A_{l,h},
  prior_{l,h})`` (a sum over the heads).
"""
import itertools
import math

import numpy as np
import pytest
import torch

import dfq_dense.synth.base as synth_base
from dfq_dense.registry import MODELS, build
from dfq_dense.synth import (SPDFQ, MimiQ, PSAQViT,
                             attention_prior_alignment_loss,
                             gaussian_mixture_prior, msr_regions)
from dfq_dense.synth.base import batch_seed, roll_flip
from dfq_dense.synth.mimiq import inter_head_similarity

from tiny_models import TinyModel


@pytest.fixture(scope='module')
def tiny_model():
    m = TinyModel()
    m.backbone.eval()
    return m


# --------------------------------------------------------------- PSAQ-ViT
def _official_lr(base_lr, warmup_length, epochs, epoch):
    """``lr_cosine_policy(base_lr, warmup_length, epochs)`` of the official
    ``generate_data.py`` (l. 170-178), at iteration ``epoch`` of a round."""
    if epoch < warmup_length:
        return base_lr * (epoch + 1) / warmup_length
    e = epoch - warmup_length
    es = epochs - warmup_length
    return 0.5 * (1 + np.cos(np.pi * e / es)) * base_lr


def test_psaq_defaults_are_the_official_ones():
    s = PSAQViT(progress=False)
    assert s.synth_rounds == 2 and s.iterations == 500
    assert s.total_iterations == 1000
    assert s.jitters == (15, 30) and s.jitter_shift == 'shared'
    assert s.lr == 0.25 and s.betas == (0.5, 0.9) and s.warmup_iters == 100
    assert s.tau_per == 'run' and s.tv_on == 'augmented'
    assert s.tau_range == (2500., 3000.) and s.flip
    # the old schedule is one config away
    old = PSAQViT(progress=False, **PSAQViT.LEGACY_SCHEDULE)
    assert old.synth_rounds == 1 and old.jitters == (15, )
    assert (old.tau_per, old.tv_on, old.jitter_shift) == (
        'iteration', 'raw', 'independent')


def test_psaq_lr_two_rounds_vs_official_policy():
    s = PSAQViT(progress=False)
    # the official loop: for lr_it in range(2): for itr in range(500)
    ref = [_official_lr(0.25, 100, 500, itr)
           for lr_it in range(2) for itr in range(500)]
    got = [s.lr_at(it) for it in range(s.total_iterations)]
    assert np.allclose(got, ref, rtol=0, atol=1e-12)
    # each round warms up again
    assert got[500] == pytest.approx(0.25 / 100) and got[499] < 1e-4


def test_psaq_lr_applied_during_synthesis(tiny_model):
    s = build(MODELS, dict(type='PSAQViT', num_images=1, batch_size=1,
                           img_size=28, iterations=5, warmup_iters=2,
                           log_interval=1, progress=False))
    s.generate(tiny_model)
    ref = [_official_lr(0.25, 2, 5, i) for _ in range(2) for i in range(5)]
    assert [h['iter'] for h in s.history] == list(range(1, 11))
    assert np.allclose([h['lr'] for h in s.history], ref, atol=1e-12)


def _drawn_shift(generator, jitter, shift, size=64):
    """The roll ``roll_flip`` draws from ``generator`` (whose state is not
    advanced): a one-hot probe is rolled without flip."""
    probe_gen = torch.Generator().manual_seed(0)
    probe_gen.set_state(generator.get_state())
    probe = torch.zeros(1, 1, size, size)
    probe[0, 0, 0, 0] = 1
    out = roll_flip(probe, probe_gen, jitter, False, shift)
    y, x = divmod(int(out.flatten().argmax()), size)
    return (y if y <= size // 2 else y - size,
            x if x <= size // 2 else x - size)


def test_psaq_jitter_per_round_in_synthesis(tiny_model, monkeypatch):
    """Round 1 rolls by at most 15 px, round 2 by at most 30 px, one offset
    for both axes (official: ``shifts=(off, off)``)."""
    calls = []
    original = synth_base.roll_flip

    def recording(x, generator, jitter, flip, shift='independent'):
        calls.append((jitter, _drawn_shift(generator, jitter, shift)))
        return original(x, generator, jitter, flip, shift)

    monkeypatch.setattr(synth_base, 'roll_flip', recording)
    s = build(MODELS, dict(type='PSAQViT', num_images=1, batch_size=1,
                           img_size=28, iterations=4, progress=False))
    s.generate(tiny_model)
    assert [j for j, _ in calls] == [15] * 4 + [30] * 4
    for j, (dy, dx) in calls:
        assert dy == dx and abs(dy) <= j


@pytest.mark.parametrize('round_idx,lim', [(0, 15), (1, 30)])
def test_psaq_maximal_shift_per_round(round_idx, lim):
    """Over many draws the maximal |shift| is exactly the round's ``lim``
    and every offset of ``random.randint(-lim, lim)`` occurs."""
    s = PSAQViT(progress=False, flip=False)  # read the roll alone
    g = torch.Generator().manual_seed(round_idx)
    probe = torch.zeros(1, 1, 64, 64)
    probe[0, 0, 0, 0] = 1
    seen = set()
    for _ in range(3000):
        out = s.augment(probe, g, round_idx)
        y, x = divmod(int(out.flatten().argmax()), 64)
        dy, dx = (y if y <= 32 else y - 64), (x if x <= 32 else x - 64)
        assert dy == dx
        seen.add(dy)
    assert seen == set(range(-lim, lim + 1))
    assert max(abs(v) for v in seen) == lim


def _record_tv(monkeypatch):
    calls = []
    original = synth_base.tv_prior_loss

    def recording(x, *args, tau=None, generator=None, **kw):
        calls.append(dict(tau=tau, leaf=x.is_leaf))
        return original(x, *args, tau=tau, generator=generator, **kw)

    monkeypatch.setattr(synth_base, 'tv_prior_loss', recording)
    return calls


def test_psaq_tau_once_per_batch(tiny_model, monkeypatch):
    calls = _record_tv(monkeypatch)
    s = build(MODELS, dict(type='PSAQViT', num_images=2, batch_size=1,
                           img_size=28, iterations=3, seed=4,
                           progress=False))
    s.generate(tiny_model)
    assert len(calls) == 2 * 2 * 3  # batches x rounds x iterations
    per_batch = [calls[:6], calls[6:]]
    taus = []
    for b, batch in enumerate(per_batch):
        values = {c['tau'] for c in batch}
        assert len(values) == 1  # the same target at every iteration
        tau = values.pop()
        assert 2500 <= tau <= 3000
        # drawn once from the batch's generator, right after the pixels
        g = torch.Generator().manual_seed(batch_seed(4, b))
        torch.randn((1, 3, 28, 28), generator=g)
        assert tau == pytest.approx(
            2500 + 500 * torch.rand((), generator=g).item())
        taus.append(tau)
        # official: the TV sees the jittered image (not the leaf pixels)
        assert not any(c['leaf'] for c in batch)
    assert taus[0] != taus[1]  # different batches, different targets


def test_psaq_tau_per_iteration_legacy(tiny_model, monkeypatch):
    calls = _record_tv(monkeypatch)
    s = build(MODELS, dict(type='PSAQViT', num_images=1, batch_size=1,
                           img_size=28, iterations=4, progress=False,
                           **PSAQViT.LEGACY_SCHEDULE))
    s.generate(tiny_model)
    assert len(calls) == 4
    assert all(c['tau'] is None and c['leaf'] for c in calls)


def test_psaq_generate_deterministic(tiny_model):
    cfg = dict(type='PSAQViT', num_images=2, batch_size=1, img_size=28,
               iterations=2, seed=1, progress=False)
    a = build(MODELS, cfg).generate(tiny_model)
    b = build(MODELS, cfg).generate(tiny_model)
    assert torch.equal(a, b)


def test_psaq_schedule_options_validated():
    for bad in (dict(synth_rounds=0), dict(jitter=-1),
                dict(jitter_shift='diagonal'), dict(tau_per='batch'),
                dict(tv_on='jittered')):
        with pytest.raises(ValueError):
            PSAQViT(progress=False, **bad)


# ------------------------------------------------------------------ MimiQ
def test_mimiq_optimizer_param_groups(tiny_model, monkeypatch):
    made = []

    class RecordingAdamW(torch.optim.AdamW):

        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            made.append(self)

    monkeypatch.setattr(torch.optim, 'AdamW', RecordingAdamW)
    s = build(MODELS, dict(type='MimiQ', num_images=1, batch_size=1,
                           img_size=28, iterations=3, progress=False,
                           log_interval=1))
    s.generate(tiny_model)
    assert len(made) == 1
    opt = made[0]
    assert isinstance(opt, torch.optim.AdamW)  # decoupled weight decay
    assert len(opt.param_groups) == 1
    group = opt.param_groups[0]
    assert opt.defaults['lr'] == 0.1
    assert group['weight_decay'] == 1e-6
    assert tuple(group['betas']) == (0.9, 0.999)
    # cosine from 0.1 (first iteration) to 1e-3 (last)
    ref = [1e-3 + (0.1 - 1e-3) * 0.5 * (1 + math.cos(math.pi * t / 2))
           for t in range(3)]
    assert np.allclose([h['lr'] for h in s.history], ref, atol=1e-12)
    assert group['lr'] == pytest.approx(1e-3)
    # jitter 8 px then 16 px
    m = MimiQ(iterations=2000, progress=False)
    assert m.jitter_at(0) == 8 and m.jitter_at(999) == 8
    assert m.jitter_at(1000) == 16 and m.jitter_at(1999) == 16


def _np_ssim(a, b, c1=0.01**2, c2=0.03**2):
    """Global SSIM of two maps, population statistics."""
    ma, mb = a.mean(), b.mean()
    va, vb = ((a - ma)**2).mean(), ((b - mb)**2).mean()
    cov = ((a - ma) * (b - mb)).mean()
    return ((2 * ma * mb + c1) * (2 * cov + c2)) / (
        (ma**2 + mb**2 + c1) * (va + vb + c2))


def _loop_head_pairs(logits, valid, pairs):
    """Direct loop over (image, window, valid query) and over head pairs
    (``pairs(h)``), mean of ``1 - SSIM^2`` of the min-max normalised key
    maps."""
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
                terms.append(np.mean([1 - _np_ssim(maps[i], maps[j])**2
                                      for i, j in pairs(h)]))
    return float(np.mean(terms))


def test_mimiq_head_pairs_full_matrix_with_diagonal():
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(2, 2, 3, 5, 5, generator=g, dtype=torch.float64)
    valid = torch.ones(2, 2, 5, dtype=torch.bool)
    valid[:, 1, 4] = False
    full = _loop_head_pairs(
        logits.numpy(), valid.numpy(),
        lambda h: itertools.product(range(h), range(h)))
    got = inter_head_similarity(logits, valid).item()  # default: 'all'
    assert abs(got - full) < 1e-12
    # the pairs i < j of earlier versions, one option away
    upper = _loop_head_pairs(logits.numpy(), valid.numpy(),
                             lambda h: itertools.combinations(range(h), 2))
    assert abs(inter_head_similarity(logits, valid, pairs='distinct').item()
               - upper) < 1e-12
    # SSIM(i, i) = 1: the full average is (H - 1) / H of the distinct one
    assert abs(full - upper * 2 / 3) < 1e-12
    # the synthesizer's default and its legacy option
    assert MimiQ(progress=False).head_pairs == 'all'
    assert MimiQ(progress=False, head_pairs='distinct').head_pairs == \
        'distinct'
    with pytest.raises(ValueError):
        MimiQ(progress=False, head_pairs='upper')


# ------------------------------------------------------------------ SPDFQ
def test_spdfq_msr_m_distribution():
    """m ~ U{1..4} per image; patches non-overlapping, inside the image."""
    g = torch.Generator().manual_seed(0)
    H, W, n = 37, 50, 2000
    boxes, cells = msr_regions(n, (H, W), 4, g, count='random',
                               return_cells=True)
    counts = torch.bincount(boxes[:, 0], minlength=n)
    assert counts.min() >= 1 and counts.max() <= 4
    freq = torch.bincount(counts, minlength=5)[1:].float() / n
    assert (freq > 0).all()  # every m in {1, ..., 4} occurs
    assert ((freq - 0.25).abs() < 0.05).all()  # uniform
    for b in range(n):
        rows = boxes[boxes[:, 0] == b, 1:].tolist()
        cb = cells[boxes[:, 0] == b].tolist()
        assert len(set(cb)) == len(cb)
        for y0, y1, x0, x1 in rows:
            assert 0 <= y0 < y1 <= H and 0 <= x0 < x1 <= W
        for (a0, a1, a2, a3), (b0, b1, b2, b3) in itertools.combinations(
                rows, 2):
            overlap = min(a1, b1) > max(a0, b0) and min(a3, b3) > max(a2, b2)
            assert not overlap
    # the legacy draw: always min(num_patches, 4) regions
    fixed = msr_regions(10, (H, W), 4, g)
    assert torch.equal(torch.bincount(fixed[:, 0]), torch.full((10, ), 4))


def test_spdfq_msr_redrawn_every_iteration(tiny_model, monkeypatch):
    import dfq_dense.synth.spdfq as spdfq_mod
    seen = []
    original = spdfq_mod.crop_and_resize

    def recording(x, boxes, size=None):
        seen.append(boxes.clone())
        return original(x, boxes, size)

    monkeypatch.setattr(spdfq_mod, 'crop_and_resize', recording)
    s = build(MODELS, dict(type='SPDFQ', num_images=2, batch_size=2,
                           img_size=56, iterations=6, seed=0,
                           progress=False, num_classes=10,
                           crop_size=(28, 28)))
    assert s.msr_count == 'random' and s.apa_heads == 'sum'
    s.generate(tiny_model)
    assert len(seen) == 6
    for boxes in seen:
        counts = torch.bincount(boxes[:, 0], minlength=2)
        assert counts.min() >= 1 and counts.max() <= 4
    assert len({tuple(b.flatten().tolist()) for b in seen}) > 1
    # legacy: the same regions at every iteration, 4 per image
    seen.clear()
    build(MODELS, dict(type='SPDFQ', num_images=2, batch_size=2,
                       img_size=56, iterations=3, seed=0, progress=False,
                       num_classes=10, crop_size=(28, 28),
                       msr_count='fixed')).generate(tiny_model)
    assert all(torch.equal(b, seen[0]) for b in seen)
    assert torch.equal(torch.bincount(seen[0][:, 0]), torch.tensor([4, 4]))


def test_spdfq_apa_sums_over_heads():
    """Direct loop of the paper's L_APA = sum_{l > L/2} sum_h (l / L)
    L_{l,h}.  ``L_{l,h}`` is the MSE of the key distribution (attention
    averaged over the queries) and the prior, averaged over images and
    windows; this suite measures it in uniform-density units, i.e. the
    paper's MSE times ``N^2`` (N keys of a window)."""
    g = torch.Generator().manual_seed(3)
    L, B, nW, H, N = 4, 2, 3, 3, 4
    records, priors = [], []
    for l in range(1, L + 1):
        probs = torch.rand(B, nW, H, N, N, generator=g,
                           dtype=torch.float64).softmax(-1)
        records.append(dict(probs=probs, valid=torch.ones(B, nW, N,
                                                          dtype=torch.bool),
                            depth=l, num_blocks=L))
        priors.append(gaussian_mixture_prior(H, (2, 2), 5, g).double())
    ref = 0.
    for rec in records:
        l = rec['depth']
        if not l > L / 2:
            continue
        P = rec['probs'].numpy()
        prior = priors[l - 1].reshape(H, N).numpy()
        prior = prior / prior.sum(-1, keepdims=True)  # a distribution
        for h in range(H):
            mses = []
            for b in range(B):
                for w in range(nW):
                    a = P[b, w, h].mean(0)  # mean over the queries
                    mses.append(np.mean((a - prior[h])**2) * N**2)
            ref += (l / L) * np.mean(mses)
    got = attention_prior_alignment_loss(records, priors)
    assert abs(got.item() - ref) < 1e-10
    # earlier versions: the mean over the heads, i.e. 1 / H of the sum
    mean = attention_prior_alignment_loss(records, priors, heads='mean')
    assert abs(mean.item() - ref / H) < 1e-10
    with pytest.raises(ValueError):
        attention_prior_alignment_loss(records, priors, heads='max')
    with pytest.raises(ValueError):
        SPDFQ(progress=False, apa_heads='max')
    with pytest.raises(ValueError):
        SPDFQ(progress=False, msr_count='all')
