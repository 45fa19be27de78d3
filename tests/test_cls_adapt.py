"""Classification track: activation checkpointing (``with_cp``), the
synthesis memory estimate and the adapters (PSAQ-ViT V2's rounds, MimiQ's
distillation, SPDFQ's block reconstruction) on timm Swin and DeiT
classifiers.

Each check is against an independent reference: the gradients without
checkpointing, the KL divergence of the class probabilities written out,
the head-wise structure term from its formula, the FP model's own
sub-modules run by hand for the reconstruction's units; plus
tools/dfq_test.py with each adapter on a tiny timm Swin.

Tiny random timm models (nothing downloaded) on the CPU.
"""
import copy
import json
import os
import os.path as osp
import subprocess
import sys

import pytest
import torch

import timm  # noqa: E402  (a runtime dependency: no skip)
from tiny_models import (TIMM_DEIT, TIMM_SWIN, TINY_TIMM_DEIT,  # noqa: E402
                         TINY_TIMM_SWIN, tiny_cls_overrides, tiny_timm,
                         write_class_folders)

from dfq_dense.cls import TimmClassifier  # noqa: E402
from dfq_dense.quant import (enable_calibration,  # noqa: E402
                             finish_calibration, quantize_model)
from dfq_dense.registry import ADAPTERS, MODELS, build  # noqa: E402
from dfq_dense.synth.hooks import SwinAttnRecorder  # noqa: E402
from dfq_dense.synth.loop import (checkpointed_blocks,  # noqa: E402
                                  find_swin_blocks)

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
SWIN, DEIT, TINY_SWIN, TINY_DEIT = (TIMM_SWIN, TIMM_DEIT, TINY_TIMM_SWIN,
                                    TINY_TIMM_DEIT)
K = 3  # classes
ARCHS = {'swin': (SWIN, TINY_SWIN, 3), 'deit': (DEIT, TINY_DEIT, 2)}


def _classifier(arch, seed=0):
    """A TimmClassifier (random weights) as the DFQ loop builds it."""
    name, kwargs, _ = ARCHS[arch]
    torch.manual_seed(seed)
    model = TimmClassifier(name, num_classes=K, pretrained=False,
                           model_kwargs=dict(kwargs))
    # timm's init gives near-zero logits (std 0.02 head): a trained
    # classifier's are O(1) and its class probabilities far from uniform
    head = model.backbone.get_classifier()
    with torch.no_grad():
        head.weight.mul_(50)
    return model.eval()


def _images(n=4, seed=0):
    return torch.randn(n, 3, 32, 32,
                       generator=torch.Generator().manual_seed(seed))


def _student(teacher, bits=4, images=None):
    """The teacher's W``bits``A``bits`` copy, calibrated on ``images``."""
    student = copy.deepcopy(teacher)
    quantize_model(student, bits, bits, scope='backbone')
    enable_calibration(student)
    with torch.no_grad():
        student.backbone(_images() if images is None else images)
    finish_calibration(student)
    return student.eval()


# --------------------------------------------------------------------------
# with_cp on timm blocks
# --------------------------------------------------------------------------
def _recorded_loss(bb, x, rec):
    """A loss of everything the recorders read plus the logits."""
    rec.clear()
    logits = bb(x)
    loss = (logits ** 2).mean()
    for r in rec.records:
        loss = loss + (r['feat'] ** 2).mean() + r['logits'].abs().mean() + \
            (r['probs'] * r['probs'].detach().log1p()).sum(-1).mean()
    return loss, len(rec.records)


