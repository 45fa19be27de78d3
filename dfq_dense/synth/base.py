"""Base class, shared pieces and I/O helpers of the data-free image
synthesizers.

Synthesizers work in the *normalised* pixel space of the model's
``data_preprocessor`` (``(x - mean) / std``, RGB channel order: mmdet's
DetDataPreprocessor and mmseg's SegDataPreProcessor apply ``bgr_to_rgb``
before normalising, and their ``mean``/``std`` are given in RGB order), i.e.
the space of the tensors the backbone receives.  ``generate`` returns a float
tensor ``(N, 3, H, W)`` in that space.
"""
import contextlib
import hashlib
import math
import os
import os.path as osp
from typing import (Callable, Dict, Iterable, List, Optional, Sequence,
                    Tuple, Union)

import torch
from mmengine.logging import MessageHub, print_log
from torch import nn

from .losses import tv_prior_loss

SYNTH_FILE = 'synthetic_images.pth'
GRID_FILE = 'synthetic_grid.png'


# --------------------------------------------------------------------------
# normalisation helpers
# --------------------------------------------------------------------------
def get_mean_std(model: Optional[nn.Module] = None,
                 data_preprocessor_cfg: Optional[dict] = None
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(mean, std)`` of shape ``(3, 1, 1)`` (float32, CPU).

    Taken from ``model.data_preprocessor.mean/std`` when present, else from
    ``data_preprocessor_cfg['mean'/'std']``; identity (0, 1) when the
    preprocessor does not normalise.
    """
    dp = getattr(model, 'data_preprocessor', None) if model is not None \
        else None
    mean = std = None
    if dp is not None and getattr(dp, '_enable_normalize', True) and \
            getattr(dp, 'mean', None) is not None:
        mean, std = dp.mean, dp.std
    elif data_preprocessor_cfg is not None and \
            data_preprocessor_cfg.get('mean') is not None:
        mean = torch.as_tensor(data_preprocessor_cfg['mean'])
        std = torch.as_tensor(data_preprocessor_cfg['std'])
    if mean is None:
        mean, std = torch.zeros(3), torch.ones(3)
    mean = torch.as_tensor(mean).detach().float().cpu().reshape(-1, 1, 1)
    std = torch.as_tensor(std).detach().float().cpu().reshape(-1, 1, 1)
    if mean.shape[0] == 1:
        mean, std = mean.expand(3, 1, 1).clone(), std.expand(3, 1, 1).clone()
    return mean, std


def valid_range(mean: torch.Tensor,
                std: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel bounds ``((0-mean)/std, (255-mean)/std)``, ``(3,1,1)``."""
    mean = torch.as_tensor(mean).float().reshape(-1, 1, 1)
    std = torch.as_tensor(std).float().reshape(-1, 1, 1)
    return (0. - mean) / std, (255. - mean) / std


def clamp_to_range(x: torch.Tensor, mean: torch.Tensor,
                   std: torch.Tensor) -> torch.Tensor:
    """Clamp a normalised ``(N, 3, H, W)`` tensor to the valid pixel range."""
    lo, hi = valid_range(mean, std)
    return torch.max(torch.min(x, hi.to(x)), lo.to(x))


def denormalize(x: torch.Tensor, mean: torch.Tensor,
                std: torch.Tensor) -> torch.Tensor:
    """Normalised ``(N, 3, H, W)`` -> uint8 RGB ``(N, 3, H, W)`` in 0..255."""
    mean = torch.as_tensor(mean).float().reshape(1, -1, 1, 1).to(x.device)
    std = torch.as_tensor(std).float().reshape(1, -1, 1, 1).to(x.device)
    img = x.detach().float() * std + mean
    return img.round().clamp(0, 255).to(torch.uint8)


def save_images(x: torch.Tensor,
                mean: torch.Tensor,
                std: torch.Tensor,
                out_dir: str,
                meta: Optional[dict] = None,
                nrow: int = 8) -> str:
    """Write ``synthetic_images.pth`` and ``synthetic_grid.png``.

    The ``.pth`` holds ``{'images': normalised float tensor (CPU), 'mean',
    'std', 'meta'}``; the PNG is a de-normalised grid (RGB -> BGR, encoded
    with cv2).  Both are written atomically (a temporary sibling renamed
    into place), so a killed run or a full disk never leaves a truncated
    file; a PNG that cannot be encoded raises instead of being skipped.
    Returns the path of the ``.pth``.
    """
    import cv2
    from torchvision.utils import make_grid

    from ..utils.fileio import atomic_path, torch_save_atomic
    os.makedirs(out_dir, exist_ok=True)
    meta = dict(meta or {})
    meta.setdefault('channel_order', 'rgb')
    meta.setdefault('space', 'normalised')
    path = osp.join(out_dir, SYNTH_FILE)
    rgb = denormalize(x.detach().cpu(), mean, std)
    grid = make_grid(rgb, nrow=min(nrow, max(1, rgb.shape[0])), padding=2)
    grid = grid.permute(1, 2, 0).contiguous().numpy()  # H, W, RGB
    ok, png = cv2.imencode('.png', grid[:, :, ::-1].copy())
    if not ok:
        raise OSError(f'could not encode {osp.join(out_dir, GRID_FILE)}')
    torch_save_atomic(
        dict(images=x.detach().cpu().float(),
             mean=torch.as_tensor(mean).float().reshape(-1, 1, 1).cpu(),
             std=torch.as_tensor(std).float().reshape(-1, 1, 1).cpu(),
             meta=meta), path)
    with atomic_path(osp.join(out_dir, GRID_FILE), '.png') as tmp:
        with open(tmp, 'wb') as f:
            f.write(png.tobytes())
    return path


def load_images(out_dir: str) -> dict:
    """Read what :func:`save_images` wrote: dict(images, mean, std, meta).

    ``out_dir`` may be the folder or the ``.pth`` itself.
    """
    from ..utils.checkpoint import safe_torch_load
    path = out_dir if out_dir.endswith('.pth') else osp.join(
        out_dir, SYNTH_FILE)
    return safe_torch_load(path)


# --------------------------------------------------------------------------
# shared pieces of the synthesizers
# --------------------------------------------------------------------------
def parse_components(name: str, known: Sequence[str], components,
                     counted: Optional[Sequence[str]] = None
                     ) -> Dict[str, bool]:
    """On/off switches of a method's loss terms, ``{component: bool}``.

    Args:
        name: the method, prefix of the error messages.
        known: its components, in the order of the returned dict.
        components: None (all on); a dict ``{name: on}`` (missing names stay
            on); or a list / tuple / set of the names that are on (the
            others off).
        counted: the components of which at least one must be on (default
            all of ``known``).  When it leaves some out, those alone leave
            nothing to optimise, and the error says so.

    Raises:
        ValueError: ``unknown component 'x'; known components: a, b, ...``
            for a name not in ``known``; ``all components are switched off``
            when none of ``counted`` is on.
    """
    out = {k: True for k in known}
    if isinstance(components, (list, tuple, set)):
        # a list of names: exactly those are on
        out = {k: False for k in known}
        components = {k: True for k in components}
    for k, v in dict(components or {}).items():
        if k not in out:
            raise ValueError(
                f'{name}: unknown component {k!r}; known components: '
                f'{", ".join(known)}')
        out[k] = bool(v)
    counted = known if counted is None else counted
    if not any(out[k] for k in counted):
        why = '' if set(counted) == set(known) else '; nothing to optimise'
        raise ValueError(f'{name}: all components are switched off '
                         f'({", ".join(known)}){why}')
    return out


def warmup_cosine_lr(it: int, lr: float, warmup_iters: int,
                     iterations: int) -> float:
    """Learning rate of iteration ``it`` (0-based) of ``iterations``: linear
    warm-up to ``lr`` over ``warmup_iters`` iterations, then cosine decay
    to 0."""
    w, T = warmup_iters, iterations
    if it < w:
        return lr * (it + 1) / w
    if T <= w:
        return lr
    return lr * 0.5 * (1 + math.cos(math.pi * (it - w) / (T - w)))


JITTER_SHIFTS = ('shared', 'independent')


def roll_flip(x: torch.Tensor, generator: torch.Generator, jitter: int,
              flip: bool, shift: str = 'independent') -> torch.Tensor:
    """Random roll of ``(N, C, H, W)`` by up to ``jitter`` px, then a
    horizontal flip with p=0.5 (differentiable, nothing to undo).

    ``shift='independent'`` draws the vertical and the horizontal offset
    separately (DeepInversion's jitter); ``'shared'`` draws one offset
    ``off ~ U{-jitter..jitter}`` and rolls by ``(off, off)``, as the official
    PSAQ-ViT code does (``generate_data.py``: ``off = random.randint(-lim,
    lim)``, ``torch.roll(img, shifts=(off, off), dims=(2, 3))``).

    Draws from ``generator`` in this order: the shift(s) (two for
    ``'independent'``, one for ``'shared'``; only when ``jitter > 0``), then
    the flip (only when ``flip``); the synthesizers' images for a seed
    depend on this order.
    """
    if shift not in JITTER_SHIFTS:
        raise ValueError(f'shift must be one of {JITTER_SHIFTS}, got '
                         f'{shift!r}')
    if jitter > 0:
        if shift == 'shared':
            off = int(torch.randint(-jitter, jitter + 1, (1, ),
                                    generator=generator).item())
            dx = dy = off
        else:
            dx, dy = torch.randint(-jitter, jitter + 1, (2, ),
                                   generator=generator).tolist()
        x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    if flip and torch.rand((), generator=generator).item() < 0.5:
        x = torch.flip(x, dims=(3, ))
    return x


def draw_tau(tau_range: Tuple[float, float],
             generator: Optional[torch.Generator] = None) -> float:
    """One TV target ``tau ~ U(tau_range)`` (unscaled), drawn exactly as
    :func:`~dfq_dense.synth.losses.tv_prior_loss` draws it (one
    ``torch.rand`` from ``generator``)."""
    u = torch.rand((), generator=generator).item()
    return tau_range[0] + (tau_range[1] - tau_range[0]) * u


def batch_seed(seed: int, batch_idx: int) -> int:
    """Seed of the generator of batch ``batch_idx``.

    Every batch draws from its own CPU generator, so a batch's images depend
    only on the seed, the batch index and the settings: not on which
    batches were synthesized before it in this process.  That is what lets
    a synthesis be split across ranks and resumed after an interruption
    with bit-identical images.  Batch 0 uses ``seed`` itself (a one-batch
    run is unchanged by this scheme); batch ``b > 0`` uses the first 63
    bits of ``sha256("seed:b")``.
    """
    if batch_idx == 0:
        return int(seed)
    digest = hashlib.sha256(f'{int(seed)}:{int(batch_idx)}'.encode())
    return int.from_bytes(digest.digest()[:8], 'big') >> 1


TAU_PER = ('run', 'iteration')
TV_ON = ('augmented', 'raw')


def jitter_per_round(name: str, jitter) -> Tuple[int, ...]:
    """The maximal roll (pixels) of every round from ``jitter``: an int
    (one round's worth, repeated) or one per round; ValueError (prefixed
    with ``name``) unless they are integers >= 0."""
    values = [jitter] if isinstance(jitter, (int, float)) else list(jitter)
    if len(values) == 0 or any(int(v) != v or v < 0 for v in values):
        raise ValueError(f'{name}: jitter must be an integer >= 0 or one '
                         f'per round, got {jitter!r}')
    return tuple(int(v) for v in values)


def progress_bar(desc: str, total: int, enabled: bool = True):
    """A tqdm bar (mmengine's ProgressBar without tqdm) of ``total``
    steps, or None when not ``enabled``."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
        return tqdm(total=total, desc=desc, dynamic_ncols=True)
    except ImportError:  # pragma: no cover
        from mmengine.utils import ProgressBar
        return ProgressBar(total)


def bar_update(bar) -> None:
    """One step of a bar of :func:`progress_bar` (None: nothing)."""
    if bar is None:
        return
    if hasattr(bar, 'update') and not hasattr(bar, 'task_num'):
        bar.update(1)  # tqdm
    else:
        bar.update()  # mmengine ProgressBar


class PixelAdamMixin:
    """PSAQ-ViT's pixel-optimisation recipe, reused by SPDFQ.

    Provides the settings (:meth:`_init_pixel_adam`), the learning rate of
    an iteration (:meth:`lr_at`: warm-up + cosine, restarted every round),
    the augmentation (:meth:`augment`: roll jitter + flip, the jitter of the
    round) and the TV prior with a random target (:meth:`tv_prior`,
    :meth:`draw_tau`, :meth:`tv_input`).  Mix in before
    :class:`BaseSynthesizer` (one progress-bar step per iteration).

    Rounds.  ``synth_rounds`` rounds of ``iterations`` iterations each
    (``iterations`` counts the iterations *of one round*): every round has
    its own linear warm-up over ``warmup_iters`` iterations then cosine
    decay to 0, and its own maximal roll ``jitter_at(round)``; the
    optimizer (and its state) is shared by the rounds.  This is the
    official PSAQ-ViT schedule (``generate_data.py``: ``for lr_it in
    range(2)``, 500 iterations each, ``lr_cosine_policy(lr, 100, 500)`` per
    round, ``lim = 15`` then ``30``, one ``optim.Adam`` created before the
    rounds).
    """

    def _init_pixel_adam(self, lr: float, betas: Tuple[float, float],
                         warmup_iters: Optional[int],
                         jitter: Union[int, Sequence[int]],
                         flip: bool, tv_weight: float,
                         tau_range: Tuple[float, float],
                         tau_ref_pixels: int,
                         synth_rounds: int = 1,
                         jitter_shift: str = 'independent',
                         tau_per: str = 'iteration',
                         tv_on: str = 'raw') -> None:
        """Store the recipe's settings (call after ``BaseSynthesizer``'s
        ``__init__``, which sets ``iterations``, the iterations per round).

        Args:
            warmup_iters: warm-up of every round; None means
                ``min(100, iterations // 5)`` (100 for the official 500).
            jitter: maximal roll in pixels: an int (every round), or one
                per round (round ``r`` uses ``jitter[min(r, len - 1)]``, so
                extra entries are ignored and the last one repeats).
            synth_rounds: number of rounds (>= 1).
            jitter_shift: ``'shared'`` (one offset for both axes, official
                PSAQ-ViT) or ``'independent'`` (see :func:`roll_flip`).
            tau_per: ``'run'`` draws the TV target once per synthesized
                batch (:meth:`draw_tau`, official PSAQ-ViT: ``var_pred``
                drawn once before the rounds); ``'iteration'`` draws a new
                one every iteration.
            tv_on: ``'augmented'`` takes the TV prior on the jittered /
                flipped batch (official PSAQ-ViT:
                ``get_image_prior_losses(img_jit)``); ``'raw'`` on the
                un-augmented pixels.
        """
        self.lr = float(lr)
        self.betas = tuple(betas)
        self.warmup_iters = (min(100, self.iterations // 5)
                             if warmup_iters is None else int(warmup_iters))
        if int(synth_rounds) < 1:
            raise ValueError(f'{type(self).__name__}: synth_rounds must be '
                             f'>= 1, got {synth_rounds}')
        self.synth_rounds = int(synth_rounds)
        self.jitters = jitter_per_round(type(self).__name__, jitter)
        self.jitter = self.jitters[0]
        for key, value, allowed in (('jitter_shift', jitter_shift,
                                     JITTER_SHIFTS),
                                    ('tau_per', tau_per, TAU_PER),
                                    ('tv_on', tv_on, TV_ON)):
            if value not in allowed:
                raise ValueError(f'{type(self).__name__}: {key} must be one '
                                 f'of {allowed}, got {value!r}')
        self.jitter_shift = jitter_shift
        self.tau_per = tau_per
        self.tv_on = tv_on
        self.flip = bool(flip)
        self.tv_weight = float(tv_weight)
        self.tau_range = tuple(tau_range)
        self.tau_ref_pixels = int(tau_ref_pixels)

    @property
    def total_iterations(self) -> int:
        """Iterations of one batch over all rounds."""
        return self.synth_rounds * self.iterations

    def round_of(self, it: int) -> int:
        """Round (0-based) of the batch iteration ``it`` (0-based, counted
        over all rounds)."""
        return min(it // max(1, self.iterations), self.synth_rounds - 1)

    def lr_at(self, it: int) -> float:
        """Learning rate of the batch iteration ``it`` (0-based, counted
        over all rounds): :func:`warmup_cosine_lr` of the iteration within
        its round, so every round warms up and decays again."""
        within = it - self.round_of(it) * self.iterations
        return warmup_cosine_lr(within, self.lr, self.warmup_iters,
                                self.iterations)

    def jitter_at(self, round_idx: int = 0) -> int:
        """Maximal roll (pixels) of round ``round_idx``."""
        return self.jitters[min(int(round_idx), len(self.jitters) - 1)]

    def augment(self, x: torch.Tensor, generator: torch.Generator,
                round_idx: int = 0) -> torch.Tensor:
        """Random roll jitter (the round's maximum) and horizontal flip
        (differentiable, :func:`roll_flip`)."""
        return roll_flip(x, generator, self.jitter_at(round_idx), self.flip,
                         self.jitter_shift)

    def draw_tau(self, generator: torch.Generator) -> Optional[float]:
        """The batch's TV target with ``tau_per='run'`` (one draw, see
        :func:`draw_tau`); None with ``'iteration'`` (:meth:`tv_prior`
        then draws one every call)."""
        if self.tau_per != 'run':
            return None
        return draw_tau(self.tau_range, generator)

    def tv_input(self, x: torch.Tensor, x_aug: torch.Tensor) -> torch.Tensor:
        """The batch the TV prior sees: ``x_aug`` (``tv_on='augmented'``)
        or ``x`` (``'raw'``)."""
        return x_aug if self.tv_on == 'augmented' else x

    def tv_prior(self, x: torch.Tensor, generator: torch.Generator,
                 tau: Optional[float] = None) -> torch.Tensor:
        """:func:`~dfq_dense.synth.losses.tv_prior_loss` of ``x`` with the
        recipe's weight and target (already weighted): ``tau`` (unscaled,
        e.g. from :meth:`draw_tau`) or, when None, a fresh draw from
        ``generator``."""
        return tv_prior_loss(x, weight=self.tv_weight,
                             tau_range=self.tau_range,
                             ref_pixels=self.tau_ref_pixels,
                             generator=generator, tau=tau)

    def _bar_steps(self) -> int:
        return max(1, self.total_iterations)


# --------------------------------------------------------------------------
# base synthesizer
# --------------------------------------------------------------------------
class SynthesisError(RuntimeError):
    """A synthesis that went wrong (NaN / Inf images or loss): one line."""


def check_finite_images(x: torch.Tensor, what: str) -> None:
    """Raise :class:`SynthesisError` if ``x`` holds NaN or Inf."""
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        raise SynthesisError(
            f'{what}: {100.0 * bad.float().mean().item():.1f}% of the '
            'pixels are NaN/Inf (diverged: lower the learning rate or a '
            'loss weight, check bandwidth / tv_weight)')


def get_backbone(model: nn.Module) -> nn.Module:
    backbone = getattr(model, 'backbone', None)
    if backbone is None:
        raise ValueError(
            f'{type(model).__name__} has no `.backbone`; synthesizers run '
            'the backbone of an mmdet/mmseg model')
    return backbone


@contextlib.contextmanager
def frozen_backbone(backbone: nn.Module):
    """Eval mode, ``requires_grad=False`` and ``with_cp=False`` inside.

    Gradient checkpointing is switched off because its (reentrant) recompute
    would run the forward hooks under ``no_grad``.  Everything is restored
    on exit.
    """
    modes = {m: m.training for m in backbone.modules()}
    grads = {p: p.requires_grad for p in backbone.parameters()}
    cps = {m: m.with_cp for m in backbone.modules()
           if isinstance(getattr(m, 'with_cp', None), bool)}
    try:
        backbone.eval()
        for p in grads:
            p.requires_grad_(False)
        for m in cps:
            m.with_cp = False
        yield backbone
    finally:
        for m, mode in modes.items():
            m.training = mode
        for p, g in grads.items():
            p.requires_grad_(g)
        for m, cp in cps.items():
            m.with_cp = cp


class BaseSynthesizer:
    """Base of the synthesizers: batching, seeding, bounds, I/O.

    Args:
        num_images: number of images to produce.
        batch_size: images optimised / drawn together.
        img_size: ``(H, W)`` or an int (square); must be given (here or to
            :meth:`generate`), typically the model's test scale.
        iterations: optimisation steps per batch (ignored by non-iterative
            synthesizers).
        seed: seeds the CPU ``torch.Generator`` used for initialisation and
            augmentations; the same seed gives the same images.
        log_interval: log the loss terms every this many iterations.
        progress: show a progress bar.
        device: run there; default the backbone's device.
    """
    # Lets config validation list the registered data sources.
    is_synthesizer = True

    def __init__(self,
                 num_images: int = 8,
                 batch_size: int = 8,
                 img_size: Optional[Union[int, Sequence[int]]] = None,
                 iterations: int = 500,
                 seed: int = 0,
                 log_interval: int = 50,
                 progress: bool = True,
                 device: Optional[Union[str, torch.device]] = None):
        assert num_images > 0 and batch_size > 0
        self.num_images = int(num_images)
        self.batch_size = int(batch_size)
        self.img_size = img_size
        self.iterations = int(iterations)
        self.seed = int(seed)
        self.log_interval = max(1, int(log_interval))
        self.progress = progress
        self.device = device
        self.mean = self.std = None
        self.history = []  # logged dicts of loss terms
        self.visualizer = None  # set by the DFQ loop: the runner's

    def check_model(self, model: nn.Module) -> None:
        """Raise ValueError if ``model`` lacks what this method needs."""
        get_backbone(model)

    def prepare(self) -> None:
        """Check, before any work, that this data source can deliver
        (raise ValueError / FileNotFoundError if not).  Synthesizers need
        nothing but the model; a source that reads files checks them here,
        so that a bad path fails before the checkpoint is even loaded."""

    # ---------------------------------------------------------------- utils
    @staticmethod
    def _hw(img_size) -> Tuple[int, int]:
        if img_size is None:
            raise ValueError('img_size must be given (e.g. the test scale of '
                             'the model as (H, W))')
        if isinstance(img_size, int):
            return img_size, img_size
        h, w = img_size
        return int(h), int(w)

    def _device(self, backbone):
        if self.device is not None:
            return torch.device(self.device)
        p = next(backbone.parameters(), None)
        return p.device if p is not None else torch.device('cpu')

    @property
    def num_batches(self) -> int:
        return math.ceil(self.num_images / self.batch_size)

    def _init_pixels(self, n: int, hw: Tuple[int, int], device,
                     generator: torch.Generator):
        """Starting pixels of an optimised batch: ``x ~ N(0, 1)`` ``(n, 3,
        H, W)`` drawn from the CPU ``generator`` (the same start for a seed
        on any device), clamped to the valid range, requiring grad.

        Returns:
            ``(x, mean, std)``, mean/std on ``device`` for later clamps.
        """
        H, W = hw
        mean, std = self.mean.to(device), self.std.to(device)
        x = torch.randn((n, 3, H, W), generator=generator).to(device)
        x = clamp_to_range(x, mean, std).requires_grad_(True)
        return x, mean, std

    def _log_due(self, it: int, total: int) -> bool:
        """Log iteration ``it`` (0-based) of ``total``: every
        ``log_interval``-th, the first and the last."""
        return (it + 1) % self.log_interval == 0 or it == 0 or \
            it + 1 == total

    # ------------------------------------------------------------------ api
    def generate(self,
                 model: nn.Module,
                 data_preprocessor_cfg: Optional[dict] = None,
                 img_size: Optional[Union[int, Sequence[int]]] = None
                 ) -> torch.Tensor:
        """Synthesize ``num_images`` images for ``model``.

        Args:
            model: an mmdet/mmseg model (``.backbone`` and, normally,
                ``.data_preprocessor`` with ``mean``/``std`` buffers).
            data_preprocessor_cfg: fallback for mean/std when the model has
                no normalising data_preprocessor.
            img_size: overrides the constructor's ``img_size``.

        Returns:
            CPU float tensor ``(num_images, 3, H, W)``, normalised space.
        """
        out = self.generate_batches(model, range(self.num_batches),
                                    data_preprocessor_cfg, img_size)
        return torch.cat([out[b] for b in sorted(out)], 0)

    def batch_sizes(self) -> List[int]:
        """Number of images of each batch (the last one may be smaller)."""
        return [min(self.batch_size, self.num_images - b * self.batch_size)
                for b in range(self.num_batches)]

    def generate_batches(self,
                         model: nn.Module,
                         batches: Iterable[int],
                         data_preprocessor_cfg: Optional[dict] = None,
                         img_size: Optional[Union[int, Sequence[int]]] = None,
                         on_batch: Optional[Callable[[int, torch.Tensor],
                                                     None]] = None
                         ) -> Dict[int, torch.Tensor]:
        """Synthesize the batches ``batches`` (indices into
        ``range(num_batches)``), each from its own generator
        (:func:`batch_seed`), so any subset gives the same images as the
        full run.  ``on_batch(b, images)`` is called as each batch
        finishes (the DFQ loop writes it to disk there).

        Returns:
            ``{batch index: CPU float tensor (n, 3, H, W)}``.
        """
        H, W = self._hw(img_size if img_size is not None else self.img_size)
        self.mean, self.std = get_mean_std(model, data_preprocessor_cfg)
        backbone = get_backbone(model)
        device = self._device(backbone)
        sizes = self.batch_sizes()
        batches = sorted(set(int(b) for b in batches))
        for b in batches:
            if not 0 <= b < len(sizes):
                raise ValueError(f'batch {b} out of range(0, {len(sizes)})')
        self.history = []
        out = {}
        bar = self._progress_bar(len(batches) * self._bar_steps())
        try:
            with frozen_backbone(backbone):
                for b in batches:
                    generator = torch.Generator().manual_seed(
                        batch_seed(self.seed, b))
                    x = self.synthesize_batch(backbone, sizes[b], (H, W),
                                              device, generator,
                                              batch_idx=b, bar=bar)
                    x = clamp_to_range(x.detach(), self.mean.to(x.device),
                                       self.std.to(x.device)).cpu()
                    check_finite_images(x, f'{type(self).__name__} batch '
                                        f'{b + 1}/{len(sizes)}')
                    out[b] = x
                    if on_batch is not None:
                        on_batch(b, x)
        finally:
            if bar is not None and hasattr(bar, 'close'):
                bar.close()
        return out

    def synthesize_batch(self, backbone: nn.Module, n: int,
                         hw: Tuple[int, int], device: torch.device,
                         generator: torch.Generator, batch_idx: int = 0,
                         bar=None) -> torch.Tensor:
        """Return ``(n, 3, H, W)`` normalised images (to be overridden)."""
        raise NotImplementedError

    def save(self, images: torch.Tensor, out_dir: str,
             meta: Optional[dict] = None) -> str:
        """:func:`save_images` with this synthesizer's mean/std and meta."""
        assert self.mean is not None, 'call generate() first'
        meta = dict(meta or {})
        meta.setdefault('synthesizer', type(self).__name__)
        meta.setdefault('seed', self.seed)
        meta.setdefault('iterations', self.iterations)
        return save_images(images, self.mean, self.std, out_dir, meta)

    # --------------------------------------------------------------- logging
    def log_terms(self, log: dict, prefix: str = 'synth') -> None:
        """Record one iteration's loss terms everywhere they are read.

        ``log`` holds ``batch`` and ``iter`` (0-based batch index, 1-based
        iteration) and float terms.  The terms go to ``self.history``, to
        mmengine's MessageHub (``<prefix>/<term>``), to the current logger
        and, when ``self.visualizer`` is set (the DFQ loop sets the runner's),
        to the visualizer's backends (TensorBoard, WandB ... as configured by
        the config's ``visualizer``).
        """
        self.history.append(dict(log))
        terms = {k: float(v) for k, v in log.items()
                 if k not in ('batch', 'iter')}
        bad = [k for k, v in terms.items() if not math.isfinite(v)]
        if bad:
            raise SynthesisError(
                f'{type(self).__name__} {prefix} batch {log["batch"] + 1}'
                f'/{self.num_batches} iter {log["iter"]}: loss term(s) '
                f'{", ".join(bad)} are NaN/Inf (diverged: lower the '
                'learning rate or the weight of that term)')
        hub = MessageHub.get_current_instance()
        for key, value in terms.items():
            hub.update_scalar(f'{prefix}/{key}', value)
        self._log_step = getattr(self, '_log_step', 0) + 1
        if self.visualizer is not None:
            self.visualizer.add_scalars(
                {f'{prefix}/{k}': v for k, v in terms.items()},
                step=self._log_step)
        print_log(
            f'[{type(self).__name__}] {prefix} batch {log["batch"] + 1}'
            f'/{self.num_batches} iter {log["iter"]} ' + ' '.join(
                f'{k} {v:.4f}' for k, v in terms.items()), logger='current')

    # -------------------------------------------------------------- progress
    def _bar_steps(self) -> int:
        """Progress-bar steps per batch."""
        return 1

    def _progress_bar(self, total: int):
        return progress_bar(type(self).__name__, total, self.progress)

    @staticmethod
    def _bar_update(bar):
        bar_update(bar)
