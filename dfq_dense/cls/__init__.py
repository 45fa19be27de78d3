"""Classification track: timm classifiers on ImageNet val.

* :class:`TimmClassifier` (``MODELS``): a timm model with its weights and a
  normalising data preprocessor, as an mmengine model;
* :class:`ImageNetValDataset` (``DATASETS``): a class-folder tree with
  timm's eval transform of the model;
* :class:`ImageNetAccuracy` (``METRICS``): ``imagenet/top1``,
  ``imagenet/top5`` in percent.

Configs: ``configs/cls/``.  Importing this package does not import timm
(the registries import it for every ``dfq_dense.*`` look-up).
"""
from .classifier import TimmClassifier
from .dataset import ImageFolderError, ImageNetValDataset
from .metric import ImageNetAccuracy
from .timm_utils import WeightsNotFoundError

__all__ = ['TimmClassifier', 'ImageNetValDataset', 'ImageNetAccuracy',
           'ImageFolderError', 'WeightsNotFoundError']
