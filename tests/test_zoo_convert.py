"""tools/convert_checkpoint.py / dfq_dense.zoo.convert.

The official checkpoints cannot be downloaded here, so their state dicts
are made from small modules written in this file after the official Swin
code (SwinTransformer/Swin-Transformer-Object-Detection and -Semantic-
Segmentation, mmdet/mmseg/models/backbones/swin_transformer.py): same
module names, so the same keys; same formulas, so outputs can be compared
with mmdet's modules loaded with the converted weights.  The head keys are
those of mmdet 2.11 / mmseg 0.x, spelled out below with their shapes.
"""
import os.path as osp
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.config import Config

from dfq_dense.utils.checkpoint import load_checkpoint_strict
from dfq_dense.zoo.convert import (CONVERTER_VERSION, ConversionError,
                                   check_against_config, convert_state_dict,
                                   describe, merging_permutation,
                                   sha256_file)

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, osp.join(REPO, 'tools'))
import convert_checkpoint  # noqa: E402

EMBED, DEPTHS, HEADS, WINDOW = 16, (2, 2), (1, 2), 7


# ----------------------------------------------------------------------
# The official Swin backbone, small (names and formulas of the official
# code; written here, not imported).
# ----------------------------------------------------------------------
def partition(x, ws):
    """(B, H, W, C) -> (B * windows, ws, ws, C)."""
    B, H, W, C = x.shape
    x = x.view(B, H // ws, ws, W // ws, ws, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws, ws, C)


def unpartition(windows, ws, H, W):
    B = windows.shape[0] // ((H // ws) * (W // ws))
    x = windows.view(B, H // ws, W // ws, ws, ws, -1).permute(
        0, 1, 3, 2, 4, 5)
    return x.reshape(B, H, W, -1)


class OfficialMlp(nn.Module):

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class OfficialWindowAttention(nn.Module):

    def __init__(self, dim, ws, heads):
        super().__init__()
        self.ws, self.heads = ws, heads
        self.scale = (dim // heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(
            torch.randn((2 * ws - 1) ** 2, heads) * 0.5)
        # Relative (row, column) offset of every token pair, shifted to
        # start at 0, as one index into the (2ws-1)^2 table.
        rows, cols = torch.meshgrid(torch.arange(ws), torch.arange(ws),
                                    indexing='ij')
        coords = torch.stack([rows.flatten(), cols.flatten()])  # 2, N
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
        rel = rel + (ws - 1)
        index = rel[..., 0] * (2 * ws - 1) + rel[..., 1]
        self.register_buffer('relative_position_index', index)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, mask=None):
        Bw, N, C = x.shape
        q, k, v = self.qkv(x).view(Bw, N, 3, self.heads, C // self.heads) \
            .permute(2, 0, 3, 1, 4)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[
            self.relative_position_index.view(-1)].view(N, N, -1)
        attn = attn + bias.permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            nW = mask.shape[0]
            attn = attn.view(Bw // nW, nW, self.heads, N, N) + \
                mask[None, :, None]
            attn = attn.view(Bw, self.heads, N, N)
        attn = attn.softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(Bw, N, C))


def shift_mask(H, W, ws, shift):
    """The official BasicLayer's attention mask of the shifted windows."""
    Hp, Wp = -(-H // ws) * ws, -(-W // ws) * ws
    img = torch.zeros(1, Hp, Wp, 1)
    spans = (slice(0, -ws), slice(-ws, -shift), slice(-shift, None))
    label = 0
    for hs in spans:
        for wsl in spans:
            img[:, hs, wsl, :] = label
            label += 1
    win = partition(img, ws).view(-1, ws * ws)
    diff = win[:, None, :] - win[:, :, None]
    return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)


class OfficialBlock(nn.Module):

    def __init__(self, dim, heads, ws, shift):
        super().__init__()
        self.ws, self.shift = ws, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = OfficialWindowAttention(dim, ws, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = OfficialMlp(dim, 4 * dim)

    def forward(self, x, H, W):
        B, L, C = x.shape
        shortcut = x
        x = self.norm1(x).view(B, H, W, C)
        pad_r, pad_b = (-W) % self.ws, (-H) % self.ws
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        Hp, Wp = x.shape[1:3]
        mask = None
        if self.shift:
            x = torch.roll(x, (-self.shift, -self.shift), (1, 2))
            mask = shift_mask(H, W, self.ws, self.shift)
        win = partition(x, self.ws).view(-1, self.ws * self.ws, C)
        x = unpartition(self.attn(win, mask).view(-1, self.ws, self.ws, C),
                        self.ws, Hp, Wp)
        if self.shift:
            x = torch.roll(x, (self.shift, self.shift), (1, 2))
        x = x[:, :H, :W, :].reshape(B, H * W, C)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class OfficialPatchMerging(nn.Module):

    def __init__(self, dim):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x, H, W):
        B, L, C = x.shape
        x = x.view(B, H, W, C)
        x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        # (row, column) offsets (0,0), (1,0), (0,1), (1,1)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2],
                       x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.view(B, -1, 4 * C)))


