"""Runs a user can trust: batch-wise (resumable, shardable) synthesis, the
quantization report and the checks that stop a run with meaningless
numbers (NaN images or activations, quantizers that saw no data), run ids
and no stale results in a reused work dir."""
import contextlib
import errno
import json
import os
import os.path as osp
import sys

import pytest
import torch

from tiny_models import TinyModel

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, osp.join(REPO, 'tools'))
import dfq_test  # noqa: E402

UPERNET = osp.join(REPO, 'configs/demo/upernet_swin_demo_w8a8.py')
MASK_RCNN = osp.join(REPO, 'configs/demo/mask_rcnn_swin_demo_w8a8.py')
# Two synthesis batches, a few val images: seconds, not minutes.
SMALL = {'test_dataloader.dataset.indices': 8,
         'dfq.synthesizer.num_images': 4, 'dfq.synthesizer.batch_size': 2,
         'dfq.synthesizer.iterations': 2, 'dfq.calib_batch_size': 2}


def _run(config, work, **opts):
    args = dfq_test.parse_args([config, '--work-dir', str(work)])
    args.cfg_options = dict(SMALL, **opts)
    return dfq_test.run(args)


def _images(work):
    return torch.load(str(work / 'synthetic' / 'synthetic_images.pth'),
                      weights_only=True)


# ------------------------------------------------------------ synthesis unit
def test_any_subset_of_batches_gives_the_full_run_images():
    """Batch b depends on the seed and b only: synthesizing batches alone
    (as a resumed run or another rank does) gives the full run's pixels."""
    from dfq_dense.synth import PSAQViT
    from dfq_dense.synth.base import batch_seed
    model = TinyModel()

    def synth():
        return PSAQViT(num_images=5, batch_size=2, img_size=56,
                       iterations=2, progress=False, seed=7)

    full = synth().generate(model)
    assert full.shape == (5, 3, 56, 56)
    part = synth().generate_batches(model, [2, 0])
    assert sorted(part) == [0, 2]
    assert torch.equal(part[0], full[0:2])
    assert torch.equal(part[2], full[4:5])
    # batch 0 keeps the plain seed; the others get distinct derived seeds
    assert batch_seed(7, 0) == 7
    assert len({batch_seed(7, b) for b in range(1, 50)} | {7}) == 50


def test_nan_images_stop_synthesis_naming_the_batch():
    from dfq_dense.synth import GaussianNoise
    from dfq_dense.synth.base import SynthesisError

    class Broken(GaussianNoise):
        def synthesize_batch(self, backbone, n, hw, device, generator,
                             batch_idx=0, bar=None):
            x = super().synthesize_batch(backbone, n, hw, device, generator,
                                         batch_idx, bar)
            return x * float('nan') if batch_idx == 1 else x

    with pytest.raises(SynthesisError, match=r'batch 2/3: 100.0% of the '
                       r'pixels are NaN/Inf'):
        Broken(num_images=5, batch_size=2, img_size=32,
               progress=False).generate(TinyModel())


def test_nan_loss_term_stops_synthesis_naming_the_step():
    from dfq_dense.synth import GaussianNoise
    from dfq_dense.synth.base import SynthesisError
    s = GaussianNoise(num_images=2, batch_size=2, img_size=32,
                      progress=False)
    with pytest.raises(SynthesisError, match='batch 1/1 iter 3: loss '
                       r'term\(s\) entropy are NaN/Inf'):
        s.log_terms(dict(batch=0, iter=3, entropy=float('nan'), tv=1.0))


def test_image_files_are_atomic_on_a_full_disk(tmp_path, monkeypatch):
    """A write that fails half-way (no space left) leaves the earlier file
    intact and no partial or temporary file behind."""
    from dfq_dense.synth.base import save_images
    x = torch.zeros(2, 3, 8, 8)
    mean, std = torch.zeros(3), torch.ones(3)
    save_images(x, mean, std, str(tmp_path), meta=dict(first=True))
    before = sorted(os.listdir(tmp_path))
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.flush()
        f.truncate(10)  # what a full disk leaves: a stub
        raise OSError(errno.ENOSPC, 'No space left on device')

    monkeypatch.setattr(torch, 'save', full_disk)
    with pytest.raises(OSError, match='No space left'):
        save_images(x + 1, mean, std, str(tmp_path), meta=dict(first=False))
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == before
    saved = torch.load(str(tmp_path / 'synthetic_images.pth'),
                       weights_only=True)
    assert saved['meta']['first'] is True


