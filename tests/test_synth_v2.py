"""Tests of the teacher-student pieces: feature discrepancy, StudentStep and
PSAQ-ViT V2 (its V1 synthesis and its rounds, the PSAQViTV2Rounds
adapter)."""
import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from dfq_dense.quant import (enable_calibration, finish_calibration,
                             iter_quantizers, quantize_model)
from dfq_dense.adapt import (BaseAdapter, PSAQViTV2Rounds, StudentStep,
                             extract_features, feature_discrepancy,
                             mean_discrepancy)
from dfq_dense.adapt.student_step import trainable_scales
from dfq_dense.registry import ADAPTERS, MODELS, build
from dfq_dense.synth import PSAQViT, PSAQViTV2, valid_range

from tiny_models import MEAN, STD, TinyModel


def _eval(model):
    for m in model.modules():
        m.training = False
    return model


@pytest.fixture(scope='module')
def teacher():
    return _eval(TinyModel())


@pytest.fixture(scope='module')
def images():
    g = torch.Generator().manual_seed(3)
    lo, hi = valid_range(torch.tensor(MEAN), torch.tensor(STD))
    x = torch.randn(4, 3, 56, 56, generator=g)
    return torch.max(torch.min(x, hi), lo)


def _calibrate(model, x):
    enable_calibration(model)
    with torch.no_grad():
        extract_features(model, x, include_neck=True)
    finish_calibration(model)


def _student(teacher, x, scope='backbone'):
    s = copy.deepcopy(teacher)
    quantize_model(s, 4, 4, scope=scope)
    _calibrate(s, x)
    return _eval(s)


def _grad_flags(model):
    return {n: p.requires_grad for n, p in model.named_parameters()}


def _scales(model):
    return {n: q.scale.detach().clone() for n, q in iter_quantizers(model)}


# --------------------------------------------------------------- discrepancy
def _np_mse(t, s, eps=1e-6):
    """Loop reference: teacher-standardised MSE, mean over stages."""
    B = t[0].shape[0]
    out = np.zeros(B)
    for tk, sk in zip(t, s):
        tk, sk = tk.numpy(), sk.numpy()
        _, C, H, W = tk.shape
        for b in range(B):
            acc = 0.
            for c in range(C):
                vals = [tk[b, c, i, j] for i in range(H) for j in range(W)]
                mu = sum(vals) / len(vals)
                var = sum((v - mu)**2 for v in vals) / len(vals)
                sd = math.sqrt(var + eps)
                for i in range(H):
                    for j in range(W):
                        zt = (tk[b, c, i, j] - mu) / sd
                        zs = (sk[b, c, i, j] - mu) / sd
                        acc += (zs - zt)**2
            out[b] += acc / (C * H * W) / len(t)
    return out


def _np_kl(t, s, tau):
    B = t[0].shape[0]
    out = np.zeros(B)
    for tk, sk in zip(t, s):
        tk, sk = tk.numpy(), sk.numpy()
        _, C, H, W = tk.shape
        for b in range(B):
            acc = 0.
            for i in range(H):
                for j in range(W):
                    et = [math.exp(tk[b, c, i, j] / tau) for c in range(C)]
                    es = [math.exp(sk[b, c, i, j] / tau) for c in range(C)]
                    zt, zs = sum(et), sum(es)
                    for c in range(C):
                        p, q = et[c] / zt, es[c] / zs
                        acc += p * math.log(p / q)
            out[b] += tau * tau * acc / (H * W) / len(t)
    return out


def _feats(seed):
    g = torch.Generator().manual_seed(seed)
    shapes = [(2, 3, 2, 3), (2, 4, 1, 2)]
    return [
        torch.randn(s, generator=g, dtype=torch.float64) * (k + 1) * 3 + k
        for k, s in enumerate(shapes)
    ]


def test_feature_discrepancy_mse_vs_loop():
    t, s = _feats(0), _feats(1)
    ref = _np_mse(t, s)
    d = feature_discrepancy(t, s, 'mse', reduction='none')
    assert d.shape == (2, )
    np.testing.assert_allclose(d.numpy(), ref, rtol=1e-10)
    assert abs(feature_discrepancy(t, s).item() - ref.mean()) < 1e-10
    assert abs(feature_discrepancy(t, s, reduction='sum').item() -
               ref.sum()) < 1e-10
    # identical features: 0; a single tensor works as one stage
    assert feature_discrepancy(t, [f.clone() for f in t]).item() == 0
    np.testing.assert_allclose(
        feature_discrepancy(t[0], s[0], reduction='none').numpy(),
        _np_mse(t[:1], s[:1]), rtol=1e-10)
    # the teacher statistics make it (almost) invariant to a stage's scale
    t2 = [t[0] * 100, t[1]]
    s2 = [s[0] * 100, s[1]]
    assert abs(feature_discrepancy(t2, s2).item() -
               feature_discrepancy(t, s).item()) < 1e-6
    # the statistics are detached: the gradient is that of a weighted MSE
    ss = [f.clone().requires_grad_(True) for f in s]
    tt = [f.clone().requires_grad_(True) for f in t]
    feature_discrepancy(tt, ss).backward()
    for a, b in zip(tt, ss):
        assert torch.allclose(a.grad, -b.grad)


