"""A timm image classifier as an mmengine model."""
import copy

import torch
import torch.nn.functional as F
from mmengine.logging import print_log
from mmengine.model import BaseModel
from mmengine.structures import BaseDataElement

from ..registry import MODELS
from .timm_utils import (create_timm_model, find_weights, load_timm_weights,
                         timm_data_config)


@MODELS.register_module()
class TimmClassifier(BaseModel):
    """``timm.create_model(model_name, pretrained=False, num_classes=...)``
    with its weights, a normalising data preprocessor and mmengine's
    ``forward`` modes.

    Args:
        model_name: timm model name, with the weights' tag where timm has
            several (``'swin_small_patch4_window7_224.ms_in1k'``): the tag
            selects the ``pretrained_cfg`` (weights file, eval transform).
        num_classes: classifier outputs (1000 for ImageNet-1k weights).
        checkpoint: a local weights file (see
            :func:`dfq_dense.cls.timm_utils.find_weights`).  None: timm's
            cached file for the model, when there is one.  Loaded strictly.
        pretrained: False builds the model with timm's random init and loads
            nothing (for tests and tiny models; must be asked for, so that a
            missing file is never evaluated as random weights).
        model_kwargs: further ``timm.create_model`` keyword arguments
            (``embed_dim``, ``depths``, ``img_size``, ``drop_path_rate``...).
        data_config: overrides of timm's data config
            (``resolve_data_config`` ``args``), here for ``mean``/``std``.
        data_preprocessor: None: mmengine's ``ImgDataPreprocessor`` with
            the model's data-config mean and std in pixel units (x 255),
            RGB in, no channel flip; a dict is completed with them.

    Attributes:
        backbone: the timm model itself, the *whole* classifier (patch
            embedding, blocks, final norm, head), not a feature extractor:
            ``backbone(x)`` maps normalised images ``(N, 3, H, W)`` to logits
            ``(N, num_classes)``.  Named ``backbone`` because the suite's
            synthesizers and quantizers look for the transformer at
            ``model.backbone`` (as in the mmdet / mmseg models); its module
            names are timm's (``layers.0.blocks.0.attn.qkv`` for Swin,
            ``blocks.0.attn.qkv`` for DeiT), not mmdet's.
        data_config: timm's resolved data config (what the dataset's
            transform uses as well).
        weights: the file the weights were loaded from (None when
            ``pretrained=False``).
    """

    def __init__(self,
                 model_name,
                 num_classes=1000,
                 checkpoint=None,
                 pretrained=True,
                 model_kwargs=None,
                 data_config=None,
                 data_preprocessor=None,
                 init_cfg=None):
        # Built first: the preprocessor's mean/std come from its data config,
        # and nn.Module attributes can only be set after BaseModel.__init__.
        net = create_timm_model(model_name, num_classes=num_classes,
                                model_kwargs=model_kwargs)
        weights = None
        if pretrained:
            weights = find_weights(model_name, net.pretrained_cfg,
                                   checkpoint)
            load_timm_weights(net, model_name, weights)
            print_log(f'TimmClassifier: {model_name} weights from {weights}',
                      logger='current')
        elif checkpoint is not None:
            raise ValueError(
                f'TimmClassifier: checkpoint={checkpoint!r} with '
                'pretrained=False; drop one of them')
        resolved = timm_data_config(net, data_config)
        preprocessor = copy.deepcopy(data_preprocessor) \
            if data_preprocessor is not None else \
            dict(type='ImgDataPreprocessor')
        if isinstance(preprocessor, dict):
            # timm's mean/std are for [0, 1] tensors; the dataset gives
            # uint8 0..255 (as the suite's other models' inputs).
            preprocessor.setdefault(
                'mean', [255. * m for m in resolved['mean']])
            preprocessor.setdefault(
                'std', [255. * s for s in resolved['std']])
        super().__init__(data_preprocessor=preprocessor, init_cfg=init_cfg)
        self.backbone = net
        self.model_name = model_name
        self.data_config = resolved
        self.weights = weights

    def init_weights(self):
        """Nothing: the weights are set in ``__init__`` (loaded, or timm's
        own init).  mmengine's default would call the timm model's
        ``init_weights`` and re-randomise loaded weights when a Runner
        trains."""

    def forward(self, inputs, data_samples=None, mode='tensor'):
        """``inputs``: normalised ``(N, 3, H, W)``.

        ``mode='tensor'``: logits ``(N, C)``.  ``'predict'``: a list of N
        :class:`~mmengine.structures.BaseDataElement`, each the input's data
        sample (metainfo, ``gt_label``) or a new one, with ``logits``
        ``(C,)`` and ``pred_label`` (int64 scalar, the top-1 class).
        ``'loss'``: ``dict(loss=cross entropy against gt_label)``.
        """
        logits = self.backbone(inputs)
        if mode == 'tensor':
            return logits
        if mode == 'predict':
            return self._predictions(logits, data_samples)
        if mode == 'loss':
            if not data_samples:
                raise ValueError('TimmClassifier loss mode needs data_samples '
                                 'with gt_label')
            labels = torch.stack([s.gt_label for s in data_samples]).to(
                logits.device).view(-1)
            return dict(loss=F.cross_entropy(logits, labels))
        raise ValueError(f'TimmClassifier: unknown mode {mode!r} (tensor, '
                         'predict or loss)')

    @staticmethod
    def _predictions(logits, data_samples):
        if data_samples is None:
            data_samples = [BaseDataElement() for _ in range(len(logits))]
        elif len(data_samples) != len(logits):
            raise ValueError(f'{len(data_samples)} data samples for '
                             f'{len(logits)} images')
        out = []
        logits = logits.detach()
        for sample, row in zip(data_samples, logits):
            pred = sample.new()  # a copy: metainfo and gt_label kept
            pred.logits = row
            pred.pred_label = row.argmax()
            out.append(pred)
        return out
