"""Task-independent stand-ins for class logits at the backbone level.

The seed methods steer synthesis with the classifier: PSAQ-ViT and MimiQ
with a cross-entropy to random labels, SPDFQ with soft labels.  A detector
or segmentor has no image-level classifier, and this suite uses no task
heads, so the backbone-level version replaces the classifier with a *fixed
random projection* of the pooled multi-scale backbone features:

    v      = concat_i standardise(mean_hw(feat_i))      # (B, sum C_i)
    logits = logit_scale * v @ W / sqrt(dim(v))         # (B, K)

``W ~ N(0, 1)`` of shape ``(sum C_i, K)`` is drawn once from ``seed``, so the
"classes" are K random directions of the backbone's pooled feature space:
asking an image to score high on a random class asks its pooled features to
point in a random direction, which, like a random label, spreads the
synthetic images over the feature space.  Each stage's pooled vector is
standardised (zero mean, unit variance over channels) so every stage counts
the same whatever its width and scale; with ``v`` of norm ``sqrt(dim)`` and
the ``1 / sqrt(dim)`` factor a logit's magnitude is at most
``logit_scale * |W_k|`` (about ``logit_scale * sqrt(dim)`` for the aligned
direction).
"""
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    'RandomProjectionHead', 'ClassifierLogits', 'LABEL_HEADS',
    'classifier_num_classes', 'label_head', 'pooled_features', 'random_hard_targets',
    'random_soft_targets', 'soft_cross_entropy'
]


def pooled_features(feats: Sequence[torch.Tensor],
                    eps: float = 1e-5) -> torch.Tensor:
    """``concat_i standardise(mean_hw(feats[i]))``: ``(B, sum C_i)``.

    Args:
        feats: backbone outputs, each ``(B, C_i, H_i, W_i)`` (or already
            pooled ``(B, C_i)``).
    """
    pooled = []
    for f in feats:
        p = f.flatten(2).mean(-1) if f.dim() > 2 else f
        p = (p - p.mean(-1, keepdim=True)) / (
            p.var(-1, unbiased=False, keepdim=True) + eps).sqrt()
        pooled.append(p)
    return torch.cat(pooled, dim=-1)


class RandomProjectionHead:
    """Fixed random linear "classifier" over pooled backbone features.

    Not a module and not trained: ``W`` is a buffer-like tensor drawn from
    ``seed`` when the feature width is first seen (the width depends on the
    backbone), then kept.

    Args:
        num_classes: K, the number of random directions.
        logit_scale: multiplies the logits (temperature).
        seed: seeds ``W``.
    """

    def __init__(self, num_classes: int = 100, logit_scale: float = 1.0,
                 seed: int = 0):
        if num_classes < 2:
            raise ValueError(f'num_classes must be >= 2, got {num_classes}')
        self.num_classes = int(num_classes)
        self.logit_scale = float(logit_scale)
        self.seed = int(seed)
        self.weight: Optional[torch.Tensor] = None

    def _weight(self, dim: int, device, dtype) -> torch.Tensor:
        if self.weight is None or self.weight.shape[0] != dim:
            g = torch.Generator().manual_seed(self.seed)
            self.weight = torch.randn((dim, self.num_classes), generator=g)
        return self.weight.to(device=device, dtype=dtype)

    def __call__(self, feats: Sequence[torch.Tensor], start: int = 0,
                 total: Optional[int] = None) -> torch.Tensor:
        """The logits ``(B, K)`` of ``feats`` (``B`` images).

        ``start`` / ``total``: the images are the rows ``start:start + B``
        of a batch of ``total`` (a micro-batch).  The product with ``W`` is
        then taken on ``total`` rows (the others zero) and the micro-batch's
        rows returned: the same numbers, but a BLAS picks its kernel (and
        its rounding) by the number of rows, so this gives every image the
        logits, and the gradient, it gets in the whole batch.
        """
        v = pooled_features(feats)
        w = self._weight(v.shape[-1], v.device, v.dtype)
        if total is not None and int(total) != v.shape[0]:
            rows = v.shape[0]
            pad = v.new_zeros((int(total), v.shape[-1]))
            v = torch.cat([pad[:start], v, pad[start + rows:]], 0)
            out = self.logit_scale * (v @ w) / (v.shape[-1] ** 0.5)
            return out[start:start + rows]
        return self.logit_scale * (v @ w) / (v.shape[-1] ** 0.5)


