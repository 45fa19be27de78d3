"""MimiQ and SPDFQ with label_head='classifier' on the classification track:
their class-guided terms are computed on the timm classifier's own logits
(MimiQ: cross-entropy to random labels; SPDFQ: soft cross-entropy to
softmax(Z) targets, images and MSR crops), checked against a direct
computation from the inputs the synthesizer fed; and the leaf configs
configs/cls/swin_t_w4a8_{mimiq,spdfq}.py load and assemble.

Tiny random timm Swin (nothing downloaded) on the CPU.
"""
import math
import os.path as osp

import pytest
import torch

from tiny_models import (TIMM_SWIN, TINY_TIMM_SWIN, Wrap, tiny_timm)  # noqa: E402

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
SWIN, TINY_SWIN = TIMM_SWIN, TINY_TIMM_SWIN
K = 3  # classes of the tiny classifier


def _model(seed=0):
    return Wrap(tiny_timm(SWIN, num_classes=K, seed=seed, **TINY_SWIN))


def _record_terms(synth):
    """Wrap ``synth.loss_terms``: every call's pass, inputs, backbone output,
    targets and returned terms (detached copies)."""
    calls = []
    orig = synth.loss_terms

    def spy(state, p, inputs, feats):
        terms = orig(state, p, inputs, feats)
        targets = getattr(state, 'targets', None)
        if p.name == 'images':
            targets = getattr(state, 'img_targets', targets)
        elif p.name == 'crops':
            targets = state.crop_targets_it
        f = feats[0] if isinstance(feats, (tuple, list)) else feats
        calls.append(dict(
            name=p.name,
            inputs=None if inputs is None else inputs.detach().clone(),
            feats=None if f is None else f.detach().clone(),
            targets=None if targets is None else targets.detach().clone(),
            terms={k: v.detach().clone() for k, v in terms.items()}))
        return terms

    synth.loss_terms = spy
    return calls


def _log_softmax(logits):
    """Written out (float64): ``z - max - log(sum(exp(z - max)))``."""
    z = logits.double()
    z = z - z.max(-1, keepdim=True).values
    return z - z.exp().sum(-1, keepdim=True).log()


def test_mimiq_ce_on_classifier_logits():
    from dfq_dense.synth import MimiQ
    from dfq_dense.synth.feature_targets import ClassifierLogits
    model = _model()
    synth = MimiQ(label_head='classifier', num_images=4, batch_size=4,
                  img_size=32, iterations=2, progress=False, seed=1)
    synth.check_model(model)
    assert synth.num_classes == K and isinstance(synth.head,
                                                 ClassifierLogits)
    calls = _record_terms(synth)
    synth.generate(model)
    assert len(calls) == 2 and len(synth.history) >= 1
    for c in calls:
        with torch.no_grad():
            logits = model.backbone(c['inputs'])
        # the term's logits are the classifier's on the image it was fed
        torch.testing.assert_close(c['feats'], logits, atol=1e-5,
                                   rtol=1e-5)
        t = c['targets']
        assert t.dtype == torch.long and t.shape == (4, )
        assert int(t.min()) >= 0 and int(t.max()) < K
        want = -_log_softmax(logits)[torch.arange(4), t].mean()
        assert float(c['terms']['ce']) == pytest.approx(float(want),
                                                        rel=1e-5)
    # the random labels are drawn once per batch, the same for every step
    assert torch.equal(calls[0]['targets'], calls[1]['targets'])
    assert synth.history[0]['loss_ce'] == pytest.approx(
        float(calls[0]['terms']['ce']), rel=1e-5)


