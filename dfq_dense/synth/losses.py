"""Losses of PSAQ-ViT (patch-similarity entropy, PSE) and the image TV prior.

All functions are pure (no state); tensors keep their autograd graph so the
losses can be back-propagated to the synthetic pixels.
"""
import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

__all__ = [
    'window_similarity', 'pair_mask', 'patch_similarity', 'kde',
    'GaussianKDE', 'gaussian_kde', 'kde_entropy', 'pse_entropy',
    'psaq_entropy_loss', 'total_variation', 'tv_prior_loss', 'scaled_tau',
    'pse_bounds', 'kde_grid_points', 'kde_chunk_of', 'patch_tokens'
]

#: Pixels of the batch the PSAQ-ViT TV target was tuned for (32 x 224 x 224).
TAU_REF_PIXELS = 32 * 224 * 224


#: Grid conventions of the patch-similarity KDE (see :func:`pse_entropy`).
GRIDS = ('batch', 'image')

#: Default chunk of :class:`GaussianKDE` (``chunk='auto'``): how many
#: similarity values (all images of the batch together) have their kernel
#: terms against the ``num_points`` grid points evaluated at once, per device
#: type.  The temporary memory of the KDE is two ``chunk x num_points``
#: arrays (2 x 2.6 MB on CPU, 2 x 84 MB on GPU in float32), whatever the
#: number of similarities.  On CPU larger chunks are not faster (cache); on
#: GPU smaller ones pay kernel launches.
KDE_CHUNK = {'cpu': 1 << 16, 'cuda': 1 << 21}


