"""Input checks that need the model: run before the Runner is built.

:func:`check_model_inputs` builds the config's model once (like mmengine's
Runner, on the CPU) and checks, each failure one line:

* that the data source and the adapter can serve the model
  (``check_model`` of the synthesizer and of ``dfq.adapter``, e.g.
  attention hooks need a Swin backbone);
* that the synthetic image size is not too small for the backbone
  (:func:`check_image_size`);
* whether the synthesis fits the memory available (one warning line with
  the settings that fit: :mod:`dfq_dense.engine.memory`);
* that the checkpoint fits the model, strictly
  (:func:`dfq_dense.utils.checkpoint.load_checkpoint_strict`).

:func:`check_image_size` is also called by ``DFQTestLoop.__init__``.
"""
import copy
import math
import warnings

from .dfq_config import DFQConfigError
from .runner import DFQInputError

# The last Swin stage must keep at least this many tokens per side.  With
# one token per side its window attention attends to a single token (a
# softmax over one entry), which calibrates nothing, and PSAQ-ViT's
# patch-similarity entropy has no pair of tokens to measure (it fails).
MIN_LAST_STAGE_TOKENS = 2


def build_model(cfg):
    """The config's model, built the way mmengine's Runner builds it (the
    config's default scope, a top-level ``data_preprocessor`` merged in)."""
    from mmengine.registry import MODELS, DefaultScope
    model_cfg = copy.deepcopy(cfg.model)
    if cfg.get('data_preprocessor') is not None:
        model_cfg.setdefault('data_preprocessor', cfg.data_preprocessor)
    with DefaultScope.overwrite_default_scope(cfg.get('default_scope')):
        try:
            return MODELS.build(model_cfg)
        except Exception as err:  # noqa: BLE001  (any error of the config)
            reason = str(err).strip().splitlines()[0] if str(err).strip() \
                else ''
            raise DFQInputError(
                f'cannot build the model of the config: '
                f'{type(err).__name__}: {reason[:300]}') from None


# ------------------------------------------------------------- image size
def _pair(value):
    return tuple(value) if isinstance(value, (tuple, list)) else \
        (value, value)


