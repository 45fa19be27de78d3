"""Every quantizer setting and both baselines on the classification track.

* The four settings (configs/_base_/quantizers/{naive,percentile,mse,repq}
  .py) at W8A8 on the demo classifier (timm Swin, trained): top-1 within 3
  points of its recorded FP top-1, every quantizer quantizing.  They
  calibrate on 8 real training crops (the real-image baseline's images), so
  the quantizer alone is judged: on 8 Gaussian-noise or PSAQ-ViT images at
  56x56, repq's per-channel post-LayerNorm ranges (the last stage sees 4
  tokens an image, 32 values a channel) clip the val crops and cost 3.5-5
  points (64 real crops: 0.2).
* The same settings on a tiny random timm DeiT through tools/dfq_test.py:
  quantization takes effect at W8A8, W16A16 matches FP.
* RepQ-ViT's LayerNorm reparameterisation on timm's Swin (patch merging
  and zero-padded windows included) and DeiT: the pairs found, the folded
  parameters against RepQ-ViT's formula written out here, the FP output
  unchanged, the activation integers unchanged; repq's per-role overrides
  reach timm's modules.
* The Gaussian-noise and real-image baselines on the demo classifier; the
  real images are training crops given the classifier's eval transform and
  mean / std.
"""
import copy
import json
import os
import os.path as osp
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

from tiny_models import (TIMM_DEIT, TIMM_SWIN, Wrap,  # noqa: E402
                         tiny_cls_overrides, tiny_timm,
                         write_class_folders)

from dfq_dense.quant import (QuantLinear, enable_calibration,  # noqa: E402
                             finish_calibration, quantize_model,
                             set_quantizers_enabled)
from dfq_dense.quant.modules import QuantWeightModule  # noqa: E402
from dfq_dense.quant.reparam import find_reparam_pairs  # noqa: E402
from dfq_dense.quant.spec import module_roles  # noqa: E402

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, osp.join(REPO, 'tools'))
import dfq_test  # noqa: E402

SETTINGS = ('naive', 'percentile', 'mse', 'repq')
QUANTIZERS = osp.join(REPO, 'configs', '_base_', 'quantizers')
DEMO = osp.join(REPO, 'configs', 'demo')
TRAIN_CROPS = 'data/dfq_demo/cls/train'
# Roles whose input quantizer repq.py makes per channel (then folded).
PER_CHANNEL_ROLES = ('qkv', 'fc1', 'reduction')
# The demo classifier: 8 attentions, 8 qkv + 8 proj + 16 MLP Linears, 3
# patch-merging reductions, patch embedding, head: 98 quantizers; repq adds
# the 8 post-softmax quantizers and folds 8 qkv + 8 fc1 + 3 reduction.
DEMO_QUANTIZERS = 98
DEMO_FOLDED = 19
W8A8_TOL = 3.0

SWIN, DEIT = TIMM_SWIN, TIMM_DEIT
# 32x32: 8x8 tokens, 4x4 windows (no padding); 40x40: 10x10 tokens then
# 5x5, both zero-padded to whole 4x4 windows (the folding must put the
# image of 0 back into the padded tokens).
TINY = {
    'swin': (SWIN, dict(embed_dim=16, depths=(2, 2), num_heads=(2, 2),
                        window_size=4, img_size=32)),
    'swin_padded': (SWIN, dict(embed_dim=16, depths=(2, 2),
                               num_heads=(2, 2), window_size=4,
                               img_size=40)),
    'deit': (DEIT, dict(embed_dim=32, depth=2, num_heads=2, img_size=32,
                        patch_size=8)),
}


def _setting(name):
    """A quantizer fragment's setting, as quantize_model takes it."""
    from mmengine.config import Config
    cfg = Config.fromfile(osp.join(QUANTIZERS, name + '.py'))
    setting = cfg.dfq_quantizer.to_dict()
    setting.pop('scope')
    setting.pop('skip')
    return setting


_Classifier = Wrap  # the timm model at .backbone, as TimmClassifier


def _tiny(kind, seed=0):
    """A tiny random timm model whose LayerNorms have a random affine (so
    the folding moves something: timm initialises them to 1 / 0)."""
    name, kwargs = TINY[kind]
    net = tiny_timm(name, seed=seed, **kwargs)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(torch.exp(0.5 * torch.randn_like(m.weight)))
                m.bias.copy_(0.5 * torch.randn_like(m.bias))
    return net


