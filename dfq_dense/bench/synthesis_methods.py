"""One synthesis iteration of each method, as a whole and split into terms.

Every class composes the iteration of its method from the suite's public
loss functions and recorders (``dfq_dense.synth``) with the method's
settings (:func:`method_settings`: the config fragment of
``configs/_base_/methods/`` over the synthesizer's defaults), on a
backbone with the pixels ``x`` ``(batch, 3, H, W)`` as the only thing that
learns:

``plain(gen)``
    the iteration as the synthesizer runs it (its loss terms, its
    backward(s), its optimizer step and the clamp to the valid range);
``split(gen, clock)``
    the same computation, with ``clock.mark(term)`` after each piece.  A
    loss is charged with its forward *and its own backward* down to the
    tensors it reads (the recorded attention tensors, the backbone outputs,
    the pixels): those are detached into leaves, the loss is
    differentiated to them (``torch.autograd.grad``), and the gradients are
    then pushed through the backbone to the pixels in one backward
    (``backward``), as the single ``loss.backward()`` of ``plain`` does.

Terms (``TERMS``, ``(name, kind)``, kind one of forward / loss / backward /
step):

* ``forward``: augmentation of the batch (roll / flip, MimiQ's colour
  jitter and noise) and the backbone forward with the method's recorders
  attached (MimiQ's recorder recomputes the per-head ``q k^T`` in its hook:
  charged here).  PSAQ-ViT V2: the teacher; ``student_forward`` the
  fake-quantized student.  SPDFQ: the images; ``msr_crop_forward`` the
  drawing of the multi-semantic regions, the crops (``native_crops`` at
  their own pixel size with the fragment's ``crop_size='native'``, one
  forward per crop size; ``crop_and_resize`` otherwise), their
  augmentation and their forward.
* one ``loss`` term per prior loss of the method.
* ``backward``: the backbone backward(s) to the pixels (PSAQ-ViT V2 with
  ``balance='grad_norm'``: one per term and the per-image gradient-norm
  combination; SPDFQ: of the images, ``msr_crop_backward`` of the crops).
* ``step``: the optimizer step and the clamp to the valid pixel range.

The synthesis loop's memory options (``micro_batch_size``, ``with_cp``; off
in the fragments) are recorded with the settings, not applied: the
iteration here forwards the whole batch at once.
"""
import copy
import math
from typing import Dict, List

import torch
import torch.nn.functional as F

from .common import REPO

METHOD_CONFIGS = {
    'psaq_vit': 'configs/_base_/methods/psaq_vit.py',
    'psaq_vit_v2': 'configs/_base_/methods/psaq_vit_v2.py',
    'mimiq': 'configs/_base_/methods/mimiq.py',
    'spdfq': 'configs/_base_/methods/spdfq.py',
}

#: The settings each iteration reads, with the defaults of the method's
#: paper / this suite's synthesizer, used when neither the config fragment
#: nor the built synthesizer has them.
_PSE = dict(entropy_weight=1.0, bandwidth=0.01, num_points=10,
            max_samples=None, diagonal=True, grid='batch',
            drop_first_token=False, kde_chunk='auto')
_TV = dict(tv_weight=0.05, tau_range=(2500., 3000.), tau_ref_pixels=None)
#: The memory options of the synthesis loop: recorded, not applied (the
#: iteration here is the whole batch in one forward, no checkpointing:
#: their defaults).
_MEMORY = dict(micro_batch_size=None, with_cp=False)
SETTINGS = {
    'psaq_vit': dict(lr=0.25, betas=(0.5, 0.9), jitter=15,
                     jitter_shift='shared', flip=True, tau_per='run',
                     tv_on='augmented', **_PSE, **_TV, **_MEMORY),
    'psaq_vit_v2': dict(sample_lr=0.05, sample_betas=(0.5, 0.9),
                        sample_augment=False, balance='grad_norm',
                        sample_shares=dict(entropy=1.0, discrepancy=1.0,
                                           tv=1.0),
                        disc_weight=1.0, measure='mse', tau=1.0,
                        include_neck=False, jitter=15, jitter_shift='shared',
                        **_MEMORY,
                        flip=True,
                        components=dict(entropy=True, discrepancy=True,
                                        tv=True),
                        **_PSE, **_TV),
    'mimiq': dict(lr=0.1, betas=(0.9, 0.999), weight_decay=1e-6,
                  jitter=8, flip=True, noise_std=0.1, color_jitter=0.1,
                  head_sim_weight=1.0, ce_weight=1.0, tv_weight=2.5e-5,
                  tv_ref_pixels=16 * 224 * 224, tv_tau_range=None,
                  num_classes=100, logit_scale=1.0, ssim_c1=0.01**2,
                  ssim_c2=0.03**2, head_pairs='all', seed=0,
                  components=dict(head_similarity=True, pseudo_label=True,
                                  tv=True), **_MEMORY),
    'spdfq': dict(lr=0.25, betas=(0.5, 0.9), jitter=15,
                  jitter_shift='independent', flip=True, tau_per='iteration',
                  apa_weight=1.0, num_components=5,
                  prior_sigma_range=(0.1, 0.3), num_patches=4,
                  msr_grid=(2, 2), msr_split_jitter=0.15, crop_size=None,
                  msr_count='random', apa_heads='sum', num_classes=1000,
                  logit_scale=1.0, soft_range=(5.0, 10.0),
                  label_weight=1.0, seed=0,
                  components=dict(apa=True, msr=True, soft_label=True,
                                  tv=True), **_TV, **_MEMORY),
}


