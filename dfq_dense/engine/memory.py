"""How much memory the synthesis will need, said before a run starts.

At 800x1333 a synthesis batch of Swin-S activations does not fit a 16 GB
machine without the synthesizers' ``with_cp`` / ``micro_batch_size``
options (see ``configs/_base_/methods/``).  Rather than a table of
measured figures per backbone and method, the estimate is measured on the
config's own model and method: one synthesis iteration of one image at a
small probe size, counting the bytes autograd keeps for the backward
(:func:`peak_saved_bytes`), scaled by the pixel count (Swin's windowed
attention, the recorders and the losses all grow linearly with the
tokens) and by the images per forward.  A run whose estimate exceeds the
memory available says so in one line, with the setting that fixes it; it
still runs (the estimate leaves out allocator slack and the optimiser's
state, so it may err either way).

timm classifiers (the classification track) are probed where the pixel
scaling would not hold (:func:`probe_size`): a model built for one input
size (the shipped Swin and DeiT classifiers: their patch embedding refuses
any other) at that size, which is then the synthesis size (the estimate is
measured, not scaled; another ``img_size`` is refused in one line, as the
DFQ loop's own check does); a ViT / DeiT taking any size
(``dynamic_img_size``) at the synthesis size itself, since its global
attention grows with the square of the tokens.
"""
import logging
import os
import weakref

import torch
from mmengine.logging import print_log
from torch import nn

#: Probe size: small enough to cost about a second on a CPU, large enough
#: for every Swin stage to hold a window.
PROBE_HW = (224, 224)
#: Smaller syntheses (pixels x images per forward) are not probed.
SKIP_BELOW = 16 * PROBE_HW[0] * PROBE_HW[1]
GB = 1024 ** 3


def peak_saved_bytes(fn):
    """Run ``fn()`` and return the peak of the bytes autograd holds for
    the backward (saved tensors, each storage counted once while any
    saved reference to it lives; parameters left out: they are there
    anyway), and ``fn``'s result."""
    live = {}  # storage key -> [bytes, references]
    state = dict(now=0, peak=0)

    class _Ref:
        __slots__ = ('tensor', '__weakref__')

    def _release(key):
        entry = live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            state['now'] -= entry[0]
            del live[key]

    def pack(t):
        ref = _Ref()
        ref.tensor = t
        if isinstance(t, nn.Parameter):
            return ref
        storage = t.untyped_storage()
        key = (storage.data_ptr(), t.device.type)
        if key in live:
            live[key][1] += 1
        else:
            live[key] = [storage.nbytes(), 1]
            state['now'] += storage.nbytes()
            state['peak'] = max(state['peak'], state['now'])
        weakref.finalize(ref, _release, key)
        return ref

    def unpack(ref):
        return ref.tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        out = fn()
    return state['peak'], out


def available_bytes(device):
    """Free memory of ``device``: the GPU's free memory, or the host's
    ``MemAvailable`` (None when unknown)."""
    device = torch.device(device)
    if device.type == 'cuda':
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        with open('/proc/meminfo') as f:
            for line in f:
                if line.startswith('MemAvailable:'):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
    except (ValueError, OSError, AttributeError):
        return None


def probe_size(model, img_size):
    """``(probe (H, W), scaled)``: the size the estimate is measured at and
    whether it is scaled from there to ``img_size`` by the pixel count.

    * a backbone built for one input size (a timm classifier whose patch
      embedding has ``strict_img_size``): that size, not scaled;
      ValueError (one line) when ``img_size`` is another (its forward
      would fail);
    * a backbone with global attention over all tokens (a timm ViT / DeiT
      with ``dynamic_img_size``): ``img_size``, not scaled (the attention
      is quadratic in the tokens);
    * else (Swin's windowed attention: linear in the tokens)
      :data:`PROBE_HW`, scaled.
    """
    from ..synth.hooks import TimmAttentionSite, swin_attention_sites
    from .model_checks import check_image_size
    h, w = img_size
    backbone = getattr(model, 'backbone', None)
    embed = getattr(backbone, 'patch_embed', None)
    if getattr(embed, 'strict_img_size', False) and \
            getattr(embed, 'img_size', None) is not None:
        check_image_size(model, (h, w))
        return (h, w), False
    if backbone is not None and any(
            isinstance(s, TimmAttentionSite)
            for s in swin_attention_sites(backbone)):
        return (h, w), False
    return PROBE_HW, True


