"""DFQTestLoop: synthesize -> quantize -> calibrate -> the standard test.

Replaces mmengine's TestLoop (``test_cfg = dict(type='dfq_dense.DFQTestLoop')``),
in the spirit of mmrazor's PTQLoop.  ``Runner.test`` loads the checkpoint
before ``loop.run()``, so the loop always starts from the FP weights; after
calibration the unchanged TestLoop.run evaluates the quantized model with the
config's own metric (CocoMetric, IoUMetric).
"""
import copy
import os.path as osp
import time
from contextlib import contextmanager

import torch
from mmengine.dist import broadcast, get_rank, is_distributed
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.runner import TestLoop
from mmengine.utils import ProgressBar

from ..quant import enable_calibration, finish_calibration, quantize_model
from ..quant.io import (QuantParamsError, load_quant_params,
                        read_quant_params, save_quant_params,
                        snapshot_state)
from ..quant.spec import SETTING_KEYS
from ..registry import LOOPS, MODELS, build
from ..synth.base import load_images, save_images
from .dfq_config import DFQConfigError, parse_dfq_config, plain

SYNTH_DIR = 'synthetic'
QUANT_PARAMS = 'quant_params.pth'


def infer_test_image_size(cfg):
    """(H, W) the model is tested at, read from the test pipeline.

    mmdet's ``Resize(scale=(1333, 800), keep_ratio=True)`` means a short side
    of 800 and a long side of at most 1333: synthesize landscape 800x1333.
    mmseg models have a fixed ``data_preprocessor.size`` (the crop size).
    """
    size = cfg.model.get('data_preprocessor', {}).get('size')
    if size:
        return tuple(size)
    for step in cfg.test_dataloader.dataset.get('pipeline', []):
        if step.get('type') == 'Resize' and 'scale' in step:
            scale = step['scale']
            if isinstance(scale, int):
                return (scale, scale)
            return (min(scale), max(scale))
    raise ValueError('cannot infer the test image size: set '
                     'dfq.synthesizer.img_size=(H, W)')


def train_image_folder(cfg):
    """The training-image folder of the config's train dataset (the
    real-image baseline's default source): ``data/coco/train2017/`` for
    COCO, ``data/ade/ADEChallengeData2016/images/training`` for ADE20K."""
    dataset = cfg.train_dataloader.dataset
    while 'dataset' in dataset:  # RepeatDataset and other wrappers
        dataset = dataset.dataset
    prefix = dataset.get('data_prefix', {})
    img = prefix.get('img', prefix.get('img_path', ''))
    return osp.join(dataset.get('data_root', ''), img)


def calibration_batch(images, preprocessor, task):
    """A data batch for ``model.test_step`` from normalised images.

    The images are de-normalised back to the 0-255 channel order the loading
    pipeline produces (BGR when the preprocessor flips to RGB), so they go
    through the model's own data_preprocessor like real images.
    """
    mean = preprocessor.mean.to(images)
    std = preprocessor.std.to(images)
    raw = images * std + mean
    # mmengine's ImgDataPreprocessor and mmseg's SegDataPreProcessor name
    # the flag differently.
    if getattr(preprocessor, '_channel_conversion', False) or \
            getattr(preprocessor, 'channel_conversion', False):
        raw = raw.flip(1)
    h, w = images.shape[-2:]
    if task == 'det':
        from mmdet.structures import DetDataSample as Sample
        meta = dict(img_shape=(h, w), ori_shape=(h, w),
                    scale_factor=(1.0, 1.0))
    else:
        from mmseg.structures import SegDataSample as Sample
        meta = dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w))
    samples = [Sample(metainfo=dict(meta, img_id=i)) for i in range(len(raw))]
    return dict(inputs=list(raw.cpu()), data_samples=samples)


@contextmanager
def _all_detections(model):
    """Keep every RoI-head detection during calibration.

    Synthetic images seldom give detections above the usual score threshold
    (0.05); without any, the mask head would never run and its quantizers
    would stay uncalibrated.  With the threshold at 0 the top
    ``max_per_img`` boxes of each image reach the mask head.
    """
    heads = [m for m in model.modules()
             if hasattr(m, 'test_cfg') and isinstance(m.test_cfg, dict) and
             'score_thr' in m.test_cfg]
    saved = [m.test_cfg['score_thr'] for m in heads]
    for m in heads:
        m.test_cfg['score_thr'] = 0.0
    try:
        yield
    finally:
        for m, value in zip(heads, saved):
            m.test_cfg['score_thr'] = value