# --------------------------------------------------------------------------
# patch similarity
# --------------------------------------------------------------------------
def window_similarity(feat: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Cosine similarity of every ordered token pair of every window.

    The per-window Gram matrix of the L2-normalised tokens (norms clamped to
    ``eps``, as ``torch.cosine_similarity`` does), ``(B, nW, N, N)``,
    diagonal included.  For Swin ``N = 49`` and the Gram matrix is as large
    as the similarity set itself: nothing is materialised beyond it.
    """
    f = feat / feat.norm(dim=-1, keepdim=True).clamp_min(eps)
    return f @ f.transpose(-1, -2)


def pair_mask(valid: Optional[torch.Tensor],
              shape: Sequence[int],
              diagonal: bool = True,
              drop_first_token: bool = False,
              device=None) -> Optional[torch.Tensor]:
    """Which entries of :func:`window_similarity` enter the KDE.

    Args:
        valid: ``(B, nW, N)`` bool, False for padding tokens; None = all.
        shape: ``(B, nW, N)`` of the features.
        diagonal: keep the similarity of a token with itself.
        drop_first_token: leave token 0 of every window out (its row and
            column).

    Returns:
        ``(1, nW, N, N)`` bool when the mask is the same for every image (one
        mask broadcast over the batch), ``(B, nW, N, N)`` when it differs, or
        None when every entry is kept.
    """
    B, nW, N = (int(v) for v in shape)
    tok = None
    if valid is not None:
        tok = valid.to(device=device, dtype=torch.bool)
        if tok.shape[0] > 1 and bool((tok == tok[:1]).all()):
            tok = tok[:1]
        if bool(tok.all()):
            tok = None
    if drop_first_token:
        tok = (torch.ones((1, nW, N), dtype=torch.bool, device=device)
               if tok is None else tok.clone())
        tok[..., 0] = False
    if tok is None and diagonal:
        return None
    if tok is None:
        mask = torch.ones((1, nW, N, N), dtype=torch.bool, device=device)
    else:
        mask = tok.unsqueeze(-1) & tok.unsqueeze(-2)
    if not diagonal:
        eye = torch.eye(N, dtype=torch.bool, device=mask.device)
        mask = mask & ~eye
    return mask


def patch_similarity(feat: torch.Tensor,
                     valid: Optional[torch.Tensor] = None,
                     max_samples: Optional[int] = None,
                     generator: Optional[torch.Generator] = None,
                     eps: float = 1e-8,
                     diagonal: bool = True,
                     drop_first_token: bool = False) -> List[torch.Tensor]:
    """Cosine similarities between the tokens of each window, per image.

    The similarities of every ordered pair ``(i, j)`` of valid tokens of
    every window of an image are pooled into one 1-D tensor (windows in
    order, row-major inside a window).  Defaults follow the official
    PSAQ-ViT code: the diagonal (a token with itself, 1) is kept
    (``diagonal=False`` drops it) and every token is kept
    (``drop_first_token=True`` drops token 0 of every window, as the
    official code does for DeiT's CLS token and carries over to Swin).
    Padding tokens (``valid`` False) are always left out.

    This materialises the pooled similarities (a copy of the selected Gram
    entries); :func:`pse_entropy` works on the Gram matrix directly and is
    what the loss uses unless it subsamples.

    Args:
        feat: ``(B, nW, N, D)`` window tokens.
        valid: ``(B, nW, N)`` bool, False for padding tokens; None = all.
        max_samples: if set, keep at most this many similarities per image,
            drawn uniformly (with replacement) with ``generator``.  Not
            faithful to the official code (which keeps all of them): the
            entropy stays close but its gradient does not.
        generator: CPU ``torch.Generator`` for the subsampling (a fresh one
            seeded with 0 when None, so the call is deterministic).
        diagonal, drop_first_token: see above.

    Returns:
        list of ``B`` 1-D tensors (per image, all windows pooled).
    """
    B, nW, N, _ = feat.shape
    sim = window_similarity(feat, eps)  # (B, nW, N, N)
    mask = pair_mask(valid, (B, nW, N), diagonal, drop_first_token,
                     feat.device)
    if max_samples is not None and generator is None:
        generator = torch.Generator().manual_seed(0)
    if mask is None or mask.shape[0] == 1:
        # Same layout for every image (always the case for Swin padding):
        # one gather for the whole batch.
        out = sim.reshape(B, -1) if mask is None else sim[:, mask[0]]
        return list(_subsample(out, max_samples, generator).unbind(0))
    return [
        _subsample(sim[b][mask[b]].unsqueeze(0), max_samples,
                   generator).squeeze(0) for b in range(B)
    ]


def _subsample(values: torch.Tensor, max_samples: Optional[int],
               generator: Optional[torch.Generator]) -> torch.Tensor:
    """Subsample the columns of ``values`` ``(B, M)`` to ``max_samples``."""
    M = values.shape[-1]
    if max_samples is None or M <= max_samples:
        return values
    idx = torch.randint(M, (values.shape[0], int(max_samples)),
                        generator=generator).to(values.device)
    return torch.gather(values, 1, idx)


# --------------------------------------------------------------------------
# Gaussian KDE
# --------------------------------------------------------------------------
def kde(points: torch.Tensor, samples: torch.Tensor,
        bandwidth: float = 0.01) -> torch.Tensor:
    """Gaussian KDE of ``samples`` evaluated at ``points`` (reference form).

    ``p(x) = mean_s exp(-(x - s)^2 / (2 h^2)) / sqrt(2 pi h^2)``.
    ``points`` ``(..., P)``, ``samples`` ``(..., S)`` -> ``(..., P)``.
    Materialises ``(..., P, S)`` (and autograd saves it): fine for small
    inputs; :func:`gaussian_kde` computes the same in bounded memory.
    """
    h2 = float(bandwidth)**2
    d = points.unsqueeze(-1) - samples.unsqueeze(-2)  # (..., P, S)
    return torch.exp(-d * d / (2 * h2)).mean(-1) / math.sqrt(2 * math.pi * h2)


def _chunk_len(chunk: Union[int, str, None], rows: int, S: int,
               device: torch.device) -> int:
    """Samples per row processed at once (``chunk`` values for all rows)."""
    if chunk is None:
        return max(1, S)
    if chunk == 'auto':
        chunk = KDE_CHUNK.get(torch.device(device).type, KDE_CHUNK['cuda'])
    if isinstance(chunk, (bool, str)) or int(chunk) < 1:
        raise ValueError(f"chunk must be an int >= 1, 'auto' or None, "
                         f'got {chunk!r}')
    return max(1, int(chunk) // max(1, rows))


def _exp_floor(dtype: torch.dtype) -> float:
    """Exponent below which ``exp`` leaves the normal range of ``dtype``.

    The kernel exponents are clamped there: on CPU, ``exp`` of arguments
    whose result is subnormal or 0 takes a slow scalar path (10-30x), and
    most kernel terms of a narrow bandwidth are that small.  The clamped
    terms are ``~1e-38`` (float32) / ``~1e-307`` (float64) instead of a
    subnormal or 0, far below the resolution of ``p + eps``.
    """
    return math.log(torch.finfo(dtype).tiny) + 1.0


class GaussianKDE(torch.autograd.Function):
    """Weighted Gaussian KDE in memory linear in the number of samples.

    ``p[b, j] = sum_k w[b, k] N(x[b, j] - s[b, k]; h) / sum_k w[b, k]`` with
    ``N(d; h) = exp(-d^2 / (2 h^2)) / sqrt(2 pi h^2)``.

    Forward and backward loop over chunks of the samples, so at most
    ``chunk x P`` kernel terms exist at a time (two reused work buffers of
    that size; ``chunk=None``: one shot).  Only the inputs are saved for
    backward (``O(S)``); the kernel terms are recomputed there.  The
    gradient flows to ``samples`` only: the grid ``points`` is a constant
    (PSAQ-ViT takes it without gradient) and so are the weights.  Half
    precision inputs are evaluated in float32.  See :func:`_exp_floor` for
    the one deviation from the plain formula (terms below the normal range
    of the dtype).

    ``apply(samples, points, weights, bandwidth, chunk)``:
        samples ``(B, S)``; points ``(B, P)`` or ``(1, P)``; weights None,
        or ``(B, S)`` / ``(1, S)`` (bool or float, broadcast over rows);
        bandwidth ``h``; chunk: values (all rows together) per step,
        ``'auto'`` (:data:`KDE_CHUNK` of the device type) or None.  Returns
        ``(B, P)``.
    """

    @staticmethod
    def forward(ctx, samples, points, weights, bandwidth, chunk):
        ctx.in_dtype = samples.dtype
        if samples.dtype not in (torch.float32, torch.float64):
            samples = samples.float()
        points = points.to(samples.dtype)
        B, S = samples.shape
        P = points.shape[-1]
        h2 = float(bandwidth)**2
        step = _chunk_len(chunk, B, S, samples.device)
        buf = samples.new_empty(B * P * min(step, S))
        acc = samples.new_zeros((B, P))
        for k0 in range(0, S, step):
            s = samples[:, k0:k0 + step]
            e = GaussianKDE._terms(points, s, h2, buf)
            if weights is None:
                acc += e.sum(-1)
            else:
                w = weights[:, k0:k0 + step].to(e.dtype).unsqueeze(-1)
                acc += torch.matmul(e, w).squeeze(-1)
        del buf
        if weights is None:
            count = samples.new_full((1, 1), float(S))
        else:
            count = weights.sum(-1, keepdim=True, dtype=samples.dtype)
        # an image without any sample gets p = 0 (instead of 0 / 0)
        scale = count.clamp_min(1).reciprocal() / math.sqrt(2 * math.pi * h2)
        ctx.save_for_backward(samples, points, weights, scale)
        ctx.h2, ctx.step = h2, step
        return acc * scale

    @staticmethod
    def _terms(points, s, h2, buf, diff_buf=None):
        """``exp(-(x - s)^2 / (2 h^2))`` ``(B, P, C)`` in ``buf``; with
        ``diff_buf``, ``(x - s) exp(...)`` instead."""
        B, C = s.shape
        shape = (B, points.shape[-1], C)
        e = buf[:B * shape[1] * C].view(shape)
        if diff_buf is None:
            torch.sub(points.unsqueeze(-1), s.unsqueeze(-2), out=e)
            e.square_()
        else:
            d = diff_buf[:e.numel()].view(shape)
            torch.sub(points.unsqueeze(-1), s.unsqueeze(-2), out=d)
            torch.mul(d, d, out=e)
        e.mul_(-0.5 / h2).clamp_(min=_exp_floor(e.dtype)).exp_()
        if diff_buf is not None:
            e.mul_(d)
        return e

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_p):
        samples, points, weights, scale = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        # dp[b, j] / ds[b, k] = scale_b w_bk e_bjk (x_bj - s_bk) / h^2
        g = (grad_p.to(samples.dtype) * (scale / ctx.h2)).unsqueeze(-2)
        B, S = samples.shape
        step = ctx.step
        n = B * points.shape[-1] * min(step, S)
        buf, diff_buf = samples.new_empty(n), samples.new_empty(n)
        grad = torch.empty_like(samples)
        for k0 in range(0, S, step):
            ed = GaussianKDE._terms(points, samples[:, k0:k0 + step],
                                    ctx.h2, buf, diff_buf)
            gk = torch.matmul(g, ed).squeeze(-2)  # (B, C)
            if weights is not None:
                gk = gk * weights[:, k0:k0 + step].to(gk.dtype)
            grad[:, k0:k0 + step] = gk
        return grad.to(ctx.in_dtype), None, None, None, None


def gaussian_kde(points: torch.Tensor,
                 samples: torch.Tensor,
                 bandwidth: float = 0.01,
                 weights: Optional[torch.Tensor] = None,
                 chunk: Union[int, str, None] = 'auto') -> torch.Tensor:
    """Chunked (weighted) Gaussian KDE, same values as :func:`kde`.

    ``points`` ``(P,)`` / ``(B, P)``, ``samples`` ``(S,)`` / ``(B, S)``,
    ``weights`` None or broadcastable to ``samples``; see
    :class:`GaussianKDE` (memory linear in ``S``, no gradient to ``points``).
    """
    one = samples.dim() == 1
    s = samples.reshape(-1, samples.shape[-1])
    x = points.reshape(-1, points.shape[-1]).detach()
    w = None
    if weights is not None:
        w = weights.reshape(-1, weights.shape[-1])
    p = GaussianKDE.apply(s, x, w, float(bandwidth), chunk)
    return p.squeeze(0) if one and points.dim() == 1 else p


def _kde_bounds(samples: torch.Tensor, weights: Optional[torch.Tensor],
                grid: str, chunk: Union[int, str, None] = 'auto'
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(lo, hi)`` of the (weighted-in) samples, without gradient.

    ``grid='batch'``: over every row, each ``(1, 1)``; ``'image'``: per
    row, ``(B, 1)``.  At least float32.  The masked min/max run over the
    same chunks as the KDE; a min/max is exact, so the bounds of a batch
    are the min/max of the bounds of any split of its rows.
    """
    if grid not in GRIDS:
        raise ValueError(f'grid must be one of {GRIDS}, got {grid!r}')
    with torch.no_grad():
        v = samples.detach()
        dtype = torch.promote_types(v.dtype, torch.float32)
        B, S = v.shape
        step = _chunk_len(chunk, B, S, v.device)
        keep = None if weights is None else weights.to(torch.bool)
        los, his = [], []
        for k0 in range(0, S, step):
            c = v[:, k0:k0 + step]
            if keep is None:
                lo, hi = c, c
            else:
                m = ~keep[:, k0:k0 + step]
                lo, hi = c.masked_fill(m, math.inf), c.masked_fill(
                    m, -math.inf)
            los.append(lo.amin(-1, keepdim=True))
            his.append(hi.amax(-1, keepdim=True))
        lo = torch.cat(los, -1).amin(-1, keepdim=True).to(dtype)
        hi = torch.cat(his, -1).amax(-1, keepdim=True).to(dtype)
        if grid == 'batch':
            lo, hi = lo.amin(0, keepdim=True), hi.amax(0, keepdim=True)
        return lo, hi


def kde_grid_points(lo: torch.Tensor, hi: torch.Tensor,
                    num_points: int) -> torch.Tensor:
    """``linspace(lo, hi, num_points)`` per row of ``lo`` / ``hi``
    (``(R, 1)`` each) -> ``(R, num_points)``, no gradient."""
    with torch.no_grad():
        t = torch.linspace(0, 1, int(num_points), device=lo.device,
                           dtype=lo.dtype)
        return lo + (hi - lo) * t


def _kde_grid(samples: torch.Tensor, weights: Optional[torch.Tensor],
              num_points: int, grid: str,
              chunk: Union[int, str, None] = 'auto') -> torch.Tensor:
    """``linspace(min, max, num_points)`` of the (weighted-in) samples.

    ``grid='batch'``: one grid over every row, ``(1, P)``; ``'image'``: one
    per row, ``(B, P)``.  No gradient (as in PSAQ-ViT).  At least float32.
    The masked min/max run over the same chunks as the KDE
    (:func:`_kde_bounds`, then :func:`kde_grid_points`).
    """
    lo, hi = _kde_bounds(samples, weights, grid, chunk)
    return kde_grid_points(lo, hi, num_points)


def kde_chunk_of(chunk: Union[int, str, None], rows: int, total_rows: int,
                 device) -> Union[int, None]:
    """The ``chunk`` that gives ``rows`` rows the per-row step of
    ``total_rows`` rows under ``chunk`` (:class:`GaussianKDE` sums its
    kernel terms in steps of ``chunk // rows`` samples per row, so a row's
    floating-point sum depends on how many rows share the chunk).  With it
    a micro-batch of ``rows`` images of a batch of ``total_rows`` sums
    every image's KDE exactly as the whole batch does."""
    if chunk is None:
        return None
    step = _chunk_len(chunk, total_rows, 1 << 62, device)
    return step * max(1, int(rows))


def _trapezoid_entropy(p: torch.Tensor, points: torch.Tensor,
                       eps: float) -> torch.Tensor:
    """Trapezoid rule over ``points`` of ``-(p + eps) log(p + eps)``."""
    q = p + eps
    return torch.trapezoid(-q * torch.log(q), points.expand_as(q), dim=-1)


def kde_entropy(samples: Union[torch.Tensor, Sequence[torch.Tensor]],
                bandwidth: float = 0.01,
                num_points: int = 10,
                eps: float = 1e-4,
                chunk: Union[int, str, None] = 'auto') -> torch.Tensor:
    """Differential entropy of a Gaussian KDE of ``samples``, per row.

    The KDE (see :func:`gaussian_kde`) is evaluated at ``num_points`` points
    ``linspace(min(row), max(row))`` (min/max taken without gradient; one
    grid per row, i.e. :func:`pse_entropy`'s ``grid='image'``) and
    ``-(p + eps) log(p + eps)`` is integrated over them with the trapezoid
    rule.

    Args:
        samples: ``(S,)`` -> scalar, ``(..., S)`` -> ``(...)``, or a list of
            1-D tensors (possibly of different lengths) -> ``(B,)``.
        chunk: see :class:`GaussianKDE`.

    Returns:
        the entropy estimate (scalar or one value per row/element).
    """
    if isinstance(samples, (list, tuple)):
        return torch.stack([
            kde_entropy(s, bandwidth, num_points, eps, chunk) for s in samples
        ])
    rows = samples.reshape(-1, samples.shape[-1])
    points = _kde_grid(rows, None, num_points, 'image', chunk)
    p = GaussianKDE.apply(rows, points, None, float(bandwidth), chunk)
    return _trapezoid_entropy(p, points, eps).reshape(samples.shape[:-1])


# --------------------------------------------------------------------------
# patch-similarity entropy (PSE)
# --------------------------------------------------------------------------
def _pad_rows(rows: Sequence[torch.Tensor]):
    """Stack 1-D tensors; ragged ones are zero-padded with a weight mask."""
    n = [r.numel() for r in rows]
    if all(m == n[0] for m in n):
        return torch.stack(list(rows)), None
    out = rows[0].new_zeros((len(rows), max(n)))
    keep = torch.zeros((len(rows), max(n)), dtype=torch.bool,
                       device=rows[0].device)
    for b, r in enumerate(rows):
        out[b, :r.numel()] = r
        keep[b, :r.numel()] = True
    return out, keep


def _pse_samples(feat: torch.Tensor, valid: Optional[torch.Tensor],
                 diagonal: bool, drop_first_token: bool,
                 max_samples: Optional[int],
                 generator: Optional[torch.Generator]):
    """``(samples (B, S), weights or None)`` of :func:`pse_entropy`."""
    if feat.dtype in (torch.float16, torch.bfloat16):
        feat = feat.float()  # similarities to resolve a bandwidth of 0.01
    if max_samples is None:
        B, nW, N, _ = feat.shape
        samples = window_similarity(feat).reshape(B, nW * N * N)
        mask = pair_mask(valid, (B, nW, N), diagonal, drop_first_token,
                         feat.device)
        weights = None if mask is None else mask.reshape(mask.shape[0], -1)
        return samples, weights
    return _pad_rows(
        patch_similarity(feat, valid, max_samples, generator,
                         diagonal=diagonal,
                         drop_first_token=drop_first_token))


def pse_entropy(feat: torch.Tensor,
                valid: Optional[torch.Tensor] = None,
                bandwidth: float = 0.01,
                num_points: int = 10,
                eps: float = 1e-4,
                diagonal: bool = True,
                grid: str = 'batch',
                drop_first_token: bool = False,
                max_samples: Optional[int] = None,
                generator: Optional[torch.Generator] = None,
                chunk: Union[int, str, None] = 'auto',
                points: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Patch-similarity entropy of one attention layer, per image ``(B,)``.

    Defaults are the official PSAQ-ViT code's conventions:

    * the cosine similarity of every ordered token pair of every window,
      the diagonal (a token with itself) included, all windows of an image
      pooled into one sample set;
    * every similarity enters the KDE (no subsampling);
    * one grid per layer: ``linspace(min, max, num_points)`` over the
      similarities of the whole batch, without gradient;
    * Gaussian KDE (bandwidth ``h``), entropy per image by the trapezoid
      rule of ``-(p + eps) log(p + eps)``.

    Not in the official code but necessary here: padding tokens that Swin
    adds to reach multiples of the window size (``valid`` False) are left
    out (the official code runs at 224x224 and never pads).

    The similarities are the per-window Gram matrix ``(B, nW, N, N)``;
    padding, the diagonal and token 0 are masked through the KDE's weights
    (no copy), and :class:`GaussianKDE` keeps the memory linear in the
    number of similarities.

    Options (each not the official behaviour):
        diagonal: False leaves a token's similarity with itself out.
        grid: ``'image'`` takes one grid per image (its own min/max).
        drop_first_token: True drops token 0 of every window, as the
            official code does (DeiT's CLS token, a carry-over on Swin).
        max_samples: keep at most this many similarities per image, drawn
            uniformly with ``generator`` (see :func:`patch_similarity`): the
            entropy stays close but the gradient does not follow the exact
            one at dense resolution.
        chunk: see :class:`GaussianKDE` (numerics only, not a convention).

    ``points`` ``(1, P)`` gives the grid instead of computing it from
    ``feat`` (``grid`` is then not used): a micro-batch of a larger batch
    passes the batch's grid (:func:`pse_bounds` of every micro-batch,
    combined), so that its images' entropies are those of the whole batch.
    """
    samples, weights = _pse_samples(feat, valid, diagonal, drop_first_token,
                                    max_samples, generator)
    if points is None:
        points = _kde_grid(samples, weights, num_points, grid, chunk)
    p = GaussianKDE.apply(samples, points, weights, float(bandwidth), chunk)
    return _trapezoid_entropy(p, points, eps)


def patch_tokens(rec: Dict) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(feat, valid)`` of a recorder's record without its prefix tokens
    (``rec['prefix_tokens']``: DeiT's CLS token), the tokens PSAQ-ViT's
    patch similarity is taken over: the official code
    (github.com/zkkli/PSAQ-ViT) uses the patch tokens of DeiT only.  Swin
    records have none and are returned as they are."""
    feat, valid = rec['feat'], rec.get('valid')
    p = int(rec.get('prefix_tokens', 0) or 0)
    if p:
        feat = feat[..., p:, :]
        valid = None if valid is None else valid[..., p:]
    return feat, valid


def pse_bounds(records: Sequence[Dict],
               diagonal: bool = True,
               drop_first_token: bool = False,
               chunk: Union[int, str, None] = 'auto'
               ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Per record (layer), the ``(lo, hi)`` ``(1, 1)`` bounds of the
    similarities of all its images, without gradient: what
    :func:`pse_entropy` spans its ``grid='batch'`` KDE grid over.  Bounds
    of several micro-batches combine exactly (``torch.minimum`` /
    ``torch.maximum``) into those of their union; :func:`kde_grid_points`
    turns them into the grid."""
    out = []
    with torch.no_grad():
        for rec in records:
            feat, valid = patch_tokens(rec)
            samples, weights = _pse_samples(feat, valid, diagonal,
                                            drop_first_token, None, None)
            out.append(_kde_bounds(samples, weights, 'batch', chunk))
    return out


def psaq_entropy_loss(records: Sequence[Dict],
                      bandwidth: float = 0.01,
                      num_points: int = 10,
                      max_samples: Optional[int] = None,
                      generator: Optional[torch.Generator] = None,
                      return_per_layer: bool = False,
                      diagonal: bool = True,
                      grid: str = 'batch',
                      drop_first_token: bool = False,
                      chunk: Union[int, str, None] = 'auto',
                      eps: float = 1e-4,
                      points: Optional[Sequence[torch.Tensor]] = None,
                      total: Optional[int] = None):
    """PSAQ-ViT patch-similarity loss: ``-sum_layers mean_batch H``.

    Minimising it maximises the entropy (diversity) of the within-window
    patch similarity at every hooked attention layer.  ``H`` is
    :func:`pse_entropy` of each record; the defaults (diagonal kept, one
    KDE grid per layer over the whole batch, every token, every similarity)
    are those of the official PSAQ-ViT code, padding tokens excluded, the
    patch tokens only (a DeiT record's CLS token dropped, see
    :func:`patch_tokens`).  The
    options ``diagonal``, ``grid``, ``drop_first_token``, ``max_samples``
    (with ``generator``), ``chunk`` and ``eps`` are described there.

    The behaviour of earlier versions of this function is
    ``diagonal=False, grid='image'`` (with ``max_samples`` as configured).

    Micro-batches.  With ``total`` (the images of the whole batch) the
    records hold a part of the batch and each layer's term is the *sum* of
    its images' entropies divided by ``total`` (its share of the batch
    mean: the shares of the parts add up to the batch's loss); ``points``
    (one ``(1, P)`` grid per record) then gives the batch's grids
    (``grid='batch'``), ``chunk`` should be :func:`kde_chunk_of` the
    batch's.

    Args:
        records: output of :class:`~dfq_dense.synth.hooks.AttnOutputRecorder`
            (dicts with ``feat`` ``(B, nW, N, D)`` and ``valid``).
        return_per_layer: also return the ``(L,)`` detached entropies.
    """
    if len(records) == 0:
        raise ValueError('psaq_entropy_loss got no records: was the backbone '
                         'run inside an AttnOutputRecorder?')
    if grid not in GRIDS:
        raise ValueError(f'grid must be one of {GRIDS}, got {grid!r}')
    if points is not None and len(points) != len(records):
        raise ValueError(f'psaq_entropy_loss: {len(points)} grids for '
                         f'{len(records)} records')
    ents = []
    for k, rec in enumerate(records):
        feat, valid = patch_tokens(rec)
        h = pse_entropy(feat, valid, bandwidth, num_points,
                        eps, diagonal=diagonal, grid=grid,
                        drop_first_token=drop_first_token,
                        max_samples=max_samples, generator=generator,
                        chunk=chunk,
                        points=None if points is None else points[k])
        ents.append(h.mean() if total is None else h.sum() / total)
    ents = torch.stack(ents)
    loss = -ents.sum()
    if return_per_layer:
        return loss, ents.detach()
    return loss


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Total variation prior of DeepInversion / PSAQ-ViT.

    Sum of the Frobenius norms (over the whole batch and all channels) of the
    horizontal, vertical and the two diagonal finite differences of
    ``x`` ``(B, C, H, W)``.
    """
    d1 = x[:, :, :, :-1] - x[:, :, :, 1:]
    d2 = x[:, :, :-1, :] - x[:, :, 1:, :]
    d3 = x[:, :, 1:, :-1] - x[:, :, :-1, 1:]
    d4 = x[:, :, :-1, :-1] - x[:, :, 1:, 1:]
    return d1.norm() + d2.norm() + d3.norm() + d4.norm()


def scaled_tau(tau: float, shape: Sequence[int],
               ref_pixels: int = TAU_REF_PIXELS) -> float:
    """Scale a TV target tuned for ``ref_pixels`` to a batch of ``shape``.

    TV is a Frobenius norm, i.e. the square root of a sum over pixels, so for
    images of similar local statistics it grows with ``sqrt(B * H * W)``;
    the target is scaled by ``sqrt(B * H * W / ref_pixels)``.
    """
    B, _, H, W = shape
    return float(tau) * math.sqrt(B * H * W / float(ref_pixels))


def tv_prior_loss(x: torch.Tensor,
                  weight: float = 0.05,
                  tau_range: Tuple[float, float] = (2500., 3000.),
                  ref_pixels: int = TAU_REF_PIXELS,
                  generator: Optional[torch.Generator] = None,
                  tau: Optional[float] = None) -> torch.Tensor:
    """``weight * |TV(x) - tau|`` with a random TV target.

    PSAQ-ViT draws ``tau ~ U(2500, 3000)`` for a batch of 32 images of
    224x224 (in normalised space).  Here ``tau`` is drawn from ``tau_range``
    (with ``generator``) and scaled by ``sqrt(B*H*W / ref_pixels)`` (see
    :func:`scaled_tau`) so the target keeps the same per-pixel roughness at
    any batch size and (dense) resolution.  Pass ``tau`` to fix the unscaled
    target instead of drawing it.
    """
    if tau is None:
        u = torch.rand((), generator=generator).item()
        tau = tau_range[0] + (tau_range[1] - tau_range[0]) * u
    target = scaled_tau(tau, x.shape, ref_pixels)
    return weight * (total_variation(x) - target).abs()
