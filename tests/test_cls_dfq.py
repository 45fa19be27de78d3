"""Classification track, DFQ part: timm Swin / DeiT attention quantized as
mmdet's WindowMSA, the synthesizers' attention recorders on timm blocks,
PSAQ-ViT's class-guided loss and tools/dfq_test.py on a timm classifier.

Tiny random timm models (nothing downloaded) on the CPU.
"""
import json
import os
import os.path as osp
import subprocess
import sys

import numpy as np
import pytest
import torch

from tiny_models import (TIMM_DEIT, TIMM_SWIN, TINY_TIMM_DEIT,  # noqa: E402
                         TINY_TIMM_SWIN, tiny_cls_overrides,
                         tiny_timm, write_class_folders)

from dfq_dense.quant import (QuantTimmAttention,  # noqa: E402
                             QuantTimmWindowAttention, enable_calibration,
                             finish_calibration, quantize_model)
from dfq_dense.quant.spec import module_roles  # noqa: E402
from dfq_dense.synth.hooks import SwinAttnRecorder  # noqa: E402
from dfq_dense.synth.losses import (patch_tokens,  # noqa: E402
                                    window_similarity)

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
SWIN, DEIT, TINY_SWIN, TINY_DEIT = (TIMM_SWIN, TIMM_DEIT, TINY_TIMM_SWIN,
                                    TINY_TIMM_DEIT)


def _swin(seed=0):
    return tiny_timm(SWIN, seed=seed, **TINY_SWIN)


def _deit(seed=0):
    return tiny_timm(DEIT, seed=seed, **TINY_DEIT)


def _inputs_of(module, model, x):
    """The positional and keyword inputs of ``module`` in ``model(x)``."""
    seen = {}

    def hook(m, args, kwargs):
        seen.setdefault('in', (args, kwargs))

    h = module.register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        model(x)
    h.remove()
    return seen['in']


def _fq(t, bits):
    """Asymmetric per-tensor min/max fake quantization (range widened to
    hold 0), written out: the suite's activation / matmul convention."""
    lo, hi = min(float(t.min()), 0.0), max(float(t.max()), 0.0)
    scale = max((hi - lo) / (2 ** bits - 1), 1e-8)
    zp = int(np.clip(round(-lo / scale), 0, 2 ** bits - 1))
    return torch.fake_quantize_per_tensor_affine(t, scale, zp, 0,
                                                 2 ** bits - 1)


