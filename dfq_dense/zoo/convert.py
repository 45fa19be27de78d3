"""Official Swin dense-prediction checkpoints -> mmdet 3 / mmseg 1 keys.

The published Swin detection checkpoints (SwinTransformer/
Swin-Transformer-Object-Detection, an mmdet 2.11 fork) and segmentation
checkpoints (SwinTransformer/Swin-Transformer-Semantic-Segmentation, an
mmseg 0.x fork) carry the backbone of the official Swin code.  mmdet 3 and
mmseg 1 ship their own re-implementation of that backbone with other module
names, and a PatchMerging that samples the 2x2 neighbourhood with
``nn.Unfold``, which orders the 4*C merged channels differently.  The heads
(FPN, RPN, (Cascade) RoI heads, UperHead / FCNHead) kept their key names
from mmdet 2.11 / mmseg 0.x to mmdet 3 / mmseg 1, so they are copied as
they are; a strict load (``--check``) proves that for a given config.

Backbone key map (``backbone.`` prefix omitted)::

    patch_embed.proj.*                  -> patch_embed.projection.*
    patch_embed.norm.*                  -> patch_embed.norm.*
    layers.i.blocks.j.norm{1,2}.*       -> stages.i.blocks.j.norm{1,2}.*
    layers.i.blocks.j.attn.<p>          -> stages.i.blocks.j.attn.w_msa.<p>
        (<p>: qkv.*, proj.*, relative_position_bias_table,
         relative_position_index)
    layers.i.blocks.j.mlp.fc1.*         -> stages.i.blocks.j.ffn.layers.0.0.*
    layers.i.blocks.j.mlp.fc2.*         -> stages.i.blocks.j.ffn.layers.1.*
    layers.i.downsample.reduction.weight-> stages.i.downsample.reduction.weight
        (input columns permuted, see :func:`merging_permutation`)
    layers.i.downsample.norm.{weight,bias}
                                        -> stages.i.downsample.norm.*
        (permuted the same way)
    norm{i}.*                           -> norm{i}.*   (per-output norms)

The relative position index of the official code and of mmdet's / mmseg's
``WindowMSA`` are the same buffer (same values), so it is carried over.
"""
import hashlib
import os.path as osp
import re
from collections import OrderedDict

import torch

CONVERTER_VERSION = '1.0'

# Official 2x2 neighbourhood order of PatchMerging: torch.cat([x0, x1, x2,
# x3], -1) with x0 = x[:, 0::2, 0::2], x1 = x[:, 1::2, 0::2],
# x2 = x[:, 0::2, 1::2], x3 = x[:, 1::2, 1::2] -- (row, column) offsets:
OFFICIAL_MERGE_OFFSETS = ((0, 0), (1, 0), (0, 1), (1, 1))

# The models whose official checkpoints this converter knows: backbone size
# (embed dims, depths) and the head family.
KNOWN_MODELS = OrderedDict([
    ('mask_rcnn_swin_t', dict(arch='mask_rcnn', embed_dims=96,
                              depths=(2, 2, 6, 2))),
    ('mask_rcnn_swin_s', dict(arch='mask_rcnn', embed_dims=96,
                              depths=(2, 2, 18, 2))),
    ('cascade_mask_rcnn_swin_t', dict(arch='cascade_mask_rcnn',
                                      embed_dims=96, depths=(2, 2, 6, 2))),
    ('cascade_mask_rcnn_swin_s', dict(arch='cascade_mask_rcnn',
                                      embed_dims=96, depths=(2, 2, 18, 2))),
    ('cascade_mask_rcnn_swin_b', dict(arch='cascade_mask_rcnn',
                                      embed_dims=128, depths=(2, 2, 18, 2))),
    ('upernet_swin_t', dict(arch='upernet', embed_dims=96,
                            depths=(2, 2, 6, 2))),
    ('upernet_swin_s', dict(arch='upernet', embed_dims=96,
                            depths=(2, 2, 18, 2))),
    ('upernet_swin_b', dict(arch='upernet', embed_dims=128,
                            depths=(2, 2, 18, 2))),
])
TARGET_LAYOUT = dict(mask_rcnn='mmdet3', cascade_mask_rcnn='mmdet3',
                     upernet='mmseg1')


