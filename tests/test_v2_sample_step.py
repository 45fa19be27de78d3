"""PSAQ-ViT V2's sample step: the balanced combination of its terms makes the
images harder for the current student (the teacher-student discrepancy
rises), the former plain weighted sum can let it fall, and the balanced
update gives every term its configured share."""
import copy

import pytest
import torch

from dfq_dense.quant import (enable_calibration, finish_calibration,
                             quantize_model)
from dfq_dense.adapt import extract_features
from dfq_dense.registry import ADAPTERS, MODELS, build
from dfq_dense.synth import valid_range
from dfq_dense.synth.hooks import AttnOutputRecorder

from tiny_models import MEAN, STD, TinyModel


def _eval(model):
    for m in model.modules():
        m.training = False
    return model


def _student(teacher, x):
    s = copy.deepcopy(teacher)
    quantize_model(s, 4, 4, scope='backbone')
    enable_calibration(s)
    with torch.no_grad():
        extract_features(s, x)
    finish_calibration(s)
    return _eval(s)


def _disc(t_feats, s_feats, eps=1e-6):
    """The 'mse' measure from its definition: per stage, standardise with
    the teacher's per-sample, per-channel spatial mean / population std
    (+eps), mean squared difference over (C, H, W); mean over stages, then
    over the batch."""
    per_stage = []
    for t, s in zip(t_feats, s_feats):
        mu = t.mean(dim=(2, 3), keepdim=True).detach()
        sd = ((t.detach() - mu).pow(2).mean(dim=(2, 3), keepdim=True) +
              eps).sqrt()
        per_stage.append((((s - mu) / sd - (t - mu) / sd)**2).mean((1, 2, 3)))
    return torch.stack(per_stage).mean(0).mean()


@torch.no_grad()
def _measure(teacher, student, x):
    return _disc(list(teacher.backbone(x)), list(student.backbone(x))).item()


@pytest.fixture(scope='module')
def teacher():
    return _eval(TinyModel())


def _synth(seed, **kw):
    """PSAQ-ViT V2's rounds (one, without student step), ``kw`` given."""
    cfg = dict(type='PSAQViTV2Rounds', batch_size=4, rounds=1, seed=seed,
               progress=False, log_interval=100,
               components=dict(student_step=False))
    cfg.update(kw)
    return build(ADAPTERS, cfg)


def _sample_step(teacher, seed, **kw):
    """V1 images, a student calibrated on them, one sample step (``kw``
    the V1 synthesis takes too, e.g. ``entropy_weight``, go to both, as
    when both were one synthesizer)."""
    from dfq_dense.engine.dfq_config import synthesizer_keys
    from dfq_dense.synth import PSAQViTV2
    shared = {k: v for k, v in kw.items()
              if k in synthesizer_keys(PSAQViTV2)}
    v1 = build(MODELS, dict(type='PSAQViTV2', num_images=4, batch_size=4,
                            img_size=56, iterations=10, seed=seed,
                            progress=False, log_interval=100, **shared))
    synth = _synth(seed, **kw)
    x0 = v1.generate(teacher)
    student = _student(teacher, x0)
    x1 = synth.run(teacher, student, x0.clone())
    rnd = [h for h in synth.history if h.get('phase') == 'round']
    assert len(rnd) == 1
    return synth, student, x0, x1, rnd[0]


@pytest.mark.parametrize('seed', [0, 1])
def test_default_sample_step_raises_discrepancy(teacher, seed):
    synth, student, x0, x1, rnd = _sample_step(teacher, seed)
    assert synth.balance == 'grad_norm'
    d0, d1 = _measure(teacher, student, x0), _measure(teacher, student, x1)
    assert d1 > 2 * d0, (d0, d1)
    # logged before / after the step, for the DFQ loop to report
    assert rnd['disc_before'] == pytest.approx(d0, rel=1e-4)
    assert rnd['disc_after'] == pytest.approx(d1, rel=1e-4)
    # the images stay valid, and the entropy / TV terms are still there
    lo, hi = valid_range(torch.tensor(MEAN), torch.tensor(STD))
    assert (x1 >= lo - 1e-6).all() and (x1 <= hi + 1e-6).all()
    sample = [h for h in synth.history if h.get('phase') == 'sample']
    assert sample and all(h['gnorm_entropy'] > 0 and h['gnorm_tv'] > 0 and
                          h['gnorm_discrepancy'] > 0 for h in sample)