def _plain(value):
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


#: Methods whose measured iteration belongs to their adapter.
ADAPTER_METHODS = ('psaq_vit_v2', )


def _build_fragments(fragments, primary='dfq_synthesizer'):
    """The objects the method's fragments build (its synthesizer and, where
    the fragment has one, its adapter), for their defaults; the one of
    ``primary`` last."""
    from .. import registry
    built = []
    order = [('dfq_synthesizer', 'MODELS'), ('dfq_adapter', 'ADAPTERS')]
    order.sort(key=lambda kr: kr[0] == primary)
    for key, reg in order:
        frag = fragments.get(key)
        if not isinstance(frag, dict) or getattr(registry, reg,
                                                 None) is None:
            continue
        try:
            built.append(registry.build(getattr(registry, reg),
                                        dict(frag, progress=False)))
        except Exception:  # noqa: BLE001  (the fragments still give some)
            try:
                built.append(registry.build(getattr(registry, reg), frag))
            except Exception:  # noqa: BLE001
                pass
    return built


def method_settings(method: str) -> Dict:
    """The settings of ``method``'s iteration: what the method's config
    fragment (``configs/_base_/methods/<method>.py``: its
    ``dfq_synthesizer`` and, where it has one, ``dfq_adapter``) sets, else
    the defaults of what those fragments build (the synthesizer, the
    adapter), else :data:`SETTINGS`'s.  Returns a JSON-able dict with
    ``source``: where each setting came from."""
    import os.path as osp

    from mmengine.config import Config
    cfg = Config.fromfile(osp.join(REPO, METHOD_CONFIGS[method]))
    fragments = {k: v for k, v in cfg.to_dict().items()
                 if k.startswith('dfq_') and isinstance(v, dict)}
    # the fragment that owns the iteration wins over the other one (the
    # sample step of PSAQ-ViT V2 is its adapter's; the others synthesize)
    primary = 'dfq_adapter' if method in ADAPTER_METHODS else \
        'dfq_synthesizer'
    fragments = dict(sorted(fragments.items(),
                            key=lambda kv: kv[0] == primary))
    built = _build_fragments(fragments, primary)
    out, source = {}, {}
    for key, default in SETTINGS[method].items():
        value, where = default, 'default'
        for obj in built:
            if key == 'jitter' and hasattr(obj, 'jitters'):
                value, where = obj.jitters[0], type(obj).__name__
            elif hasattr(obj, key):
                value, where = getattr(obj, key), type(obj).__name__
        for name, frag in fragments.items():
            if key in frag:
                value, where = frag[key], name
        if key == 'jitter' and isinstance(value, (tuple, list)):
            value = value[0]  # the maximal roll of the first round / half
        if key == 'components':  # missing switches stay on
            value = dict(default, **{k: bool(v) for k, v in
                                     dict(value or {}).items()
                                     if k in default})
        if key == 'sample_shares':
            value = dict(default, **dict(value or {}))
        out[key] = value
        source[key] = where
    if out.get('tau_ref_pixels', 0) is None:
        from ..synth.losses import TAU_REF_PIXELS
        out['tau_ref_pixels'] = TAU_REF_PIXELS
    out = _plain(out)
    out['source'] = source
    return out


# --------------------------------------------------------------- helpers
def _leaves(tensors):
    return [t.detach().requires_grad_(True) for t in tensors]


def _grads(loss, leaves):
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [torch.zeros_like(leaf) if g is None else g
            for leaf, g in zip(leaves, grads)]


class _Backward:
    """Gradients collected at the detached tensors, pushed to the pixels
    in one ``torch.autograd.backward``."""

    def __init__(self):
        self.roots, self.grads = [], []

    def add(self, tensors, grads):
        for t, g in zip(tensors, grads):
            if t.requires_grad:
                self.roots.append(t)
                self.grads.append(g)

    def run(self):
        if self.roots:
            torch.autograd.backward(self.roots, self.grads)
        self.roots, self.grads = [], []