class OfficialLayer(nn.Module):

    def __init__(self, dim, depth, heads, ws, downsample):
        super().__init__()
        self.blocks = nn.ModuleList([
            OfficialBlock(dim, heads, ws, 0 if i % 2 == 0 else ws // 2)
            for i in range(depth)])
        self.downsample = OfficialPatchMerging(dim) if downsample else None


class OfficialPatchEmbed(nn.Module):

    def __init__(self, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, 4, 4)
        self.norm = nn.LayerNorm(dim)


class OfficialSwin(nn.Module):

    def __init__(self, dim=EMBED, depths=DEPTHS, heads=HEADS, ws=WINDOW):
        super().__init__()
        self.patch_embed = OfficialPatchEmbed(dim)
        self.layers = nn.ModuleList([
            OfficialLayer(dim * 2 ** i, d, h, ws, i < len(depths) - 1)
            for i, (d, h) in enumerate(zip(depths, heads))])
        for i in range(len(depths)):
            self.add_module(f'norm{i}', nn.LayerNorm(dim * 2 ** i))


def _randomize(module, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return module


def official_backbone_state():
    swin = _randomize(OfficialSwin())
    return {f'backbone.{k}': v for k, v in swin.state_dict().items()}


# ----------------------------------------------------------------------
# Official head keys (mmdet 2.11 / mmseg 0.x names; shapes of the small
# configs below).
# ----------------------------------------------------------------------
def _conv_bn(prefix, cout, cin, k):
    return {f'{prefix}.conv.weight': (cout, cin, k, k),
            f'{prefix}.bn.weight': (cout,), f'{prefix}.bn.bias': (cout,),
            f'{prefix}.bn.running_mean': (cout,),
            f'{prefix}.bn.running_var': (cout,),
            f'{prefix}.bn.num_batches_tracked': ()}


def _conv(prefix, cout, cin, k):
    return {f'{prefix}.weight': (cout, cin, k, k), f'{prefix}.bias': (cout,)}


def cascade_head_shapes(ins=(EMBED, 2 * EMBED), ch=256, fc=1024,
                        classes=80):
    shapes = {}
    for i, c in enumerate(ins):
        shapes.update(_conv(f'neck.lateral_convs.{i}.conv', ch, c, 1))
        shapes.update(_conv(f'neck.fpn_convs.{i}.conv', ch, ch, 3))
    shapes.update(_conv('rpn_head.rpn_conv', ch, ch, 3))
    shapes.update(_conv('rpn_head.rpn_cls', 3, ch, 1))
    shapes.update(_conv('rpn_head.rpn_reg', 12, ch, 1))
    for s in range(3):
        p = f'roi_head.bbox_head.{s}'
        for i in range(4):
            shapes.update(_conv_bn(f'{p}.shared_convs.{i}', ch, ch, 3))
        shapes[f'{p}.shared_fcs.0.weight'] = (fc, ch * 49)
        shapes[f'{p}.shared_fcs.0.bias'] = (fc,)
        shapes[f'{p}.fc_cls.weight'] = (classes + 1, fc)
        shapes[f'{p}.fc_cls.bias'] = (classes + 1,)
        shapes[f'{p}.fc_reg.weight'] = (4 * classes, fc)
        shapes[f'{p}.fc_reg.bias'] = (4 * classes,)
        p = f'roi_head.mask_head.{s}'
        for i in range(4):
            shapes.update(_conv(f'{p}.convs.{i}.conv', ch, ch, 3))
        shapes[f'{p}.upsample.weight'] = (ch, ch, 2, 2)  # ConvTranspose2d
        shapes[f'{p}.upsample.bias'] = (ch,)
        shapes.update(_conv(f'{p}.conv_logits', classes, ch, 1))
    return shapes


def upernet_head_shapes(ins=(EMBED, 2 * EMBED), ch=32, aux=16,
                        classes=150):
    shapes = {}
    d = 'decode_head'
    for i in range(4):  # pool scales (1, 2, 3, 6)
        shapes.update(_conv_bn(f'{d}.psp_modules.{i}.1', ch, ins[-1], 1))
    shapes.update(_conv_bn(f'{d}.bottleneck', ch, ins[-1] + 4 * ch, 3))
    for i, c in enumerate(ins[:-1]):
        shapes.update(_conv_bn(f'{d}.lateral_convs.{i}', ch, c, 1))
        shapes.update(_conv_bn(f'{d}.fpn_convs.{i}', ch, ch, 3))
    shapes.update(_conv_bn(f'{d}.fpn_bottleneck', ch, len(ins) * ch, 3))
    shapes.update(_conv(f'{d}.conv_seg', classes, ch, 1))
    shapes.update(_conv_bn('auxiliary_head.convs.0', aux, ins[-1], 3))
    shapes.update(_conv('auxiliary_head.conv_seg', classes, aux, 1))
    return shapes


def _tensors(shapes, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return {k: (torch.tensor(3) if s == () else torch.randn(s, generator=gen))
            for k, s in shapes.items()}


def official_checkpoint(kind):
    state = official_backbone_state()
    state.update(_tensors(cascade_head_shapes() if kind == 'cascade' else
                          upernet_head_shapes()))
    # What the official repositories save: weights plus meta / optimizer.
    return dict(meta=dict(mmdet_version='2.11.0', epoch=36),
                state_dict=state)


# ----------------------------------------------------------------------
# Small mmdet 3 / mmseg 1 models from the real configs.
# ----------------------------------------------------------------------
SMALL_BACKBONE = dict(embed_dims=EMBED, depths=list(DEPTHS),
                      num_heads=list(HEADS), out_indices=(0, 1),
                      init_cfg=None)


def small_config(kind):
    if kind == 'cascade':
        cfg = Config.fromfile(osp.join(
            REPO, 'configs', 'cascade_mask_rcnn_swin_t_w8a8.py'))
        cfg.merge_from_dict(dict(model=dict(
            backbone=SMALL_BACKBONE,
            neck=dict(in_channels=[EMBED, 2 * EMBED]))))
    else:
        cfg = Config.fromfile(osp.join(
            REPO, 'configs', 'upernet_swin_b_w8a8.py'))
        cfg.merge_from_dict(dict(model=dict(
            backbone=dict(SMALL_BACKBONE, pretrained=None),
            decode_head=dict(in_channels=[EMBED, 2 * EMBED],
                             in_index=[0, 1], channels=32),
            auxiliary_head=dict(in_channels=2 * EMBED, in_index=1,
                                channels=16))))
    return cfg


# ----------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------
def test_merging_permutation_is_a_permutation():
    for c in (1, 3, 16):
        perm = merging_permutation(c)
        assert sorted(perm.tolist()) == list(range(4 * c))
    # C = 1: Unfold order (0,0), (0,1), (1,0), (1,1) picks the official
    # groups x0, x2, x1, x3.
    assert merging_permutation(1).tolist() == [0, 2, 1, 3]


@pytest.mark.parametrize('hw', [(8, 8), (7, 9)])
def test_patch_merging_matches_mmcv(hw):
    from mmcv.cnn.bricks.transformer import PatchMerging
    torch.manual_seed(0)
    official = _randomize(OfficialPatchMerging(EMBED), seed=3)
    state = {f'backbone.layers.0.downsample.{k}': v
             for k, v in official.state_dict().items()}
    converted, _ = convert_state_dict_backbone_only(state)
    ours = PatchMerging(EMBED, 2 * EMBED, stride=2,
                        norm_cfg=dict(type='LN'), init_cfg=None)
    ours.load_state_dict({k.split('downsample.')[1]: v
                          for k, v in converted.items()}, strict=True)
    H, W = hw
    x = torch.randn(2, H * W, EMBED)
    out, size = ours(x, (H, W))
    assert size == (-(-H // 2), -(-W // 2))
    torch.testing.assert_close(out, official(x, H, W), atol=1e-5, rtol=0)
    # Without the reorder the outputs differ: the permutation matters.
    ours.reduction.weight.data = state[
        'backbone.layers.0.downsample.reduction.weight'].clone()
    ours.norm.weight.data = state['backbone.layers.0.downsample.norm.weight']
    ours.norm.bias.data = state['backbone.layers.0.downsample.norm.bias']
    assert not torch.allclose(ours(x, (H, W))[0], official(x, H, W),
                              atol=1e-3)


def convert_state_dict_backbone_only(state):
    """Convert backbone keys alone (no heads: describe() would refuse)."""
    from dfq_dense.zoo.convert import convert_backbone_key
    out = {}
    for k, v in state.items():
        nk, nv = convert_backbone_key(k[len('backbone.'):], v)
        out['backbone.' + nk] = nv
    return out, None


@pytest.mark.parametrize('masked', [False, True])
def test_window_attention_matches_mmdet(masked):
    from mmdet.models.backbones.swin import WindowMSA
    official = _randomize(OfficialWindowAttention(32, WINDOW, 2), seed=4)
    state = {f'backbone.layers.1.blocks.0.attn.{k}': v
             for k, v in official.state_dict().items()}
    converted, _ = convert_state_dict_backbone_only(state)
    ours = WindowMSA(32, 2, (WINDOW, WINDOW), init_cfg=None)
    # The official relative position index equals mmdet's own.
    assert torch.equal(official.relative_position_index,
                       ours.relative_position_index)
    ours.load_state_dict({k.split('w_msa.')[1]: v
                          for k, v in converted.items()}, strict=True)
    x = torch.randn(8, WINDOW * WINDOW, 32)
    mask = shift_mask(14, 14, WINDOW, WINDOW // 2) if masked else None
    torch.testing.assert_close(ours(x, mask), official(x, mask), atol=1e-5,
                               rtol=0)


@pytest.mark.parametrize('shift,hw', [(0, (14, 14)), (3, (14, 14)),
                                      (3, (10, 12))])
def test_swin_block_matches_mmdet(shift, hw):
    from mmdet.models.backbones.swin import SwinBlock
    official = _randomize(OfficialBlock(EMBED, 2, WINDOW, shift), seed=5)
    state = {f'backbone.layers.0.blocks.1.{k}': v
             for k, v in official.state_dict().items()}
    converted, _ = convert_state_dict_backbone_only(state)
    ours = SwinBlock(EMBED, 2, 4 * EMBED, window_size=WINDOW,
                     shift=bool(shift), init_cfg=None).eval()
    ours.load_state_dict({k.split('blocks.1.')[1]: v
                          for k, v in converted.items()}, strict=True)
    H, W = hw
    x = torch.randn(2, H * W, EMBED)
    torch.testing.assert_close(ours(x, (H, W)), official(x, H, W),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize('kind', ['cascade', 'upernet'])
def test_every_key_maps_and_loads_strictly(tmp_path, kind):
    from dfq_dense.engine.model_checks import build_model
    ckpt = official_checkpoint(kind)
    official_keys = set(ckpt['state_dict'])
    converted, info = convert_state_dict(ckpt)
    assert info['arch'] == ('cascade_mask_rcnn' if kind == 'cascade'
                            else 'upernet')
    assert info['embed_dims'] == EMBED and info['depths'] == list(DEPTHS)
    assert info['model'] is None  # no official checkpoint of this size
    assert len(converted) == len(official_keys)  # one-to-one
    assert not any(k.startswith(('backbone.layers.',
                                 'backbone.patch_embed.proj.'))
                   for k in converted)
    model = build_model(small_config(kind))
    own = model.state_dict()
    # Every model key is in the checkpoint (the index buffers included)
    # and every checkpoint key is in the model, with the same shape.
    assert set(converted) == set(own)
    assert all(converted[k].shape == own[k].shape for k in own)
    path = tmp_path / 'converted.pth'
    torch.save(dict(state_dict=converted), path)
    load_checkpoint_strict(model, str(path))
    loaded = model.state_dict()
    assert torch.equal(
        loaded['backbone.stages.0.blocks.1.attn.w_msa.qkv.weight'],
        ckpt['state_dict']['backbone.layers.0.blocks.1.attn.qkv.weight'])


def test_converted_backbone_matches_official_stage():
    """Stage 0 of the converted backbone (2 blocks + patch merging) equals
    the official stage on the same tokens."""
    from dfq_dense.engine.model_checks import build_model
    ckpt = official_checkpoint('cascade')
    official = OfficialSwin()
    official.load_state_dict({k[len('backbone.'):]: v for k, v in
                              ckpt['state_dict'].items()
                              if k.startswith('backbone.')})
    converted, _ = convert_state_dict(ckpt)
    model = build_model(small_config('cascade')).eval()
    model.load_state_dict(converted, strict=True)
    H = W = 14
    x = torch.randn(1, H * W, EMBED)
    ref = x
    for block in official.layers[0].blocks:
        ref = block(ref, H, W)
    ref_down = official.layers[0].downsample(ref, H, W)
    stage = model.backbone.stages[0]
    out = x
    for block in stage.blocks:
        out = block(out, (H, W))
    down, _ = stage.downsample(out, (H, W))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(down, ref_down, atol=1e-5, rtol=0)


def test_describe_names_the_published_sizes():
    state = {'backbone.patch_embed.proj.weight': torch.zeros(96, 3, 4, 4),
             'roi_head.bbox_head.0.fc_cls.weight': torch.zeros(1),
             'roi_head.bbox_head.1.fc_cls.weight': torch.zeros(1),
             'roi_head.bbox_head.2.fc_cls.weight': torch.zeros(1)}
    for i, d in enumerate((2, 2, 18, 2)):
        for j in range(d):
            state[f'backbone.layers.{i}.blocks.{j}.norm1.weight'] = \
                torch.zeros(1)
    assert describe(state)['model'] == 'cascade_mask_rcnn_swin_s'
    with pytest.raises(ConversionError, match='not cascade_mask_rcnn_swin_t'):
        convert_state_dict(state, model='cascade_mask_rcnn_swin_t')


# ------------------------------------------------------------------ CLI
def _cli(capsys, *args):
    code = convert_checkpoint.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err.strip()


def _small_config_file(tmp_path, kind):
    path = tmp_path / f'small_{kind}.py'
    small_config(kind).dump(str(path))
    return path


def test_cli_writes_converted_file_and_checks_it(tmp_path, capsys):
    src = tmp_path / 'cascade_official.pth'
    torch.save(official_checkpoint('cascade'), src)
    dst = tmp_path / 'out' / 'cascade_mmdet3.pth'
    config = _small_config_file(tmp_path, 'cascade')
    code, out, err = _cli(capsys, src, dst, '--check', config)
    assert code == 0, err
    digest = sha256_file(str(dst))
    assert digest in out and 'strict load into the CascadeRCNN' in out
    assert (tmp_path / 'out' / 'cascade_mmdet3.pth.sha256').read_text() \
        == f'{digest}  cascade_mmdet3.pth\n'
    saved = torch.load(dst, weights_only=True)
    assert set(saved) == {'state_dict', 'meta'}
    meta = saved['meta']
    assert meta['source_sha256'] == sha256_file(str(src))
    assert meta['converter_version'] == CONVERTER_VERSION
    assert meta['target_layout'] == 'mmdet3'
    assert not list(tmp_path.glob('out/.tmp.*'))  # atomic: no leftovers
    # The strict check of the tool itself passes too.
    cfg = Config.fromfile(str(config))
    assert check_against_config(str(dst), cfg) == 'CascadeRCNN'
    # An existing output is kept unless --force.
    code, _, err = _cli(capsys, src, dst)
    assert code == 2 and 'exists' in err and len(err.splitlines()) == 1
    assert _cli(capsys, src, dst, '--force')[0] == 0


def test_cli_upernet_check(tmp_path, capsys):
    src = tmp_path / 'upernet_official.pth'
    torch.save(official_checkpoint('upernet'), src)
    dst = tmp_path / 'upernet_mmseg1.pth'
    code, out, err = _cli(capsys, src, dst, '--check',
                          _small_config_file(tmp_path, 'upernet'))
    assert code == 0, err
    assert 'strict load into the EncoderDecoder' in out
    assert torch.load(dst, weights_only=True)['meta']['target_layout'] == \
        'mmseg1'


def test_cli_check_fails_on_wrong_config(tmp_path, capsys):
    src = tmp_path / 'cascade_official.pth'
    torch.save(official_checkpoint('cascade'), src)
    dst = tmp_path / 'c.pth'
    code, _, err = _cli(capsys, src, dst, '--check',
                        _small_config_file(tmp_path, 'upernet'))
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith('convert_checkpoint: error: checkpoint')
    assert 'does not fit' in err


def test_cli_refuses_to_overwrite_input(tmp_path, capsys):
    src = tmp_path / 'official.pth'
    torch.save(official_checkpoint('cascade'), src)
    before = sha256_file(str(src))
    for dst in (src, tmp_path / '.' / 'official.pth'):
        code, _, err = _cli(capsys, src, dst, '--force')
        assert code == 2 and 'refusing to overwrite the input' in err
        assert len(err.splitlines()) == 1
    assert sha256_file(str(src)) == before


@pytest.mark.parametrize('what,expected', [
    ('text', 'not a torch checkpoint'),
    ('classification', 'ImageNet classification checkpoint'),
    ('converted', 'already in the mmdet 3 / mmseg 1 Swin layout'),
    ('resnet', 'not recognised'),
    ('backbone_only', 'not recognised'),
    ('wrong_model', 'not mask_rcnn_swin_t'),
])
def test_cli_unrecognised_input_one_line(tmp_path, capsys, what, expected):
    src = tmp_path / 'in.pth'
    args = []
    if what == 'text':
        src.write_text('not a checkpoint\n')
    elif what == 'classification':
        swin = OfficialSwin()
        torch.save(dict(model=swin.state_dict()), src)  # official layout
    elif what == 'converted':
        converted, _ = convert_state_dict(official_checkpoint('cascade'))
        torch.save(dict(state_dict=converted), src)
    elif what == 'resnet':
        torch.save(dict(state_dict={'backbone.conv1.weight':
                                    torch.zeros(64, 3, 7, 7)}), src)
    elif what == 'backbone_only':
        torch.save(dict(state_dict=official_backbone_state()), src)
    else:
        torch.save(official_checkpoint('cascade'), src)
        args = ['--model', 'mask_rcnn_swin_t']
    dst = tmp_path / 'out.pth'
    code, out, err = _cli(capsys, src, dst, *args)
    assert code == 2
    assert err.startswith('convert_checkpoint: error: ')
    assert expected in err and len(err.splitlines()) == 1
    assert 'Traceback' not in err
    assert not dst.exists()