def test_spdfq_soft_labels_on_classifier_logits():
    from dfq_dense.synth import SPDFQ
    from dfq_dense.synth.feature_targets import ClassifierLogits
    model = _model(seed=2)
    synth = SPDFQ(label_head='classifier', crop_size=None, num_images=2,
                  batch_size=2, img_size=32, iterations=2, progress=False,
                  seed=3)
    synth.check_model(model)
    assert synth.num_classes == K and isinstance(synth.head,
                                                 ClassifierLogits)
    calls = _record_terms(synth)
    synth.generate(model)
    passes = [c['name'] for c in calls]
    assert passes.count('images') == 2 and passes.count('crops') == 2
    for c in calls:
        if c['name'] == 'tv':
            continue
        key = 'sl_img' if c['name'] == 'images' else 'sl_crops'
        with torch.no_grad():
            logits = model.backbone(c['inputs'])
        # crops resized to the fixed input size (crop_size=None)
        assert tuple(c['inputs'].shape[-2:]) == (32, 32)
        torch.testing.assert_close(c['feats'], logits, atol=1e-5,
                                   rtol=1e-5)
        T = c['targets'].double()
        assert T.shape == (len(logits), K)
        # softmax(Z), Z zero but one entry z ~ U(5, 10): the top entry is
        # e^z / (e^z + K - 1), the others 1 / (e^z + K - 1)
        top = T.max(-1).values
        z = torch.log(top * (K - 1) / (1 - top))
        assert bool(((z > 5 - 1e-6) & (z < 10 + 1e-6)).all()), z
        rest = (1 - top) / (K - 1)
        assert torch.allclose(T.sort(-1).values[:, :-1],
                              rest[:, None].expand(-1, K - 1), atol=1e-7)
        want = -(T * _log_softmax(logits)).sum(-1).mean()
        assert float(c['terms'][key]) == pytest.approx(float(want),
                                                       rel=1e-5)
    first = [c for c in calls if c['name'] != 'tv'][:2]
    h = synth.history[0]
    assert h['loss_sl_img'] == pytest.approx(
        float(first[0]['terms']['sl_img']), rel=1e-5)
    assert h['loss_sl_crops'] == pytest.approx(
        float(first[1]['terms']['sl_crops']), rel=1e-5)
    assert h['loss_sl'] == pytest.approx(
        h['loss_sl_img'] + h['loss_sl_crops'], rel=1e-6)


@pytest.mark.parametrize('leaf,method,adapter', [
    ('swin_t_w4a8_mimiq.py', 'MimiQ', 'MimiQDistill'),
    ('swin_t_w4a8_spdfq.py', 'SPDFQ', 'BlockReconstruction'),
])
def test_cls_method_configs_load_and_assemble(leaf, method, adapter):
    from dfq_dense.engine.dfq_config import parse_dfq_config
    from dfq_dense.engine.runner import load_config, task_of
    from dfq_dense.registry import ADAPTERS, MODELS, build
    from dfq_dense.synth.feature_targets import ClassifierLogits
    cfg = load_config(osp.join(REPO, 'configs', 'cls', leaf))
    assert task_of(cfg) == 'cls'
    assert cfg.model.model_name == 'swin_tiny_patch4_window7_224.ms_in1k'
    assert cfg.test_cfg.type == 'dfq_dense.DFQTestLoop'
    dfq = parse_dfq_config(cfg.dfq)
    synth = dict(dfq.synthesizer)
    assert synth['type'] == method and synth['label_head'] == 'classifier'
    assert (dfq.quantizer.w_bits, dfq.quantizer.a_bits) == (4, 8)
    assert dfq.adapter['type'] == adapter
    if method == 'SPDFQ':
        assert synth['crop_size'] is None  # fixed-size timm input
    # the assembled synthesizer and adapter take a (tiny) timm Swin
    synth.update(num_images=2, batch_size=2, img_size=32, iterations=1,
                 progress=False)
    model = _model()
    s = build(MODELS, synth)
    s.check_model(model)
    assert isinstance(s.head, ClassifierLogits) and s.num_classes == K
    build(ADAPTERS, dict(dfq.adapter)).check_model(model)
    assert math.isfinite(s.generate(model).sum().item())