def _as_list(feats):
    return [feats] if isinstance(feats, torch.Tensor) else list(feats)


class Iteration:
    """Base: the pixels, the settings and the clamp.

    Args:
        parts: dict with ``backbone`` (frozen, eval), ``mean`` / ``std``
            (``(3, 1, 1)`` on the device) and, for PSAQ-ViT V2,
            ``student`` (the fake-quantized backbone).
        settings: :func:`method_settings`.
        batch, hw: the synthetic batch.
        seed: seeds the starting pixels and the method's random draws
            made once per batch (targets, priors, the TV target).
    """

    TERMS = ()

    def __init__(self, parts, settings, batch, hw, device, seed=0):
        from ..synth.base import clamp_to_range
        self.backbone = parts['backbone']
        self.mean = parts['mean'].to(device)
        self.std = parts['std'].to(device)
        self.s = settings
        self.n, self.hw, self.device = int(batch), tuple(hw), device
        g = torch.Generator().manual_seed(seed)
        x = torch.randn((self.n, 3) + self.hw, generator=g).to(device)
        self.x = clamp_to_range(x, self.mean, self.std).requires_grad_(True)
        self.terms = list(self.TERMS)
        self.setup(parts, g)

    def setup(self, parts, g):
        pass

    def clamp(self):
        from ..synth.base import clamp_to_range
        with torch.no_grad():
            self.x.copy_(clamp_to_range(self.x, self.mean, self.std))

    def step(self):
        self.opt.step()
        self.clamp()

    def close(self):
        rec = getattr(self, 'rec', None)
        if rec is not None:
            rec.remove()


# ---------------------------------------------------------------- PSAQ-ViT
class PSAQIteration(Iteration):
    """PSAQ-ViT (V1): ``AttnOutputRecorder``, ``psaq_entropy_loss`` (exact
    PSE) + ``tv_prior_loss`` (on the jittered batch by default), one
    backward, Adam."""

    TERMS = (('forward', 'forward'), ('pse', 'loss'), ('tv', 'loss'),
             ('backward', 'backward'), ('step', 'step'))

    def setup(self, parts, g):
        from ..synth import AttnOutputRecorder
        from ..synth.base import draw_tau
        s = self.s
        self.rec = AttnOutputRecorder(self.backbone)
        self.opt = torch.optim.Adam([self.x], lr=s['lr'],
                                    betas=tuple(s['betas']))
        self.tau = draw_tau(tuple(s['tau_range']), g) \
            if s['tau_per'] == 'run' else None

    def augment(self, x, gen):
        from ..synth.base import roll_flip
        return roll_flip(x, gen, int(self.s['jitter']), self.s['flip'],
                         self.s['jitter_shift'])

    def pse(self, records, gen, weighted=True):
        from ..synth import psaq_entropy_loss
        s = self.s
        return (s['entropy_weight'] if weighted else 1.) * psaq_entropy_loss(
            records, bandwidth=s['bandwidth'], num_points=s['num_points'],
            max_samples=s['max_samples'], generator=gen,
            diagonal=s['diagonal'], grid=s['grid'],
            drop_first_token=s['drop_first_token'], chunk=s['kde_chunk'])

    def tv(self, x, gen, tau=None):
        from ..synth import tv_prior_loss
        s = self.s
        return tv_prior_loss(x, weight=s['tv_weight'],
                             tau_range=tuple(s['tau_range']),
                             ref_pixels=s['tau_ref_pixels'], generator=gen,
                             tau=tau)

    def plain(self, gen):
        self.opt.zero_grad(set_to_none=True)
        x_aug = self.augment(self.x, gen)
        self.rec.clear()
        self.backbone(x_aug)
        loss_ent = self.pse(self.rec.records, gen)
        self.rec.clear()
        tv_in = x_aug if self.s['tv_on'] == 'augmented' else self.x
        loss = loss_ent + self.tv(tv_in, gen, self.tau)
        loss.backward()
        self.step()

    def split(self, gen, clock):
        clock.start()
        self.opt.zero_grad(set_to_none=True)
        x_aug = self.augment(self.x, gen)
        self.rec.clear()
        self.backbone(x_aug)
        records = self.rec.records
        self.rec.clear()
        clock.mark('forward')
        back = _Backward()
        feats = [r['feat'] for r in records]
        leaves = _leaves(feats)
        loss = self.pse([dict(r, feat=f) for r, f in zip(records, leaves)],
                        gen)
        back.add(feats, _grads(loss, leaves))
        clock.mark('pse')
        tv_in = x_aug if self.s['tv_on'] == 'augmented' else self.x
        leaf, = _leaves([tv_in])
        back.add([tv_in], _grads(self.tv(leaf, gen, self.tau), [leaf]))
        clock.mark('tv')
        back.run()
        clock.mark('backward')
        self.step()
        clock.mark('step')


