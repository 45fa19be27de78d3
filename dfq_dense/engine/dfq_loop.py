"""DFQTestLoop: synthesize -> quantize -> calibrate -> (adapt) -> the
standard test.

Replaces mmengine's TestLoop (``test_cfg = dict(type='dfq_dense.DFQTestLoop')``),
in the spirit of mmrazor's PTQLoop.  ``Runner.test`` loads the checkpoint
before ``loop.run()``, so the loop always starts from the FP weights; after
calibration (and, with ``dfq.adapter``, the adapter's changes to the
calibrated student against an FP copy of the model) the unchanged
TestLoop.run evaluates the quantized model with the config's own metric
(CocoMetric, IoUMetric).
"""
import copy
import glob
import hashlib
import json
import os
import os.path as osp
import secrets
import shutil
import time
from contextlib import contextmanager

import torch
from mmengine.dist import (all_gather_object, all_reduce, barrier, broadcast,
                           broadcast_object_list, get_rank, get_world_size,
                           is_distributed)
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.runner import TestLoop
from mmengine.utils import ProgressBar

from ..quant import enable_calibration, finish_calibration, quantize_model
from ..quant.convert import (codes_changed, iter_quantizers,
                             quantization_report, weight_codes)
from ..quant.io import (QuantParamsError, load_quant_params,
                        read_quant_params, save_quant_params,
                        snapshot_state)
from ..quant.observers import calibration_step
from ..quant.spec import SETTING_KEYS
from ..registry import ADAPTERS, LOOPS, MODELS, build
from ..synth.base import (SynthesisError, get_mean_std, load_images,
                          save_images)
from ..utils.fileio import torch_save_atomic
from .dfq_config import DFQConfigError, parse_dfq_config, plain
from .image_reuse import (ImageReuseError, image_provenance,
                          prepare_loaded_images)

SYNTH_DIR = 'synthetic'
BATCH_DIR = 'batches'
QUANT_PARAMS = 'quant_params.pth'
RESULTS = 'dfq_results.json'
PREVIOUS_DIR = 'previous'


class DFQRunError(RuntimeError):
    """A run that cannot give meaningful numbers (NaN images or
    activations, quantizers that saw no data, quantization without
    effect): reported as one line, the run stops."""


def new_run_id():
    """Time + random: tells the files of one run from another's."""
    return time.strftime('%Y%m%d-%H%M%S') + '-' + secrets.token_hex(4)