def _apply(module, layer, h, w):
    """Spatial size after ``module`` (a PatchEmbed / PatchMerging of mmdet,
    mmseg or mmcv): its adaptive padding, then ``layer`` (the Conv2d
    projection or the Unfold sampler)."""
    pad = getattr(module, 'adap_padding', None) or \
        getattr(module, 'adaptive_padding', None)
    if pad is not None:
        ph, pw = pad.get_pad_shape((h, w))
        h, w = h + ph, w + pw
    k, s = _pair(layer.kernel_size), _pair(layer.stride)
    p, d = _pair(layer.padding), _pair(layer.dilation)
    if isinstance(layer.padding, str):  # 'same' / 'valid' on a Conv2d
        p = (0, 0) if layer.padding == 'valid' else \
            ((k[0] - 1) // 2, (k[1] - 1) // 2)
    out = []
    for size, i in ((h, 0), (w, 1)):
        out.append((size + 2 * p[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1)
    return tuple(out)


def _swin_parts(backbone):
    """``(patch_embed, [downsample of each stage])`` of an mmdet / mmseg
    SwinTransformer, or None for another backbone."""
    embed = getattr(backbone, 'patch_embed', None)
    stages = getattr(backbone, 'stages', None)
    if embed is None or stages is None or \
            getattr(embed, 'projection', None) is None:
        return None
    if not all(hasattr(s, 'blocks') for s in stages):
        return None
    return embed, [getattr(s, 'downsample', None) for s in stages]


def swin_token_maps(backbone, h, w):
    """Token map ``(h, w)`` of every stage of a Swin backbone for an image
    of ``h x w`` (None for another backbone)."""
    parts = _swin_parts(backbone)
    if parts is None:
        return None
    embed, downs = parts
    size = _apply(embed, embed.projection, h, w)
    maps = []
    for down in downs:
        maps.append(size)
        if down is not None:
            size = _apply(down, down.sampler, *size)
    return maps


def swin_min_image_size(backbone):
    """Smallest ``(H, W)`` whose last Swin stage keeps
    :data:`MIN_LAST_STAGE_TOKENS` tokens per side (None: not a Swin)."""
    if swin_token_maps(backbone, 1, 1) is None:
        return None
    out = []
    for axis in (0, 1):
        lo, hi = 1, 1
        while True:  # the token map grows with the image: double, bisect
            size = (hi, 1) if axis == 0 else (1, hi)
            if swin_token_maps(backbone, *size)[-1][axis] >= \
                    MIN_LAST_STAGE_TOKENS:
                break
            lo, hi = hi, hi * 2
        while lo < hi:
            mid = (lo + hi) // 2
            size = (mid, 1) if axis == 0 else (1, mid)
            if swin_token_maps(backbone, *size)[-1][axis] >= \
                    MIN_LAST_STAGE_TOKENS:
                hi = mid
            else:
                lo = mid + 1
        out.append(hi)
    return tuple(out)


def check_image_size(model, img_size):
    """Raise ValueError (one line) when images of ``img_size`` are too
    small for the model's Swin backbone: patch embedding and patch merging
    (with their corner padding) must leave the last stage at least
    :data:`MIN_LAST_STAGE_TOKENS` tokens per side.  Other backbones are
    not checked."""
    backbone = getattr(model, 'backbone', None)
    if backbone is None or img_size is None:
        return
    h, w = _pair(img_size)
    embed = getattr(backbone, 'patch_embed', None)
    if getattr(embed, 'strict_img_size', False) and \
            tuple(getattr(embed, 'img_size', ())) != (h, w):
        # a timm classifier built for one input size (its position
        # embedding / Swin masks): anything else fails in its forward
        size = tuple(embed.img_size)
        raise ValueError(
            f'img_size=({h}, {w}) does not fit this timm '
            f'{type(backbone).__name__}, built for {size[0]}x{size[1]} '
            f'inputs; use img_size={size} (img_size=None: the model\'s '
            'test size)')
    minimum = swin_min_image_size(backbone)
    if minimum is None:
        return
    if h >= minimum[0] and w >= minimum[1]:
        return
    maps = swin_token_maps(backbone, h, w)
    embed, downs = _swin_parts(backbone)
    stride = _pair(embed.projection.stride)[0] * math.prod(
        _pair(d.sampler.stride)[0] for d in downs[:-1] if d is not None)
    raise ValueError(
        f'img_size=({h}, {w}) is too small for this {type(backbone).__name__}'
        f' (downsampling x{stride}): its last stage would see '
        f'{maps[-1][0]}x{maps[-1][1]} tokens, window attention needs at '
        f'least {MIN_LAST_STAGE_TOKENS}x{MIN_LAST_STAGE_TOKENS}; use H >= '
        f'{minimum[0]} and W >= {minimum[1]} (e.g. the test scale: '
        'img_size=None)')


# ------------------------------------------------------------ all checks
def synthesizer_cfg(cfg, dfq):
    """The synthesizer config the DFQ loop builds (img_size and the
    real-image folder filled in)."""
    from .dfq_loop import complete_real_images, infer_test_image_size
    synth = dict(dfq.synthesizer)
    if synth.get('img_size') is None:
        try:
            synth['img_size'] = infer_test_image_size(cfg)
        except ValueError as err:
            raise DFQConfigError(str(err)) from None
    try:
        return complete_real_images(cfg, synth)
    except ValueError as err:  # no training set to take the images from
        raise DFQConfigError(f'dfq.synthesizer {synth["type"]}: '
                             f'{err}') from None


def check_model_inputs(cfg, dfq, checkpoint, images=None, image_size=None):
    """Build the model once and run the checks of the module docstring.

    Args:
        cfg: the full config; dfq: the parsed ``dfq`` config.
        checkpoint: local path of the FP checkpoint (None: a classifier
            that loads its own weights).

    Returns:
        the weights file a :class:`~dfq_dense.cls.TimmClassifier` loaded
        (None for other models and for random weights).
        images: the ``dfq.load_images`` tensor, if any (its size is
            checked instead of the synthesizer's ``img_size``).
        image_size: the size the loaded images are resized to (images of
            another task, see :mod:`~dfq_dense.engine.image_reuse`),
            checked instead of theirs.
    """
    from ..registry import MODELS, build
    from ..utils.checkpoint import load_checkpoint_strict
    with warnings.catch_warnings():
        # The deprecation notes of mmdet / mmseg modules appear when the
        # Runner builds the model; here they would precede a one-line error.
        warnings.simplefilter('ignore')
        model = build_model(cfg)
    if not dfq.load_quantized:
        synth = synthesizer_cfg(cfg, dfq)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter('ignore')
                synthesizer = build(MODELS, synth)
                synthesizer.check_model(model)
        except (ValueError, TypeError, AssertionError) as err:
            raise DFQConfigError(
                f'dfq.synthesizer {synth["type"]}: {err}') from None
        if dfq.get('adapter') is not None:
            from ..registry import ADAPTERS
            try:
                build(ADAPTERS, dfq.adapter).check_model(model)
            except (ValueError, TypeError) as err:
                raise DFQConfigError(
                    f'dfq.adapter {dfq.adapter["type"]}: {err}') from None
        size = tuple(images.shape[-2:]) if images is not None else \
            synth['img_size']
        if image_size is not None:
            size = image_size
        try:
            check_image_size(model, size)
        except ValueError as err:
            what = 'dfq.load_images' if images is not None else \
                'dfq.synthesizer'
            raise DFQConfigError(f'{what}: {err}') from None
        if images is None:
            # Will the synthesis fit?  Said in one line before it starts.
            import torch

            from .memory import check_synthesis_memory
            hw = (size, size) if isinstance(size, int) else tuple(size)
            check_synthesis_memory(
                model, synth, hw,
                'cuda' if torch.cuda.is_available() else 'cpu')
    if checkpoint is not None:
        load_checkpoint_strict(model, checkpoint)
    # A timm classifier loaded its weights itself, strictly (the file it
    # found: model.checkpoint or timm's cache; None for random weights).
    weights = getattr(model, 'weights', None)
    del model
    return weights
