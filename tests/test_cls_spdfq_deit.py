"""SPDFQ's attention priors alignment (APA) on timm DeiT, the paper's form:
per head of the deeper half of the blocks, the CLS token's attention to the
patch grid against a random Gaussian-mixture map over that grid, weighted
l / L (arXiv 2412.16553, APA).  Checked against a loop written from the
equations on the attention module's own q, k; the prior maps' properties;
gradients to the image; a short synthesis; the one-line refusals (a ViT
without CLS token, MSR crops of a size a fixed-size timm classifier
refuses); configs/cls/deit_s_w4a8_spdfq.py.

Tiny random timm DeiT (nothing downloaded) on the CPU.
"""
import math
import os.path as osp

import pytest
import torch

import timm  # noqa: E402  (a runtime dependency: no skip)
from tiny_models import (TIMM_DEIT, Wrap, tiny_timm)  # noqa: E402

from dfq_dense.synth.loop import SynthState  # noqa: E402
from dfq_dense.synth.spdfq import (SPDFQ, AttnProbRecorder,  # noqa: E402
                                   attention_prior_alignment_loss,
                                   gaussian_mixture_prior)

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
K = 3  # classes of the tiny classifiers
# 4 blocks (deeper half: 3 and 4), 2 heads, 4x4 patches of 8 px at 32x32.
TINY_DEIT = dict(embed_dim=32, depth=4, num_heads=2, img_size=32,
                 patch_size=8)


def _deit(seed=0, name=TIMM_DEIT, **kw):
    return tiny_timm(name, num_classes=K, seed=seed, **dict(TINY_DEIT, **kw))


def _priors(model, grid, seed=0):
    """One ``(heads, gh, gw)`` map set per block, drawn here."""
    g = torch.Generator().manual_seed(seed)
    return [gaussian_mixture_prior(blk.attn.num_heads, grid, 3, g)
            for blk in model.blocks]


def _attn_inputs(model, x):
    """The input ``(B, T, C)`` of every block's attention in ``model(x)``
    (graph kept)."""
    seen, handles = [], []
    for blk in model.blocks:
        handles.append(blk.attn.register_forward_pre_hook(
            lambda m, args: seen.append(args[0])))
    model(x)
    for h in handles:
        h.remove()
    return seen


def _reference_apa(model, x, priors, prefix):
    """L_APA = sum_{l > L/2} (l / L) sum_h mean_b mse_{l,h,b}, written from
    the equations with python loops: the CLS query's logits to every key
    ``(q_cls . k_j) * head_dim^-0.5`` from the attention's own ``qkv``
    Linear (timm's layout: q, k, v blocks of C, heads of head_dim inside),
    softmax over all keys, the patch keys kept and renormalised, ``mse =
    mean_k (P (a_k - p_k))^2``.  Returns ``(total, {l: sum_h L_{l,h}})``."""
    inputs = _attn_inputs(model, x)
    L = len(model.blocks)
    total, per_block = 0., {}
    for l, (blk, xt) in enumerate(zip(model.blocks, inputs), start=1):
        if not l > L / 2:
            continue
        attn = blk.attn
        assert isinstance(attn.q_norm, torch.nn.Identity)
        assert isinstance(attn.k_norm, torch.nn.Identity)
        H = attn.num_heads
        B, T, C = xt.shape
        hd = C // H
        qkv = attn.qkv(xt)  # (B, T, 3C)
        block = 0.
        for h in range(H):
            p = priors[l - 1][h].reshape(-1)
            P = p.numel()
            assert P == T - prefix
            head = 0.
            for b in range(B):
                q_cls = qkv[b, 0, h * hd:(h + 1) * hd]
                logits = torch.stack([
                    (q_cls * qkv[b, j, C + h * hd:C + (h + 1) * hd]).sum()
                    * hd ** -0.5 for j in range(T)])
                e = torch.exp(logits - logits.max())
                row = e / e.sum()
                a = row[prefix:] / row[prefix:].sum()
                mse = sum((P * (a[k] - p[k]))**2 for k in range(P)) / P
                head = head + mse / B
            block = block + head
        per_block[l] = float(block)
        total = total + (l / L) * block
    return total, per_block