def _expected_pairs(kind, prefix='backbone.'):
    """The (LayerNorm, Linear) pairs RepQ-ViT folds in timm's blocks."""
    if kind == 'deit':
        blocks = [f'blocks.{i}' for i in range(2)]
        merges = []
    else:
        blocks = [f'layers.{i}.blocks.{j}' for i in range(2)
                  for j in range(2)]
        merges = ['layers.1.downsample']
    pairs = []
    for b in blocks:
        pairs += [(f'{b}.norm1', f'{b}.attn.qkv'),
                  (f'{b}.norm2', f'{b}.mlp.fc1')]
    pairs += [(f'{m}.norm', f'{m}.reduction') for m in merges]
    return sorted((prefix + ln, prefix + lin) for ln, lin in pairs)


def _calibrated(net, setting, images, reparam):
    model = _Classifier(copy.deepcopy(net))
    quantize_model(model, 8, 8, logger='silent', **setting)
    enable_calibration(model)
    with torch.no_grad():
        for i in range(0, len(images), 2):
            model(images[i:i + 2])
    folded = finish_calibration(model, reparam=reparam)
    return model, folded


# --------------------------------------------------------------------------
# repq on timm modules (no tool)
# --------------------------------------------------------------------------
@pytest.mark.parametrize('kind', ['swin', 'deit'])
def test_repq_overrides_reach_timm_modules(kind):
    """repq.py's 'qkv' / 'fc1' / 'reduction' overrides make exactly those
    timm Linears' inputs per channel (the rest per tensor), and
    find_reparam_pairs pairs each with the LayerNorm in front."""
    model = _Classifier(_tiny(kind))
    quantize_model(model, 8, 8, logger='silent', **_setting('repq'))
    linears = {n: m for n, m in model.named_modules()
               if isinstance(m, QuantLinear)}
    channel = sorted(n for n, m in linears.items()
                     if m.input_quantizer.granularity == 'channel')
    assert channel == [lin for _, lin in _expected_pairs(kind)]
    for name, m in linears.items():
        q = m.input_quantizer
        assert type(q.observer).__name__ == 'PercentileSearchObserver'
        roles = module_roles(name)
        if name in channel:
            assert roles[-1] in PER_CHANNEL_ROLES, name
            assert q.ch_axis == -1 and q.observer.max_samples == 2048
        else:
            assert not set(roles) & set(PER_CHANNEL_ROLES), name
            assert q.granularity == 'tensor'
            assert q.observer.max_samples == 65536  # the act default
    # every post-softmax attention with the log-sqrt(2) quantizer
    mm2 = [m for n, m in model.named_modules() if n.endswith('.matmul2')]
    assert len(mm2) == (4 if kind == 'swin' else 2)
    assert all(type(m.quantizer_a).__name__ == 'SoftmaxQuantizer' and
               m.quantizer_a.mode == 'log_sqrt2' for m in mm2)
    names = dict(model.named_modules())
    found = sorted(name for name, _, _, _ in find_reparam_pairs(model))
    assert found == channel
    for ln_name, lin_name in _expected_pairs(kind):
        pair = [p for p in find_reparam_pairs(model) if p[0] == lin_name]
        assert pair[0][1] is names[ln_name] and pair[0][2] is names[
            lin_name]
    # naive: no per-channel activation, nothing to fold
    naive = _Classifier(_tiny(kind))
    quantize_model(naive, 8, 8, logger='silent', **_setting('naive'))
    assert find_reparam_pairs(naive) == []


def _fold_by_hand(net, qparams, kind):
    """RepQ-ViT's reparameterisation written out on a plain FP copy: with
    the calibrated per-channel (s_c, z_c) of a Linear's input, s~ = mean
    s_c, z~ = round(mean z_c), r1 = s_c / s~, r2 = z_c - z~; the LayerNorm
    gets gamma / r1 and beta / r1 + s~ r2, the Linear W * r1 (per input
    column) and b - (W * r1) @ (s~ r2)."""
    ref = copy.deepcopy(net)
    mods = dict(ref.named_modules())
    per_tensor = {}
    with torch.no_grad():
        for ln_name, lin_name in _expected_pairs(kind, prefix=''):
            s, z = (t.double() for t in qparams[lin_name])
            s_t, z_t = s.mean(), torch.round(z.mean())
            r1, r2 = s / s_t, z - z_t
            ln, lin = mods[ln_name], mods[lin_name]
            ln.weight.copy_(ln.weight.double() / r1)
            ln.bias.copy_(ln.bias.double() / r1 + s_t * r2)
            w = lin.weight.double() * r1[None, :]
            bias = -(w @ (s_t * r2))  # timm's reduction has no bias
            if lin.bias is not None:
                bias = bias + lin.bias.double()
            lin.bias = nn.Parameter(bias.float())
            lin.weight.copy_(w)
            per_tensor[lin_name] = (s_t, z_t)
    return ref, per_tensor


