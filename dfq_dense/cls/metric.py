"""Top-1 / top-5 accuracy of the classification track."""
import torch
from mmengine.evaluator import BaseMetric

from ..registry import METRICS


@METRICS.register_module()
class ImageNetAccuracy(BaseMetric):
    """Top-1 and top-5 accuracy in percent: ``imagenet/top1``,
    ``imagenet/top5``.

    Consumes the predictions of
    :class:`~dfq_dense.cls.classifier.TimmClassifier` (each with ``logits``
    of shape ``(num_classes,)`` and ``gt_label``).  A sample is right at k
    when its label is among its k highest logits (``torch.topk``); with
    fewer than 5 classes, top-5 is over all of them.

    Per sample only the 5 best class indices and the label are kept (not
    the 1000 logits), so 50 000 val images cost a few MB, also when the
    results are gathered across ranks.
    """

    default_prefix = 'imagenet'
    TOPK = 5

    def process(self, data_batch, data_samples):
        for sample in data_samples:
            if 'logits' not in sample or 'gt_label' not in sample:
                raise KeyError(
                    'ImageNetAccuracy needs predictions with "logits" and '
                    f'"gt_label", got keys {sorted(sample)}; use '
                    'TimmClassifier\'s predict mode and ImageNetValDataset')
            logits = torch.as_tensor(sample['logits']).detach().float()
            k = min(self.TOPK, logits.shape[-1])
            best = logits.topk(k).indices.cpu()
            self.results.append(
                (best, int(torch.as_tensor(sample['gt_label']))))

    def compute_metrics(self, results):
        if not results:
            raise ValueError('ImageNetAccuracy got no predictions')
        best = torch.stack([r[0] for r in results])  # (N, k), best first
        labels = torch.tensor([r[1] for r in results]).unsqueeze(1)
        hits = best == labels
        # Counts over the number of samples: exact, not a float32 mean.
        n = len(results)
        return dict(top1=100.0 * int(hits[:, 0].sum()) / n,
                    top5=100.0 * int(hits.any(dim=1).sum()) / n)