def random_hard_targets(n: int, num_classes: int,
                        generator: torch.Generator) -> torch.Tensor:
    """``n`` uniform random class indices (the random labels of PSAQ-ViT /
    MimiQ)."""
    return torch.randint(0, num_classes, (n, ), generator=generator)


def random_soft_targets(n: int, num_classes: int, generator: torch.Generator,
                        low: float = 5.0, high: float = 10.0) -> torch.Tensor:
    """SPDFQ's soft labels: ``softmax(Z)`` with ``Z`` zero except one random
    target entry per row drawn from ``U(low, high)``; ``(n, K)``."""
    target = torch.randint(0, num_classes, (n, ), generator=generator)
    z = torch.zeros((n, num_classes))
    z[torch.arange(n), target] = low + (high - low) * torch.rand(
        (n, ), generator=generator)
    return z.softmax(-1)


def soft_cross_entropy(logits: torch.Tensor,
                       targets: torch.Tensor,
                       total: Optional[int] = None) -> torch.Tensor:
    """``mean_b(-sum_k targets[b, k] * log_softmax(logits)[b, k])``; with
    ``total`` (the rows of the whole batch, for a micro-batch of it) the
    sum over the rows divided by ``total`` instead of the mean."""
    ce = (targets.to(logits) * F.log_softmax(logits, -1)).sum(-1)
    if total is None:
        return -ce.mean()
    return -(ce.sum() / total)


#: Where the class-guided losses take their logits: ``'projection'`` (the
#: :class:`RandomProjectionHead` stand-in over pooled backbone features, the
#: backbone-level variant for detectors and segmentors) or ``'classifier'``
#: (the backbone's own output, the logits of a timm classifier, as the
#: methods' papers do on ImageNet).
LABEL_HEADS = ('projection', 'classifier')


def classifier_num_classes(backbone) -> int:
    """The number of classes of a classifier backbone (a timm model:
    ``num_classes``); ValueError for a backbone that gives no logits."""
    k = getattr(backbone, 'num_classes', None)
    if not isinstance(k, int) or isinstance(k, bool) or k < 2 or \
            not hasattr(backbone, 'forward_head'):
        raise ValueError(
            f"label_head='classifier' needs a classifier whose output is "
            f'class logits (a timm model with num_classes >= 2); '
            f'{type(backbone).__name__} is not one (use '
            "label_head='projection')")
    return k


class ClassifierLogits:
    """The class logits the classifier backbone itself outputs, with the
    call of :class:`RandomProjectionHead` (``head(feats, start, total)``):
    ``feats`` is the backbone output, ``(B, K)`` logits (or a one-element
    sequence of them), returned as they are."""

    def __init__(self, num_classes: int):
        self.num_classes = int(num_classes)

    def __call__(self, feats, start: int = 0,
                 total: Optional[int] = None) -> torch.Tensor:
        if not torch.is_tensor(feats):
            feats = list(feats)
            if len(feats) != 1:
                raise ValueError('ClassifierLogits: the backbone gave '
                                 f'{len(feats)} outputs, expected logits')
            feats = feats[0]
        if feats.dim() != 2 or feats.shape[-1] != self.num_classes:
            raise ValueError(
                f'ClassifierLogits: backbone output {tuple(feats.shape)} '
                f'is not (B, {self.num_classes}) class logits')
        return feats


def label_head(kind: str, backbone, num_classes: int, logit_scale: float,
               seed: int):
    """``(head, num_classes)`` of a method's class-guided loss: the
    classifier's own logits (``kind='classifier'``, ``num_classes`` that of
    the classifier) or the random projection (``'projection'``)."""
    if kind == 'classifier':
        k = classifier_num_classes(backbone)
        return ClassifierLogits(k), k
    if kind != 'projection':
        raise ValueError(f'label_head must be one of {LABEL_HEADS}, got '
                         f'{kind!r}')
    return RandomProjectionHead(num_classes=num_classes,
                                logit_scale=logit_scale, seed=seed), \
        num_classes