# ------------------------------------------------------------------- MimiQ
class MimiQIteration(Iteration):
    """MimiQ: roll / flip / colour jitter / noise, ``AttnLogitsRecorder``,
    ``inter_head_similarity_loss`` + cross-entropy of the random projection
    head to random labels + TV (of the un-jittered pixels), one backward,
    AdamW."""

    TERMS = (('forward', 'forward'), ('head_similarity', 'loss'),
             ('pseudo_label', 'loss'), ('tv', 'loss'),
             ('backward', 'backward'), ('step', 'step'))

    def setup(self, parts, g):
        from ..synth import AttnLogitsRecorder
        from ..synth.feature_targets import (RandomProjectionHead,
                                             random_hard_targets)
        s, comp = self.s, self.s['components']
        self.terms = [t for t in self.TERMS if comp.get(t[0], True)]
        self.rec = AttnLogitsRecorder(self.backbone) \
            if comp['head_similarity'] else None
        self.head = RandomProjectionHead(num_classes=s['num_classes'],
                                         logit_scale=s['logit_scale'],
                                         seed=s['seed'])
        self.targets = random_hard_targets(self.n, s['num_classes'],
                                           g).to(self.device)
        self.noise_gen = None
        if s['noise_std'] > 0:
            self.noise_gen = torch.Generator(
                device=self.device).manual_seed(
                    int(torch.randint(2**62, (), generator=g)))
        self.opt = torch.optim.AdamW([self.x], lr=s['lr'],
                                     betas=tuple(s['betas']),
                                     weight_decay=s['weight_decay'])

    def augment(self, x, gen):
        from ..synth.base import roll_flip
        s = self.s
        x = roll_flip(x, gen, int(s['jitter']), s['flip'])
        n = x.shape[0]
        if s['color_jitter'] > 0:
            c = s['color_jitter']
            gain = 1 + c * (2 * torch.rand((n, 3, 1, 1), generator=gen) - 1)
            off = c * (2 * torch.rand((n, 3, 1, 1), generator=gen) - 1)
            x = x * gain.to(x) + off.to(x)
        if s['noise_std'] > 0:
            noise = torch.randn(x.shape, generator=self.noise_gen,
                                device=x.device, dtype=x.dtype)
            x = x + s['noise_std'] * noise
        return x

    def head_similarity(self, records):
        from ..synth import inter_head_similarity_loss
        s = self.s
        return s['head_sim_weight'] * inter_head_similarity_loss(
            records, c1=s['ssim_c1'], c2=s['ssim_c2'],
            pairs=s['head_pairs'])

    def pseudo_label(self, feats):
        return self.s['ce_weight'] * F.cross_entropy(
            self.head(tuple(feats)), self.targets)

    def tv(self, x, gen):
        from ..synth import tv_prior_loss
        s = self.s
        if s['tv_tau_range'] is not None:
            return tv_prior_loss(x, weight=s['tv_weight'],
                                 tau_range=tuple(s['tv_tau_range']),
                                 ref_pixels=s['tv_ref_pixels'],
                                 generator=gen)
        B, _, H, W = x.shape
        w = s['tv_weight'] * math.sqrt(s['tv_ref_pixels'] / float(B * H * W))
        return tv_prior_loss(x, weight=w, tau=0.)

    def plain(self, gen):
        comp = self.s['components']
        self.opt.zero_grad(set_to_none=True)
        x_aug = self.augment(self.x, gen)
        if self.rec is not None:
            self.rec.clear()
        feats = _as_list(self.backbone(x_aug))
        loss = torch.zeros((), device=self.device)
        if self.rec is not None:
            loss = loss + self.head_similarity(self.rec.records)
            self.rec.clear()
        if comp['pseudo_label']:
            loss = loss + self.pseudo_label(feats)
        del feats
        if comp['tv']:
            loss = loss + self.tv(self.x, gen)
        loss.backward()
        self.step()

    def split(self, gen, clock):
        comp = self.s['components']
        clock.start()
        self.opt.zero_grad(set_to_none=True)
        x_aug = self.augment(self.x, gen)
        if self.rec is not None:
            self.rec.clear()
        feats = _as_list(self.backbone(x_aug))
        records = self.rec.records if self.rec is not None else []
        if self.rec is not None:
            self.rec.clear()
        clock.mark('forward')
        back = _Backward()
        if self.rec is not None:
            logits = [r['logits'] for r in records]
            leaves = _leaves(logits)
            loss = self.head_similarity(
                [dict(r, logits=lg) for r, lg in zip(records, leaves)])
            back.add(logits, _grads(loss, leaves))
            clock.mark('head_similarity')
        if comp['pseudo_label']:
            leaves = _leaves(feats)
            back.add(feats, _grads(self.pseudo_label(leaves), leaves))
            clock.mark('pseudo_label')
        if comp['tv']:
            leaf, = _leaves([self.x])
            back.add([self.x], _grads(self.tv(leaf, gen), [leaf]))
            clock.mark('tv')
        back.run()
        clock.mark('backward')
        self.step()
        clock.mark('step')


