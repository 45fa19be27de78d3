"""ImageNet val as a class-folder tree, with timm's eval transform.

Layout (the usual one, e.g. ILSVRC2012_img_val.tar sorted into class
folders by the common ``valprep.sh``)::

    data/imagenet/val/n01440764/ILSVRC2012_val_00000293.JPEG
    data/imagenet/val/n01443537/...
    ...                                  (1000 wnid folders)

Class index = position of the folder in sorted order, as torchvision's
ImageFolder and timm's folder reader give it (timm sorts by a natural key,
which for the equal-length wnids ``n########`` is the same order); that is
the label order of timm's ImageNet-1k classifiers.

Each sample is the image as timm's own eval transform of the model leaves it
*before* normalisation: ``timm.data.create_transform(**resolve_data_config(
{}, model=model), is_training=False, normalize=False)``, i.e. resize, center
crop, a ``uint8`` RGB ``(3, H, W)`` tensor (what timm hands its prefetcher).
Normalisation is the model's data preprocessor's (mean and std of the same
data config, times 255), as for the suite's detection and segmentation
models, whose synthesizers work in that normalised space; together the two
give timm's full eval transform (checked by the tests).
"""
import os
import os.path as osp

import torch
from mmengine.dataset import BaseDataset
from mmengine.structures import BaseDataElement

from ..registry import DATASETS
from .timm_utils import create_timm_model, timm_data_config

LAYOUT = '<root>/<wnid class folder>/*.JPEG'


class ImageFolderError(FileNotFoundError):
    """The folder is missing or is not a class-folder tree: one line."""


def scan_class_folders(root, extensions):
    """``(classes, samples)`` of a class-folder tree.

    ``classes`` are the sorted sub-folder names (hidden ones, such as
    ``.ipynb_checkpoints``, skipped: they would shift every label after
    them); ``samples`` are ``(path, class index)`` with the files of each
    class in sorted order.  An empty class folder is an error, as in
    torchvision's ImageFolder: timm's reader would drop the class and shift
    the labels after it, so the two conventions would disagree.
    """
    if not osp.isdir(root):
        raise ImageFolderError(
            f'ImageNet val folder not found: {root} (expected the layout '
            f'{LAYOUT}, one folder per class; set the dataset\'s data_root)')
    classes = sorted(e.name for e in os.scandir(root)
                     if e.is_dir() and not e.name.startswith('.'))
    if not classes:
        raise ImageFolderError(
            f'{root} has no class folders (expected the layout {LAYOUT}; '
            'sort the val images into their wnid folders first)')
    samples = []
    for index, name in enumerate(classes):
        folder = osp.join(root, name)
        files = sorted(
            f for f in os.listdir(folder)
            if osp.splitext(f)[1].lower() in extensions and
            osp.isfile(osp.join(folder, f)))
        if not files:
            raise ImageFolderError(
                f'class folder {folder} has no images ({"/".join(extensions)}'
                f'); expected the layout {LAYOUT}')
        samples.extend((osp.join(folder, f), index) for f in files)
    return classes, samples


@DATASETS.register_module()
class ImageNetValDataset(BaseDataset):
    """ImageNet val (or any class-folder tree) for a timm classifier.

    Args:
        data_root: the folder of the class folders.
        model_name: the timm model (with its weights' tag, e.g.
            ``'swin_tiny_patch4_window7_224.ms_in1k'``) whose eval transform
            is applied: it is built on the meta device, only to read its
            ``pretrained_cfg``.
        model_kwargs: the model's ``timm.create_model`` keyword arguments,
            as given to the classifier.
        data_config: overrides of timm's data config (``resolve_data_config``
            ``args``, e.g. ``dict(input_size=(3, 112, 112), crop_pct=1.0)``).
        train_transform: None (default): timm's eval transform, the
            evaluation this class is for.  A dict: timm's *training*
            transform instead, ``create_transform(**data_config,
            is_training=True, normalize=False, **train_transform)`` (e.g.
            ``dict(scale=(0.6, 1.0), hflip=0.5, color_jitter=0.2)``), for
            training a classifier on a class-folder tree of one's own (the
            demo classifier).
        num_classes: how many class folders there must be.  Labels are
            folder positions, so a tree with another number of classes (a
            subset of ImageNet) would silently mislabel images for a
            1000-class model; it is refused instead.  Give the true number
            for a tree of your own.
        **kwargs: :class:`mmengine.dataset.BaseDataset` arguments
            (``indices``, ``serialize_data``, ``lazy_init``...).  There is no
            ``pipeline``: the transform is timm's.

    A sample is ``dict(inputs=uint8 (3, H, W), data_samples=BaseDataElement)``
    with ``gt_label`` (int64 scalar tensor) and the metainfo ``img_path``,
    ``ori_shape`` (h, w of the file) and ``img_shape`` (of the crop).
    ``metainfo['classes']`` are the folder names (wnids) in label order.
    """

    METAINFO = dict(classes=None)

    def __init__(self,
                 data_root='data/imagenet/val',
                 model_name='swin_tiny_patch4_window7_224',
                 model_kwargs=None,
                 data_config=None,
                 train_transform=None,
                 num_classes=1000,
                 test_mode=True,
                 **kwargs):
        if 'pipeline' in kwargs:
            raise TypeError(
                'ImageNetValDataset takes no pipeline: it applies timm\'s '
                'eval transform of model_name; change it with data_config')
        from timm.data import create_transform
        from timm.data.readers.img_extensions import get_img_extensions
        try:
            model = create_timm_model(model_name, model_kwargs=model_kwargs,
                                      device='meta')
        except (RuntimeError, NotImplementedError):
            # A model whose construction reads tensor values cannot be
            # built on the meta device; a real (random-init) build gives
            # the same pretrained_cfg.
            model = create_timm_model(model_name, model_kwargs=model_kwargs)
        self.model_name = model_name
        self.data_config = timm_data_config(model, data_config)
        # normalize=False: uint8 out; the data preprocessor normalises.
        if train_transform is None:
            self.transform = create_transform(
                **self.data_config, is_training=False, normalize=False)
        else:
            self.transform = create_transform(
                **self.data_config, is_training=True, normalize=False,
                **dict(train_transform))
        self.num_classes = num_classes
        self._extensions = get_img_extensions(as_set=True)
        super().__init__(
            data_root=data_root, pipeline=[self._load_sample],
            test_mode=test_mode, **kwargs)

    def load_data_list(self):
        classes, samples = scan_class_folders(self.data_root,
                                              self._extensions)
        if self.num_classes is not None and len(classes) != self.num_classes:
            raise ImageFolderError(
                f'{self.data_root} has {len(classes)} class folders, '
                f'expected {self.num_classes} (labels are sorted folder '
                'positions, so a subset of classes would mislabel images; '
                'use the full val set, or set num_classes for a tree of your '
                'own)')
        self._metainfo['classes'] = tuple(classes)
        return [dict(img_path=path, gt_label=label)
                for path, label in samples]

    def _load_sample(self, info):
        # Opened and converted as torchvision's and timm's folder datasets
        # do (PIL, RGB), so the transform sees the same image.
        from PIL import Image
        with open(info['img_path'], 'rb') as f:
            img = Image.open(f)
            ori_shape = (img.height, img.width)
            img = img.convert('RGB')
        inputs = self.transform(img)
        sample = BaseDataElement(metainfo=dict(
            img_path=info['img_path'], ori_shape=ori_shape,
            img_shape=tuple(inputs.shape[-2:])))
        sample.gt_label = torch.tensor(info['gt_label'], dtype=torch.long)
        return dict(inputs=inputs, data_samples=sample)