@pytest.mark.parametrize('kind', ['swin', 'swin_padded', 'deit'])
def test_repq_reparam_matches_formula_and_keeps_fp(kind):
    net = _tiny(kind)
    size = TINY[kind][1]['img_size']
    g = torch.Generator().manual_seed(1)
    calib = torch.randn(4, 3, size, size, generator=g)
    x = torch.randn(3, 3, size, size, generator=g)
    with torch.no_grad():
        y_fp = net(x)
    setting = _setting('repq')
    # the per-channel model (no folding) and the reparameterised one,
    # calibrated on the same images
    chan, folded0 = _calibrated(net, setting, calib, reparam=False)
    rep, folded = _calibrated(net, setting, calib, reparam=True)
    pairs = _expected_pairs(kind)
    assert folded0 == [] and sorted(folded) == [lin for _, lin in pairs]
    cm, rm = dict(chan.named_modules()), dict(rep.named_modules())
    qparams = {}
    for _, lin in pairs:
        q = cm[lin].input_quantizer
        assert q.granularity == 'channel' and q.scale.dim() == 1
        qparams[lin[len('backbone.'):]] = (q.scale, q.zero_point)
    ref, per_tensor = _fold_by_hand(net, qparams, kind)
    refm = dict(ref.named_modules())
    # the implementation's folded parameters and per-tensor qparams are
    # RepQ-ViT's
    for ln_name, lin_name in pairs:
        short_ln, short_lin = (n[len('backbone.'):] for n in (ln_name,
                                                               lin_name))
        for got, want in ((rm[ln_name].weight, refm[short_ln].weight),
                          (rm[ln_name].bias, refm[short_ln].bias),
                          (rm[lin_name].module.weight,
                           refm[short_lin].weight),
                          (rm[lin_name].module.bias, refm[short_lin].bias)):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        q = rm[lin_name].input_quantizer
        s_t, z_t = per_tensor[short_lin]
        assert q.granularity == 'tensor' and q.scale.dim() == 0
        assert float(q.scale) == pytest.approx(float(s_t), rel=1e-6)
        assert int(q.zero_point) == int(z_t)
    # the folding does not change the FP model: quantizers off, the
    # reparameterised model gives the original output (padded windows too)
    set_quantizers_enabled(rep, False)
    with torch.no_grad():
        y_rep = rep(x)
        y_ref = ref(x)
    torch.testing.assert_close(y_rep, y_fp, atol=1e-4, rtol=1e-4)
    if kind == 'swin_padded':
        # a plain timm model pads the folded LayerNorm's output with 0, not
        # with s~ r2: the padded windows change, which the quantized
        # attention's pad value restores
        assert (y_ref - y_fp).abs().max() > 1e-3
    else:
        torch.testing.assert_close(y_ref, y_fp, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('kind', ['swin_padded', 'deit'])
def test_repq_reparam_keeps_activation_integers(kind):
    """Per-tensor quantization of the folded LayerNorm output gives the
    integers per-channel quantization gave: with FP weights (the folded
    weights' own quantization aside) the two W-FP/A8 models agree."""
    net = _tiny(kind)
    size = TINY[kind][1]['img_size']
    g = torch.Generator().manual_seed(2)
    calib = torch.randn(4, 3, size, size, generator=g)
    x = torch.randn(3, 3, size, size, generator=g)
    setting = _setting('repq')
    chan, _ = _calibrated(net, setting, calib, reparam=False)
    rep, folded = _calibrated(net, setting, calib, reparam=True)
    assert folded
    for model in (chan, rep):
        for m in model.modules():
            if isinstance(m, QuantWeightModule):
                m.weight_quantizer.disable()
    with torch.no_grad():
        y_fp = net(x)
        y_chan, y_rep = chan(x), rep(x)
    err = float((y_chan - y_fp).norm())
    assert err > 1e-3 * float(y_fp.norm())  # the activations quantize
    torch.testing.assert_close(y_rep, y_chan, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------
# the demo classifier through tools/dfq_test.py
# --------------------------------------------------------------------------
def _demo_fp_top1():
    from dfq_dense.demo import load_manifest
    return load_manifest()['swin_cls_demo']['fp_metrics']['imagenet/top1']


def _run(cfg, work, *options, checkpoint=None):
    head = [cfg] if checkpoint is None else [cfg, checkpoint]
    code = dfq_test.main(head + ['--work-dir', work, *options])
    assert code == 0
    with open(osp.join(work, 'dfq_results.json')) as f:
        res = json.load(f)
    res['_work'] = work
    return res


@pytest.fixture(scope='module')
def demo_runs(tmp_path_factory, demo_data_root):
    """W8A8 runs of the demo classifier: each setting on 8 real training
    crops (naive: the shipped real-image baseline config), and the shipped
    Gaussian-noise baseline.  Run from the repo root (the demo configs'
    data paths are relative to it)."""
    root = tmp_path_factory.mktemp('cls_quantizers')
    configs = {'naive': osp.join(DEMO, 'swin_cls_demo_w8a8_real.py'),
               'noise': osp.join(DEMO, 'swin_cls_demo_w8a8_noise.py')}
    for name in SETTINGS[1:]:
        path = root / f'swin_cls_demo_w8a8_real_{name}.py'
        path.write_text(f"""_base_ = [
    '{DEMO}/swin_cls_demo.py',
    '{REPO}/configs/_base_/methods/real_images.py',
    '{QUANTIZERS}/{name}.py',
    '{REPO}/configs/_base_/bits/w8a8.py',
]
dfq_calib_batch_size = 4
dfq = dict(synthesizer=dict(num_images=8, batch_size=8,
                            data_root='{TRAIN_CROPS}'))
""")
        configs[name] = str(path)
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        return {name: _run(cfg, str(root / name))
                for name, cfg in configs.items()}
    finally:
        os.chdir(cwd)


def _check_quantized(res, quantizers):
    assert (res['w_bits'], res['a_bits']) == (8, 8)
    q = res['quantization']
    assert q['total']['quantizers'] == q['total']['quantizing'] == quantizers
    assert q['total']['disabled'] == 0 and q['disabled'] == []
    assert 0 < q['output_change']['rel_l2'] < 0.5


@pytest.mark.parametrize('setting', SETTINGS)
def test_demo_setting_w8a8_close_to_fp(demo_runs, setting):
    res = demo_runs[setting]
    fp = _demo_fp_top1()
    top1 = res['metrics']['imagenet/top1']
    assert abs(top1 - fp) <= W8A8_TOL, (setting, top1, fp)
    assert res['method'] == 'RealImages'
    assert res['quantized_modules']['WindowAttention'] == 8
    repq = setting == 'repq'
    _check_quantized(res, DEMO_QUANTIZERS + (8 if repq else 0))
    assert res['reparameterized'] == (DEMO_FOLDED if repq else 0)
    roles = res['quantization']['roles']
    assert roles['reduction']['modules'] == 3
    assert roles['qkv']['modules'] == roles['fc1']['modules'] == 8


def test_demo_settings_differ(demo_runs):
    """The settings are not the same quantizer under four names."""
    changes = {s: demo_runs[s]['quantization']['output_change']['rel_l2']
               for s in SETTINGS}
    assert len(set(changes.values())) == len(SETTINGS), changes


def test_demo_gaussian_noise_baseline(demo_runs):
    res = demo_runs['noise']
    assert res['method'] == 'GaussianNoise'
    assert res['num_images'] == 8 and res['image_size'] == [56, 56]
    _check_quantized(res, DEMO_QUANTIZERS)
    assert abs(res['metrics']['imagenet/top1'] - _demo_fp_top1()) <= \
        W8A8_TOL


def test_demo_real_images_baseline(demo_runs):
    """The real-image baseline reads 8 training crops (never val) and gives
    them the classifier's eval transform (56x56, crop_pct 1: as they are)
    and its mean / std."""
    from PIL import Image

    from dfq_dense.utils.checkpoint import safe_torch_load
    res = demo_runs['naive']
    assert res['method'] == 'RealImages'
    assert res['num_images'] == 8 and res['image_size'] == [56, 56]
    synth = res['synthesizer']
    assert synth['data_root'] == TRAIN_CROPS
    assert (synth['resize'], synth['crop_pct'], synth['interpolation'],
            synth['crop_mode']) == ('center_crop', 1.0, 'bilinear',
                                    'center')
    _check_quantized(res, DEMO_QUANTIZERS)
    # the best of the demo rows: real data
    assert abs(res['metrics']['imagenet/top1'] - _demo_fp_top1()) <= 1.0
    saved = safe_torch_load(osp.join(res['_work'], 'synthetic',
                                     'synthetic_images.pth'))
    files = saved['meta']['files']
    assert len(files) == 8 and len(set(files)) == 8
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1) * 255
    for image, rel in zip(saved['images'], files):
        path = osp.join(REPO, TRAIN_CROPS, rel)
        rgb = np.asarray(Image.open(path).convert('RGB'))
        want = (torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() -
                mean) / std
        torch.testing.assert_close(image.float(), want, atol=1e-4, rtol=0)


# --------------------------------------------------------------------------
# a tiny timm DeiT through tools/dfq_test.py
# --------------------------------------------------------------------------
@pytest.fixture(scope='module')
def deit_setup(tmp_path_factory):
    from PIL import Image
    root = tmp_path_factory.mktemp('cls_deit')
    val = root / 'val'
    rng = write_class_folders(val)
    # training images of other sizes for the real-image baseline
    train = root / 'train'
    os.makedirs(train)
    for j in range(4):
        arr = rng.randint(0, 256, (30 + 9 * j, 48 - 5 * j, 3),
                          dtype=np.uint8)
        Image.fromarray(arr).save(train / f'img_{j}.JPEG')
    weights = str(root / 'tiny_deit.pth')
    torch.save(_tiny('deit', seed=1).state_dict(), weights)
    configs = {}
    for name, method in [(s, 'gaussian_noise') for s in SETTINGS] + [
            ('real', 'real_images')]:
        quantizer = 'naive' if name == 'real' else name
        cfg = root / f'tiny_deit_{name}.py'
        cfg.write_text(f"""_base_ = [
    '{REPO}/configs/cls/_base_/models/deit_tiny_patch16_224.py',
    '{REPO}/configs/cls/_base_/dfq_cls_runtime.py',
    '{REPO}/configs/_base_/methods/{method}.py',
    '{QUANTIZERS}/{quantizer}.py',
    '{REPO}/configs/_base_/bits/w8a8.py',
]
{tiny_cls_overrides(DEIT, TINY['deit'][1], val)}
dfq = dict(synthesizer=dict(num_images=8, batch_size=8, progress=False),
           calib_batch_size=4)
""")
        configs[name] = str(cfg)
    return dict(root=root, train=str(train), weights=weights,
                configs=configs)


@pytest.mark.parametrize('setting', SETTINGS)
def test_deit_setting(deit_setup, setting):
    root = deit_setup['root']
    cfg, weights = deit_setup['configs'][setting], deit_setup['weights']
    repq = setting == 'repq'
    # the patch embedding, 8 Linears and the head (input + weight), 2
    # attentions (q, k, v; repq: + the post-softmax attention)
    res = _run(cfg, str(root / f'{setting}_w8a8'), checkpoint=weights)
    assert res['task'] == 'cls' and res['quantized_modules']['Attention'] \
        == 2
    n = res['quantization']['total']['quantizers']
    _check_quantized(res, n)
    assert n == 2 * 10 + 2 * 3 + (2 if repq else 0)
    assert res['reparameterized'] == (4 if repq else 0)
    assert res['quantization']['output_change']['max_abs'] > 0
    # W16A16 on the same images: the wiring loses nothing.  repq's
    # post-softmax quantizer is dropped there: a log-sqrt(2) grid (powers of
    # sqrt 2) rounds by up to ~17 % whatever the bits, which only reach
    # further towards 0.
    options = ['dfq.quantizer.w_bits=16', 'dfq.quantizer.a_bits=16']
    if repq:
        options.append('dfq.quantizer.softmax=None')
    res16 = _run(cfg, str(root / f'{setting}_w16a16'), '--eval-fp',
                 '--cfg-options', *options, checkpoint=weights)
    assert (res16['w_bits'], res16['a_bits']) == (16, 16)
    assert res16['reparameterized'] == res['reparameterized']
    assert res16['metrics'] == res16['fp_metrics']
    change = res16['quantization']['output_change']
    assert change['rel_l2'] < 0.1 * res['quantization']['output_change'][
        'rel_l2']
    assert change['rel_l2'] < 1e-3, change


def test_deit_real_images(deit_setup, capsys):
    """The real-image baseline on a classifier without a training set:
    one line asking for data_root; with it, the images get DeiT's own eval
    transform (timm's pretrained cfg: crop_pct 0.9, bicubic)."""
    root, cfg = deit_setup['root'], deit_setup['configs']['real']
    code = dfq_test.main([cfg, deit_setup['weights'], '--work-dir',
                          str(root / 'real_none')])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'set dfq.synthesizer.data_root' in err[0], err
    assert not osp.exists(root / 'real_none')
    res = _run(cfg, str(root / 'real'), '--cfg-options',
               f'dfq.synthesizer.data_root={deit_setup["train"]}',
               'dfq.synthesizer.num_images=4',
               'dfq.synthesizer.batch_size=4',
               checkpoint=deit_setup['weights'])
    assert res['method'] == 'RealImages' and res['num_images'] == 4
    assert res['image_size'] == [32, 32]
    synth = res['synthesizer']
    assert (synth['resize'], synth['crop_pct'], synth['interpolation']) == \
        ('center_crop', 0.9, 'bicubic')
    _check_quantized(res, res['quantization']['total']['quantizers'])


# --------------------------------------------------------------------------
# RealImages' classifier transform
# --------------------------------------------------------------------------
def test_real_images_center_crop(tmp_path):
    """resize='center_crop': the short side to size / crop_pct, the centre
    crop (timm's eval transform written out with PIL), then mean / std."""
    from PIL import Image

    from dfq_dense.synth import RealImages
    rng = np.random.RandomState(0)
    sizes = [(30, 50), (64, 40)]  # (h, w)
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8)).save(
            tmp_path / f'{i}.png')
    s = RealImages(data_root=str(tmp_path), num_images=2, batch_size=2,
                   img_size=(16, 16), resize='center_crop', crop_pct=0.8,
                   interpolation='bicubic', progress=False)
    out = s.generate(_Classifier(nn.Identity()))
    assert out.shape == (2, 3, 16, 16)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1) * 255
    dp = dict(mean=mean.flatten().tolist(), std=std.flatten().tolist())
    out = s.generate(_Classifier(nn.Identity()), data_preprocessor_cfg=dp)
    for image, path in zip(out, s.selected_files):
        img = Image.open(path).convert('RGB')
        w, h = img.size
        short = 20  # floor(16 / 0.8)
        if w <= h:
            nw, nh = short, int(short * h / w)
        else:
            nw, nh = int(short * w / h), short
        img = img.resize((nw, nh), Image.BICUBIC)
        top, left = int(round((nh - 16) / 2)), int(round((nw - 16) / 2))
        rgb = np.asarray(img.crop((left, top, left + 16, top + 16)))
        want = (torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() -
                mean) / std
        torch.testing.assert_close(image, want, atol=1e-4, rtol=0)
    for bad in (dict(crop_pct=0), dict(crop_pct=1.5),
                dict(interpolation='cubic'), dict(crop_mode='top')):
        with pytest.raises(ValueError, match=list(bad)[0]):
            RealImages(data_root=str(tmp_path), resize='center_crop', **bad)


def test_real_images_defaults_per_track():
    """A classifier config without resize gets its eval transform; a
    dense config keeps the keep-ratio padding; an explicit resize stays."""
    from mmengine.config import Config

    from dfq_dense.engine.dfq_loop import complete_real_images
    cls = Config.fromfile(osp.join(DEMO, 'swin_cls_demo.py'))
    synth = complete_real_images(cls, dict(type='RealImages',
                                           data_root=None))
    assert synth == dict(type='RealImages', data_root=TRAIN_CROPS + '/',
                         resize='center_crop', crop_pct=1.0,
                         interpolation='bilinear', crop_mode='center')
    kept = complete_real_images(cls, dict(type='RealImages', data_root='x',
                                          resize='stretch'))
    assert kept == dict(type='RealImages', data_root='x', resize='stretch')
    seg = Config.fromfile(osp.join(DEMO, 'upernet_swin_demo.py'))
    synth = complete_real_images(seg, dict(type='RealImages',
                                           data_root='y'))
    assert synth == dict(type='RealImages', data_root='y')
    noise = dict(type='GaussianNoise')
    assert complete_real_images(cls, dict(noise)) == noise
