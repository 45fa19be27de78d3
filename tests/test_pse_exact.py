"""Exact patch-similarity entropy (PSE) of PSAQ-ViT: the chunked KDE and the
official code's conventions, against a brute-force float64 reference."""
import math

import pytest
import torch

from dfq_dense.registry import MODELS, build
from dfq_dense.synth import AttnOutputRecorder, PSAQViT
from dfq_dense.synth.losses import (GaussianKDE, gaussian_kde, kde,
                                    pair_mask, pse_entropy,
                                    psaq_entropy_loss)

from tiny_models import TinyModel

F64 = torch.float64


# ------------------------------------------------------------- reference
def _reference_loss(records, diagonal=True, grid='batch', drop_first=False,
                    h=0.01, num_points=10, eps=1e-4):
    """The official code's formulas, one value at a time: cosine similarity
    of every token pair of every window (padding left out), all windows of
    an image pooled, one linspace grid over the batch min/max (or per image),
    Gaussian KDE, trapezoid of -(p+eps)log(p+eps), mean over images, minus
    the sum over layers."""
    total = 0.
    for rec in records:
        feat, valid = rec['feat'], rec.get('valid')
        B, nW, N, _ = feat.shape
        sets = []
        for b in range(B):
            vals = []
            for w in range(nW):
                toks = [
                    i for i in range(N)
                    if (valid is None or bool(valid[b, w, i])) and not (
                        drop_first and i == 0)
                ]
                t = feat[b, w, toks]  # (n, D), as the official code does
                sim = torch.cosine_similarity(t.unsqueeze(1), t.unsqueeze(0),
                                              dim=-1)
                if not diagonal:
                    sim = sim[~torch.eye(len(toks), dtype=torch.bool)]
                vals.append(sim.reshape(-1))
            sets.append(torch.cat(vals))
        if grid == 'batch':
            lo = min(v.min().item() for v in sets)
            hi = max(v.max().item() for v in sets)
            grids = [torch.linspace(lo, hi, num_points, dtype=F64)] * B
        else:
            grids = [
                torch.linspace(v.min().item(), v.max().item(), num_points,
                               dtype=F64) for v in sets
            ]
        ents = []
        for v, x in zip(sets, grids):
            d = x[:, None] - v[None, :]
            p = (torch.exp(-d**2 / (2 * h * h)) /
                 math.sqrt(2 * math.pi * h * h)).mean(1)
            f = -(p + eps) * torch.log(p + eps)
            ents.append(torch.trapezoid(f, x))
        total = total - torch.stack(ents).mean()
    return total


