"""Real calibration images: the upper-bound baseline of the data-free methods.

:class:`RealImages` is a "synthesizer" that does not synthesise: it reads
``num_images`` image files from a folder and returns them in the same
normalised space as the other synthesizers, so the quantization pipeline can
calibrate on real data with the very same code path.
"""
import os
import os.path as osp
from typing import List, Optional, Tuple

import torch

from ..registry import MODELS
from .base import BaseSynthesizer

__all__ = ['RealImages', 'list_images', 'IMAGE_EXTENSIONS']

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')


def list_images(data_root: str) -> List[str]:
    """All ``.jpg``/``.jpeg``/``.png`` files (any letter case) under
    ``data_root``, recursively, as sorted paths relative to ``data_root``
    (sorted so the list does not depend on the file system's order)."""
    if not osp.isdir(data_root):
        raise FileNotFoundError(
            f'RealImages: data_root {data_root!r} does not exist or is not a '
            'folder')
    files = []
    for root, _, names in os.walk(data_root, followlinks=True):
        for name in names:
            if name.lower().endswith(IMAGE_EXTENSIONS):
                files.append(
                    osp.relpath(osp.join(root, name), data_root).replace(
                        os.sep, '/'))
    return sorted(files)


@MODELS.register_module()
class RealImages(BaseSynthesizer):
    """Calibration on real images read from a folder (upper bound).

    The image files under ``data_root`` (see :func:`list_images`) are listed
    sorted; ``num_images`` of them are picked with a permutation drawn from a
    CPU ``torch.Generator`` seeded with ``seed`` (the first ``num_images`` of
    ``randperm``), so a seed always picks the same files, in the same order.
    Each file is read with cv2 (BGR, 8 bit, 3 channels), converted to RGB,
    resized to the target ``(H, W)`` (bilinear) and normalised with the
    model's ``mean``/``std`` (``(rgb - mean) / std``).  No model forward.

    Resizing (``resize``):

    * ``'keep_ratio'`` (default): scale by ``min(H / h, W / w)`` so the image
      fits inside ``(H, W)`` without distortion (as the keep-ratio ``Resize``
      of the mmdet/mmseg test pipelines does), place it top-left and pad the
      bottom/right with 0 in the *normalised* space, i.e. the mean colour,
      which is exactly what ``DetDataPreprocessor`` / ``SegDataPreProcessor``
      pad batches with (they pad after normalising, ``pad_value=0``).  Object
      shapes and scales then match what the model sees at test time.
    * ``'stretch'``: plain resize to ``(H, W)`` (every pixel real, aspect
      ratio distorted).
    * ``'center_crop'``: a timm classifier's eval transform, the one
      :class:`~dfq_dense.cls.ImageNetValDataset` applies to the val images
      (``timm.data.create_transform(input_size=(3, H, W), interpolation,
      crop_pct, crop_mode, is_training=False, normalize=False)`` on the file
      read with PIL): the short side resized to ``size / crop_pct``, the
      centre ``(H, W)`` cropped.  A classifier is tested on such crops, not
      on padded images; the DFQ loop picks this mode, with the model's own
      ``crop_pct`` / ``interpolation`` / ``crop_mode``, for a
      :class:`~dfq_dense.cls.TimmClassifier` config that sets no
      ``resize``.

    Args (beyond :class:`BaseSynthesizer`; ``iterations`` is unused):
        data_root: folder of ``.jpg``/``.png`` images (searched recursively).
        resize: ``'keep_ratio'``, ``'stretch'`` or ``'center_crop'``.
        crop_pct, interpolation, crop_mode: timm's eval-transform settings
            of ``'center_crop'`` (timm's defaults; unused by the other
            modes).
    """

    RESIZE_MODES = ('keep_ratio', 'stretch', 'center_crop')
    INTERPOLATIONS = ('nearest', 'bilinear', 'bicubic', 'box', 'hamming',
                      'lanczos')
    CROP_MODES = ('center', 'squash', 'border')

    def __init__(self,
                 data_root: Optional[str] = None,
                 num_images: int = 8,
                 batch_size: int = 8,
                 img_size=None,
                 seed: int = 0,
                 resize: str = 'keep_ratio',
                 crop_pct: float = 0.875,
                 interpolation: str = 'bicubic',
                 crop_mode: str = 'center',
                 iterations: int = 0,
                 log_interval: int = 50,
                 progress: bool = True,
                 device=None):
        super().__init__(num_images=num_images, batch_size=batch_size,
                         img_size=img_size, iterations=iterations, seed=seed,
                         log_interval=log_interval, progress=progress,
                         device=device)
        if not data_root:
            raise ValueError('RealImages needs data_root (a folder of '
                             '.jpg/.png images)')
        if resize not in self.RESIZE_MODES:
            raise ValueError(f'RealImages: resize must be one of '
                             f'{self.RESIZE_MODES}, got {resize!r}')
        if isinstance(crop_pct, bool) or \
                not isinstance(crop_pct, (int, float)) or \
                not 0 < crop_pct <= 1:
            raise ValueError(f'RealImages: crop_pct must be in (0, 1], got '
                             f'{crop_pct!r}')
        if interpolation not in self.INTERPOLATIONS:
            raise ValueError(f'RealImages: interpolation must be one of '
                             f'{self.INTERPOLATIONS}, got {interpolation!r}')
        if crop_mode not in self.CROP_MODES:
            raise ValueError(f'RealImages: crop_mode must be one of '
                             f'{self.CROP_MODES}, got {crop_mode!r}')
        self.data_root = str(data_root)
        self.resize = resize
        self.crop_pct = float(crop_pct)
        self.interpolation = interpolation
        self.crop_mode = crop_mode
        self._transform = None  # center_crop: timm's, built once per size
        self.selected_files = None

    # ------------------------------------------------------------ selection
    def prepare(self) -> None:
        """Pick the files now: a missing folder or too few images fail
        before any work (see :meth:`select_files`)."""
        self.selected_files = self.select_files()

    def select_files(self) -> List[str]:
        """The ``num_images`` picked paths (absolute), in output order."""
        files = list_images(self.data_root)
        if len(files) < self.num_images:
            raise ValueError(
                f'RealImages: data_root {self.data_root!r} has '
                f'{len(files)} .jpg/.png images, fewer than num_images='
                f'{self.num_images}')
        g = torch.Generator().manual_seed(self.seed)
        perm = torch.randperm(len(files), generator=g)[:self.num_images]
        return [osp.join(self.data_root, files[i]) for i in perm.tolist()]

    # --------------------------------------------------------------- loading
    def load_image(self, path: str, hw: Tuple[int, int]) -> torch.Tensor:
        """One file -> normalised RGB ``(3, H, W)`` float tensor."""
        if self.resize == 'center_crop':
            return self._load_center_crop(path, hw)
        import cv2
        import numpy as np
        H, W = hw
        img = cv2.imread(path, cv2.IMREAD_COLOR)  # BGR uint8 (h, w, 3)
        if img is None:
            raise ValueError(f'RealImages: cannot read image {path!r}')
        img = img[:, :, ::-1]  # RGB
        h, w = img.shape[:2]
        if self.resize == 'stretch':
            out_hw = (H, W)
        else:
            scale = min(H / h, W / w)
            out_hw = (min(H, max(1, int(h * scale + 0.5))),
                      min(W, max(1, int(w * scale + 0.5))))
        if out_hw != (h, w):
            img = cv2.resize(np.ascontiguousarray(img),
                             (out_hw[1], out_hw[0]),
                             interpolation=cv2.INTER_LINEAR)
        rgb = torch.from_numpy(np.ascontiguousarray(img)).permute(
            2, 0, 1).float()
        x = (rgb - self.mean) / self.std
        if out_hw != (H, W):  # keep_ratio: bottom/right pad with 0
            out = torch.zeros((3, H, W))
            out[:, :out_hw[0], :out_hw[1]] = x
            x = out
        return x

    def _load_center_crop(self, path, hw):
        """``resize='center_crop'``: timm's eval transform, as the
        classifier's val images get it, then the model's mean / std."""
        from PIL import Image
        from timm.data import create_transform
        hw = tuple(int(v) for v in hw)
        if self._transform is None or self._transform[0] != hw:
            # normalize=False: uint8 RGB (3, H, W), as ImageNetValDataset.
            self._transform = (hw, create_transform(
                input_size=(3, ) + hw, interpolation=self.interpolation,
                crop_pct=self.crop_pct, crop_mode=self.crop_mode,
                is_training=False, normalize=False))
        try:
            with open(path, 'rb') as f:
                img = Image.open(f).convert('RGB')
        except OSError as err:
            raise ValueError(f'RealImages: cannot read image {path!r}: '
                             f'{err}') from None
        rgb = self._transform[1](img).float()
        return (rgb - self.mean) / self.std

    def generate(self, model, data_preprocessor_cfg=None, img_size=None):
        """See :meth:`BaseSynthesizer.generate`; fails before any work when
        the folder is missing or holds too few images.  The picked files are
        kept in ``self.selected_files``."""
        self.selected_files = self.select_files()
        return super().generate(model, data_preprocessor_cfg, img_size)

    def save(self, images, out_dir, meta=None):
        """:meth:`BaseSynthesizer.save`, with the picked files in ``meta``."""
        meta = dict(meta or {})
        meta.setdefault('data_root', self.data_root)
        meta.setdefault('resize', self.resize)
        if self.resize == 'center_crop':
            meta.setdefault('crop_pct', self.crop_pct)
            meta.setdefault('interpolation', self.interpolation)
            meta.setdefault('crop_mode', self.crop_mode)
        if self.selected_files is not None:
            meta.setdefault('files', [
                osp.relpath(f, self.data_root).replace(os.sep, '/')
                for f in self.selected_files
            ])
        return super().save(images, out_dir, meta)

    def synthesize_batch(self, backbone, n, hw, device, generator,
                         batch_idx=0, bar=None):
        files = self.selected_files
        if files is None:
            files = self.selected_files = self.select_files()
        start = batch_idx * self.batch_size
        x = torch.stack(
            [self.load_image(f, hw) for f in files[start:start + n]])
        self._bar_update(bar)
        return x
