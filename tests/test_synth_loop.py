"""The shared synthesis loop and the shared Swin attention recorder: a
method run through the loop gives exactly what its recipe written out by
hand gives, the loop's phases come in order, and the one recorder records
what the three former recorders did."""
import contextlib

import pytest
import torch

from dfq_dense.registry import MODELS, build
from dfq_dense.synth import (AttnLogitsRecorder, AttnOutputRecorder,
                             AttnProbRecorder, SwinAttnRecorder,
                             clamp_to_range, get_mean_std, psaq_entropy_loss,
                             tv_prior_loss)
from dfq_dense.synth.base import batch_seed, roll_flip, warmup_cosine_lr

from tiny_models import TinyModel


@pytest.fixture(scope='module')
def tiny_model():
    model = TinyModel()
    for m in model.modules():
        m.training = False
    return model


def _psaq_by_hand(model, n, hw, seed, iterations, rounds, lr, betas,
                  warmup, jitters, tv_weight, tau_range, ref_pixels):
    """PSAQ-ViT's official recipe, one batch, written out: x ~ N(0, 1)
    clamped, one TV target, one Adam for all rounds; per iteration the
    round's warm-up + cosine lr, a shared roll and a flip, the backbone
    under the recorder, -sum of the patch-similarity entropies + the TV
    prior of the jittered batch, backward, step, clamp."""
    mean, std = get_mean_std(model)
    g = torch.Generator().manual_seed(batch_seed(seed, 0))
    x = clamp_to_range(torch.randn((n, 3) + hw, generator=g), mean, std)
    x.requires_grad_(True)
    u = torch.rand((), generator=g).item()
    tau = tau_range[0] + (tau_range[1] - tau_range[0]) * u
    opt = torch.optim.Adam([x], lr=lr, betas=betas)
    bb = model.backbone
    with AttnOutputRecorder(bb) as rec:
        for it in range(rounds * iterations):
            r = it // iterations
            for group in opt.param_groups:
                group['lr'] = warmup_cosine_lr(it - r * iterations, lr,
                                               warmup, iterations)
            opt.zero_grad(set_to_none=True)
            x_aug = roll_flip(x, g, jitters[r], True, 'shared')
            rec.clear()
            bb(x_aug)
            ent = psaq_entropy_loss(rec.records, generator=g)
            tv = tv_prior_loss(x_aug, weight=tv_weight, tau_range=tau_range,
                               ref_pixels=ref_pixels, generator=g, tau=tau)
            (1.0 * ent + tv).backward()
            opt.step()
            with torch.no_grad():
                x.copy_(clamp_to_range(x, mean, std))
    return x.detach()


def test_psaq_through_the_loop_is_the_recipe(tiny_model):
    s = build(MODELS, dict(type='PSAQViT', num_images=2, batch_size=2,
                           img_size=(28, 35), iterations=3, synth_rounds=2,
                           warmup_iters=1, seed=7, progress=False))
    x = s.generate(tiny_model)
    ref = _psaq_by_hand(tiny_model, 2, (28, 35), 7, 3, 2, 0.25, (0.5, 0.9),
                        1, (15, 30), 0.05, (2500., 3000.), s.tau_ref_pixels)
    assert torch.equal(x, ref)


class _Phases:
    """A ``phase_timer`` that records the phase names."""

    def __init__(self):
        self.names = []

    def __call__(self, name):
        self.names.append(name)
        return contextlib.nullcontext()


@pytest.mark.parametrize('method,per_iteration', [
    ('PSAQViT', ['augment', 'forward', 'loss', 'backward', 'step']),
    ('MimiQ', ['augment', 'forward', 'loss', 'backward', 'step']),
    # images, multi-semantic crops, TV prior: each backpropagated before
    # the next forward
    ('SPDFQ', ['augment', 'forward', 'loss', 'backward'] * 2 +
     ['loss', 'backward', 'step']),
])
def test_loop_phases(tiny_model, method, per_iteration):
    cfg = dict(type=method, num_images=1, batch_size=1, img_size=28,
               iterations=2, seed=0, progress=False, log_interval=1)
    if method == 'PSAQViT':
        cfg['synth_rounds'] = 1
    if method == 'SPDFQ':
        cfg['num_classes'] = 10
    s = build(MODELS, cfg)
    timer = s.phase_timer = _Phases()
    x = s.generate(tiny_model)
    assert timer.names == per_iteration * 2
    # the timer changes nothing
    s.phase_timer = None
    assert torch.equal(x, s.generate(tiny_model))
    assert len(s.history) == 2 and all(
        f'loss_{t}' in h for h in s.history for t in s.LOSS_TERMS)


def test_one_recorder_records_what_the_three_did(tiny_model):
    bb = tiny_model.backbone
    x = torch.randn(2, 3, 36, 44, generator=torch.Generator().manual_seed(1))
    out = {}
    for name, make in (('feat', lambda: AttnOutputRecorder(bb)),
                       ('logits', lambda: AttnLogitsRecorder(bb)),
                       ('probs', lambda: AttnProbRecorder(bb))):
        with make() as rec, torch.no_grad():
            bb(x)
            out[name] = [r[name] for r in rec.records]
            valid = [r['valid'] for r in rec.records]
    with SwinAttnRecorder(bb, record=('feat', 'logits', 'probs')) as rec, \
            torch.no_grad():
        bb(x)
        records = list(rec.records)
    assert len(records) == 4
    for k, r in enumerate(records):
        for name in ('feat', 'logits', 'probs'):
            assert torch.equal(r[name], out[name][k]), (k, name)
        assert torch.equal(r['valid'], valid[k])
        assert (r['depth'], r['num_blocks']) == (k + 1, 4)
    with pytest.raises(ValueError, match='cannot record'):
        SwinAttnRecorder(bb, record=('keys', ))