@pytest.mark.parametrize('tau', [1.0, 2.5])
def test_feature_discrepancy_kl_vs_loop(tau):
    t, s = _feats(2), _feats(3)
    ref = _np_kl(t, s, tau)
    d = feature_discrepancy(t, s, 'kl', tau=tau, reduction='none')
    np.testing.assert_allclose(d.numpy(), ref, rtol=1e-9)
    assert (d > 0).all()
    assert abs(feature_discrepancy(t, s, 'kl', tau).item() -
               ref.mean()) < 1e-10
    assert feature_discrepancy(t, [f.clone() for f in t], 'kl',
                               tau).item() == 0


def test_feature_discrepancy_errors():
    t, s = _feats(0), _feats(1)
    with pytest.raises(ValueError, match='measure'):
        feature_discrepancy(t, s, 'l1')
    with pytest.raises(ValueError, match='number of feature maps'):
        feature_discrepancy(t, s[:1])
    with pytest.raises(ValueError, match='stage 1'):
        feature_discrepancy(t, [s[0], s[1][:, :2]])
    with pytest.raises(ValueError, match='reduction'):
        feature_discrepancy(t, s, reduction='max')


# --------------------------------------------------------------- student step
def test_student_step_config():
    st = StudentStep.build(dict(type='x', params='both', iters=3), lr=0.5,
                           batch_size=2)
    assert (st.params, st.iters, st.lr, st.qparam_lr, st.batch_size) == \
        ('both', 3, 0.5, 0.5, 2)
    assert StudentStep.build(st) is st
    for bad in (dict(params='bias'), dict(loss='ce'), dict(optimizer='lamb'),
                dict(measure='l2')):
        with pytest.raises(ValueError):
            StudentStep(**bad)
    # batch order: consecutive permutations, every image once per epoch
    st = StudentStep(iters=5, batch_size=2)
    idx = st.batch_indices(4, torch.Generator().manual_seed(0))
    assert [len(i) for i in idx] == [2] * 5
    flat = torch.cat(idx)
    assert sorted(flat[:4].tolist()) == [0, 1, 2, 3]
    assert sorted(flat[4:8].tolist()) == [0, 1, 2, 3]
    again = st.batch_indices(4, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(idx, again))


def test_student_step_weights(teacher, images):
    student = _student(teacher, images)
    # a frozen parameter must come back frozen
    frozen = student.backbone.patch_embed.norm.weight
    frozen.requires_grad_(False)
    flags = _grad_flags(student)
    scales = _scales(student)
    d0 = mean_discrepancy(teacher, student, images).item()
    st = StudentStep(params='weights', lr=3e-4, iters=10, batch_size=4,
                     log_interval=1)
    out = st.run(teacher, student, images)
    d1 = mean_discrepancy(teacher, student, images).item()
    assert d1 < 0.95 * d0
    assert out['loss_last'] < out['loss_first']
    assert out['num_weights'] > 0 and out['num_scales'] == 0
    assert len(st.history) == 10 and 'loss_feature' in st.history[0]
    assert _grad_flags(student) == flags
    assert all(p.grad is None for p in student.parameters())
    assert not any(m.training for m in student.modules())
    # scales untouched, the frozen-by-caller parameter trained anyway
    for n, s in _scales(student).items():
        assert torch.equal(s, scales[n]), n
    # the teacher is untouched
    for (n, p), q in zip(teacher.named_parameters(),
                         TinyModel().parameters()):
        assert torch.equal(p, q), n