# ------------------------------------------------------------------- SPDFQ
class SPDFQIteration(Iteration):
    """SPDFQ: ``AttnProbRecorder``, ``attention_prior_alignment_loss`` +
    soft-label cross-entropy of the images (backward), the multi-semantic
    crops (``msr_regions`` / ``crop_and_resize``, their own forward,
    soft-label cross-entropy, backward), the TV prior (backward), Adam."""

    TERMS = (('forward', 'forward'), ('apa', 'loss'),
             ('soft_label', 'loss'), ('backward', 'backward'),
             ('msr_crop_forward', 'forward'),
             ('msr_crop_backward', 'backward'), ('tv', 'loss'),
             ('step', 'step'))

    def setup(self, parts, g):
        from ..synth import AttnProbRecorder, gaussian_mixture_prior, \
            msr_regions
        from ..synth.base import draw_tau
        from ..synth.feature_targets import RandomProjectionHead
        s, comp = self.s, self.s['components']
        self.use_labels = s['label_weight'] != 0
        self.msr_on = comp['msr'] and self.use_labels
        keep = {'forward': comp['apa'] or self.use_labels,
                'apa': comp['apa'], 'soft_label': self.use_labels,
                'backward': comp['apa'] or self.use_labels,
                'msr_crop_forward': self.msr_on,
                'msr_crop_backward': self.msr_on, 'tv': comp['tv']}
        self.terms = [t for t in self.TERMS if keep.get(t[0], True)]
        self.rec = AttnProbRecorder(self.backbone)
        self.priors = None
        if comp['apa']:
            self.priors = [
                gaussian_mixture_prior(heads, (ws, ws), s['num_components'],
                                       g, tuple(s['prior_sigma_range'])
                                       ).to(self.device)
                for heads, ws in self.rec.block_specs()]
        else:
            self.rec.remove()
            self.rec = None
        self.head = RandomProjectionHead(num_classes=s['num_classes'],
                                         logit_scale=s['logit_scale'],
                                         seed=s['seed'])
        self.img_targets = self.targets(self.n, g)
        self.boxes = self.crop_targets = self.cell_targets = None
        grid = tuple(s['msr_grid'])
        if comp['msr'] and s['msr_count'] == 'fixed':
            self.boxes = msr_regions(self.n, self.hw, s['num_patches'], g,
                                     grid, s['msr_split_jitter'])
            self.crop_targets = self.targets(self.boxes.shape[0], g)
        elif comp['msr']:
            self.cell_targets = self.targets(self.n * grid[0] * grid[1], g)
        cs = s['crop_size']
        self.crop_size = cs if cs is None or cs == NATIVE else (
            (cs, ) * 2 if isinstance(cs, int) else tuple(cs))
        self.tau = draw_tau(tuple(s['tau_range']), g) \
            if s['tau_per'] == 'run' else None
        self.opt = torch.optim.Adam([self.x], lr=s['lr'],
                                    betas=tuple(s['betas']))

    def targets(self, n, g):
        from ..synth.feature_targets import (random_hard_targets,
                                             random_soft_targets)
        s = self.s
        if s['components']['soft_label']:
            lo, hi = s['soft_range']
            t = random_soft_targets(n, s['num_classes'], g, lo, hi)
        else:
            t = F.one_hot(random_hard_targets(n, s['num_classes'], g),
                          s['num_classes']).float()
        return t.to(self.device)

    def regions(self, gen):
        from ..synth import msr_regions
        s = self.s
        if s['msr_count'] == 'fixed':
            return self.boxes, self.crop_targets
        grid = tuple(s['msr_grid'])
        boxes, cells = msr_regions(self.n, self.hw, s['num_patches'], gen,
                                   grid, s['msr_split_jitter'],
                                   count='random', return_cells=True)
        index = (boxes[:, 0] * grid[0] * grid[1] + cells).to(self.device)
        return boxes, self.cell_targets[index]

    def augment(self, x, gen):
        from ..synth.base import roll_flip
        return roll_flip(x, gen, int(self.s['jitter']), self.s['flip'],
                         self.s['jitter_shift'])

    def label_loss(self, feats, targets):
        from ..synth.feature_targets import soft_cross_entropy
        return self.s['label_weight'] * soft_cross_entropy(
            self.head(list(feats)), targets)

    def apa(self, records):
        from ..synth import attention_prior_alignment_loss
        return self.s['apa_weight'] * attention_prior_alignment_loss(
            records, self.priors, heads=self.s['apa_heads'])

    def tv(self, x, gen):
        from ..synth import tv_prior_loss
        s = self.s
        return tv_prior_loss(x, weight=s['tv_weight'],
                             tau_range=tuple(s['tau_range']),
                             ref_pixels=s['tau_ref_pixels'], generator=gen,
                             tau=self.tau)

    def crop_inputs(self, gen):
        """This iteration's MSR crops as ``[(crops, targets)]``: one group
        resized to ``crop_size`` (None: the input size, the paper's), or
        with ``crop_size='native'`` the crops at their own pixel size, one
        group per size (``native_crops``), every group given the same roll
        / flip draws, as the synthesizer forwards them."""
        from ..synth import crop_and_resize
        boxes, targets = self.regions(gen)
        if self.crop_size != NATIVE:
            crops = crop_and_resize(self.x, boxes, self.crop_size)
            return [(self.augment(crops, gen), targets)]
        from ..synth.spdfq import native_crops
        groups, order = native_crops(self.x, boxes)
        targets = targets[torch.as_tensor(order, device=targets.device)]
        start = gen.get_state()
        out, first = [], 0
        for crops in groups:
            gen.set_state(start)
            out.append((self.augment(crops, gen),
                        targets[first:first + crops.shape[0]]))
            first += crops.shape[0]
        return out

    def crop_forward(self, crops):
        if self.rec is not None:
            self.rec.enabled = False
        try:
            return _as_list(self.backbone(crops))
        finally:
            if self.rec is not None:
                self.rec.enabled = True

    def crop_loss(self, feats, targets, start, total):
        """The soft CE of one group of crops: its share of the mean over
        all ``total`` crops of the iteration."""
        from ..synth.feature_targets import soft_cross_entropy
        if start == 0 and targets.shape[0] == total:
            return self.label_loss(feats, targets)
        try:  # the head's micro-batch form (same numbers as in the batch)
            logits = self.head(list(feats), start, total)
        except TypeError:
            logits = self.head(list(feats))
        return self.s['label_weight'] * soft_cross_entropy(
            logits, targets) * targets.shape[0] / total

    def plain(self, gen):
        comp = self.s['components']
        self.opt.zero_grad(set_to_none=True)
        if comp['apa'] or self.use_labels:
            x_aug = self.augment(self.x, gen)
            if self.rec is not None:
                self.rec.clear()
            feats = _as_list(self.backbone(x_aug))
            loss1 = torch.zeros((), device=self.device)
            if self.use_labels:
                loss1 = loss1 + self.label_loss(feats, self.img_targets)
            if comp['apa']:
                loss1 = loss1 + self.apa(self.rec.records)
                self.rec.clear()
            if loss1.requires_grad:
                loss1.backward()
            del feats
        if self.msr_on:
            groups = self.crop_inputs(gen)
            total = sum(int(t.shape[0]) for _, t in groups)
            start = 0
            for crops, targets in groups:
                feats = self.crop_forward(crops)
                self.crop_loss(feats, targets, start, total).backward()
                start += targets.shape[0]
                del feats
        if comp['tv']:
            self.tv(self.x, gen).backward()
        if self.x.grad is not None:
            self.opt.step()
        self.clamp()

    def split(self, gen, clock):
        comp = self.s['components']
        clock.start()
        self.opt.zero_grad(set_to_none=True)
        back = _Backward()
        if comp['apa'] or self.use_labels:
            x_aug = self.augment(self.x, gen)
            if self.rec is not None:
                self.rec.clear()
            feats = _as_list(self.backbone(x_aug))
            records = self.rec.records if self.rec is not None else []
            if self.rec is not None:
                self.rec.clear()
            clock.mark('forward')
            if comp['apa']:
                probs = [r['probs'] for r in records]
                leaves = _leaves(probs)
                loss = self.apa([dict(r, probs=p)
                                 for r, p in zip(records, leaves)])
                back.add(probs, _grads(loss, leaves))
                clock.mark('apa')
            if self.use_labels:
                leaves = _leaves(feats)
                back.add(feats, _grads(
                    self.label_loss(leaves, self.img_targets), leaves))
                clock.mark('soft_label')
            back.run()
            del feats, records
            clock.mark('backward')
        if self.msr_on:
            groups = self.crop_inputs(gen)
            total = sum(int(t.shape[0]) for _, t in groups)
            start = 0
            for crops, targets in groups:
                feats = self.crop_forward(crops)
                clock.mark('msr_crop_forward')
                leaves = _leaves(feats)
                back.add(feats, _grads(
                    self.crop_loss(leaves, targets, start, total), leaves))
                clock.mark('soft_label')
                back.run()
                start += targets.shape[0]
                del feats, leaves
                clock.mark('msr_crop_backward')
        if comp['tv']:
            leaf, = _leaves([self.x])
            back.add([self.x], _grads(self.tv(leaf, gen), [leaf]))
            back.run()
            clock.mark('tv')
        if self.x.grad is not None:
            self.opt.step()
        self.clamp()
        clock.mark('step')