@pytest.mark.parametrize('fused', [False, True])
@pytest.mark.parametrize('arch', ['swin', 'deit'])
def test_with_cp_timm_blocks_same_gradients(arch, fused):
    """Checkpointed timm blocks: the recorders' tensors and the pixel
    gradient are those without checkpointing (the recompute runs the same
    operations, hooks included), for timm's explicit and fused attention;
    the blocks' own forwards are back afterwards."""
    bb = _classifier(arch).backbone
    for m in bb.modules():
        if hasattr(m, 'fused_attn'):
            m.fused_attn = fused
    blocks = find_swin_blocks(bb)
    assert len(blocks) == ARCHS[arch][2]
    block_type = timm.models.swin_transformer.SwinTransformerBlock \
        if arch == 'swin' else timm.models.vision_transformer.Block
    assert all(type(b) is block_type for b in blocks)
    x = _images(2, seed=3).requires_grad_(True)
    grads, values, recomputed = [], [], []
    for cp in (False, True):
        with SwinAttnRecorder(bb, record=('feat', 'logits', 'probs')) as rec, \
                checkpointed_blocks(bb, cp):
            assert all(('forward' in b.__dict__) == cp for b in blocks)
            loss, n_rec = _recorded_loss(bb, x, rec)
            assert n_rec == ARCHS[arch][2]
            rec.keep = False  # as the loop's backward
            saved = []
            if cp:
                # the recompute runs the hooks of every attention again
                for s in rec.sites:
                    saved.append(s.w_msa.register_forward_hook(
                        lambda m, a, o: recomputed.append(m)))
            loss.backward()
            for h in saved:
                h.remove()
            # the recompute's records were dropped
            assert len(rec.records) == n_rec
        grads.append(x.grad.clone())
        values.append(loss.detach())
        x.grad = None
    assert len(recomputed) == ARCHS[arch][2]
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-6, atol=1e-9)
    assert torch.equal(values[0], values[1])
    assert all('forward' not in b.__dict__ for b in blocks)
    # without a gradient nothing is checkpointed (and the model runs)
    with checkpointed_blocks(bb), torch.no_grad():
        assert bb(x).shape == (2, K)


@pytest.mark.parametrize('arch', ['swin', 'deit'])
@pytest.mark.parametrize('method', [
    dict(type='PSAQViT', synth_rounds=1, iterations=2,
         label_head='classifier'),
    dict(type='MimiQ', iterations=2, label_head='classifier'),
    dict(type='SPDFQ', iterations=2, label_head='classifier',
         crop_size=None),
])
def test_with_cp_synthesis_same_images(arch, method):
    """Each synthesizer on a timm classifier: the same images with and
    without ``with_cp`` (and with it together with micro-batching: the
    micro-batched images)."""
    model = _classifier(arch)
    if method['type'] == 'SPDFQ' and arch == 'deit':
        # its attention priors are maps over square windows: not on DeiT
        method = dict(method, components=dict(apa=False))

    def run(**opts):
        synth = build(MODELS, dict(
            method, num_images=2, batch_size=2, img_size=32, seed=4,
            progress=False, **opts))
        synth.check_model(model)
        return synth.generate(model), synth.history

    ref, ref_log = run()
    got, log = run(with_cp=True)
    assert torch.equal(got, ref)
    assert log[0]['loss'] == ref_log[0]['loss']
    assert run(with_cp=True, micro_batch_size=1)[0].equal(
        run(micro_batch_size=1)[0])


# --------------------------------------------------------------------------
# the synthesis memory estimate on timm classifiers
# --------------------------------------------------------------------------
def _peak_of(model, cfg):
    """Bytes autograd keeps in one iteration of one image (the probe's
    measure), measured directly."""
    from dfq_dense.engine.memory import peak_saved_bytes
    synth = build(MODELS, dict(cfg, num_images=1, batch_size=1,
                               iterations=1, seed=0, progress=False))
    return peak_saved_bytes(lambda: synth.generate(model))[0]