def test_plain_sum_lets_discrepancy_fall(teacher):
    """The former behaviour (balance=None) with a dominant entropy."""
    _, student, x0, x1, rnd = _sample_step(teacher, 0, balance=None,
                                           entropy_weight=10.)
    d0, d1 = _measure(teacher, student, x0), _measure(teacher, student, x1)
    assert d1 < d0, (d0, d1)
    assert rnd['disc_after'] < rnd['disc_before']


def test_balanced_sample_step_is_deterministic(teacher):
    x1 = _sample_step(teacher, 3, sample_iters=5)[3]
    x1b = _sample_step(teacher, 3, sample_iters=5)[3]
    assert torch.equal(x1, x1b)


@pytest.mark.parametrize('shares', [None, dict(entropy=0.2, discrepancy=0.5,
                                               tv=0.3)])
def test_balanced_gradient_shares(teacher, shares):
    synth = _synth(0, sample_shares=shares)
    want = dict(entropy=1 / 3, discrepancy=1 / 3, tv=1 / 3) if shares is \
        None else shares
    g = torch.Generator().manual_seed(7)
    lo, hi = valid_range(torch.tensor(MEAN), torch.tensor(STD))
    x = torch.max(torch.min(torch.randn(2, 3, 56, 56, generator=g), hi), lo)
    student = _student(teacher, x)
    x = x.clone().requires_grad_(True)
    rec = AttnOutputRecorder(teacher.backbone)
    try:
        gen = torch.Generator().manual_seed(11)
        state = gen.get_state()
        terms, _ = synth.sample_terms(teacher, student, x, rec, gen, False)
        grad, _ = synth.balanced_grad(terms, x)
        # the per-term gradients, computed directly (same random draws)
        gen.set_state(state)
        rec.clear()
        t_feats = list(teacher.backbone(x))
        l_ent, _ = synth.entropy_loss(rec.records, gen)
        rec.clear()
        l_disc = -_disc(t_feats, list(student.backbone(x)))
        l_tv = synth.tv_prior(x, gen)
    finally:
        rec.remove()
    names = ('entropy', 'discrepancy', 'tv')
    grads = [torch.autograd.grad(l, x, retain_graph=True)[0]
             for l in (l_ent, l_disc, l_tv)]
    for b in range(len(x)):
        G = torch.stack([gk[b].flatten() for gk in grads], 1).double()
        y = grad[b].flatten().double()
        coef = torch.linalg.lstsq(G, y[:, None]).solution[:, 0]
        assert torch.allclose(G @ coef, y, atol=1e-4 * y.abs().max())
        # share of the update = ||coef_k g_k|| / sum_j ||coef_j g_j||
        parts = coef * G.norm(dim=0)
        assert (parts > 0).all()
        for k, p in zip(names, parts / parts.sum()):
            assert p.item() == pytest.approx(want[k] / sum(want.values()),
                                             abs=1e-4), k
        # common norm: RMS 1 per pixel for the shares summed
        assert parts.sum().item() == pytest.approx(x[b].numel()**0.5,
                                                   rel=1e-4)


def test_balance_arguments():
    with pytest.raises(ValueError, match='balance'):
        _synth(0, balance='pcgrad')
    with pytest.raises(ValueError, match='unknown sample_shares'):
        _synth(0, sample_shares=dict(bn=1.))
    with pytest.raises(ValueError, match='sample_shares'):
        _synth(0, sample_shares=dict(tv=-1.))
    s = _synth(0, sample_shares=dict(tv=2.), components=dict(entropy=False))
    assert s.active_shares(['discrepancy', 'tv']) == pytest.approx(
        dict(discrepancy=1 / 3, tv=2 / 3))