class ConversionError(ValueError):
    """The input is no official Swin dense checkpoint this converter knows,
    or does not match the requested model: one line."""


# ------------------------------------------------------------ patch merging
def merging_permutation(channels):
    """Index ``perm`` with ``new[..., j] = old[..., perm[j]]`` for the 4*C
    merged channels of a PatchMerging over ``channels`` input channels.

    Official order: channel ``g * C + c`` holds input channel ``c`` at the
    g-th offset of :data:`OFFICIAL_MERGE_OFFSETS`.  ``nn.Unfold`` (kernel 2,
    stride 2) on a (B, C, H, W) map puts input channel ``c`` at kernel
    position (ki, kj) in output channel ``(c * 2 + ki) * 2 + kj``: channel
    major, then kernel row, then kernel column.
    """
    perm = []
    for c in range(channels):
        for ki in range(2):
            for kj in range(2):
                group = OFFICIAL_MERGE_OFFSETS.index((ki, kj))
                perm.append(group * channels + c)
    return torch.tensor(perm, dtype=torch.long)


def _permute_merge(key, value):
    """Reorder the merged-channel axis of a downsample parameter."""
    if key.endswith('reduction.weight'):  # (2C, 4C): input columns
        if value.dim() != 2 or value.shape[1] % 4:
            raise ConversionError(
                f'unexpected shape {tuple(value.shape)} of {key}')
        return value[:, merging_permutation(value.shape[1] // 4)].clone()
    if value.dim() != 1 or value.shape[0] % 4:  # norm weight / bias (4C,)
        raise ConversionError(
            f'unexpected shape {tuple(value.shape)} of {key}')
    return value[merging_permutation(value.shape[0] // 4)].clone()


# ------------------------------------------------------------ key renaming
_BLOCK = r'layers\.(\d+)\.blocks\.(\d+)\.'
_RULES = (
    (re.compile(r'^patch_embed\.proj\.(weight|bias)$'),
     r'patch_embed.projection.\1', False),
    (re.compile(r'^patch_embed\.norm\.(weight|bias)$'),
     r'patch_embed.norm.\1', False),
    (re.compile('^' + _BLOCK + r'(norm[12])\.(weight|bias)$'),
     r'stages.\1.blocks.\2.\3.\4', False),
    (re.compile('^' + _BLOCK + r'attn\.((?:qkv|proj)\.(?:weight|bias)|'
                r'relative_position_bias_table|relative_position_index)$'),
     r'stages.\1.blocks.\2.attn.w_msa.\3', False),
    (re.compile('^' + _BLOCK + r'mlp\.fc1\.(weight|bias)$'),
     r'stages.\1.blocks.\2.ffn.layers.0.0.\3', False),
    (re.compile('^' + _BLOCK + r'mlp\.fc2\.(weight|bias)$'),
     r'stages.\1.blocks.\2.ffn.layers.1.\3', False),
    (re.compile(r'^layers\.(\d+)\.downsample\.(reduction\.weight|'
                r'norm\.weight|norm\.bias)$'),
     r'stages.\1.downsample.\2', True),
    (re.compile(r'^norm(\d+)\.(weight|bias)$'), r'norm\1.\2', False),
)


def convert_backbone_key(key, value):
    """``(new_key, new_value)`` of one official backbone entry (``key``
    without the ``backbone.`` prefix); :class:`ConversionError` if the key
    is not one of the official Swin backbone's."""
    for pattern, repl, merge in _RULES:
        if pattern.match(key):
            new_key = pattern.sub(repl, key)
            return new_key, (_permute_merge(key, value) if merge else value)
    if key == 'absolute_pos_embed':
        raise ConversionError(
            'backbone.absolute_pos_embed: checkpoints trained with an '
            'absolute position embedding (ape=True) are not supported')
    raise ConversionError(f'unrecognised backbone key backbone.{key}')


# ------------------------------------------------------------ recognition
def _state_dict_of(checkpoint):
    # mmdet / mmseg save weights under 'state_dict', the official Swin
    # classification code under 'model'.
    for key in ('state_dict', 'model'):
        if isinstance(checkpoint, dict) and isinstance(
                checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    if not isinstance(checkpoint, dict) or not checkpoint or not all(
            isinstance(k, str) and torch.is_tensor(v)
            for k, v in checkpoint.items()):
        raise ConversionError(
            'not a model checkpoint (expected a dict of tensors, or one '
            'under "state_dict")')
    return OrderedDict((re.sub(r'^module\.', '', k), v)
                       for k, v in checkpoint.items())


def describe(state_dict):
    """What an official checkpoint holds: ``dict(model, arch, embed_dims,
    depths)``; :class:`ConversionError` when it is none this converter
    knows (already converted, a classification checkpoint, another
    backbone or head).  ``model`` is the name in :data:`KNOWN_MODELS`, or
    None for a size no official checkpoint has."""
    keys = list(state_dict)
    if 'backbone.patch_embed.projection.weight' in state_dict or any(
            k.startswith('backbone.stages.') for k in keys):
        raise ConversionError(
            'already in the mmdet 3 / mmseg 1 Swin layout (backbone.stages.*)'
            '; pass it to tools/dfq_test.py as it is')
    if 'backbone.patch_embed.proj.weight' not in state_dict or not any(
            k.startswith('backbone.layers.') for k in keys):
        what = ('an ImageNet classification checkpoint (no detector or '
                'segmentor)') if 'patch_embed.proj.weight' in state_dict \
            else 'no official Swin detection / segmentation checkpoint'
        raise ConversionError(
            f'not recognised: {what}; expected the keys '
            'backbone.patch_embed.proj.* and backbone.layers.* of the '
            'official Swin detection / segmentation repositories')
    embed_dims = int(state_dict['backbone.patch_embed.proj.weight'].shape[0])
    blocks = {}
    for k in keys:
        m = re.match(r'backbone\.layers\.(\d+)\.blocks\.(\d+)\.', k)
        if m:
            stage, block = int(m.group(1)), int(m.group(2))
            blocks[stage] = max(blocks.get(stage, 0), block + 1)
    depths = tuple(blocks[i] for i in sorted(blocks))
    if any(k.startswith('decode_head.psp_modules.') for k in keys):
        arch = 'upernet'
    elif any(k.startswith('roi_head.bbox_head.0.') for k in keys):
        stages = {int(m.group(1)) for m in (
            re.match(r'roi_head\.bbox_head\.(\d+)\.', k) for k in keys) if m}
        if stages != {0, 1, 2}:
            raise ConversionError(
                f'not recognised: a cascade with {len(stages)} bbox stages '
                '(the official Cascade Mask R-CNN has 3)')
        arch = 'cascade_mask_rcnn'
    elif any(k.startswith('roi_head.bbox_head.') for k in keys) and any(
            k.startswith('roi_head.mask_head.') for k in keys):
        arch = 'mask_rcnn'
    else:
        raise ConversionError(
            'not recognised: a Swin backbone without the Mask R-CNN, Cascade '
            'Mask R-CNN or UperNet heads of the official checkpoints')
    # The published sizes have a name; another size of the same layout
    # (e.g. a small test model) converts the same way, with model None.
    model = None
    for name, spec in KNOWN_MODELS.items():
        if (spec['arch'], spec['embed_dims'], spec['depths']) == \
                (arch, embed_dims, depths):
            model = name
    return dict(model=model, arch=arch, embed_dims=embed_dims,
                depths=list(depths))


def convert_state_dict(state_dict, model=None):
    """``(converted state dict, description)`` of an official checkpoint's
    state dict (or whole checkpoint).  With ``model`` (a key of
    :data:`KNOWN_MODELS`), a checkpoint of another model is refused."""
    state_dict = _state_dict_of(state_dict)
    info = describe(state_dict)
    if model is not None and model != info['model']:
        if model not in KNOWN_MODELS:
            raise ConversionError(
                f'unknown --model {model} (known: {", ".join(KNOWN_MODELS)})')
        held = info['model'] or f'a {info["arch"]} of another size'
        raise ConversionError(
            f'the checkpoint holds {held} (embed dims {info["embed_dims"]}, '
            f'depths {info["depths"]}), not {model}')
    out = OrderedDict()
    for key, value in state_dict.items():
        if key.startswith('backbone.'):
            new_key, value = convert_backbone_key(key[len('backbone.'):],
                                                  value)
            new_key = 'backbone.' + new_key
        else:
            new_key = key  # heads: same names in mmdet 3 / mmseg 1
        if new_key in out:
            raise ConversionError(f'two keys map to {new_key}')
        out[new_key] = value.detach().clone().contiguous()
    return out, info


# ------------------------------------------------------------ files
def sha256_file(path, chunk=1 << 20):
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(chunk), b''):
            digest.update(block)
    return digest.hexdigest()


def _same_file(a, b):
    if osp.exists(a) and osp.exists(b):
        return osp.samefile(a, b)
    return osp.realpath(a) == osp.realpath(b)


def convert_file(src, dst, model=None, force=False):
    """Convert the checkpoint ``src`` into the new file ``dst``.

    Writes ``{'state_dict': ..., 'meta': {...}}`` atomically (a reader never
    sees a half-written file) and ``dst + '.sha256'`` (``sha256sum``
    format).  Refuses to write over ``src``, and over an existing ``dst``
    unless ``force``.

    Returns:
        dict: ``meta`` of the new file plus ``sha256`` and ``path``.
    """
    from ..utils.checkpoint import safe_torch_load
    from ..utils.fileio import atomic_path, torch_save_atomic
    if _same_file(src, dst):
        raise ConversionError(
            f'refusing to overwrite the input {src}: give another output path')
    if osp.isdir(dst):
        raise ConversionError(f'output {dst} is a folder: give a file path')
    if osp.exists(dst) and not force:
        raise ConversionError(
            f'output {dst} exists: remove it or pass --force')
    checkpoint = safe_torch_load(src, map_location='cpu')
    state_dict, info = convert_state_dict(checkpoint, model)
    meta = dict(
        converted_from=osp.basename(src),
        source_sha256=sha256_file(src),
        source_layout=('mmdet 2.11 (official Swin detection)'
                       if info['arch'] != 'upernet' else
                       'mmseg 0.x (official Swin segmentation)'),
        target_layout=TARGET_LAYOUT[info['arch']],
        model=info['model'],
        arch=info['arch'],
        embed_dims=info['embed_dims'],
        depths=info['depths'],
        converter='dfq_dense.zoo.convert',
        converter_version=CONVERTER_VERSION)
    torch_save_atomic(dict(state_dict=state_dict, meta=meta), dst)
    digest = sha256_file(dst)
    with atomic_path(dst + '.sha256', '.sha256') as tmp:
        with open(tmp, 'w') as f:
            f.write(f'{digest}  {osp.basename(dst)}\n')
    return dict(meta, sha256=digest, path=dst)


def check_against_config(path, config):
    """Load the converted ``path`` strictly into the model of ``config``
    (a file name or an mmengine Config): no missing, unexpected or
    mis-shaped key.  Returns the model's class name."""
    from mmengine.config import Config

    import dfq_dense  # noqa: F401  (registers the project's modules)
    from ..engine.model_checks import build_model
    from ..utils.checkpoint import load_checkpoint_strict
    cfg = Config.fromfile(config) if isinstance(config, str) else config
    model = build_model(cfg)
    load_checkpoint_strict(model, path)
    return type(model).__name__