@pytest.mark.parametrize('arch', ['swin', 'deit'])
def test_memory_estimate_timm_at_the_model_size(arch, monkeypatch):
    """A timm classifier built for 32x32 inputs is probed at 32x32 (not
    at the 224x224 probe, which its patch embedding refuses), its
    estimate not scaled; another size is refused in one line; with_cp
    checkpoints its blocks (not a crash) and keeps less."""
    from dfq_dense.engine import memory
    monkeypatch.setattr(memory, 'SKIP_BELOW', 0)
    model = _classifier(arch)
    cfg = dict(type='PSAQViT', num_images=8, batch_size=4, iterations=3,
               label_head='classifier')
    est = memory.synthesis_estimate(model, cfg, (32, 32))
    assert est['probe_hw'] == (32, 32)
    ref = _peak_of(model, dict(cfg, img_size=(32, 32), synth_rounds=1))
    assert ref > 0 and est['per_image'] == ref
    assert est['per_forward'] == 4 * ref and est['images_per_forward'] == 4
    cp = memory.synthesis_estimate(model, dict(cfg, with_cp=True), (32, 32))
    assert 0 < cp['per_image'] < est['per_image']
    with pytest.raises(ValueError, match=r'built for 32x32') as err:
        memory.synthesis_estimate(model, cfg, (64, 64))
    assert '\n' not in str(err.value)
    lines = []
    memory.check_synthesis_memory(
        model, cfg, (32, 32), 'cpu', available=int(2 * ref),
        log=lambda msg, **kw: lines.append(msg))
    assert len(lines) == 1 and '32x32 probe' in lines[0]
    assert 'dfq.synthesizer.with_cp=True' in lines[0]


def test_memory_estimate_dynamic_size_deit_probes_the_synthesis_size(
        monkeypatch):
    """A DeiT taking any size (dynamic_img_size): its global attention
    grows with the square of the tokens, so it is probed at the synthesis
    size itself, not scaled from a small probe."""
    from dfq_dense.engine import memory
    monkeypatch.setattr(memory, 'SKIP_BELOW', 0)
    torch.manual_seed(0)
    model = TimmClassifier(DEIT, num_classes=K, pretrained=False,
                           model_kwargs=dict(TINY_DEIT,
                                             dynamic_img_size=True)).eval()
    cfg = dict(type='PSAQViT', num_images=2, batch_size=2, iterations=2)
    est = memory.synthesis_estimate(model, cfg, (48, 48))
    assert est['probe_hw'] == (48, 48)
    assert est['per_image'] == _peak_of(
        model, dict(cfg, img_size=(48, 48), synth_rounds=1))
    small = memory.synthesis_estimate(model, cfg, (32, 32))
    assert small['probe_hw'] == (32, 32) and small['per_image'] == _peak_of(
        model, dict(cfg, img_size=(32, 32), synth_rounds=1))
    assert small['per_image'] < est['per_image']


# --------------------------------------------------------------------------
# discrepancy on class logits
# --------------------------------------------------------------------------
def _kl(t, s, tau=1.0):
    """Per image ``tau^2 KL(softmax(t / tau) || softmax(s / tau))``,
    written out in float64."""
    t, s = t.double() / tau, s.double() / tau
    log_p = t - t.exp().sum(-1, keepdim=True).log()
    log_q = s - s.exp().sum(-1, keepdim=True).log()
    return tau * tau * (log_p.exp() * (log_p - log_q)).sum(-1)


def test_logit_discrepancy_is_the_kl_of_the_class_probabilities():
    from dfq_dense.adapt import feature_discrepancy
    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    for tau in (1.0, 2.5):
        got = feature_discrepancy(t, s, 'kl', tau, reduction='none')
        torch.testing.assert_close(got.double(), _kl(t, s, tau),
                                   rtol=1e-5, atol=1e-7)
    assert float(feature_discrepancy(t, t, 'kl')) == pytest.approx(0,
                                                                  abs=1e-7)
    with pytest.raises(ValueError, match="use measure='kl'") as err:
        feature_discrepancy(t, s, 'mse')
    assert '\n' not in str(err.value)