def test_student_step_qparams(teacher, images):
    student = _student(teacher, images)
    weights = {n: p.detach().clone() for n, p in student.named_parameters()}
    scales = _scales(student)
    flags = _grad_flags(student)
    d0 = mean_discrepancy(teacher, student, images).item()
    st = StudentStep(params='qparams', lr=1e-4, iters=15, batch_size=4)
    out = st.run(teacher, student, images)
    d1 = mean_discrepancy(teacher, student, images).item()
    assert d1 < d0
    assert out['num_weights'] == 0 and out['num_scales'] > 0
    for n, p in student.named_parameters():
        assert torch.equal(p, weights[n]), n
    changed = [n for n, s in _scales(student).items()
               if not torch.equal(s, scales[n])]
    assert len(changed) == out['num_scales']
    for _, q in iter_quantizers(student):
        assert not q.scale.requires_grad and q.scale.grad is None
        assert q.state == 'quantizing'
    assert _grad_flags(student) == flags

    # scales stay positive even under a huge step
    st = StudentStep(params='qparams', optimizer='sgd', lr=1e3, iters=2,
                     batch_size=4)
    st.run(teacher, student, images)
    for _, q in trainable_scales([student.backbone]):
        assert (q.scale >= 1e-8).all() and torch.isfinite(q.scale).all()


def test_student_step_mimiq_loss(teacher, images):
    student = _student(teacher, images)
    st = StudentStep(params='weights', lr=3e-4, iters=10, batch_size=4,
                     loss='mimiq', log_interval=1)
    st.run(teacher, student, images)
    hist = st.history
    assert all('loss_structure' in h for h in hist)
    for h in hist:
        assert abs(h['loss'] - (10 * h['loss_structure'] +
                                h['loss_feature'])) < 1e-5
    assert hist[-1]['loss'] < hist[0]['loss']
    assert hist[-1]['loss_structure'] < hist[0]['loss_structure']


def test_student_step_with_neck(images):
    teacher = _eval(TinyModel(neck=True))
    student = _student(teacher, images, scope='model')
    feats = extract_features(student, images[:1], include_neck=True)
    assert [tuple(f.shape[:2]) for f in feats] == [(1, 16), (1, 16)]
    neck0 = {n: p.detach().clone() for n, p in student.neck.named_parameters()}
    d0 = mean_discrepancy(teacher, student, images, include_neck=True)
    StudentStep(params='both', lr=3e-4, iters=5, batch_size=4,
                include_neck=True).run(teacher, student, images)
    d1 = mean_discrepancy(teacher, student, images, include_neck=True)
    assert d1 < d0
    assert any(not torch.equal(p, neck0[n])
               for n, p in student.neck.named_parameters())


# ----------------------------------------------------------------- PSAQ-ViT V2
def _v2(seed=5, **kw):
    """PSAQ-ViT V2: its V1 synthesis (dfq.synthesizer) and its rounds
    (dfq.adapter, with ``kw``)."""
    synth = build(MODELS, dict(type='PSAQViTV2', num_images=2, batch_size=2,
                               img_size=56, iterations=2, seed=seed,
                               progress=False, log_interval=1))
    cfg = dict(type='PSAQViTV2Rounds', batch_size=2, rounds=2,
               sample_iters=3, seed=seed, progress=False, log_interval=1,
               student_step=dict(lr=3e-4, iters=4, batch_size=2))
    cfg.update(kw)
    return synth, build(ADAPTERS, cfg)


def _run_v2(base, v2, calibrate=None):
    synth, adapter = v2
    teacher = copy.deepcopy(base)
    x0 = synth.generate(teacher)
    student = _student(teacher, x0)
    before = copy.deepcopy(student)
    x1 = adapter.run(teacher, student, x0.clone(), calibrate=calibrate)
    return teacher, student, before, x0, x1


def test_psaq_v2_adapt_reduces_discrepancy_and_is_deterministic(teacher):
    synth, adapter = v2 = _v2()
    assert isinstance(synth, PSAQViTV2) and isinstance(synth, PSAQViT)
    assert isinstance(adapter, PSAQViTV2Rounds) and \
        isinstance(adapter, BaseAdapter)
    # the synthesizer makes images only; the adapter changes the student
    assert not hasattr(synth, 'adapt') and not hasattr(PSAQViT, 'adapt')
    t, student, before, x0, x1 = _run_v2(teacher, v2)
    assert x1.shape == x0.shape == (2, 3, 56, 56) and x1.device.type == 'cpu'
    assert not torch.equal(x0, x1)
    lo, hi = valid_range(torch.tensor(MEAN), torch.tensor(STD))
    assert (x1 >= lo - 1e-6).all() and (x1 <= hi + 1e-6).all()
    # the student improved on the pool it was trained on; with the balanced
    # sample step (default balance='grad_norm') the pool moves far from the
    # V1 images x0, so no gain on x0 is required any more
    assert mean_discrepancy(t, student, x1) < \
        mean_discrepancy(t, before, x1)
    assert not any(m.training for m in student.modules())
    assert all(p.requires_grad for p in student.parameters())
    assert all(q.state == 'quantizing' and not q.scale.requires_grad
               for _, q in iter_quantizers(student))
    # generate()'s V1 entries (no phase), the adapter's rounds
    assert {h.get('phase') for h in synth.history} == {None}
    phases = {h.get('phase') for h in adapter.history}
    assert phases == {'sample', 'student', 'round'}
    rounds = [h for h in adapter.history if h.get('phase') == 'round']
    assert len(rounds) == 2
    assert all(r['disc_end'] < r['disc_after_sample'] for r in rounds)
    sample = [h for h in adapter.history if h.get('phase') == 'sample']
    assert len(sample) == 2 * 3 and all(
        h['loss_entropy'] != 0 and h['loss_disc'] > 0 and h['loss_tv'] > 0
        for h in sample)

    # same seed, fresh copies: identical images and student
    _, student2, _, x0b, x1b = _run_v2(teacher, _v2())
    assert torch.equal(x0, x0b) and torch.equal(x1, x1b)
    for (n, p), q in zip(student.state_dict().items(),
                         student2.state_dict().values()):
        assert torch.equal(p, q), n
    # another seed: other images
    _, _, _, _, x1c = _run_v2(teacher, _v2(seed=6))
    assert not torch.equal(x1, x1c)