# ------------------------------------------------------------- the loss
@pytest.mark.parametrize('name,img,grid,prefix', [
    ('deit_tiny_patch16_224', 32, (4, 4), 1),
    # a distillation token (two prefix keys dropped), a non-square grid
    # (row-major order of the prior maps)
    ('deit_tiny_distilled_patch16_224', (32, 48), (4, 6), 2),
])
def test_deit_apa_against_equations(name, img, grid, prefix):
    model = _deit(name=name, img_size=img)
    hw = (img, img) if isinstance(img, int) else img
    x = torch.randn(2, 3, *hw)
    priors = _priors(model, grid)
    with AttnProbRecorder(model) as rec, torch.no_grad():
        model(x)
        records = rec.records
        assert [r['prefix_tokens'] for r in records] == [prefix] * 4
        assert all(tuple(r['hw_shape']) == grid for r in records)
        loss, per = attention_prior_alignment_loss(records, priors,
                                                   return_per_block=True)
        mean = attention_prior_alignment_loss(records, priors,
                                              heads='mean')
        every = attention_prior_alignment_loss(records, priors,
                                               deeper_half=False)
    with torch.no_grad():
        want, want_per = _reference_apa(model, x, priors, prefix)
    assert sorted(per) == [3, 4] and sorted(want_per) == [3, 4]
    for l in (3, 4):
        assert float(per[l]) == pytest.approx(want_per[l], rel=1e-5)
    assert float(loss) == pytest.approx(float(want), rel=1e-5)
    assert float(loss) > 0
    # heads averaged instead of summed (2 heads): half of it
    assert float(mean) == pytest.approx(float(want) / 2, rel=1e-5)
    # every block: the two shallow blocks add to it
    assert float(every) > float(loss) + 1e-6


def test_deit_apa_zero_on_its_own_attention_and_micro_batches():
    """A prior equal to the CLS-to-patch row gives 0; a micro-batch's
    share (batch_total) adds up to the batch's loss."""
    model = _deit(seed=1)
    x = torch.randn(3, 3, 32, 32)
    with AttnProbRecorder(model) as rec, torch.no_grad():
        model(x[:1])
        one = rec.records
        # the prior is image 0's own CLS row, renormalised over the patches
        own = []
        for r in one:
            row = r['probs'][0, 0, :, 0, 1:]
            own.append((row / row.sum(-1, keepdim=True)).reshape(2, 4, 4))
        assert float(attention_prior_alignment_loss(one, own)) < 1e-10
        priors = _priors(model, (4, 4), seed=2)
        rec.clear()
        model(x)
        whole = attention_prior_alignment_loss(rec.records, priors)
        parts = 0.
        for i in range(3):
            rec.clear()
            model(x[i:i + 1])
            parts = parts + attention_prior_alignment_loss(
                rec.records, priors, batch_total=3)
    assert float(parts) == pytest.approx(float(whole), rel=1e-5)
    # a prior over another grid is refused in one line
    with AttnProbRecorder(model) as rec, torch.no_grad():
        model(x[:1])
        with pytest.raises(ValueError, match='no map of 16 patches'):
            attention_prior_alignment_loss(rec.records,
                                           _priors(model, (3, 3)))