def test_outputs_resolution_and_refusals():
    """Logits by default on a timm classifier (KL), the backbone-level
    feature map with outputs='features' (MSE); one-line refusals."""
    from dfq_dense.adapt import resolve_outputs
    from dfq_dense.adapt.student_step import extract_features
    model = _classifier('swin')
    assert resolve_outputs('x', 'auto', None, model) == ('classifier', 'kl')
    assert resolve_outputs('x', 'features', None, model) == ('features',
                                                             'mse')
    with pytest.raises(ValueError, match="measure='kl'"):
        resolve_outputs('x', 'auto', 'mse', model)
    x = _images(2)
    with torch.no_grad():
        logits, = extract_features(model, x, outputs='auto')
        fmap, = extract_features(model, x, outputs='features')
        # the last stage (4x4 tokens, 32 channels) after the final norm
        want = model.backbone.norm(model.backbone.layers(
            model.backbone.patch_embed(x))).permute(0, 3, 1, 2)
    assert logits.shape == (2, K)
    torch.testing.assert_close(fmap, want)
    deit = _classifier('deit')
    with torch.no_grad():
        fmap, = extract_features(deit, x, outputs='features')
        tokens = deit.backbone.forward_features(x)  # (2, 1 + 16, 32)
    assert fmap.shape == (2, 32, 4, 4)
    torch.testing.assert_close(fmap.flatten(2).transpose(1, 2),
                               tokens[:, 1:])  # CLS dropped
    # a V2 adapter with the dense default measure is refused on logits
    v2 = build(ADAPTERS, dict(type='PSAQViTV2Rounds', measure='mse'))
    with pytest.raises(ValueError, match="outputs='features'"):
        v2.check_model(model)
    # and outputs='classifier' on a backbone without class logits
    from tiny_models import TinyModel
    v2 = build(ADAPTERS, dict(type='PSAQViTV2Rounds', outputs='classifier'))
    with pytest.raises(ValueError, match="outputs='classifier' needs") as e:
        v2.check_model(TinyModel())
    assert '\n' not in str(e.value)


# --------------------------------------------------------------------------
# PSAQ-ViT V2's rounds
# --------------------------------------------------------------------------
def _valid_range(model):
    cfg = model.data_config
    mean = torch.tensor(cfg['mean']).view(1, 3, 1, 1)
    std = torch.tensor(cfg['std']).view(1, 3, 1, 1)
    return -mean / std, (1 - mean) / std


@pytest.mark.parametrize('arch', ['swin', 'deit'])
def test_v2_sample_step_raises_the_logit_kl(arch):
    """The sample step's discrepancy term on a classifier, alone (plain
    sum): one Adam step descending on ``-mean KL(T(x) || S(x))`` of the
    class probabilities (the paper: hard samples for the current
    student), from the KL written out; more iterations raise the KL."""
    teacher = _classifier(arch)
    x0 = _images(4, seed=1)
    lo, hi = _valid_range(teacher)
    x0 = torch.max(torch.min(x0, hi), lo)
    student = _student(teacher, images=x0)
    lr = 0.05
    cfg = dict(type='PSAQViTV2Rounds', batch_size=4, rounds=1, seed=0,
               sample_iters=1, sample_lr=lr, balance=None, progress=False,
               components=dict(entropy=False, tv=False, student_step=False))
    adapter = build(ADAPTERS, cfg)
    adapter.check_model(teacher)
    x1 = adapter.run(teacher, student, x0.clone())
    # reference: the KL and its pixel gradient, Adam's first step
    # (m / (sqrt(v) + eps) = g / (|g| + eps) after bias correction)
    x = x0.clone().requires_grad_(True)
    loss = -_kl(teacher.backbone(x), student.backbone(x)).mean()
    g, = torch.autograd.grad(loss, x)
    want = torch.max(torch.min(x0 - lr * g / (g.abs() + 1e-8), hi), lo)
    assert (x1 - x0).abs().max() > 0.5 * lr
    # Adam's first step is lr * g / (|g| + 1e-8): where |g| is within a
    # few hundred eps the float32 rounding of the smallest gradients moves
    # it; elsewhere it is the reference's, and its sign everywhere
    sure = g.abs() > 1e-6
    assert sure.float().mean() > 0.5
    torch.testing.assert_close(x1[sure], want.float()[sure], atol=1e-5,
                               rtol=0)
    inside = (want > lo) & (want < hi) & (g.abs() > 1e-7)
    assert torch.equal(torch.sign(x1 - x0)[inside],
                       -torch.sign(g).float()[inside])
    rnd = [h for h in adapter.history if h['phase'] == 'round'][0]
    with torch.no_grad():
        assert rnd['disc_before'] == pytest.approx(
            float(_kl(teacher.backbone(x0), student.backbone(x0)).mean()),
            rel=1e-4)
        assert rnd['disc_after'] == pytest.approx(
            float(_kl(teacher.backbone(x1), student.backbone(x1)).mean()),
            rel=1e-4)
    # the default balanced step (entropy, KL, TV shares): the KL rises
    adapter = build(ADAPTERS, dict(cfg, sample_iters=6, balance='grad_norm',
                                   components=dict(student_step=False)))
    adapter.run(teacher, student, x0.clone())
    rnd = [h for h in adapter.history if h['phase'] == 'round'][0]
    assert rnd['disc_after'] > 1.5 * rnd['disc_before']