def _probe_cfg(synth_cfg, accepted, hw=PROBE_HW):
    cfg = dict(synth_cfg, num_images=1, batch_size=1, img_size=hw,
               iterations=1, seed=0)
    cfg['micro_batch_size'] = None
    for key, value in (('synth_rounds', 1), ('progress', False),
                       ('warmup_iters', 0)):
        if accepted is None or key in accepted:
            cfg[key] = value
    return cfg


def synthesis_estimate(model, synth_cfg, img_size):
    """``dict(per_image=bytes, per_forward=bytes, images_per_forward=n,
    params=bytes, probe_hw=(H, W))`` of ``synth_cfg`` on ``model`` at
    ``img_size`` (H, W), measured at ``probe_hw`` (:func:`probe_size`);
    None for data sources that optimise nothing or small syntheses."""
    from ..registry import MODELS, build
    from .dfq_config import NON_ITERATIVE, synthesizer_class, \
        synthesizer_keys
    method = str(synth_cfg['type']).split('.')[-1]
    if method in NON_ITERATIVE:
        return None
    h, w = img_size
    n = synth_cfg.get('micro_batch_size') or synth_cfg.get('batch_size', 1)
    n = min(n, synth_cfg.get('batch_size', n))
    if h * w * n <= SKIP_BELOW:
        return None
    hw, scaled = probe_size(model, (h, w))
    cls = synthesizer_class(synth_cfg['type'])
    probe = build(MODELS, _probe_cfg(synth_cfg, synthesizer_keys(cls), hw))
    peak, _ = peak_saved_bytes(lambda: probe.generate(model))
    per_image = peak * (h * w) / (hw[0] * hw[1]) if scaled else peak
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return dict(per_image=per_image, per_forward=per_image * n,
                images_per_forward=n, params=params, probe_hw=hw)


def check_synthesis_memory(model, synth_cfg, img_size, device,
                           available=None, log=print_log):
    """Estimate the synthesis memory (:func:`synthesis_estimate`) and say
    in one line when it exceeds what ``device`` has free, naming the
    settings that fit.  Returns the estimate (with ``available``) or
    None."""
    est = synthesis_estimate(model, synth_cfg, img_size)
    if est is None:
        return None
    free = available_bytes(device) if available is None else available
    est['available'] = free
    need = est['per_forward'] + est['params']
    if free is None or need <= free:
        return est
    with_cp = bool(synth_cfg.get('with_cp', False))
    # with_cp keeps about half of the activations or less (the Swin blocks'
    # inputs instead of everything inside them; tests/test_synth_memory.py)
    per_image = est['per_image'] if with_cp else est['per_image'] / 2
    fits = int((free - est['params']) // per_image) if per_image else 0
    fix = [] if with_cp else ['dfq.synthesizer.with_cp=True']
    if fits >= 1:
        fix.append(f'dfq.synthesizer.micro_batch_size={fits}')
    else:
        fix.append('a smaller dfq.synthesizer.img_size or a device with '
                   'more memory')
    h, w = img_size
    log(f'dfq: the synthesis needs about {need / GB:.1f} GB '
        f'({est["per_image"] / GB:.2f} GB per image at {h}x{w} x '
        f'{est["images_per_forward"]} per forward, measured on a '
        f'{est["probe_hw"][0]}x{est["probe_hw"][1]} probe), {device} has '
        f'{free / GB:.1f} GB free: set ' + ' and '.join(fix) +
        ' (same images; see configs/_base_/methods/)',
        logger='current', level=logging.WARNING)
    est['fix'] = fix
    return est


__all__ = ['peak_saved_bytes', 'available_bytes', 'synthesis_estimate',
           'check_synthesis_memory', 'probe_size', 'PROBE_HW', 'SKIP_BELOW']