def _records(seed=0, per_image_valid=False):
    """Two layers of Swin-like window tokens in float64, with padding."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(2, 3, 9, 4), (2, 2, 4, 6)]
    feats = [
        torch.randn(s, generator=g, dtype=F64).requires_grad_(True)
        for s in shapes
    ]
    # layer 0: the last window is padded (3 tokens), the same in every image
    v0 = torch.ones(3, 9, dtype=torch.bool)
    v0[2, 6:] = False
    v0 = v0.unsqueeze(0).expand(2, 3, 9)
    if per_image_valid:
        v0 = v0.clone()
        v0[1, 0, 4:] = False
    recs = [dict(feat=feats[0], valid=v0), dict(feat=feats[1], valid=None)]
    return feats, recs


def _value_and_grads(fn, seed=0, per_image_valid=False):
    feats, recs = _records(seed, per_image_valid)
    loss = fn(recs)
    grads = torch.autograd.grad(loss, feats)
    return loss.detach(), grads


def _assert_close(a, b, tol=1e-10):
    (va, ga), (vb, gb) = a, b
    assert abs(va.item() - vb.item()) <= tol * max(1., abs(vb.item()))
    for x, y in zip(ga, gb):
        scale = max(1., y.abs().max().item())
        assert (x - y).abs().max().item() <= tol * scale


OPTIONS = [
    dict(),
    dict(diagonal=False),
    dict(grid='image'),
    dict(drop_first_token=True),
    dict(diagonal=False, grid='image', drop_first_token=True),
]


@pytest.mark.parametrize('per_image_valid', [False, True])
@pytest.mark.parametrize('opts', OPTIONS)
def test_matches_official_reference(opts, per_image_valid):
    """Value and gradient w.r.t. the recorded features, every option, the
    padding mask the same in every image or not."""
    ref_kw = dict(diagonal=opts.get('diagonal', True),
                  grid=opts.get('grid', 'batch'),
                  drop_first=opts.get('drop_first_token', False))
    ref = _value_and_grads(lambda r: _reference_loss(r, **ref_kw),
                           per_image_valid=per_image_valid)
    got = _value_and_grads(lambda r: psaq_entropy_loss(r, **opts),
                           per_image_valid=per_image_valid)
    _assert_close(got, ref, 1e-9)
    # the gradient is not trivially small
    assert all(g.abs().max() > 1e-3 for g in ref[1])


def test_conventions_matter():
    """Each option really changes the result (the test above would not see
    an option that is ignored)."""
    base = _value_and_grads(psaq_entropy_loss)
    for opts in OPTIONS[1:]:
        other = _value_and_grads(lambda r, o=opts: psaq_entropy_loss(r, **o))
        assert abs(other[0].item() - base[0].item()) > 1e-6, opts


def test_tiny_swin_with_padding():
    """The recorder's real records (60 px: 15x15 tokens, padded windows,
    shifted blocks) against the reference."""
    torch.manual_seed(0)
    bb = TinyModel().backbone.double()
    bb.eval()
    with AttnOutputRecorder(bb) as rec, torch.no_grad():
        bb(torch.randn(2, 3, 60, 60, dtype=F64))
        recs = rec.records
    assert any(not bool(r['valid'].all()) for r in recs)
    feats = [r['feat'].clone().requires_grad_(True) for r in recs]

    def run(fn):
        rs = [dict(r, feat=f) for r, f in zip(recs, feats)]
        loss = fn(rs)
        return loss.detach(), torch.autograd.grad(loss, feats)

    _assert_close(run(psaq_entropy_loss), run(_reference_loss), 1e-9)


# ---------------------------------------------------------------- the KDE
@pytest.mark.parametrize('chunk', [None, 1, 5, 'auto'])
def test_gradcheck_gaussian_kde(chunk):
    g = torch.Generator().manual_seed(1)
    s = (torch.rand(2, 13, generator=g, dtype=F64) * 0.2).requires_grad_()
    x = torch.linspace(-0.02, 0.22, 6, dtype=F64).expand(2, 6)
    w = torch.rand(1, 13, generator=g) > 0.3
    for h in (0.01, 0.05):
        assert torch.autograd.gradcheck(
            lambda t: GaussianKDE.apply(t, x, None, h, chunk), (s, ))
        assert torch.autograd.gradcheck(
            lambda t: GaussianKDE.apply(t, x, w, h, chunk), (s, ))
        # same values as the plain (materialising) KDE
        assert torch.allclose(GaussianKDE.apply(s, x, None, h, chunk),
                              kde(x, s, h), rtol=1e-12, atol=1e-12)
        ref = kde(x[:1], s[:, w[0]], h)
        assert torch.allclose(GaussianKDE.apply(s, x, w, h, chunk), ref,
                              rtol=1e-12, atol=1e-12)


def test_gaussian_kde_shapes_and_half_precision():
    s = torch.rand(40, dtype=F64)
    x = torch.linspace(0, 1, 7, dtype=F64)
    assert torch.allclose(gaussian_kde(x, s, 0.1), kde(x, s, 0.1))
    # half precision samples are evaluated in float32
    sh = s.half().requires_grad_()
    p = gaussian_kde(x.float(), sh, 0.1)
    assert p.dtype == torch.float32
    assert torch.allclose(p.double(), kde(x, sh.double(), 0.1), rtol=1e-5)
    p.sum().backward()
    assert sh.grad.dtype == torch.float16 and torch.isfinite(sh.grad).all()
    with pytest.raises(ValueError, match='chunk'):
        gaussian_kde(x, s, 0.1, chunk=0)
    # half precision features: similarities and KDE in float32
    feats, recs = _records()
    f = feats[0].detach()
    a = pse_entropy(f.float(), recs[0]['valid'])
    b = pse_entropy(f.half(), recs[0]['valid'])
    assert b.dtype == torch.float32 and torch.allclose(a, b, rtol=0.05)


@pytest.mark.parametrize('opts', OPTIONS)
def test_chunked_equals_unchunked(opts):
    one = _value_and_grads(
        lambda r: psaq_entropy_loss(r, chunk=None, **opts), 3, True)
    for chunk in (1, 7, 100, 'auto'):
        got = _value_and_grads(
            lambda r, c=chunk: psaq_entropy_loss(r, chunk=c, **opts), 3,
            True)
        _assert_close(got, one, 1e-10)


def test_subsampling_option():
    """max_samples >= the similarity count keeps them all (the same result
    as the exact path); smaller subsamples deterministically."""
    exact = _value_and_grads(psaq_entropy_loss, 4, True)
    for opts in OPTIONS:
        a = _value_and_grads(lambda r, o=opts: psaq_entropy_loss(r, **o), 4,
                             True)
        b = _value_and_grads(
            lambda r, o=opts: psaq_entropy_loss(r, max_samples=10**6, **o),
            4, True)
        _assert_close(b, a, 1e-10)
    sub = [
        _value_and_grads(lambda r: psaq_entropy_loss(
            r, max_samples=20, generator=torch.Generator().manual_seed(0)),
            4, True) for _ in range(2)
    ]
    _assert_close(sub[0], sub[1], 0.)
    assert abs(sub[0][0].item() - exact[0].item()) > 1e-6


def test_pair_mask():
    valid = torch.ones(2, 3, 4, dtype=torch.bool)
    assert pair_mask(valid, (2, 3, 4)) is None
    assert pair_mask(None, (2, 3, 4)) is None
    m = pair_mask(None, (2, 3, 4), diagonal=False)
    assert m.shape == (1, 3, 4, 4) and int(m.sum()) == 3 * 12
    m = pair_mask(None, (2, 3, 4), drop_first_token=True)
    assert int(m.sum()) == 3 * 9 and not m[..., 0, :].any()
    valid[1, 0, 3] = False
    m = pair_mask(valid, (2, 3, 4))
    assert m.shape == (2, 3, 4, 4) and int(m[1].sum()) == 16 * 3 - 7
    assert pair_mask(valid[:1], (1, 3, 4)) is None


# ----------------------------------------------------------------- memory
def _saved_numels(fn):
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sizes


def test_saved_tensors_are_linear_in_samples():
    """Neither the KDE nor the rest of the loss keeps ``S x P`` values for
    backward: at most the similarities themselves (``S``) per tensor."""
    S, P = 20000, 10
    s = torch.rand(1, S).requires_grad_()
    x = torch.linspace(0, 1, P).reshape(1, P)
    _, sizes = _saved_numels(lambda: GaussianKDE.apply(s, x, None, 0.01, 64))
    assert max(sizes) == S and sum(sizes) <= S + P + 1
    # the whole loss on one layer of 600 windows of 49 tokens
    feat = torch.randn(1, 600, 49, 8).requires_grad_()
    valid = torch.ones(1, 600, 49, dtype=torch.bool)
    valid[:, -5:, 40:] = False
    S = 600 * 49 * 49
    loss, sizes = _saved_numels(lambda: psaq_entropy_loss(
        [dict(feat=feat, valid=valid)]))
    assert max(sizes) <= S and sum(sizes) < 3 * S
    loss.backward()
    assert torch.isfinite(feat.grad).all()


def test_chunked_kde_never_allocates_s_by_p():
    """The largest single allocation of the chunked KDE (forward and
    backward) is a chunk, not ``S x P``."""
    prof = pytest.importorskip('torch.profiler')
    S, P, chunk = 200000, 10, 4096
    s = torch.rand(1, S).requires_grad_()
    x = torch.linspace(0, 1, P).reshape(1, P)
    with prof.profile(activities=[prof.ProfilerActivity.CPU],
                      profile_memory=True) as p:
        GaussianKDE.apply(s, x, None, 0.01, chunk).sum().backward()
    biggest = max(e.self_cpu_memory_usage for e in p.events())
    # the gradient itself (S floats) at most; S x P floats would be 10x that
    assert 0 < biggest <= S * 4 < S * P * 4


# ------------------------------------------------------------ synthesizer
def test_psaq_vit_options_plumbed():
    s = build(MODELS, dict(type='PSAQViT', progress=False))
    assert (s.max_samples, s.diagonal, s.grid, s.drop_first_token,
            s.kde_chunk) == (None, True, 'batch', False, 'auto')
    s = build(MODELS, dict(type='PSAQViT', progress=False, diagonal=False,
                           grid='image', drop_first_token=True,
                           max_samples=50, kde_chunk=3))
    _, recs = _records(5)
    loss, ents = s.entropy_loss(recs, torch.Generator().manual_seed(0))
    ref = psaq_entropy_loss(recs, diagonal=False, grid='image',
                            drop_first_token=True, max_samples=50,
                            generator=torch.Generator().manual_seed(0))
    assert torch.allclose(loss, ref, rtol=1e-12) and ents.shape == (2, )
    with pytest.raises(ValueError, match='grid'):
        PSAQViT(grid='window', progress=False)
    with pytest.raises(ValueError, match='grid'):
        psaq_entropy_loss(recs, grid='window')