@pytest.mark.parametrize('arch', ['swin', 'deit'])
def test_v2_sample_step_with_cp_on_the_quantized_student(arch,
                                                        monkeypatch):
    """with_cp in the sample step checkpoints the blocks of the FP teacher
    and of the quantized student (timm blocks holding the quantized
    attention): the same images as without it."""
    from dfq_dense.synth import loop
    calls = []

    def counting(fn, *args, **kwargs):
        calls.append(fn.__self__)
        return checkpoint(fn, *args, **kwargs)

    checkpoint = loop.checkpoint
    monkeypatch.setattr(loop, 'checkpoint', counting)
    teacher = _classifier(arch)
    x0 = _images(4, seed=8)
    student = _student(teacher, images=x0)
    cfg = dict(type='PSAQViTV2Rounds', batch_size=4, rounds=1,
               sample_iters=2, progress=False,
               components=dict(student_step=False))
    ref = build(ADAPTERS, cfg).run(teacher, student, x0.clone())
    got = build(ADAPTERS, dict(cfg, with_cp=True)).run(teacher, student,
                                                       x0.clone())
    assert not torch.equal(ref, x0)
    assert torch.equal(got, ref)
    # every block of both models, once per forward with a gradient
    blocks = {id(b) for m in (teacher, student)
              for b in find_swin_blocks(m.backbone)}
    assert len(blocks) == 2 * ARCHS[arch][2]
    assert {id(b) for b in calls} == blocks


def test_v2_backbone_level_variant_on_a_classifier():
    """outputs='features': the discrepancy of the classifier's last
    feature map (teacher-standardised MSE), written out."""
    teacher = _classifier('swin')
    x0 = _images(4, seed=2)
    student = _student(teacher, images=x0)
    adapter = build(ADAPTERS, dict(
        type='PSAQViTV2Rounds', batch_size=4, rounds=1, sample_iters=1,
        outputs='features', progress=False,
        components=dict(entropy=False, tv=False, student_step=False)))
    adapter.run(teacher, student, x0.clone())
    rnd = [h for h in adapter.history if h['phase'] == 'round'][0]
    with torch.no_grad():
        t = teacher.backbone.forward_features(x0).double()  # (B, H, W, C)
        s = student.backbone.forward_features(x0).double()
        sigma = (t.var(dim=(1, 2), unbiased=False, keepdim=True) +
                 1e-6).sqrt()
        want = ((s - t) / sigma).pow(2).mean()
    assert rnd['disc_before'] == pytest.approx(float(want), rel=1e-4)


@pytest.mark.parametrize('arch', ['swin', 'deit'])
def test_student_step_distils_the_logits(arch):
    """V2's student step (and MimiQ's KL term) on a classifier: one SGD
    step on ``mean KL(T(x) || S(x))`` of the class probabilities through
    the straight-through quantizers, against the step computed by hand."""
    from dfq_dense.adapt import StudentStep
    teacher = _classifier(arch)
    x = _images(4, seed=5)
    student = _student(teacher, images=x)
    ref = copy.deepcopy(student)
    flags = {n: p.requires_grad for n, p in student.named_parameters()}
    t_state = copy.deepcopy(teacher.state_dict())
    lr = 0.5
    step = StudentStep(params='weights', optimizer='sgd', lr=lr,
                       momentum=0.0, iters=1, batch_size=4, log_interval=1)
    out = step.run(teacher, student, x)
    # the teacher is untouched, the student's flags restored
    assert all(torch.equal(v, teacher.state_dict()[k])
               for k, v in t_state.items())
    assert {n: p.requires_grad
            for n, p in student.named_parameters()} == flags
    params = list(ref.backbone.parameters())
    for p in params:
        p.requires_grad_(True)
    with torch.no_grad():
        t = teacher.backbone(x)
    loss = _kl(t, ref.backbone(x)).mean()
    loss.backward()
    assert out['loss_first'] == pytest.approx(loss.item(), rel=1e-4)
    _check_sgd_step(ref, student, lr)