def test_deit_apa_gradients_reach_the_image():
    model = _deit(seed=2)
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    with AttnProbRecorder(model) as rec:
        model(x)
        loss = attention_prior_alignment_loss(rec.records,
                                              _priors(model, (4, 4)))
    loss.backward()
    g = x.grad
    assert g is not None and bool(torch.isfinite(g).all())
    assert float(g.abs().sum()) > 0
    # both images get a gradient (the loss is a mean over images)
    assert all(float(g[i].abs().sum()) > 0 for i in range(2))
    # a step against the gradient lowers the loss
    with AttnProbRecorder(model) as rec, torch.no_grad():
        model(x - 1e-2 * g / g.abs().max())
        lower = attention_prior_alignment_loss(rec.records,
                                               _priors(model, (4, 4)))
    assert float(lower) < loss.item()


# ------------------------------------------------------------ the priors
def _start(synth, model, seed, hw=(32, 32)):
    """What SPDFQ draws at the start of a batch, from a generator seeded
    with ``seed``."""
    x = torch.zeros(2, 3, *hw)
    state = SynthState(model, x, torch.zeros(3, 1, 1), torch.ones(3, 1, 1),
                       torch.Generator().manual_seed(seed), 0, hw,
                       torch.device('cpu'))
    synth.start_batch(state)
    state.recorder.remove()
    return state


def test_deit_prior_maps():
    model = _deit()
    synth = SPDFQ(label_head='classifier', crop_size=None, num_images=2,
                  batch_size=2, img_size=32, iterations=1, progress=False)
    synth.check_model(Wrap(model))
    s1 = _start(synth, model, 5)
    assert len(s1.priors) == 4
    for p in s1.priors:
        # one map per head over the 4x4 patch grid (not the 17 tokens)
        assert p.shape == (2, 4, 4) and p.dtype == torch.float32
        assert bool((p >= 0).all())
        torch.testing.assert_close(p.sum((1, 2)), torch.ones(2),
                                   atol=1e-6, rtol=0)
        assert not torch.allclose(p[0], p[1])  # heads differ
        assert float(p.amax()) > 1.5 / 16  # not uniform
    # deterministic with the seed, different with another
    s2 = _start(synth, model, 5)
    s3 = _start(synth, model, 6)
    for a, b, c in zip(s1.priors, s2.priors, s3.priors):
        assert torch.equal(a, b)
        assert not torch.allclose(a, c)
    # DeiT-S: 12 blocks of 6 heads over the 14x14 grid of 224x224 inputs
    small = timm.create_model('deit_small_patch16_224', pretrained=False)
    with AttnProbRecorder(small) as rec:
        grids = SPDFQ.prior_grids(rec, small, (224, 224))
        specs = rec.block_specs()
    assert grids == [(14, 14)] * 12 and [h for h, _ in specs] == [6] * 12
    # a model that takes other sizes: the grid of the images
    dyn = _deit(dynamic_img_size=True)
    with AttnProbRecorder(dyn) as rec:
        assert SPDFQ.prior_grids(rec, dyn, (48, 32)) == [(6, 4)] * 4


# ------------------------------------------------------------- synthesis
def test_spdfq_synthesis_on_deit():
    model = Wrap(_deit(seed=3))
    common = dict(label_head='classifier', crop_size=None, num_images=2,
                  batch_size=2, img_size=32, progress=False, seed=4,
                  log_interval=1)
    # every term on: runs, everything finite, APA logged
    synth = SPDFQ(iterations=4, **common)
    synth.check_model(model)
    out = synth.generate(model)
    assert out.shape == (2, 3, 32, 32) and bool(torch.isfinite(out).all())
    assert len(synth.history) == 4
    for h in synth.history:
        assert all(math.isfinite(v) for v in h.values()
                   if isinstance(v, float))
        assert h['loss_apa'] > 0 and h['loss_sl_crops'] > 0
    # APA alone: the loss falls and the images move because of it (with
    # apa_weight=0 nothing pulls on the pixels: they stay the initial ones)
    alone = dict(common, label_weight=0, jitter=0, flip=False,
                 components=dict(msr=False, tv=False))
    runs = {}
    for w in (1.0, 0.0):
        s = SPDFQ(iterations=30, apa_weight=w, **alone)
        s.check_model(model)
        runs[w] = (s.generate(model), [h['loss_apa'] for h in s.history])
    (x1, apa), (x0, apa0) = runs[1.0], runs[0.0]
    assert apa[-1] < 0.95 * apa[0]
    assert apa0[0] == pytest.approx(apa[0], rel=1e-6)  # same start
    assert apa0[-1] == pytest.approx(apa0[0], rel=1e-6)  # nothing moved
    assert float((x1 - x0).abs().max()) > 0.05