def test_psaq_v2_sample_step_raises_discrepancy(teacher):
    v2 = _v2(rounds=1, sample_iters=5,
             components=dict(entropy=False, student_step=False, tv=False))
    t, student, before, x0, x1 = _run_v2(teacher, v2)
    assert mean_discrepancy(t, student, x1) > \
        1.1 * mean_discrepancy(t, student, x0)
    # the student was not touched
    for (n, p), q in zip(student.state_dict().items(),
                         before.state_dict().values()):
        assert torch.equal(p, q), n
    assert all(h['loss_entropy'] == 0 and h['loss_tv'] == 0
               for h in v2[1].history if h.get('phase') == 'sample')


def test_psaq_v2_selection_and_recalibrate(teacher):
    calls = []
    synth, adapter = _v2(rounds=2, sample_iters=2, images_per_round=1,
                         selection='hard', recalibrate=True,
                         components=['discrepancy', 'student_step'],
                         student_step=dict(iters=1, batch_size=2, lr=1e-4))
    tt = copy.deepcopy(teacher)
    x0 = synth.generate(tt)
    student = _student(tt, x0)
    d = mean_discrepancy(tt, student, x0, reduction='none')
    hardest = int(d.argmax())

    def calibrate(x):
        calls.append(x.clone())
        _calibrate(student, x)

    class Vis:  # stands in for the runner's visualizer
        scalars = []

        def add_scalars(self, scalars, step):
            self.scalars.append((dict(scalars), step))

    adapter.visualizer = Vis()
    # one round only to check which image moved
    adapter.rounds = 1
    x1 = adapter.run(tt, student, x0, calibrate=calibrate)
    keys = set().union(*(k for k, _ in Vis.scalars))
    assert {'adapt/sample_loss_disc', 'adapt/student_loss_feature',
            'adapt/disc_end'} <= keys
    moved = [i for i in range(2) if not torch.equal(x0[i], x1[i])]
    assert moved == [hardest]
    assert len(calls) == 1 and torch.equal(calls[0], x1)
    adapter.recalibrate = False
    adapter.run(tt, student, x1, calibrate=calibrate)
    assert len(calls) == 1


def test_psaq_v2_components_and_check_model(teacher):
    with pytest.raises(ValueError, match='known components: entropy, '
                       'discrepancy, student_step, tv'):
        _v2(components=dict(entropy=True, hardness=True))
    with pytest.raises(ValueError, match='all components'):
        _v2(components=[])
    with pytest.raises(ValueError, match='selection'):
        _v2(selection='worst')
    with pytest.raises(ValueError, match='params'):
        _v2(student_step=dict(params='bias'))
    synth, adapter = _v2(components=dict(tv=False, entropy=False))
    assert adapter.components == dict(entropy=False, discrepancy=True,
                                      student_step=True, tv=False)
    synth.check_model(teacher)
    adapter.check_model(teacher)
    # the entropy of the sample step hooks Swin attention too
    with_entropy = _v2()[1]
    with_entropy.check_model(teacher)

    class Conv(nn.Module):

        def __init__(self):
            super().__init__()
            self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3))

    for checked in (synth, with_entropy):
        with pytest.raises(ValueError, match='Swin'):
            checked.check_model(Conv())
        with pytest.raises(ValueError, match='backbone'):
            checked.check_model(nn.Linear(2, 2))