def _check_sgd_step(ref, student, lr):
    """The student's parameters moved by ``-lr * grad`` of the reference
    copy's loss (to float32 rounding of the gradients: 1e-3 of the
    largest update), and most of them moved."""
    pairs = [(n, p, q) for (n, p), q in zip(ref.backbone.named_parameters(),
                                            student.backbone.parameters())]
    scale = max(float((lr * p.grad).abs().max()) for _, p, _ in pairs
                if p.grad is not None)
    assert scale > 0
    moved = 0
    for name, p, q in pairs:
        step = q.detach() - p.detach()
        want = torch.zeros_like(step) if p.grad is None else -lr * p.grad
        torch.testing.assert_close(step, want.float(), rtol=1e-3,
                                   atol=1e-3 * scale, msg=name)
        moved += int(step.abs().max() > 0)
    assert moved > len(pairs) // 2


# --------------------------------------------------------------------------
# MimiQ's distillation
# --------------------------------------------------------------------------
def _proj_inputs(model, x):
    """The input of every attention's ``proj`` (``attn @ v``, heads
    concatenated): Swin ``(B * nW, N, C)``, DeiT ``(B, N, C)``."""
    outs, handles = [], []
    for name, m in model.backbone.named_modules():
        if name.endswith('attn.proj'):
            handles.append(m.register_forward_pre_hook(
                lambda mod, args: outs.append(args[0])))
    try:
        logits = model.backbone(x)
    finally:
        for h in handles:
            h.remove()
    return outs, logits


def _structure(t, s, heads, c2=0.03 ** 2):
    """``1 - mean`` over windows, heads and channels of SSIM's structure
    term over the tokens, ``(2 cov + c2) / (var_t + var_s + c2)``."""
    t, s = t.double(), s.double()
    dt, ds = t - t.mean(-2, keepdim=True), s - s.mean(-2, keepdim=True)
    cov = (dt * ds).mean(-2)
    st = (2 * cov + c2) / (dt.pow(2).mean(-2) + ds.pow(2).mean(-2) + c2)
    assert st.shape[-1] % heads == 0
    return 1 - st.mean()


@pytest.mark.parametrize('arch', ['swin', 'deit'])
def test_mimiq_distill_on_timm(arch):
    """MimiQ's loss on a classifier: 10 x the head-wise structure term of
    every attention output + the KL of the class probabilities, one SGD
    step, both from the formulas."""
    teacher = _classifier(arch)
    x = _images(4, seed=6)
    student = _student(teacher, images=x)
    ref = copy.deepcopy(student)
    lr = 0.2
    adapter = build(ADAPTERS, dict(
        type='MimiQDistill', student_step=dict(
            iters=1, batch_size=4, lr=lr, momentum=0.0, nesterov=False,
            weight_decay=0.0, log_interval=1)))
    adapter.check_model(student)
    adapter.run(teacher, student, x)
    log = adapter.history[0]
    with torch.no_grad():
        t_out, t_logits = _proj_inputs(teacher, x)
    for p in ref.parameters():
        p.requires_grad_(True)
    s_out, s_logits = _proj_inputs(ref, x)
    assert len(t_out) == len(s_out) == ARCHS[arch][2]
    struct = torch.stack([_structure(t, s, 2)
                          for t, s in zip(t_out, s_out)]).mean()
    kl = _kl(t_logits, s_logits).mean()
    # 1 - (a mean of terms near 1) in float32: 5e-7 absolute
    assert log['loss_structure'] == pytest.approx(struct.item(), rel=1e-4,
                                                  abs=5e-7)
    assert log['loss_feature'] == pytest.approx(kl.item(), rel=1e-4)
    total = 10 * struct + kl
    assert log['loss'] == pytest.approx(total.item(), rel=1e-4, abs=5e-6)
    total.backward()
    _check_sgd_step(ref, student, lr)