def synthesis_key(synth_cfg, checkpoint_sha256, backbone_cfg):
    """Hash of everything a synthetic image depends on: the method and its
    settings (seed, count, batch size, size), the FP weights and the
    backbone architecture.  Finished batches are reused only under the
    same key.  ``with_cp`` is left out: activation checkpointing gives
    bit-identical images (tests/test_synth_memory.py), so a run may resume
    with it switched on to fit; ``micro_batch_size`` stays in (it changes
    the floating-point summation order, so images are equivalent, not
    identical)."""
    synth_cfg = {k: v for k, v in dict(synth_cfg).items() if k != 'with_cp'}
    blob = json.dumps(dict(synthesizer=plain(synth_cfg),
                           checkpoint=checkpoint_sha256,
                           backbone=plain(backbone_cfg)), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def infer_test_image_size(cfg):
    """(H, W) the model is tested at, read from the test pipeline.

    mmdet's ``Resize(scale=(1333, 800), keep_ratio=True)`` means a short side
    of 800 and a long side of at most 1333: synthesize landscape 800x1333.
    mmseg models have a fixed ``data_preprocessor.size`` (the crop size).
    """
    if is_classifier_cfg(cfg):
        return classifier_input_size(cfg)
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


def is_classifier_cfg(cfg):
    """Whether the config's model is the classification track's
    :class:`~dfq_dense.cls.TimmClassifier`."""
    model_type = (cfg.get('model') or {}).get('type')
    return isinstance(model_type, str) and \
        model_type.split('.')[-1] == 'TimmClassifier'


def classifier_data_config(cfg):
    """timm's resolved eval data config of a classifier config's model
    (input size, interpolation, crop pct and mode, mean, std), built on the
    meta device only to read its ``pretrained_cfg``."""
    from ..cls.timm_utils import create_timm_model, timm_data_config
    model = cfg.model
    try:
        net = create_timm_model(model['model_name'],
                                model_kwargs=model.get('model_kwargs'),
                                device='meta')
    except (RuntimeError, NotImplementedError):
        net = create_timm_model(model['model_name'],
                                model_kwargs=model.get('model_kwargs'))
    return timm_data_config(net, model.get('data_config'))


def classifier_input_size(cfg):
    """(H, W) of a timm classifier's eval transform (its data config's
    ``input_size``, 224x224 for the shipped models): the size it is tested
    at and the images are synthesized at."""
    data = classifier_data_config(cfg)
    return tuple(int(v) for v in data['input_size'][1:])


def task_of_cfg(cfg):
    """'det', 'seg' or 'cls' (see :func:`dfq_dense.engine.runner.task_of`)."""
    return {'mmdet': 'det', 'mmseg': 'seg', 'dfq_dense': 'cls'}.get(
        cfg.get('default_scope'), 'seg')


def synthesis_model_cfg(cfg):
    """The architecture part of :func:`synthesis_key`: the backbone config
    (detectors, segmentors) or the timm model (classifiers)."""
    if is_classifier_cfg(cfg):
        m = cfg.model
        return dict(model_name=m.get('model_name'),
                    num_classes=m.get('num_classes'),
                    model_kwargs=m.get('model_kwargs'))
    return cfg.model.get('backbone')


def train_image_folder(cfg):
    """The training-image folder of the config's train dataset (the
    real-image baseline's default source): ``data/coco/train2017/`` for
    COCO, ``data/ade/ADEChallengeData2016/images/training`` for ADE20K."""
    if cfg.get('train_dataloader') is None:
        raise ValueError('the config has no training set to draw real '
                         'images from: set dfq.synthesizer.data_root=DIR')
    dataset = cfg.train_dataloader.dataset
    while 'dataset' in dataset:  # RepeatDataset and other wrappers
        dataset = dataset.dataset
    prefix = dataset.get('data_prefix', {})
    img = prefix.get('img', prefix.get('img_path', ''))
    return osp.join(dataset.get('data_root', ''), img)


def complete_real_images(cfg, synth):
    """Fill in a ``RealImages`` synthesizer config (in place; other types
    are returned as they are): ``data_root=None`` takes the config's
    training images (:func:`train_image_folder`), and on a timm classifier
    without an explicit ``resize`` the images get the classifier's own eval
    transform (``resize='center_crop'`` with its ``crop_pct``,
    ``interpolation`` and ``crop_mode``), the view its val images have,
    instead of the dense models' keep-ratio padding."""
    if synth['type'].split('.')[-1] != 'RealImages':
        return synth
    if synth.get('data_root') is None:
        synth['data_root'] = train_image_folder(cfg)
    if is_classifier_cfg(cfg) and synth.get('resize') is None:
        data = classifier_data_config(cfg)
        synth.update(resize='center_crop', crop_pct=float(data['crop_pct']),
                     interpolation=str(data['interpolation']),
                     crop_mode=str(data.get('crop_mode', 'center')))
    return synth


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
    elif task == 'cls':
        from mmengine.structures import BaseDataElement as Sample
        meta = dict(img_shape=(h, w), ori_shape=(h, w))
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


def quantize_for_dfq(model, quantizer, dry_run=False):
    """``quantize_model`` with a ``dfq.quantizer`` config, as every DFQ run
    converts (the loop, the benchmarks): bits, scope, skip and the setting
    keys.  mmseg's auxiliary head is a training-only branch: it never runs
    at test time, so it neither sees calibration data nor changes a
    metric; it stays FP."""
    q = quantizer
    skip = list(q.get('skip', []))
    if getattr(model, 'with_auxiliary_head', False):
        skip += ['auxiliary_head', 'auxiliary_head.*']
    return quantize_model(
        model, w_bits=q['w_bits'], a_bits=q['a_bits'],
        scope=q.get('scope', 'model'), skip=skip, dry_run=dry_run,
        **{k: q[k] for k in SETTING_KEYS if k in q})


def adaptation_losses(history):
    """What the adapter's own loss did, from its ``history``: the first and
    last logged student-step loss (``student_loss``; over all student steps
    of all rounds) and, per reconstructed unit, the reconstruction loss
    before and after (``reconstruction``).  Empty for an adapter that logs
    neither."""
    out = {}
    student = [h for h in history
               if h.get('phase') == 'student' and 'loss' in h]
    if student:
        out['student_loss'] = dict(first=student[0]['loss'],
                                   last=student[-1]['loss'],
                                   logged_steps=len(student))
    units = [h for h in history if 'loss_before' in h and 'loss_after' in h]
    if units:
        out['reconstruction'] = [
            {k: h[k] for k in ('block', 'loss_before', 'loss_after')
             if k in h} for h in units]
    return out


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
        self.task = task_of_cfg(runner.cfg)
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
        # The (adapt) stage: what changes the calibrated student after the
        # calibration (dfq.adapter; None: nothing).
        self.adapter = None
        if not self.dfq.load_quantized:
            try:
                self.synthesizer = build(MODELS, self.synth_cfg)
                self.synthesizer.check_model(self._model)
                if not self.dfq.load_images:
                    # Too small an img_size for the backbone: one line.
                    from .model_checks import check_image_size
                    check_image_size(self._model, self.synth_cfg['img_size'])
                    # e.g. real images: the folder exists and holds enough
                    self.synthesizer.prepare()
                # Loss terms also go to the config's visualizer backends.
                self.synthesizer.visualizer = runner.visualizer
            except (ValueError, TypeError, FileNotFoundError) as err:
                raise DFQConfigError(
                    f'dfq.synthesizer {self.synth_cfg["type"]}: {err}') \
                    from None
            if self.dfq.adapter is not None:
                try:
                    self.adapter = build(ADAPTERS, self.dfq.adapter)
                    self.adapter.check_model(self._model)
                except (ValueError, TypeError) as err:
                    raise DFQConfigError(
                        f'dfq.adapter {self.dfq.adapter["type"]}: {err}') \
                        from None
                self.adapter.visualizer = runner.visualizer

    @property
    def _model(self):
        model = self.runner.model
        return model.module if is_model_wrapper(model) else model

    def run(self):
        model = self._model
        self._start_run()
        if self.dfq.eval_fp:
            start = time.time()
            self.report['fp_metrics'] = super().run()
            self.report['fp_eval_seconds'] = time.time() - start

        if self.dfq.load_quantized:
            self._load_quantized(model)
        else:
            # An adapter needs the FP model beside the student.
            teacher = copy.deepcopy(model).eval() \
                if self.adapter is not None else None
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
                codes = weight_codes(model)
                adapted = self._adapt(teacher, model, images, bool(folded))
                self.report['adapt_seconds'] = time.time() - start
                # How much the adapter moved the quantized model.
                self.report['adaptation'] = dict(
                    adapter=plain(self.dfq.adapter),
                    weight_codes_changed=codes_changed(
                        codes, weight_codes(model)),
                    images_changed=not torch.equal(adapted, images),
                    # per round, what the adapter logged of its
                    # teacher-student discrepancy (PSAQ-ViT V2: before and
                    # after its sample step)
                    rounds=[{k: v for k, v in h.items()
                             if k == 'round' or k.startswith('disc_')}
                            for h in self.adapter.history
                            if h.get('phase') == 'round'])
                self.report['adaptation'].update(
                    adaptation_losses(self.adapter.history))
                del codes
                del teacher
                if get_rank() == 0 and not torch.equal(adapted, images):
                    # The sample steps changed the images: keep them too.
                    save_images(adapted, model.data_preprocessor.mean,
                                model.data_preprocessor.std,
                                osp.join(self.runner.work_dir, SYNTH_DIR,
                                         'adapted'),
                                meta=dict(synthesizer=self.report[
                                    'synthesizer'], adapted=True,
                                    run_id=self.run_id,
                                    **image_provenance(self.runner.cfg)))
            self.report['output_change'] = self._check_effect(model, images)
            if get_rank() == 0:
                path = osp.join(self.runner.work_dir, QUANT_PARAMS)
                save_quant_params(path, model, snapshot,
                                  plain(self.dfq.quantizer), reparam=folded,
                                  extra_meta=dict(
                                      synthesizer=self.report['synthesizer'],
                                      num_images=self.report['num_images'],
                                      image_size=self.report['image_size'],
                                      run_id=self.run_id))
                self.report['quant_params'] = path
        if 'output_change' not in self.report:
            self.report['output_change'] = self._check_effect(model, None)
        self.report['quantization'] = quantization_report(model)

        start = time.time()
        metrics = super().run()
        self.report['eval_seconds'] = time.time() - start
        return metrics

    # --------------------------------------------------------- run identity
    def _start_run(self):
        """Give this run an id (rank 0's, on every rank) and move the
        results of an earlier run in the same work dir aside, so that a
        ``dfq_results.json`` always describes the files beside it.

        ``dfq_results.json`` and ``quant_params.pth`` of the earlier run go
        to ``previous/<its run id>/``; its finished synthesis stays (it is
        reused only under the same settings, see :meth:`_synthesize`).
        """
        ids = [new_run_id() if get_rank() == 0 else None]
        if is_distributed():
            broadcast_object_list(ids, src=0)
        self.run_id = ids[0]
        self.report['run_id'] = self.run_id
        work_dir = self.runner.work_dir
        moved = {}
        if get_rank() == 0:
            stale = [f for f in (RESULTS, QUANT_PARAMS)
                     if osp.isfile(osp.join(work_dir, f))]
            if stale:
                old_id = _previous_run_id(work_dir) or time.strftime(
                    '%Y%m%d-%H%M%S', time.localtime(osp.getmtime(
                        osp.join(work_dir, stale[0])))) + '-unknown'
                dest = osp.join(work_dir, PREVIOUS_DIR, old_id)
                os.makedirs(dest, exist_ok=True)
                for f in stale:
                    os.replace(osp.join(work_dir, f), osp.join(dest, f))
                    moved[osp.abspath(osp.join(work_dir, f))] = \
                        osp.join(dest, f)
                print_log(f'DFQ: moved the earlier run\'s {", ".join(stale)}'
                          f' to {dest}', logger='current')
        if is_distributed():
            box = [moved]
            broadcast_object_list(box, src=0)
            moved = box[0]
        # An input of this run that was just moved is read from its new
        # place.
        for key in ('load_quantized', 'load_images'):
            path = self.dfq.get(key)
            if path and osp.abspath(path) in moved:
                self.dfq[key] = moved[osp.abspath(path)]

    def _checkpoint_sha256(self):
        run = self.runner.cfg.get('dfq_run') or {}
        if run.get('checkpoint_sha256'):
            return run['checkpoint_sha256']
        path = run.get('checkpoint') or self.runner.cfg.get('load_from') \
            or self.runner.cfg.model.get('checkpoint')
        if path and osp.isfile(path):
            from ..demo import sha256sum
            return sha256sum(path)
        return None

    def _adapt(self, teacher, model, images, reparameterized):
        """Let the adapter adapt the calibrated student.

        Every rank runs it on the same images and seed (re-calibration
        inside is collective); rank 0's result is then broadcast so that the
        ranks hold identical students even where GPU kernels are not
        deterministic.  A reparameterised student cannot be re-calibrated
        (its LayerNorms already hold the folded scales): the method then
        keeps the first calibration.
        """
        calibrate = None if reparameterized else \
            (lambda imgs: self._calibrate(model, imgs))
        images = self.adapter.run(teacher, model, images,
                                  calibrate=calibrate)
        if is_distributed():
            for tensor in list(model.state_dict().values()):
                broadcast(tensor, src=0)
        return images

    def _quantize(self, model, dry_run=False):
        return quantize_for_dfq(model, self.dfq.quantizer, dry_run)

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
        return complete_real_images(self.runner.cfg, cfg)

    def _get_images(self, model):
        synth_cfg = self.synth_cfg
        source = self.dfq.load_images
        if source:
            saved = load_images(source)
            # Images of another task (same backbone family) are resized to
            # this run's synthesis size (engine/image_reuse.py); another
            # family or a file that is no synthetic-images file: one line.
            mean, std = get_mean_std(model)
            try:
                images, origin = prepare_loaded_images(
                    saved, source, image_provenance(self.runner.cfg),
                    synth_cfg['img_size'], mean, std)
            except ImageReuseError as err:
                raise DFQConfigError(str(err)) from None
            self.report['images_source'] = origin
            if origin['cross_task']:
                print_log(f'DFQ: images of a {origin["task"]} run '
                          f'({origin["model"]}, {origin["size"][0]}x'
                          f'{origin["size"][1]}) resized to '
                          f'{origin["resized_to"][0]}x'
                          f'{origin["resized_to"][1]}', logger='current')
            made_by = saved['meta'].get('synthesizer', synth_cfg)
            if self.adapter is not None:
                # The method still adapts: report it, with its start images.
                self.report['initial_images_synthesizer'] = plain(made_by)
            else:
                synth_cfg = made_by
            print_log(f'DFQ: reusing {len(images)} synthetic images from '
                      f'{source} ({synth_cfg.get("type")})', logger='current')
            self.report['images_from'] = source
            if is_distributed():
                # Every rank read the same file; rank 0's copy wins anyway.
                broadcast(images, src=0)
        else:
            images = self._synthesize(model)
        self._check_finite_images(images, 'the synthetic images')
        self.report['num_images'] = int(images.shape[0])
        self.report['image_size'] = [int(s) for s in images.shape[-2:]]
        self.report['method'] = synth_cfg['type']
        self.report['synthesizer'] = plain(synth_cfg)
        return images

    @staticmethod
    def _check_finite_images(images, what):
        bad = ~torch.isfinite(images)
        if bool(bad.any()):
            n = int(bad.flatten(1).any(1).sum())
            raise DFQRunError(
                f'{what} hold NaN/Inf ({n} of {len(images)} images): the '
                'synthesis diverged; lower its learning rate or loss weights')

    def _synthesize(self, model):
        """Synthesize (or resume) the images, batches split across ranks.

        Batch ``b`` is made by rank ``b % world_size`` from its own seed
        (:func:`~dfq_dense.synth.base.batch_seed`), so the images do not
        depend on the number of processes.  Each finished batch is written
        to ``synthetic/batches/`` with the :func:`synthesis_key` of the
        run; a re-run with the same key loads the finished batches instead
        of synthesizing them again (bit-identical to an uninterrupted run),
        a changed key starts over.  When all batches are there, rank 0
        writes ``synthetic_images.pth`` (with the key) and the grid, and
        removes the batch files.
        """
        synth = self.synthesizer
        out_dir = osp.join(self.runner.work_dir, SYNTH_DIR)
        batch_dir = osp.join(out_dir, BATCH_DIR)
        key = synthesis_key(self.synth_cfg, self._checkpoint_sha256(),
                            synthesis_model_cfg(self.runner.cfg))
        self.report['synthesis_key'] = key
        rank, world = get_rank(), get_world_size()
        mean, std = model.data_preprocessor.mean, model.data_preprocessor.std
        meta = dict(synthesizer=plain(self.synth_cfg), key=key,
                    run_id=self.run_id,
                    **image_provenance(self.runner.cfg))

        final = osp.join(out_dir, 'synthetic_images.pth')
        done = None
        if osp.isfile(final):
            try:
                saved = load_images(final)
                if saved['meta'].get('key') == key:
                    done = saved['images']
            except Exception:  # noqa: BLE001  (unreadable: synthesize)
                done = None
        if done is not None:
            print_log(f'DFQ: reusing the finished synthesis in {final} '
                      '(same settings and checkpoint)', logger='current')
            self.report['resumed_batches'] = synth.num_batches
            return done

        if rank == 0:
            stale = [f for f in sorted(glob.glob(
                osp.join(batch_dir, 'batch_*.pth')))
                if (_read_batch(f) or {}).get('key') != key]
            if stale:
                print_log(f'DFQ: synthesis settings or checkpoint changed: '
                          f'starting over ({len(stale)} finished batch(es) '
                          f'of another synthesis removed from {batch_dir})',
                          logger='current')
                for f in stale:
                    os.remove(f)
        if is_distributed():
            barrier()

        mine = [b for b in range(synth.num_batches) if b % world == rank]
        batches, todo = {}, []
        for b in mine:
            saved = _read_batch(osp.join(batch_dir, f'batch_{b:05d}.pth'))
            if saved is not None and saved.get('key') == key:
                batches[b] = saved['images']
            else:
                todo.append(b)
        if batches:
            print_log(f'DFQ: resuming the synthesis: {len(batches)} finished '
                      f'batch(es) loaded from {batch_dir}', logger='current')

        def on_batch(b, x):
            torch_save_atomic(dict(images=x, batch=b, key=key),
                              osp.join(batch_dir, f'batch_{b:05d}.pth'))

        error = None
        try:
            if todo:
                batches.update(synth.generate_batches(model, todo,
                                                      on_batch=on_batch))
        except SynthesisError as err:
            error = str(err)
        if is_distributed():
            # Every rank reaches the gather, failed or not: no rank hangs.
            parts = all_gather_object((error, batches))
            errors = [e for e, _ in parts if e]
            if errors:
                raise DFQRunError(errors[0])
            batches = {b: x for _, part in parts for b, x in part.items()}
        elif error:
            raise DFQRunError(error)
        resumed = synth.num_batches - len(todo) if world == 1 else None
        if resumed:
            self.report['resumed_batches'] = resumed
        images = torch.cat([batches[b] for b in range(synth.num_batches)])
        if rank == 0:
            if hasattr(synth, 'select_files'):
                # The real-image baseline: which files it read (relative to
                # data_root), as RealImages.save records them.
                files = synth.selected_files or synth.select_files()
                meta['files'] = [osp.relpath(f, synth.data_root).replace(
                    os.sep, '/') for f in files]
            save_images(images, mean, std, out_dir, meta=meta)
            shutil.rmtree(batch_dir, ignore_errors=True)
        if is_distributed():
            barrier()
        return images

    @torch.no_grad()
    def _calibrate(self, model, images):
        """Run the calibration images through the model, the batches split
        across ranks (batch ``b`` on rank ``b % world_size``, inside
        ``calibration_step(b)`` so observers key their statistics by the
        global batch), then merge the observers: every rank ends with the
        qparams one process would compute.  Stops with one line when a
        calibration input held NaN/Inf or, unless
        ``dfq.allow_unobserved``, when a quantizer saw no data."""
        model.eval()
        enable_calibration(model)
        bs = self.dfq.calib_batch_size
        rank, world = get_rank(), get_world_size()
        starts = list(range(0, len(images), bs))
        mine = [(b, i) for b, i in enumerate(starts) if b % world == rank]
        progress = ProgressBar(len(images)) if rank == 0 else None
        with _all_detections(model):
            for b, i in mine:
                with calibration_step(b):
                    model.test_step(calibration_batch(
                        images[i:i + bs], model.data_preprocessor,
                        self.task))
                if progress:
                    for _ in range(len(images[i:i + bs])):
                        progress.update()
        quantizers = list(iter_quantizers(model))
        if is_distributed():
            # Every rank needs the global picture before deciding.
            flags = torch.tensor([[q.seen, int(q.nonfinite)]
                                  for _, q in quantizers],
                                 dtype=torch.float64).reshape(-1, 2)
            all_reduce(flags, op='sum')
            for (_, q), (seen, bad) in zip(quantizers, flags.tolist()):
                q.seen, q.nonfinite = int(seen), bool(bad)
        bad = [name for name, q in quantizers if q.nonfinite]
        if bad:
            raise DFQRunError(
                f'NaN/Inf reached {len(bad)} quantizer(s) during calibration,'
                f' first {bad[0]}: the FP model gives non-finite activations '
                'on these images (check the checkpoint and the images)')
        # Observers are merged inside, so every rank ends identical.
        folded = finish_calibration(model,
                                    reparam=self.dfq.quantizer.get(
                                        'reparam', False))
        unobserved = [name for name, q in quantizers if q.unobserved]
        if unobserved:
            msg = (f'{len(unobserved)} quantizer(s) observed no calibration '
                   f'data, first {unobserved[0]}')
            if not self.dfq.get('allow_unobserved', False):
                raise DFQRunError(
                    msg + ': they would stay full precision; skip those '
                    'modules (dfq.quantizer.skip) or set '
                    'dfq.allow_unobserved=True to run with them in FP '
                    '(reported in dfq_results.json)')
            print_log(f'DFQ: {msg}; they stay FP (dfq.allow_unobserved)',
                      logger='current', level=30)
        print_log(f'DFQ: calibrated on {len(images)} images'
                  + (f', {len(folded)} LayerNorms reparameterised'
                     if folded else ''), logger='current')
        return folded

    @torch.no_grad()
    def _check_effect(self, model, images):
        """Prove that quantization changed the model: the backbone + neck
        features of one image (a classifier's logits) with every quantizer
        as calibrated against all of them switched off.  Identical features
        with quantizers in the backbone or neck stop the run."""
        states = {q: q.state for _, q in iter_quantizers(model)}
        in_features = [n for n, _ in iter_quantizers(model)
                       if n.startswith(('backbone.', 'neck.'))]
        if not in_features:
            return dict(checked=False,
                        why='no quantizer in the backbone or neck')
        if images is None:
            h, w = infer_test_image_size(self.runner.cfg)
            g = torch.Generator().manual_seed(0)
            images = torch.randn((1, 3, min(h, 224), min(w, 224)),
                                 generator=g)
        device = next(model.parameters()).device
        x = images[:1].to(device)
        model.eval()
        # A classifier's backbone is the whole timm model: its logits.
        features = model.extract_feat if hasattr(model, 'extract_feat') \
            else model.backbone
        quant = _flatten_feats(features(x))
        try:
            for q in states:
                q.state = 'disabled'
            fp = _flatten_feats(features(x))
        finally:
            for q, state in states.items():
                q.state = state
        diff = (quant - fp).double()
        out = dict(checked=True, features='backbone+neck'
                   if hasattr(model, 'extract_feat') else 'logits',
                   max_abs=float(diff.abs().max()),
                   rel_l2=float(diff.norm() / fp.double().norm().clamp(
                       min=1e-12)))
        if out['max_abs'] == 0.0:
            raise DFQRunError(
                'quantization had no effect: the quantized backbone/neck '
                'give exactly the FP features (every quantizer disabled or '
                'uncalibrated?)')
        return out


def _flatten_feats(feats):
    if torch.is_tensor(feats):
        return feats.flatten()
    return torch.cat([f.flatten() for f in feats])


def _read_batch(path):
    """A finished batch file (dict with ``images`` and ``key``), or None
    when it is missing or unreadable (then it is synthesized again)."""
    from ..utils.checkpoint import safe_torch_load
    if not osp.isfile(path):
        return None
    try:
        return safe_torch_load(path)
    except Exception:  # noqa: BLE001  (a broken batch is redone)
        return None


def _previous_run_id(work_dir):
    """The run id recorded in the results of an earlier run, if any."""
    try:
        with open(osp.join(work_dir, RESULTS)) as f:
            return json.load(f).get('run_id')
    except Exception:  # noqa: BLE001  (missing or unreadable)
        return None
