"""Losses of PSAQ-ViT (patch-similarity entropy) and the image TV prior.

All functions are pure (no state); tensors keep their autograd graph so the
losses can be back-propagated to the synthetic pixels.
"""
import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

__all__ = [
    'patch_similarity', 'kde', 'kde_entropy', 'psaq_entropy_loss',
    'total_variation', 'tv_prior_loss', 'scaled_tau'
]

#: Pixels of the batch the PSAQ-ViT TV target was tuned for (32 x 224 x 224).
TAU_REF_PIXELS = 32 * 224 * 224


def patch_similarity(feat: torch.Tensor,
                     valid: Optional[torch.Tensor] = None,
                     max_samples: Optional[int] = None,
                     generator: Optional[torch.Generator] = None,
                     eps: float = 1e-8) -> List[torch.Tensor]:
    """Cosine similarities between the tokens of each window, per image.

    Swin has no CLS token, so nothing is dropped.  For every window the
    similarity of every ordered pair ``(i, j)`` of *valid* tokens with
    ``i != j`` is kept: the diagonal (a token with itself, always 1) carries
    no information and would put a spike at 1 in the KDE, so it is excluded.
    Both ``(i, j)`` and ``(j, i)`` are kept (as in PSAQ-ViT, which uses the
    full similarity matrix); this doubles every value and does not change
    the density.

    Args:
        feat: ``(B, nW, N, D)`` window tokens.
        valid: ``(B, nW, N)`` bool, False for padding tokens; None = all.
        max_samples: if set, keep at most this many similarities per image,
            drawn uniformly (with replacement) with ``generator``; bounds the
            memory of the KDE at dense resolution.
        generator: CPU ``torch.Generator`` for the subsampling (a fresh one
            seeded with 0 when None, so the call is deterministic).

    Returns:
        list of ``B`` 1-D tensors (per image, all windows pooled).
    """
    B, nW, N, _ = feat.shape
    f = feat / feat.norm(dim=-1, keepdim=True).clamp_min(eps)
    sim = f @ f.transpose(-1, -2)  # (B, nW, N, N)
    eye = torch.eye(N, dtype=torch.bool, device=feat.device)
    if valid is None:
        pair = (~eye).expand(B, nW, N, N)
    else:
        valid = valid.to(torch.bool)
        pair = valid.unsqueeze(-1) & valid.unsqueeze(-2) & ~eye
    if max_samples is not None and generator is None:
        generator = torch.Generator().manual_seed(0)
    if bool((pair == pair[:1]).all()):
        # Same layout for every image (always the case for Swin padding):
        # one gather for the whole batch.
        out = sim[:, pair[0]]  # (B, M)
        out = list(_subsample(out, max_samples, generator).unbind(0))
        return out
    return [
        _subsample(sim[b][pair[b]].unsqueeze(0), max_samples,
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


def kde(points: torch.Tensor, samples: torch.Tensor,
        bandwidth: float = 0.01) -> torch.Tensor:
    """Gaussian KDE of ``samples`` evaluated at ``points``.

    ``p(x) = mean_s exp(-(x - s)^2 / (2 h^2)) / sqrt(2 pi h^2)``.
    ``points`` ``(..., P)``, ``samples`` ``(..., S)`` -> ``(..., P)``.
    """
    h2 = float(bandwidth)**2
    d = points.unsqueeze(-1) - samples.unsqueeze(-2)  # (..., P, S)
    return torch.exp(-d * d / (2 * h2)).mean(-1) / math.sqrt(2 * math.pi * h2)


def kde_entropy(samples: Union[torch.Tensor, Sequence[torch.Tensor]],
                bandwidth: float = 0.01,
                num_points: int = 10,
                eps: float = 1e-4) -> torch.Tensor:
    """Differential entropy of a Gaussian KDE of ``samples``.

    The KDE (see :func:`kde`) is evaluated at ``num_points`` points
    ``linspace(min(samples), max(samples))`` (min/max taken without gradient)
    and ``-(p + eps) log(p + eps)`` is integrated over them with the
    trapezoid rule.

    Args:
        samples: ``(S,)`` -> scalar, ``(B, S)`` -> ``(B,)``, or a list of 1-D
            tensors (possibly of different lengths) -> ``(B,)``.

    Returns:
        the entropy estimate (scalar or one value per row/element).
    """
    if isinstance(samples, (list, tuple)):
        return torch.stack(
            [kde_entropy(s, bandwidth, num_points, eps) for s in samples])
    with torch.no_grad():
        lo = samples.amin(-1, keepdim=True)
        hi = samples.amax(-1, keepdim=True)
        t = torch.linspace(0, 1, num_points, device=samples.device,
                           dtype=samples.dtype)
        points = lo + (hi - lo) * t  # (..., P)
    p = kde(points, samples, bandwidth) + eps
    return torch.trapezoid(-p * torch.log(p), points, dim=-1)


def psaq_entropy_loss(records: Sequence[Dict],
                      bandwidth: float = 0.01,
                      num_points: int = 10,
                      max_samples: Optional[int] = None,
                      generator: Optional[torch.Generator] = None,
                      return_per_layer: bool = False):
    """PSAQ-ViT patch-similarity loss: ``-sum_layers mean_batch H``.

    Minimising it maximises the entropy (diversity) of the within-window
    patch similarity at every hooked attention layer.

    Args:
        records: output of :class:`~dfq_dense.synth.hooks.AttnOutputRecorder`
            (dicts with ``feat`` ``(B, nW, N, D)`` and ``valid``).
        return_per_layer: also return the ``(L,)`` detached entropies.
    """
    if len(records) == 0:
        raise ValueError('psaq_entropy_loss got no records: was the backbone '
                         'run inside an AttnOutputRecorder?')
    ents = []
    for rec in records:
        sims = patch_similarity(rec['feat'], rec.get('valid'), max_samples,
                                generator)
        if all(s.numel() == sims[0].numel() for s in sims):
            h = kde_entropy(torch.stack(sims), bandwidth, num_points)
        else:
            h = kde_entropy(sims, bandwidth, num_points)
        ents.append(h.mean())
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