# --------------------------------------------------------------------------
# SPDFQ's block reconstruction
# --------------------------------------------------------------------------
def _mse(a, b):
    """Per image mean squared error, then the mean over the images."""
    return float((a.double() - b.double()).pow(2).flatten(1).mean(1).mean())


def _timm_stages(model, x):
    """The activations after every unit of the walk, run by hand from the
    timm model's own modules (as timm's forward_features / forward_head)."""
    bb = model.backbone
    out = []
    with torch.no_grad():
        if hasattr(bb, 'layers'):  # Swin: (B, H, W, C) maps
            h = bb.patch_embed(x)
            out.append(h)
            for stage in bb.layers:
                if not isinstance(stage.downsample, torch.nn.Identity):
                    h = stage.downsample(h)
                    out.append(h)
                for blk in stage.blocks:
                    h = blk(h)
                    out.append(h)
        else:  # ViT: tokens, CLS first
            h = bb.patch_embed(x)
            h = torch.cat([bb.cls_token.expand(len(x), -1, -1), h], 1)
            h = h + bb.pos_embed
            out.append(h)
            for blk in bb.blocks:
                h = blk(h)
                out.append(h)
        out.append(bb(x))  # the logits: the model's whole forward
    return out


@pytest.mark.parametrize('arch', ['swin', 'deit'])
def test_block_reconstruction_walks_the_timm_model(arch):
    """The units of a timm classifier in forward order, each unit's loss
    the MSE between the student's and the FP model's activations after it
    (from the models' own modules, the logits from their forward), then
    a reconstruction lowers the logits' error and leaves the teacher as it
    was."""
    teacher = _classifier(arch)
    x = _images(4, seed=7)
    student = _student(teacher, images=x)
    names = {'swin': ['patch_embed', 'layers.0.blocks.0', 'layers.0.blocks.1',
                      'layers.1.downsample', 'layers.1.blocks.0', 'head'],
             'deit': ['patch_embed', 'blocks.0', 'blocks.1', 'head']}[arch]
    adapter = build(ADAPTERS, dict(type='BlockReconstruction', iters=0,
                                   batch_size=4, log_interval=0))
    adapter.check_model(student)
    adapter.run(teacher, student, x)
    assert [h['block'] for h in adapter.history] == \
        [f'backbone.{n}' for n in names]
    assert adapter.history[-1]['kind'] == 'head'
    t_acts, s_acts = _timm_stages(teacher, x), _timm_stages(student, x)
    for h, t, s in zip(adapter.history, t_acts, s_acts):
        assert h['loss_after'] == pytest.approx(_mse(s, t), rel=1e-4), \
            h['block']
    before = _mse(s_acts[-1], t_acts[-1])
    assert before > 0
    t_state = copy.deepcopy(teacher.state_dict())
    scales = {n: q.scale.clone() for n, q in student.named_modules()
              if hasattr(q, 'scale') and torch.is_tensor(q.scale)}
    adapter = build(ADAPTERS, dict(type='BlockReconstruction', iters=20,
                                   lr=4e-5, batch_size=4, log_interval=0))
    adapter.run(teacher, student, x)
    h = adapter.history[-1]
    with torch.no_grad():
        after = _mse(student.backbone(x), teacher.backbone(x))
    # the head unit's loss is the reconstructed student's logit error
    assert h['loss_after'] == pytest.approx(after, rel=1e-4)
    # the blocks' reconstruction lowers their error (the 3-class head of
    # 4-bit weights is too coarse a grid for its scales to follow SPDFQ's
    # lr smoothly: its error may move either way)
    blocks = [u for u in adapter.history if u['kind'] == 'block']
    assert sum(u['loss_after'] for u in blocks) < \
        sum(u['loss_before'] for u in blocks)
    changed = [n for n, q in student.named_modules()
               if n in scales and not torch.equal(q.scale, scales[n])]
    assert len(changed) > len(scales) // 2
    assert all(torch.equal(v, teacher.state_dict()[k])
               for k, v in t_state.items())