# ------------------------------------------------------- quantization report
class _TwoBranch(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.used = torch.nn.Conv2d(3, 4, 3)
        self.unused = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.used(x)


def test_report_counts_quantizing_and_says_why_disabled():
    from dfq_dense.quant import (enable_calibration, finish_calibration,
                                 quantize_model)
    from dfq_dense.quant.convert import quantization_report
    torch.manual_seed(0)
    model = _TwoBranch()
    quantize_model(model, w_bits=8, a_bits=8)
    enable_calibration(model)
    with torch.no_grad():
        model(torch.randn(2, 3, 8, 8))
    finish_calibration(model)
    report = quantization_report(model)
    # 2 layers x (input + weight quantizer); the unused layer's input
    # quantizer saw nothing, its weight quantizer is calibrated from the
    # weight itself.
    assert report['total'] == dict(modules=2, quantizers=4, quantizing=3,
                                   disabled=1)
    assert report['disabled'] == [dict(quantizer='unused.input_quantizer',
                                       why='observed no calibration data')]


def test_nan_calibration_input_is_flagged_not_observed():
    from dfq_dense.quant import Quantizer
    q = Quantizer(bits=8)
    q.enable_calibration()
    q(torch.tensor([1.0, float('nan')]))
    assert q.nonfinite and not q.observer.observed
    q(torch.tensor([1.0, 2.0]))
    assert q.observer.observed and q.seen == 2


# -------------------------------------------------------------- end to end
def test_run_id_report_effect_and_no_stale_results(tmp_path, demo_data_root):
    """The results say which quantizers quantize (all of them here), that
    the quantized features differ from FP, and carry the run id that
    quant_params.pth carries too.  A second run in the same work dir moves
    the first one's results aside and reuses its finished synthesis."""
    from dfq_dense.quant.io import read_quant_params
    work = tmp_path / 'run'
    first = _run(UPERNET, work)
    q = first['quantization']
    assert q['total']['quantizers'] > 0
    assert q['total']['quantizing'] == q['total']['quantizers']
    assert q['disabled'] == []
    assert q['roles']['qkv']['quantizing'] > 0
    assert q['output_change']['checked'] and \
        q['output_change']['max_abs'] > 0
    # the training-only auxiliary head is not converted
    assert not any(k.startswith('auxiliary_head')
                   for k in first['quantized_modules'])
    meta, _ = read_quant_params(str(work / 'quant_params.pth'))
    assert meta['run_id'] == first['run_id']
    assert _images(work)['meta']['run_id'] == first['run_id']
    assert 'resumed_batches' not in first

    second = _run(UPERNET, work)
    assert second['run_id'] != first['run_id']
    moved = work / 'previous' / first['run_id']
    with open(moved / 'dfq_results.json') as f:
        assert json.load(f)['run_id'] == first['run_id']
    assert (moved / 'quant_params.pth').is_file()
    with open(work / 'dfq_results.json') as f:
        assert json.load(f)['run_id'] == second['run_id']
    # same settings and checkpoint: the synthesis is reused, not redone
    assert second['resumed_batches'] == 2
    assert second['metrics'] == first['metrics']


def test_interrupted_synthesis_resumes_bit_identical(tmp_path, monkeypatch,
                                                     demo_data_root):
    import dfq_dense.engine.dfq_loop as loop
    whole = tmp_path / 'whole'
    _run(UPERNET, whole)

    work = tmp_path / 'resumed'
    # a finished batch of another synthesis (other key) is discarded
    os.makedirs(work / 'synthetic' / 'batches')
    torch.save(dict(images=torch.zeros(2, 3, 8, 8), batch=1, key='other'),
               str(work / 'synthetic' / 'batches' / 'batch_00001.pth'))
    real = loop.torch_save_atomic
    calls = []

    def killed_after_first_batch(obj, path):
        real(obj, path)
        calls.append(path)
        raise KeyboardInterrupt  # the run dies after batch 0 is on disk

    monkeypatch.setattr(loop, 'torch_save_atomic', killed_after_first_batch)
    with pytest.raises(KeyboardInterrupt):
        _run(UPERNET, work)
    monkeypatch.undo()
    assert [osp.basename(p) for p in calls] == ['batch_00000.pth']
    assert not (work / 'dfq_results.json').exists()

    res = _run(UPERNET, work)
    assert res['resumed_batches'] == 1
    assert torch.equal(_images(work)['images'], _images(whole)['images'])
    assert not (work / 'synthetic' / 'batches').exists()


def test_nan_images_stop_the_run_with_one_line(tmp_path, capsys,
                                               monkeypatch, demo_data_root):
    from dfq_dense.synth import GaussianNoise
    real = GaussianNoise.synthesize_batch

    def nan_batch(self, *args, **kwargs):
        return real(self, *args, **kwargs) * float('nan')

    monkeypatch.setattr(GaussianNoise, 'synthesize_batch', nan_batch)
    code = dfq_test.main([UPERNET, '--work-dir', str(tmp_path / 'w'),
                          '--cfg-options', 'dfq.synthesizer.type='
                          'GaussianNoise', 'dfq.synthesizer.num_images=2',
                          'dfq.synthesizer.progress=False'])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3
    assert len(err) == 1 and 'NaN/Inf' in err[0] and 'batch 1/1' in err[0]
    assert not (tmp_path / 'w' / 'dfq_results.json').exists()
    assert not (tmp_path / 'w' / 'quant_params.pth').exists()


def test_unobserved_quantizers_stop_the_run_unless_allowed(
        tmp_path, capsys, monkeypatch, demo_data_root):
    """No box survives calibration, so the mask head never runs: its
    quantizers saw no data.  The run stops with one line naming one; with
    dfq.allow_unobserved it runs and the report lists them as FP."""
    import dfq_dense.engine.dfq_loop as loop

    @contextlib.contextmanager
    def no_detections(model):
        heads = [m for m in model.modules()
                 if isinstance(getattr(m, 'test_cfg', None), dict) and
                 'score_thr' in m.test_cfg]
        saved = [m.test_cfg['score_thr'] for m in heads]
        for m in heads:
            m.test_cfg['score_thr'] = 2.0  # scores are <= 1: nothing passes
        try:
            yield
        finally:
            for m, v in zip(heads, saved):
                m.test_cfg['score_thr'] = v

    monkeypatch.setattr(loop, '_all_detections', no_detections)
    work = tmp_path / 'w'
    code = dfq_test.main([MASK_RCNN, '--work-dir', str(work),
                          '--cfg-options', 'dfq.synthesizer.type='
                          'GaussianNoise', 'dfq.synthesizer.num_images=2',
                          'dfq.synthesizer.progress=False'])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3
    assert len(err) == 1 and 'observed no calibration data' in err[0]
    assert 'roi_head.mask_head' in err[0]
    assert 'dfq.allow_unobserved=True' in err[0]

    res = _run(MASK_RCNN, work, **{'dfq.synthesizer.type': 'GaussianNoise',
                                   'dfq.allow_unobserved': True,
                                   'test_dataloader.dataset.indices': 2})
    q = res['quantization']
    assert q['total']['disabled'] == len(q['disabled']) > 0
    assert all(d['quantizer'].startswith('roi_head.mask_head') and
               d['why'] == 'observed no calibration data'
               for d in q['disabled'])
    assert q['roles']['roi']['disabled'] > 0


def test_weight_codes_are_the_integers_torch_fake_quant_uses():
    from dfq_dense.quant import (enable_calibration, finish_calibration,
                                 quantize_model)
    from dfq_dense.quant.convert import codes_changed, weight_codes
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3),
                                torch.nn.Linear(4, 5))
    quantize_model(model, w_bits=4, a_bits=8)
    enable_calibration(model)
    finish_calibration(model)
    codes = weight_codes(model)
    assert list(codes) == ['0', '1']
    for name, m in model.named_children():
        q = m.weight_quantizer
        ref = torch.fake_quantize_per_channel_affine(
            m.module.weight.detach(), q.scale, q.zero_point, 0, q.quant_min,
            q.quant_max)
        c = codes[name].float()
        assert c.min() >= -8 and c.max() <= 7
        assert torch.equal((c - q.zero_point.reshape(-1, *[1] * (c.dim() - 1)))
                           * q.scale.reshape(-1, *[1] * (c.dim() - 1)), ref)
    assert codes_changed(codes, weight_codes(model)) == 0.0
    q = model[1].weight_quantizer
    target = q.quant_min if codes['1'][0, 0] != q.quant_min else q.quant_max
    with torch.no_grad():  # one weight moved to another code
        model[1].module.weight[0, 0] = target * q.scale[0]
    after = weight_codes(model)
    assert codes_changed(codes, after) == 1 / (6 * 3 * 9 + 5 * 4)