# -------------------------------------------------------------- refusals
def test_refusals_in_one_line():
    # a ViT without CLS token (global average pooling): no CLS row
    vit = Wrap(timm.create_model(
        'vit_tiny_patch16_224', pretrained=False, num_classes=K,
        class_token=False, global_pool='avg', **TINY_DEIT))
    synth = SPDFQ(crop_size=None, img_size=32, progress=False)
    with pytest.raises(ValueError, match='no CLS token') as err:
        synth.check_model(vit)
    assert '\n' not in str(err.value)
    SPDFQ(crop_size=None, img_size=32, progress=False,
          components=dict(apa=False)).check_model(vit)
    # MSR crops at their own size (the dense fragment's crop_size='native')
    # or at a fixed size other than the classifier's: refused before any
    # work instead of timm's assertion in the first crop forward
    deit = Wrap(_deit())
    for size in ('native', 16):
        synth = SPDFQ(crop_size=size, img_size=32, progress=False)
        with pytest.raises(ValueError, match='use crop_size=None') as err:
            synth.check_model(deit)
        assert '\n' not in str(err.value) and '32x32' in str(err.value)
    # what works: None, the classifier's own size, or no crop pass at all
    for kw in (dict(crop_size=None), dict(crop_size=32),
               dict(crop_size='native', components=dict(msr=False)),
               dict(crop_size='native', label_weight=0)):
        SPDFQ(img_size=32, progress=False, **kw).check_model(deit)
    # the same on a timm Swin (fixed input size too)
    swin = Wrap(timm.create_model(
        'swin_tiny_patch4_window7_224', pretrained=False, num_classes=K,
        embed_dim=16, depths=(2, 1), num_heads=(2, 2), window_size=4,
        img_size=32))
    with pytest.raises(ValueError, match='use crop_size=None'):
        SPDFQ(crop_size='native', img_size=32,
              progress=False).check_model(swin)


# ---------------------------------------------------------------- config
def test_deit_spdfq_config_loads_and_assembles():
    from dfq_dense.engine.dfq_config import parse_dfq_config
    from dfq_dense.engine.runner import load_config, task_of
    from dfq_dense.registry import MODELS, build
    from dfq_dense.synth.feature_targets import ClassifierLogits
    cfg = load_config(osp.join(REPO, 'configs', 'cls',
                               'deit_s_w4a8_spdfq.py'))
    assert task_of(cfg) == 'cls'
    assert cfg.model.model_name == 'deit_small_patch16_224.fb_in1k'
    assert cfg.test_cfg.type == 'dfq_dense.DFQTestLoop'
    dfq = parse_dfq_config(cfg.dfq)
    synth = dict(dfq.synthesizer)
    assert synth['type'] == 'SPDFQ' and synth['label_head'] == 'classifier'
    assert synth['crop_size'] is None  # fixed-size timm input
    assert synth['components']['apa'] is True
    assert (dfq.quantizer.w_bits, dfq.quantizer.a_bits) == (4, 8)
    # the method's block-wise reconstruction, as on the Swin configs
    assert dfq.adapter['type'] == 'BlockReconstruction'
    synth.update(num_images=2, batch_size=2, img_size=32, iterations=1,
                 progress=False)
    s = build(MODELS, synth)
    s.check_model(Wrap(_deit()))  # APA on a DeiT is accepted
    assert isinstance(s.head, ClassifierLogits) and s.num_classes == K