# --------------------------------------------------------------------------
# tools/dfq_test.py with each adapter on a timm Swin classifier
# --------------------------------------------------------------------------
ADAPTER_CFGS = {
    # PSAQ-ViT V2 from the method fragment as it is (its measure=None: the
    # KL of the class probabilities on a classifier); no label term (V2
    # has no category guidance)
    'PSAQViTV2Rounds': """_base_ = [
    '{repo}/configs/cls/_base_/models/swin_tiny_patch4_window7_224.py',
    '{repo}/configs/cls/_base_/dfq_cls_runtime.py',
    '{repo}/configs/_base_/methods/psaq_vit_v2.py',
    '{repo}/configs/_base_/quantizers/naive.py',
    '{repo}/configs/_base_/bits/w4a8.py',
]
dfq = dict(synthesizer=dict(num_images=4, batch_size=2, iterations=2,
                            synth_rounds=1, progress=False),
           adapter=dict(batch_size=2, rounds=1, sample_iters=2,
                        progress=False,
                        student_step=dict(iters=2, batch_size=2)),
           calib_batch_size=2)
""",
    'MimiQDistill': """_base_ = ['{repo}/configs/cls/swin_t_w4a8_mimiq.py']
dfq = dict(synthesizer=dict(num_images=4, batch_size=2, iterations=2,
                            progress=False),
           adapter=dict(student_step=dict(iters=2, batch_size=2)),
           calib_batch_size=2)
""",
    'BlockReconstruction': """_base_ = [
    '{repo}/configs/cls/swin_t_w4a8_spdfq.py']
dfq = dict(synthesizer=dict(num_images=4, batch_size=2, iterations=2,
                            progress=False),
           adapter=dict(iters=2, batch_size=4),
           calib_batch_size=2)
""",
}


@pytest.fixture(scope='module')
def cls_data(tmp_path_factory):
    root = tmp_path_factory.mktemp('cls_adapt')
    val = root / 'val'
    write_class_folders(val)
    weights = str(root / 'tiny_swin.pth')
    torch.save(tiny_timm(SWIN, num_classes=K, seed=1,
                         **TINY_SWIN).state_dict(), weights)
    return dict(root=root, val=str(val), weights=weights)


@pytest.mark.parametrize('adapter', list(ADAPTER_CFGS))
def test_dfq_tool_adapts_a_timm_swin(cls_data, adapter):
    root = cls_data['root']
    cfg = root / f'tiny_{adapter}.py'
    cfg.write_text(ADAPTER_CFGS[adapter].format(repo=REPO) +
                   tiny_cls_overrides(SWIN, TINY_SWIN, cls_data['val']))
    work = str(root / f'work_{adapter}')
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=REPO)
    res = subprocess.run(
        [sys.executable, osp.join(REPO, 'tools', 'dfq_test.py'), str(cfg),
         cls_data['weights'], '--work-dir', work], cwd=str(root), env=env,
        capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    with open(osp.join(work, 'dfq_results.json')) as f:
        results = json.load(f)
    assert results['task'] == 'cls'
    assert 0 <= results['metrics']['imagenet/top1'] <= 100
    adapt = results['adaptation']
    assert adapt['adapter']['type'] == adapter
    if adapter == 'BlockReconstruction':
        names = [u['block'] for u in adapt['reconstruction']]
        assert names == [
            'backbone.patch_embed', 'backbone.layers.0.blocks.0',
            'backbone.layers.0.blocks.1', 'backbone.layers.1.downsample',
            'backbone.layers.1.blocks.0', 'backbone.head']
        assert all(u['loss_before'] > 0 for u in adapt['reconstruction'])
        return
    # the student's weights were trained on the logits' KL
    assert adapt['weight_codes_changed'] > 0
    assert adapt['student_loss']['logged_steps'] >= 1
    assert adapt['student_loss']['first'] > 0
    if adapter == 'PSAQViTV2Rounds':
        rnd, = adapt['rounds']
        assert adapt['images_changed']
        assert rnd['disc_start'] > 0 and rnd['disc_end'] >= 0
        assert results['synthesizer']['type'] == 'PSAQViTV2'