@LOOPS.register_module()
class DFQTestLoop(TestLoop):
    """Test loop that quantizes the model data-free before testing.

    After ``run`` the attribute ``report`` holds what ``tools/dfq_test.py``
    writes: FP metrics (if ``dfq.eval_fp``), number and size of the synthetic
    images, quantized module counts and wall seconds per stage.
    """

    def __init__(self, runner, dataloader, evaluator, fp16=False):
        super().__init__(runner, dataloader, evaluator, fp16)
        self.dfq = parse_dfq_config(runner.cfg.get('dfq'))
        self.task = 'det' if runner.cfg.get('default_scope') == 'mmdet' \
            else 'seg'
        self.report = {}
        # Everything is checked here, before the checkpoint is loaded and
        # anything runs: quantizer settings against the real module names,
        # saved parameters against the config, the method against the model.
        try:
            self._quantize(self._model, dry_run=True)
        except ValueError as err:
            raise DFQConfigError(str(err)) from None
        if self.dfq.load_quantized:
            self._check_quant_params_cfg(self.dfq.load_quantized)
        self.synth_cfg = self._synthesizer_cfg()
        self.synthesizer = None
        if not self.dfq.load_quantized:
            try:
                self.synthesizer = build(MODELS, self.synth_cfg)
                self.synthesizer.check_model(self._model)
                # Loss terms also go to the config's visualizer backends.
                self.synthesizer.visualizer = runner.visualizer
                if not self.dfq.load_images and \
                        hasattr(self.synthesizer, 'select_files'):
                    self.synthesizer.select_files()  # real images exist?
            except (ValueError, TypeError, FileNotFoundError) as err:
                raise DFQConfigError(
                    f'dfq.synthesizer {self.synth_cfg["type"]}: {err}') \
                    from None

    @property
    def _model(self):
        model = self.runner.model
        return model.module if is_model_wrapper(model) else model

    def run(self):
        model = self._model
        if self.dfq.eval_fp:
            start = time.time()
            self.report['fp_metrics'] = super().run()
            self.report['fp_eval_seconds'] = time.time() - start

        if self.dfq.load_quantized:
            self._load_quantized(model)
        else:
            # Teacher-student methods need the FP model beside the student.
            teacher = copy.deepcopy(model).eval() \
                if getattr(self.synthesizer, 'teacher_student', False) \
                else None
            start = time.time()
            images = self._get_images(teacher or model)
            self.report['synthesis_seconds'] = time.time() - start

            start = time.time()
            self.report['quantized_modules'] = self._quantize(model)
            snapshot = snapshot_state(model)
            folded = self._calibrate(model, images)
            self.report['calibration_seconds'] = time.time() - start
            self.report['reparameterized'] = len(folded)
            if teacher is not None:
                start = time.time()
                adapted = self._adapt(teacher, model, images, bool(folded))
                self.report['adapt_seconds'] = time.time() - start
                del teacher
                if get_rank() == 0 and not torch.equal(adapted, images):
                    # The sample steps changed the images: keep them too.
                    save_images(adapted, model.data_preprocessor.mean,
                                model.data_preprocessor.std,
                                osp.join(self.runner.work_dir, SYNTH_DIR,
                                         'adapted'),
                                meta=dict(synthesizer=self.report[
                                    'synthesizer'], adapted=True))
            if get_rank() == 0:
                path = osp.join(self.runner.work_dir, QUANT_PARAMS)
                save_quant_params(path, model, snapshot,
                                  plain(self.dfq.quantizer), reparam=folded,
                                  extra_meta=dict(
                                      synthesizer=self.report['synthesizer'],
                                      num_images=self.report['num_images'],
                                      image_size=self.report['image_size']))
                self.report['quant_params'] = path

        start = time.time()
        metrics = super().run()
        self.report['eval_seconds'] = time.time() - start
        return metrics

    def _adapt(self, teacher, model, images, reparameterized):
        """Let a teacher-student method adapt the calibrated student.

        Every rank runs it on the same images and seed (re-calibration
        inside is collective); rank 0's result is then broadcast so that the
        ranks hold identical students even where GPU kernels are not
        deterministic.  A reparameterised student cannot be re-calibrated
        (its LayerNorms already hold the folded scales): the method then
        keeps the first calibration.
        """
        calibrate = None if reparameterized else \
            (lambda imgs: self._calibrate(model, imgs))
        images = self.synthesizer.adapt(teacher, model, images,
                                        calibrate=calibrate)
        if is_distributed():
            for tensor in list(model.state_dict().values()):
                broadcast(tensor, src=0)
        return images

    def _quantize(self, model, dry_run=False):
        q = self.dfq.quantizer
        return quantize_model(
            model, w_bits=q.w_bits, a_bits=q.a_bits, scope=q.scope,
            skip=q.skip, dry_run=dry_run,
            **{k: q[k] for k in SETTING_KEYS if k in q})

    def _check_quant_params_cfg(self, path):
        try:
            meta, _ = read_quant_params(path)
        except (QuantParamsError, FileNotFoundError) as err:
            raise DFQConfigError(f'dfq.load_quantized: {err}') from None
        if meta['quantizer'] != plain(self.dfq.quantizer):
            q = meta['quantizer']
            raise DFQConfigError(
                f'dfq.load_quantized: {path} was made with W{q["w_bits"]}'
                f'A{q["a_bits"]} and another quantizer setting than this '
                f'config (W{self.dfq.quantizer.w_bits}'
                f'A{self.dfq.quantizer.a_bits}): use the config it was made '
                'with')

    def _load_quantized(self, model):
        """Rebuild the quantized model from saved parameters: no synthesis,
        no calibration."""
        start = time.time()
        path = self.dfq.load_quantized
        self.report['quantized_modules'] = self._quantize(model)
        try:
            meta = load_quant_params(path, model, plain(self.dfq.quantizer))
        except QuantParamsError as err:
            raise DFQConfigError(f'dfq.load_quantized: {err}') from None
        print_log(f'DFQ: loaded quantization parameters from {path}',
                  logger='current')
        synth = meta.get('synthesizer') or {}
        self.report.update(
            quant_params_from=path, method=synth.get('type', 'loaded'),
            synthesizer=synth, num_images=meta.get('num_images', 0),
            image_size=meta.get('image_size', [0, 0]), synthesis_seconds=0.0,
            calibration_seconds=time.time() - start,
            reparameterized=len(meta['reparam']))

    def _synthesizer_cfg(self):
        cfg = dict(self.dfq.synthesizer)
        if cfg.get('img_size') is None:
            cfg['img_size'] = infer_test_image_size(self.runner.cfg)
        if cfg['type'].split('.')[-1] == 'RealImages' and \
                cfg.get('data_root') is None:
            cfg['data_root'] = train_image_folder(self.runner.cfg)
        return cfg

    def _get_images(self, model):
        synth_cfg = self.synth_cfg
        out_dir = osp.join(self.runner.work_dir, SYNTH_DIR)
        source = self.dfq.load_images
        images = None
        if source:
            saved = load_images(source)
            images = saved['images']
            made_by = saved['meta'].get('synthesizer', synth_cfg)
            if getattr(self.synthesizer, 'teacher_student', False):
                # The method still adapts: report it, with its start images.
                self.report['initial_images_synthesizer'] = plain(made_by)
            else:
                synth_cfg = made_by
            print_log(f'DFQ: reusing {len(images)} synthetic images from '
                      f'{source} ({synth_cfg.get("type")})', logger='current')
            self.report['images_from'] = source
        elif get_rank() == 0:
            images = self.synthesizer.generate(model)
            save_images(images, model.data_preprocessor.mean,
                        model.data_preprocessor.std, out_dir,
                        meta=dict(synthesizer=plain(synth_cfg)))
        if is_distributed():
            # Rank 0 synthesizes; every rank calibrates on the same images.
            shape = torch.tensor(list(images.shape) if images is not None
                                 else [0, 0, 0, 0])
            broadcast(shape, src=0)
            if images is None:
                images = torch.zeros(*shape.tolist())
            broadcast(images, src=0)
        self.report['num_images'] = int(images.shape[0])
        self.report['image_size'] = [int(s) for s in images.shape[-2:]]
        self.report['method'] = synth_cfg['type']
        self.report['synthesizer'] = plain(synth_cfg)
        return images

    @torch.no_grad()
    def _calibrate(self, model, images):
        model.eval()
        enable_calibration(model)
        bs = self.dfq.calib_batch_size
        progress = ProgressBar(len(images)) if get_rank() == 0 else None
        with _all_detections(model):
            for i in range(0, len(images), bs):
                model.test_step(calibration_batch(
                    images[i:i + bs], model.data_preprocessor, self.task))
                if progress:
                    for _ in range(len(images[i:i + bs])):
                        progress.update()
        # Observers are all-reduced inside, so every rank ends identical.
        folded = finish_calibration(model,
                                    reparam=self.dfq.quantizer.get(
                                        'reparam', False))
        print_log(f'DFQ: calibrated on {len(images)} images'
                  + (f', {len(folded)} LayerNorms reparameterised'
                     if folded else ''), logger='current')
        return folded