# ------------------------------------------------- PSAQ-ViT V2 sample step
class PSAQV2SampleIteration(PSAQIteration):
    """One iteration of PSAQ-ViT V2's sample step: the FP teacher under an
    ``AttnOutputRecorder`` (``psaq_entropy_loss``), the fake-quantized
    student, ``-feature_discrepancy`` of their backbone outputs, the TV
    prior of the pixels; with ``balance='grad_norm'`` one pixel gradient per
    term, each rescaled per image to a common norm and weighted by its
    share; Adam."""

    TERMS = (('forward', 'forward'), ('student_forward', 'forward'),
             ('entropy', 'loss'), ('discrepancy', 'loss'), ('tv', 'loss'),
             ('backward', 'backward'), ('step', 'step'))
    ORDER = ('entropy', 'discrepancy', 'tv')

    def setup(self, parts, g):
        from ..synth import AttnOutputRecorder
        s, comp = self.s, self.s['components']
        self.student = parts['student']
        self.terms = [t for t in self.TERMS if comp.get(t[0], True)
                      and (t[0] != 'student_forward' or comp['discrepancy'])
                      and (t[0] != 'forward' or comp['entropy'] or
                           comp['discrepancy'])]
        self.rec = AttnOutputRecorder(self.backbone) \
            if comp['entropy'] else None
        self.opt = torch.optim.Adam([self.x], lr=s['sample_lr'],
                                    betas=tuple(s['sample_betas']))
        active = [k for k in self.ORDER if comp[k]]
        total = sum(s['sample_shares'].get(k, 1.0) for k in active)
        self.shares = {k: s['sample_shares'].get(k, 1.0) / total
                       for k in active}

    def discrepancy(self, t_feats, s_feats):
        try:  # the teacher-student losses live with the adapters
            from ..adapt.losses import feature_discrepancy
        except ImportError:  # the layout before dfq_dense.adapt
            from ..synth import feature_discrepancy
        # measure None (the fragment's): the adapter's choice on the dense
        # models' feature maps, 'mse' (adapt.student_step.resolve_outputs)
        return -feature_discrepancy(t_feats, s_feats,
                                    self.s['measure'] or 'mse',
                                    self.s['tau'])

    def combine(self, grads: Dict[str, torch.Tensor]) -> torch.Tensor:
        """``sum_k share_k * g_k / ||g_k|| * sqrt(numel(x[0]))`` per image
        (the ``'grad_norm'`` balance)."""
        out = torch.zeros_like(self.x)
        scale = math.sqrt(self.x[0].numel())
        for k, g in grads.items():
            if g is None:
                continue
            nrm = g.flatten(1).norm(dim=1)
            unit = g / nrm.clamp_min(1e-30).view(-1, *([1] * (g.dim() - 1)))
            out.add_(unit, alpha=self.shares[k] * scale)
        return out

    def _inputs(self, gen):
        return self.augment(self.x, gen) if self.s['sample_augment'] \
            else self.x

    def plain(self, gen):
        s, comp = self.s, self.s['components']
        self.opt.zero_grad(set_to_none=True)
        x_in = self._inputs(gen)
        terms = {}
        t_feats = None
        if comp['entropy'] or comp['discrepancy']:
            if self.rec is not None:
                self.rec.clear()
            t_feats = _as_list(self.backbone(x_in))
        if comp['entropy']:
            terms['entropy'] = self.pse(self.rec.records, gen,
                                        weighted=False)
            self.rec.clear()
        if comp['discrepancy']:
            terms['discrepancy'] = self.discrepancy(
                t_feats, _as_list(self.student(x_in)))
        del t_feats
        if comp['tv']:
            terms['tv'] = self.tv(self.x, gen)
        if s['balance'] == 'grad_norm':
            names = [k for k in self.ORDER if k in terms]
            grads = {}
            for i, k in enumerate(names):
                grads[k], = torch.autograd.grad(
                    terms[k], self.x, retain_graph=i < len(names) - 1,
                    allow_unused=True)
            self.x.grad = self.combine(grads)
        else:
            total = s['entropy_weight'] * terms.get('entropy', 0.) + \
                s['disc_weight'] * terms.get('discrepancy', 0.) + \
                terms.get('tv', 0.)
            total.backward()
        self.step()

    def split(self, gen, clock):
        s, comp = self.s, self.s['components']
        grad_norm = s['balance'] == 'grad_norm'
        clock.start()
        self.opt.zero_grad(set_to_none=True)
        x_in = self._inputs(gen)
        records, t_feats, s_feats = [], [], []
        if comp['entropy'] or comp['discrepancy']:
            if self.rec is not None:
                self.rec.clear()
            t_feats = _as_list(self.backbone(x_in))
            if self.rec is not None:
                records = self.rec.records
                self.rec.clear()
            clock.mark('forward')
        if comp['discrepancy']:
            s_feats = _as_list(self.student(x_in))
            clock.mark('student_forward')
        roots: Dict[str, List] = {}
        if comp['entropy']:
            feats = [r['feat'] for r in records]
            leaves = _leaves(feats)
            loss = self.pse([dict(r, feat=f) for r, f in
                             zip(records, leaves)], gen,
                            weighted=not grad_norm)
            roots['entropy'] = (feats, _grads(loss, leaves))
            clock.mark('entropy')
        if comp['discrepancy']:
            t_leaves, s_leaves = _leaves(t_feats), _leaves(s_feats)
            loss = self.discrepancy(t_leaves, s_leaves)
            if not grad_norm:
                loss = s['disc_weight'] * loss
            roots['discrepancy'] = (t_feats + s_feats,
                                    _grads(loss, t_leaves + s_leaves))
            clock.mark('discrepancy')
        if comp['tv']:
            leaf, = _leaves([self.x])
            roots['tv'] = ([self.x], _grads(self.tv(leaf, gen), [leaf]))
            clock.mark('tv')
        if grad_norm:
            grads = {}
            names = [k for k in self.ORDER if k in roots]
            for i, k in enumerate(names):
                tensors, gs = roots[k]
                if k == 'tv':
                    grads[k] = gs[0]
                    continue
                keep = [(t, g) for t, g in zip(tensors, gs)
                        if t.requires_grad]
                grads[k], = torch.autograd.grad(
                    [t for t, _ in keep], self.x, [g for _, g in keep],
                    retain_graph=any(n != 'tv' for n in names[i + 1:]),
                    allow_unused=True)
            self.x.grad = self.combine(grads)
        else:
            back = _Backward()
            for tensors, gs in roots.values():
                back.add(tensors, gs)
            back.run()
        clock.mark('backward')
        self.step()
        clock.mark('step')