def _heads(qkv, heads):
    B, N, C3 = qkv.shape
    t = qkv.reshape(B, N, 3, heads, C3 // 3 // heads).permute(2, 0, 3, 1, 4)
    return t[0], t[1], t[2]


def _swin_bias(attn_mod):
    n = attn_mod.window_area
    table = attn_mod.relative_position_bias_table
    idx = attn_mod.relative_position_index.view(-1)
    return table[idx].view(n, n, -1).permute(2, 0, 1)[None]


# --------------------------------------------------------------------------
# quantization
# --------------------------------------------------------------------------
def _calibrated(wrapper_cls, fp, bits, args, kwargs):
    q = wrapper_cls(fp, a_bits=bits)
    enable_calibration(q)
    with torch.no_grad():
        q(*args, **kwargs)
    finish_calibration(q)
    return q


def test_quantized_timm_window_attention():
    import copy
    model = _swin()
    blk = model.layers[0].blocks[1]  # shifted: mask present
    assert blk.shift_size == (2, 2) and blk.attn_mask is not None
    x = torch.randn(2, 3, 32, 32)
    args, kwargs = _inputs_of(blk.attn, model, x)
    xw, mask = args[0], kwargs['mask']
    fp = blk.attn
    fp.fused_attn = True  # the FP reference through timm's SDPA branch
    with torch.no_grad():
        ref = fp(xw, mask=mask)
    q16 = _calibrated(QuantTimmWindowAttention, copy.deepcopy(fp), 16,
                      (xw, ), dict(mask=mask))
    with torch.no_grad():
        out16 = q16(xw, mask=mask)
    torch.testing.assert_close(out16, ref, atol=2e-4, rtol=1e-3)

    q4 = _calibrated(QuantTimmWindowAttention, copy.deepcopy(fp), 4,
                     (xw, ), dict(mask=mask))
    with torch.no_grad():
        out4 = q4(xw, mask=mask)
        # by hand: fake-quant q*scale, k^T (matmul1) and v (matmul2); the
        # post-softmax attention stays FP (naive setting)
        qh, kh, vh = _heads(fp.qkv(xw), fp.num_heads)
        attn = _fq(qh * fp.scale, 4) @ _fq(kh.transpose(-2, -1), 4)
        attn = attn + _swin_bias(fp)
        nw, n = mask.shape[0], attn.shape[-1]
        attn = (attn.view(-1, nw, fp.num_heads, n, n) +
                mask[None, :, None]).view(-1, fp.num_heads, n, n)
        y = attn.softmax(-1) @ _fq(vh, 4)
        want = fp.proj(y.transpose(1, 2).reshape(xw.shape))
    torch.testing.assert_close(out4, want, atol=1e-5, rtol=1e-5)
    assert (out4 - ref).abs().max() > 10 * (out16 - ref).abs().max()


def test_quantized_timm_deit_attention():
    import copy
    model = _deit()
    fp = model.blocks[1].attn
    assert fp.fused_attn  # timm's default: SDPA
    x = torch.randn(2, 3, 32, 32)
    args, kwargs = _inputs_of(fp, model, x)
    xt = args[0]
    assert xt.shape[1] == 17  # CLS + 16 patches
    with torch.no_grad():
        ref = fp(xt)
    q16 = _calibrated(QuantTimmAttention, copy.deepcopy(fp), 16, (xt, ), {})
    with torch.no_grad():
        out16 = q16(xt)
    torch.testing.assert_close(out16, ref, atol=2e-4, rtol=1e-3)
    q4 = _calibrated(QuantTimmAttention, copy.deepcopy(fp), 4, (xt, ), {})
    with torch.no_grad():
        out4 = q4(xt)
        qh, kh, vh = _heads(fp.qkv(xt), fp.num_heads)
        attn = _fq(qh * fp.scale, 4) @ _fq(kh.transpose(-2, -1), 4)
        y = attn.softmax(-1) @ _fq(vh, 4)
        want = fp.proj(y.transpose(1, 2).reshape(xt.shape))
    torch.testing.assert_close(out4, want, atol=1e-5, rtol=1e-5)
    assert (out4 - ref).abs().max() > 10 * (out16 - ref).abs().max()


@pytest.mark.parametrize('make', [_swin, _deit])
def test_quantize_model_converts_timm(make):
    model = make()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    counts = quantize_model(model, 8, 8)
    attn_type = 'WindowAttention' if make is _swin else 'Attention'
    blocks = 3 if make is _swin else 2
    assert counts[attn_type] == blocks
    attns = [m for m in model.modules()
             if isinstance(m, (QuantTimmWindowAttention, QuantTimmAttention))]
    assert len(attns) == blocks
    # every Linear is quantized, each with its role
    names = dict(model.named_modules())
    want = {'qkv', 'proj', 'fc1', 'fc2', 'matmul1', 'matmul2', 'pred',
            'patch_embed'} | ({'reduction'} if make is _swin else set())
    roles = {r for n, m in names.items()
             if type(m).__name__.startswith('Quant')
             for r in module_roles(n)}
    assert roles == want
    # the only plain Linear layers left are those the wrappers hold
    assert all(n.endswith('.module') for n, m in names.items()
               if type(m) is torch.nn.Linear)
    enable_calibration(model)
    with torch.no_grad():
        model(x)
    finish_calibration(model)
    with torch.no_grad():
        out = model(x)
    assert 0 < float((out - ref).abs().max()) < 0.1 * float(ref.abs().max())


# --------------------------------------------------------------------------
# recorders
# --------------------------------------------------------------------------
def _partition(t, ws):
    B, H, W, C = t.shape
    t = t.view(B, H // ws, ws, W // ws, ws, C).permute(0, 1, 3, 2, 4, 5)
    return t.reshape(B * (H // ws) * (W // ws), ws * ws, C)


def _cos(f):
    f = f / f.norm(dim=-1, keepdim=True)
    return f @ f.transpose(-1, -2)


def test_recorder_timm_swin_against_direct():
    model = _swin()
    x = torch.randn(2, 3, 32, 32)
    blk = model.layers[0].blocks[1]
    (bx, ), _ = _inputs_of(blk, model, x)
    with SwinAttnRecorder(model, record=('feat', 'logits', 'probs')) as rec:
        with torch.no_grad():
            model(x)
        records = rec.records
    assert [r['name'] for r in records] == [
        'layers.0.blocks.0', 'layers.0.blocks.1', 'layers.1.blocks.0']
    r = records[1]
    assert r['shift_size'] == 2 and r['window_size'] == 4
    assert r['hw_shape'] == (8, 8) and r['prefix_tokens'] == 0
    a = blk.attn
    with torch.no_grad():
        t = torch.roll(blk.norm1(bx), (-2, -2), (1, 2))
        xw = _partition(t, 4)  # (B * 4, 16, C)
        qh, kh, vh = _heads(a.qkv(xw), a.num_heads)
        logits = (qh * a.scale) @ kh.transpose(-2, -1)
        # the shift mask, written out: regions of the rolled 8x8 map
        lab = torch.zeros(8, 8)
        for i, hs in enumerate((slice(0, 4), slice(4, 6), slice(6, 8))):
            for j, wsl in enumerate((slice(0, 4), slice(4, 6),
                                     slice(6, 8))):
                lab[hs, wsl] = 3 * i + j
        lw = _partition(lab[None, :, :, None], 4)[..., 0]  # (4, 16)
        mask = (lw[:, None, :] != lw[:, :, None]).float() * -100.0
        probs = (logits.view(2, 4, a.num_heads, 16, 16) +
                 _swin_bias(a)[:, None] + mask[None, :, None]).softmax(-1)
        feat = (probs.view(8, a.num_heads, 16, 16) @ vh).mean(1)
    torch.testing.assert_close(r['logits'],
                               logits.view(2, 4, a.num_heads, 16, 16),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(r['probs'], probs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(r['feat'], feat.view(2, 4, 16, -1),
                               atol=1e-5, rtol=1e-5)
    assert bool(r['valid'].all())
    sim, valid = patch_tokens(r)
    torch.testing.assert_close(window_similarity(sim),
                               _cos(feat).view(2, 4, 16, 16),
                               atol=1e-5, rtol=1e-5)


def test_recorder_timm_deit_drops_cls_from_similarity():
    model = _deit()
    x = torch.randn(2, 3, 32, 32)
    a = model.blocks[0].attn
    (xt, ), _ = _inputs_of(a, model, x)
    with SwinAttnRecorder(model, record=('feat', 'logits', 'probs')) as rec:
        with torch.no_grad():
            model(x)
        r = rec.records[0]
    assert len(rec.sites) == 2
    assert r['prefix_tokens'] == 1 and r['hw_shape'] == (4, 4)
    with torch.no_grad():
        qh, kh, vh = _heads(a.qkv(xt), a.num_heads)
        logits = (qh * a.scale) @ kh.transpose(-2, -1)  # (2, H, 17, 17)
        probs = logits.softmax(-1)
        feat = (probs @ vh).mean(1)  # (2, 17, head_dim)
    torch.testing.assert_close(r['logits'][:, 0], logits, atol=1e-5,
                               rtol=1e-5)
    torch.testing.assert_close(r['probs'][:, 0], probs, atol=1e-5,
                               rtol=1e-5)
    torch.testing.assert_close(r['feat'][:, 0], feat, atol=1e-5, rtol=1e-5)
    # PSAQ-ViT's patch similarity: the 16 patch tokens, CLS dropped
    f, valid = patch_tokens(r)
    assert f.shape == (2, 1, 16, feat.shape[-1]) and valid.shape == (2, 1,
                                                                     16)
    torch.testing.assert_close(window_similarity(f)[:, 0],
                               _cos(feat[:, 1:]), atol=1e-5, rtol=1e-5)


def test_psaq_classifier_label_loss():
    """PSAQ-ViT's one-hot loss on the classifier's logits: the same run as
    the backbone-level variant (same draws) plus ce_weight * CE."""
    from dfq_dense.synth import PSAQViT

    class Wrap(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.backbone = net

    model = Wrap(_deit())
    common = dict(num_images=2, batch_size=2, img_size=32, iterations=1,
                  synth_rounds=1, progress=False, seed=3)
    logs = {}
    for head, w in ((None, 1.0), ('classifier', 1.0), ('classifier', 2.0)):
        synth = PSAQViT(label_head=head, ce_weight=w, **common)
        synth.check_model(model)
        synth.generate(model)
        logs[head, w] = synth.history[0]
    assert synth.num_classes == 3
    base, one, two = logs[None, 1.0], logs['classifier', 1.0], \
        logs['classifier', 2.0]
    assert 'loss_ce' not in base or base['loss_ce'] == 0
    assert one['loss_entropy'] == pytest.approx(base['loss_entropy'])
    assert one['loss_tv'] == pytest.approx(base['loss_tv'])
    # 3 classes, random logits: the CE is about log(3)
    assert 0.3 < one['loss_ce'] < 3.0
    assert one['loss'] == pytest.approx(base['loss'] + one['loss_ce'],
                                        rel=1e-5)
    assert two['loss'] == pytest.approx(base['loss'] + 2 * one['loss_ce'],
                                        rel=1e-5)
    # a backbone without class logits is refused in one line
    with pytest.raises(ValueError, match="label_head='classifier' needs"):
        from dfq_dense.synth.feature_targets import classifier_num_classes
        classifier_num_classes(model.backbone.patch_embed)


# --------------------------------------------------------------------------
# tools/dfq_test.py on a timm classifier
# --------------------------------------------------------------------------
@pytest.fixture(scope='module')
def cls_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp('cls_dfq')
    val = root / 'val'
    write_class_folders(val)
    weights = str(root / 'tiny_swin.pth')
    torch.save(_swin(seed=1).state_dict(), weights)
    cfg = root / 'tiny_swin_w8a8.py'
    cfg.write_text(f"""_base_ = [
    '{REPO}/configs/cls/swin_t_w8a8.py',
]
{tiny_cls_overrides(SWIN, TINY_SWIN, val)}
dfq = dict(synthesizer=dict(num_images=4, batch_size=2, iterations=2,
                            synth_rounds=1, progress=False),
           calib_batch_size=2)
""")
    return dict(root=root, val=str(val), weights=weights, cfg=str(cfg))


def _tool(args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=REPO)
    return subprocess.run([sys.executable, osp.join(REPO, 'tools',
                                                    'dfq_test.py')] + args,
                          cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def test_dfq_tool_runs_timm_swin_classifier(cls_setup):
    work = str(cls_setup['root'] / 'work')
    res = _tool([cls_setup['cfg'], cls_setup['weights'], '--work-dir', work],
                str(cls_setup['root']))
    assert res.returncode == 0, res.stderr[-3000:]
    with open(osp.join(work, 'dfq_results.json')) as f:
        results = json.load(f)
    assert results['task'] == 'cls'
    assert results['image_size'] == [32, 32] and results['num_images'] == 4
    assert results['method'] == 'PSAQViT'
    assert results['synthesizer']['label_head'] == 'classifier'
    assert results['quantized_modules']['WindowAttention'] == 3
    assert results['checkpoint']['path'] == cls_setup['weights']
    top1, top5 = (results['metrics'][k]
                  for k in ('imagenet/top1', 'imagenet/top5'))
    # 6 images: top-1 is a multiple of 1/6; 3 classes: top-5 is 100 %
    assert round(top1 * 6 / 100, 6) == round(top1 * 6 / 100)
    assert top5 == pytest.approx(100.0)
    assert results['quantization']['output_change']['max_abs'] > 0
    assert results['quantization']['output_change']['features'] == 'logits'


def test_dfq_tool_cls_errors_are_one_line(cls_setup, tmp_path):
    cwd = str(cls_setup['root'])
    # a tree with another number of classes than the config says
    res = _tool([cls_setup['cfg'], cls_setup['weights'], '--work-dir',
                 str(tmp_path / 'w1'), '--cfg-options',
                 'test_dataloader.dataset.num_classes=1000'], cwd)
    assert res.returncode == 2
    line = res.stderr.strip().splitlines()
    assert len(line) == 1 and 'expected 1000' in line[0], res.stderr
    # a missing weights file
    res = _tool([cls_setup['cfg'], str(tmp_path / 'nope.pth'),
                 '--work-dir', str(tmp_path / 'w2')], cwd)
    assert res.returncode == 2
    line = res.stderr.strip().splitlines()
    assert len(line) == 1 and 'nope.pth' in line[0], res.stderr
    # a missing val folder
    res = _tool([cls_setup['cfg'], cls_setup['weights'], '--work-dir',
                 str(tmp_path / 'w3'), '--data-root',
                 str(tmp_path / 'no_val')], cwd)
    assert res.returncode == 2
    line = res.stderr.strip().splitlines()
    assert len(line) == 1 and 'data/imagenet/val' in line[0], res.stderr
    assert not osp.exists(tmp_path / 'w1') and not osp.exists(
        tmp_path / 'w3')