#: SPDFQ's ``crop_size`` that keeps every crop at its own pixel size.
NATIVE = 'native'

ITERATIONS = {
    'psaq_vit': PSAQIteration,
    'psaq_vit_v2': PSAQV2SampleIteration,
    'mimiq': MimiQIteration,
    'spdfq': SPDFQIteration,
}


# ------------------------------------------------------------------ model
def build_parts(config, seed, device, student=False):
    """The backbone of ``config``'s model (built with
    ``engine.model_checks.build_model`` as the DFQ loop builds it, random
    weights from ``seed``), frozen and in eval mode on ``device``, the
    normalisation of its data preprocessor and, with ``student``, a
    fake-quantized copy of the backbone (the config's ``dfq.quantizer``,
    calibrated on one random 224x224 image: its cost does not depend on
    the calibration data).  The rest of the model is dropped."""
    from ..engine import model_checks
    from ..synth import get_mean_std
    from .common import load_config
    cfg = load_config(config)
    torch.manual_seed(seed)
    model = model_checks.build_model(cfg)
    mean, std = get_mean_std(model)
    backbone = model.backbone
    del model
    _freeze(backbone)
    backbone.to(device)
    parts = dict(backbone=backbone, mean=mean.to(device),
                 std=std.to(device))
    if student:
        parts['student'] = make_student(backbone, cfg.dfq.quantizer,
                                        device, seed)
    return parts


def _freeze(module):
    for m in module.modules():
        m.training = False  # mmdet's SwinTransformer.train() returns None
        if isinstance(getattr(m, 'with_cp', None), bool):
            m.with_cp = False
    for p in module.parameters():
        p.requires_grad_(False)


def make_student(backbone, quantizer, device, seed=0):
    """A fake-quantized, calibrated copy of ``backbone``."""
    from ..engine.dfq_loop import quantize_for_dfq
    from ..quant import enable_calibration, finish_calibration
    from ..quant.observers import calibration_step
    holder = torch.nn.Module()
    holder.backbone = copy.deepcopy(backbone)
    q = dict(quantizer)
    q['scope'] = 'backbone'  # the sample step runs the backbone only
    quantize_for_dfq(holder, q)
    holder.to(device)
    enable_calibration(holder)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad(), calibration_step(0):
        holder.backbone(torch.randn((1, 3, 224, 224), generator=g).to(device))
    finish_calibration(holder, reparam=q.get('reparam', False))
    student = holder.backbone
    _freeze(student)
    return student
