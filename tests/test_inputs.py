"""Strict inputs of tools/dfq_test.py: every bad input stops with one line
on stderr (``dfq_test: error: ...``), exit code 2, and nothing written.

Error cases fail before any synthesis (most before the Runner exists); the
cases that must get through the input checks stop at the start of
``Runner.test`` (``stop_at_test``), after the DFQ loop is built.
"""
import errno
import json
import os
import os.path as osp
import shutil
import struct
import sys
import zipfile

import pytest
import torch

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, osp.join(REPO, 'tools'))
import dfq_test  # noqa: E402

SEG = osp.join(REPO, 'configs/demo/upernet_swin_demo_w8a8.py')
DET = osp.join(REPO, 'configs/demo/mask_rcnn_swin_demo_w8a8.py')
CKPT_DIR = osp.join(REPO, 'dfq_dense/demo/checkpoints')
SEG_CKPT = osp.join(CKPT_DIR, 'upernet_swin_demo.pth')
DET_CKPT = osp.join(CKPT_DIR, 'mask_rcnn_swin_demo.pth')


# ----------------------------------------------------------------- helpers
def run_main(capsys, argv):
    """``(exit code, stderr lines)`` of ``dfq_test.main(argv)``."""
    code = dfq_test.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def assert_one_line(code, err, *needles):
    assert code == 2
    assert len(err) == 1, err
    assert err[0].startswith('dfq_test: error: ')
    for needle in needles:
        assert needle in err[0], (needle, err[0])


class Reached(Exception):
    """Raised at the start of Runner.test: the inputs were accepted."""


@pytest.fixture
def stop_at_test(monkeypatch):
    """Let run() build the Runner and the DFQ loop, then stop."""
    from mmengine.runner import Runner
    seen = {}

    def fake_test(self):
        seen['runner'] = self
        seen['loop'] = self.build_test_loop(self._test_loop)
        raise Reached

    monkeypatch.setattr(Runner, 'test', fake_test)
    return seen


def flip_tensor_bytes(path, nbytes=8):
    """Flip ``nbytes`` in the middle of the largest tensor storage of a
    torch zip file (the zip stores them uncompressed)."""
    with zipfile.ZipFile(path) as zf:
        infos = [i for i in zf.infolist() if '/data/' in i.filename]
        info = max(infos, key=lambda i: i.file_size)
    with open(path, 'r+b') as f:
        f.seek(info.header_offset)
        header = f.read(30)
        name_len, extra_len = struct.unpack('<HH', header[26:30])
        pos = info.header_offset + 30 + name_len + extra_len + \
            info.file_size // 2
        f.seek(pos)
        data = bytearray(f.read(nbytes))
        f.seek(pos)
        f.write(bytes(b ^ 0xFF for b in data))


def make_quant_params(path):
    """A small but real quant_params.pth (two quantized Linears)."""
    from dfq_dense.quant import (enable_calibration, finish_calibration,
                                 quantize_model)
    from dfq_dense.quant.io import save_quant_params, snapshot_state
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 4))
    quantize_model(model, 8, 8)
    snap = snapshot_state(model)
    enable_calibration(model)
    with torch.no_grad():
        model(torch.randn(32, 8))
    finish_calibration(model)
    save_quant_params(str(path), model, snap, dict(w_bits=8, a_bits=8))
    return str(path)


def make_images(path, n=2, size=64):
    """A synthetic_images.pth as the DFQ loop writes it."""
    os.makedirs(osp.dirname(str(path)), exist_ok=True)
    torch.save(dict(images=torch.randn(n, 3, size, size),
                    mean=torch.zeros(3, 1, 1), std=torch.ones(3, 1, 1),
                    meta=dict(synthesizer=dict(type='GaussianNoise'))),
               str(path))
    return str(path)


def bad_file(tmp_path, kind, good=None):
    """An unreadable file: empty, truncated (half of ``good``), text, JSON."""
    path = tmp_path / f'{kind}.pth'
    if kind == 'empty':
        path.write_bytes(b'')
    elif kind == 'truncated':
        data = open(good, 'rb').read()
        path.write_bytes(data[:len(data) // 2])
    elif kind == 'text':
        path.write_text('this is not a checkpoint\n')
    else:
        path.write_text(json.dumps(dict(state_dict=dict(w=[1, 2]))))
    return str(path)


# ---------------------------------------------------- 1. strict checkpoints
def test_demo_checkpoints_load_strictly():
    from mmengine.config import Config

    from dfq_dense.engine.model_checks import build_model
    from dfq_dense.utils.checkpoint import load_checkpoint_strict
    for config, ckpt in ((SEG, SEG_CKPT), (DET, DET_CKPT)):
        model = build_model(Config.fromfile(config))
        saved = torch.load(ckpt, weights_only=True)['state_dict']
        load_checkpoint_strict(model, ckpt)
        own = model.state_dict()
        assert set(saved) <= set(own)
        for key in list(saved)[::20]:
            assert torch.equal(own[key], saved[key].to(own[key].dtype)), key


def test_wrong_model_checkpoint_is_refused(tmp_path, capsys, demo_data_root):
    # UperNet weights into the Mask R-CNN config (gave mAP 0.000 before).
    work = tmp_path / 'work'
    code, err = run_main(capsys, [DET, SEG_CKPT, '--work-dir', str(work)])
    assert_one_line(code, err, 'does not fit the MaskRCNN',
                    'missing key(s) (neck.', 'unexpected key(s) (decode_head',
                    'use the config the checkpoint was trained with')
    assert not work.exists()


def test_empty_state_dict_is_refused(tmp_path, capsys, demo_data_root):
    # {'state_dict': {}} gave mIoU 1.8 before.
    ckpt = tmp_path / 'empty_sd.pth'
    torch.save(dict(state_dict={}), str(ckpt))
    work = tmp_path / 'work'
    code, err = run_main(capsys, [SEG, str(ckpt), '--work-dir', str(work)])
    assert_one_line(code, err, 'missing key(s) (backbone.patch_embed')
    assert 'unexpected' not in err[0]
    assert not work.exists()


def test_shape_mismatch_is_refused(tmp_path, capsys, demo_data_root):
    ckpt = torch.load(SEG_CKPT, weights_only=True)
    key = 'decode_head.conv_seg.weight'
    shape = tuple(ckpt['state_dict'][key].shape)
    ckpt['state_dict'][key] = torch.zeros((shape[0] + 1, ) + shape[1:])
    path = tmp_path / 'shape.pth'
    torch.save(ckpt, str(path))
    code, err = run_main(capsys, [SEG, str(path), '--work-dir',
                                  str(tmp_path / 'w')])
    assert_one_line(code, err, '1 shape mismatch(es)', key,
                    f'checkpoint {(shape[0] + 1, ) + shape[1:]}')


def test_only_allow_listed_keys_may_be_missing(tmp_path):
    from mmengine.config import Config

    from dfq_dense.engine.model_checks import build_model
    from dfq_dense.utils.checkpoint import (TOLERATED_MISSING,
                                            CheckpointMismatchError,
                                            load_checkpoint_strict)
    # The allow-list: recomputed buffers only.
    assert [p.pattern for p in TOLERATED_MISSING] == [
        r'(^|\.)relative_position_index$', r'(^|\.)num_batches_tracked$']
    model = build_model(Config.fromfile(SEG))
    ckpt = torch.load(SEG_CKPT, weights_only=True)
    sd = ckpt['state_dict']
    index = {k: v for k, v in sd.items()
             if k.endswith('relative_position_index')}
    assert index
    path = tmp_path / 'no_index.pth'
    torch.save(dict(state_dict={k: v for k, v in sd.items()
                                if k not in index}), str(path))
    load_checkpoint_strict(model, str(path))
    for key, value in index.items():  # the model's own value == the saved
        assert torch.equal(model.state_dict()[key], value)
    # A learned parameter may not be missing.
    key = 'backbone.stages.0.blocks.0.attn.w_msa.relative_position_bias_table'
    torch.save(dict(state_dict={k: v for k, v in sd.items() if k != key}),
               str(path))
    with pytest.raises(CheckpointMismatchError, match='1 missing key'):
        load_checkpoint_strict(model, str(path))


# -------------------------------------------------- 2. demo sha256 manifest
def test_demo_checkpoint_sha256_mismatch(tmp_path, capsys, monkeypatch,
                                         demo_data_root):
    import dfq_dense.demo as demo
    folder = tmp_path / 'checkpoints'
    folder.mkdir()
    shutil.copy(demo.MANIFEST, folder / 'manifest.json')
    copy = folder / 'upernet_swin_demo.pth'
    shutil.copy(SEG_CKPT, copy)
    monkeypatch.setattr(demo, 'CHECKPOINT_DIR', str(folder))
    monkeypatch.setattr(demo, 'MANIFEST', str(folder / 'manifest.json'))
    assert demo.verify_demo_checkpoint(str(copy)) == \
        demo.load_manifest()['upernet_swin_demo']['sha256']
    flip_tensor_bytes(str(copy))
    torch.load(str(copy), weights_only=True)  # still loads: only sha256 sees
    work = tmp_path / 'work'
    code, err = run_main(capsys, [SEG, str(copy), '--work-dir', str(work)])
    assert_one_line(code, err, 'sha256 mismatch: corrupted or modified',
                    'restore it with git checkout -- '
                    'dfq_dense/demo/checkpoints/upernet_swin_demo.pth')
    assert not work.exists()
    # the same bytes outside the demo folder are not a demo checkpoint
    other = tmp_path / 'upernet_swin_demo.pth'
    shutil.copy(copy, other)
    assert demo.verify_demo_checkpoint(str(other)) is None


def test_shipped_demo_checkpoints_match_the_manifest():
    from dfq_dense.demo import verify_demo_checkpoint
    for path in (SEG_CKPT, DET_CKPT):
        assert verify_demo_checkpoint(path) is not None


# ------------------------------------------------ 3. quant_params checksums
def test_quant_params_checksums(tmp_path):
    from dfq_dense.quant.io import (FORMAT, QuantParamsError,
                                    read_quant_params, tensor_sha256)
    path = make_quant_params(tmp_path / 'quant_params.pth')
    meta, tensors = read_quant_params(path)
    assert meta['format'] == FORMAT
    assert meta['checksums'] == {k: tensor_sha256(v)
                                 for k, v in tensors.items()}
    flip_tensor_bytes(path)
    with pytest.raises(QuantParamsError, match='sha256 mismatch of 1 of 8') \
            as err:
        read_quant_params(path)
    assert '\n' not in str(err.value) and 're-create it' in str(err.value)


def test_quant_params_without_checksums_are_refused(tmp_path):
    from dfq_dense.quant.io import QuantParamsError, read_quant_params
    path = make_quant_params(tmp_path / 'qp.pth')
    data = torch.load(path, weights_only=True)
    data['meta']['format'] = 'dfq_dense.quant_params/1'
    del data['meta']['checksums']
    torch.save(data, path)
    with pytest.raises(QuantParamsError, match='without tensor checksums.*'
                       're-create it'):
        read_quant_params(path)


def test_corrupted_quant_params_through_the_tool(tmp_path, capsys,
                                                 demo_data_root):
    path = make_quant_params(tmp_path / 'quant_params.pth')
    flip_tensor_bytes(path)
    work = tmp_path / 'work'
    code, err = run_main(capsys, [SEG, '--work-dir', str(work),
                                  '--load-quantized', path])
    assert_one_line(code, err, '--load-quantized:', 'corrupted',
                    'sha256 mismatch')
    assert not work.exists()


# --------------------------------------------------- 4. unreadable files
@pytest.mark.parametrize('kind', ['empty', 'truncated', 'text', 'json'])
@pytest.mark.parametrize('where', ['checkpoint', 'load_quantized',
                                   'load_images'])
def test_unreadable_file_is_one_line(tmp_path, capsys, kind, where,
                                     demo_data_root):
    work = tmp_path / 'work'
    argv = [SEG, '--work-dir', str(work)]
    if where == 'checkpoint':
        argv.insert(1, bad_file(tmp_path, kind, SEG_CKPT))
    elif where == 'load_quantized':
        good = make_quant_params(tmp_path / 'good.pth')
        argv += ['--load-quantized', bad_file(tmp_path, kind, good)]
    else:
        good = make_images(tmp_path / 'good' / 'synthetic_images.pth')
        argv += ['--cfg-options',
                 f'dfq.load_images={bad_file(tmp_path, kind, good)}']
    code, err = run_main(capsys, argv)
    assert_one_line(code, err, f'cannot read {tmp_path}/{kind}.pth: not a '
                    'torch checkpoint, or truncated or corrupted')
    assert not work.exists()


def test_torch_file_of_another_kind(tmp_path, capsys, demo_data_root):
    qp = make_quant_params(tmp_path / 'qp.pth')
    images = make_images(tmp_path / 'img' / 'synthetic_images.pth')
    # quant params as CHECKPOINT
    code, err = run_main(capsys, [SEG, qp, '--work-dir', str(tmp_path / 'a')])
    assert_one_line(code, err, 'is not a model checkpoint')
    # synthetic images as --load-quantized
    code, err = run_main(capsys, [SEG, '--work-dir', str(tmp_path / 'b'),
                                  '--load-quantized', images])
    assert_one_line(code, err, 'not a dfq_dense quant_params file')
    # a checkpoint as dfq.load_images
    code, err = run_main(capsys, [SEG, '--work-dir', str(tmp_path / 'c'),
                                  '--cfg-options',
                                  f'dfq.load_images={qp}'])
    assert_one_line(code, err, 'is not a synthetic_images.pth')


# ------------------------------------------------ 4. load_images folders
def test_load_images_folder_of_an_earlier_run(tmp_path, capsys,
                                              stop_at_test, demo_data_root):
    from dfq_dense.engine.runner import DFQInputError, resolve_load_images
    earlier = tmp_path / 'earlier'
    path = make_images(earlier / 'synthetic' / 'synthetic_images.pth')
    for given in (earlier, earlier / 'synthetic', path):
        assert resolve_load_images(str(given))[0] == path
    empty = tmp_path / 'empty'
    empty.mkdir()
    with pytest.raises(DFQInputError, match='holds no synthetic_images.pth'):
        resolve_load_images(str(empty))
    code, err = run_main(capsys, [SEG, '--work-dir', str(tmp_path / 'w'),
                                  '--cfg-options',
                                  f'dfq.load_images={empty}'])
    assert_one_line(code, err, f'dfq.load_images folder {empty} holds no '
                    'synthetic_images.pth')
    # the work dir of an earlier run is accepted: the run gets its file
    args = dfq_test.parse_args([SEG, '--work-dir', str(tmp_path / 'x'),
                                '--cfg-options',
                                f'dfq.load_images={earlier}'])
    with pytest.raises(Reached):
        dfq_test.run(args)
    assert stop_at_test['loop'].dfq.load_images == path


def test_non_finite_load_images(tmp_path, capsys, demo_data_root):
    path = str(tmp_path / 'synthetic_images.pth')
    torch.save(dict(images=torch.full((1, 3, 64, 64), float('nan')),
                    meta={}), path)
    code, err = run_main(capsys, [SEG, '--work-dir', str(tmp_path / 'w'),
                                  '--cfg-options', f'dfq.load_images={path}'])
    assert_one_line(code, err, 'NaN/Inf')


# ------------------------------------------------------ 4. config errors
def test_config_syntax_error_names_file_and_line(tmp_path, capsys):
    bad = tmp_path / 'bad.py'
    bad.write_text(f"_base_ = '{SEG}'\nx = 1\ny = = 2\n")
    code, err = run_main(capsys, [str(bad), '--work-dir',
                                  str(tmp_path / 'w')])
    assert_one_line(code, err, f'config {bad}, line 3: syntax error')
    assert '<unknown>' not in err[0]
    # the error in a base config: that file is named
    child = tmp_path / 'child.py'
    child.write_text("_base_ = './bad.py'\nw = 2\n")
    code, err = run_main(capsys, [str(child), '--work-dir',
                                  str(tmp_path / 'w')])
    assert_one_line(code, err, f'config {bad}, line 3: syntax error')
    # other errors of the config code: file and line too
    name = tmp_path / 'name.py'
    name.write_text(f"_base_ = '{SEG}'\nx = undefined_name + 1\n")
    code, err = run_main(capsys, [str(name)])
    assert_one_line(code, err, f'{name}, line 2', 'NameError')
    assert not (tmp_path / 'w').exists()


# --------------------------------------------- 4. synthesizer settings
@pytest.mark.parametrize('override,message', [
    ('dfq.synthesizer.num_images=0', 'num_images=0 is invalid'),
    ('dfq.synthesizer.num_images=-3', 'num_images=-3 is invalid'),
    ('dfq.synthesizer.num_images=2.5', 'use an integer >= 1'),
    ('dfq.synthesizer.num_images=abc', "num_images='abc' is invalid"),
    ('dfq.synthesizer.batch_size=0', 'batch_size=0 is invalid'),
    ('dfq.synthesizer.batch_size=1.5', 'batch_size=1.5 is invalid'),
    ('dfq.synthesizer.img_size=0', 'img_size=0 is invalid'),
    ('dfq.synthesizer.img_size=(-8,64)', 'img_size=(-8, 64) is invalid'),
    ('dfq.synthesizer.img_size=big', "img_size='big' is invalid"),
    ('dfq.synthesizer.lr=nan', 'dfq.synthesizer.lr=nan is not a finite'),
    ('dfq.synthesizer.tv_weight=inf', 'tv_weight=inf is not a finite'),
    ('dfq.synthesizer.tau_range=(2500,inf)', 'tau_range[1]=inf is not a'),
    ('dfq.synthesizer.bandwidth=0', "bandwidth=0 is invalid: use a number "
     "> 0 (PSAQ-ViT's KDE bandwidth"),
    ('dfq.synthesizer.bandwidth=-0.01', 'bandwidth=-0.01 is invalid'),
    ('dfq.synthesizer.lr=0', 'lr=0 is invalid'),
    ('dfq.synthesizer.iterations=0', 'iterations=0 is invalid'),
    ('dfq.synthesizer.num_points=1', 'num_points=1 is invalid'),
    ('dfq.synthesizer.betas=(0.5,1.5)', 'two numbers in [0, 1)'),
    ('dfq.synthesizer.max_samples=0', 'max_samples=0 is invalid'),
    ('dfq.synthesizer.no_such_key=1', "PSAQViT does not take "
     "['no_such_key']"),
    ('dfq.calib_batch_size=0', 'calib_batch_size=0'),
])
def test_bad_synthesizer_setting(tmp_path, capsys, override, message):
    work = tmp_path / 'work'
    code, err = run_main(capsys, [SEG, '--work-dir', str(work),
                                  '--cfg-options', override])
    assert_one_line(code, err, message)
    assert not work.exists()


@pytest.mark.parametrize('size', ['(16,16)', '(32,64)', '1'])
def test_img_size_too_small_for_the_backbone(tmp_path, capsys, size,
                                             demo_data_root):
    work = tmp_path / 'work'
    code, err = run_main(capsys, [SEG, '--work-dir', str(work),
                                  '--cfg-options',
                                  f'dfq.synthesizer.img_size={size}'])
    assert_one_line(code, err, 'dfq.synthesizer: img_size=', 'too small',
                    'use H >= 33 and W >= 33')
    assert not work.exists()


def test_min_image_size_matches_the_real_backbone():
    """The size arithmetic against mmdet's / mmseg's Swin forward."""
    from mmengine.config import Config

    from dfq_dense.engine.model_checks import (build_model, check_image_size,
                                               swin_min_image_size,
                                               swin_token_maps)
    for config in (SEG, DET):
        model = build_model(Config.fromfile(config)).eval()
        h, w = swin_min_image_size(model.backbone)
        assert (h, w) == (33, 33)  # patch 4, three 2x mergings, 2 tokens
        for size in ((h, w), (h - 1, w), (200, 75)):
            with torch.no_grad():
                outs = model.backbone(torch.zeros(1, 3, *size))
            assert [tuple(o.shape[-2:]) for o in outs] == \
                swin_token_maps(model.backbone, *size)
        check_image_size(model, (h, w))
        with pytest.raises(ValueError, match='too small'):
            check_image_size(model, (h, w - 1))


# ------------------------------------------------------------ 4. work dir
def test_work_dir_that_is_a_file(tmp_path, capsys):
    target = tmp_path / 'a_file'
    target.write_text('x')
    code, err = run_main(capsys, [SEG, '--work-dir', str(target)])
    assert_one_line(code, err, f'work dir {target} is an existing file')
    code, err = run_main(capsys, [SEG, '--work-dir', str(target / 'sub')])
    assert_one_line(code, err, 'cannot be created', 'is a file')
    assert target.read_text() == 'x'


# ------------------------------------------------------------ 4. full disk
def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_atomic_writers_leave_nothing_on_a_full_disk(tmp_path, monkeypatch):
    from dfq_dense.utils import fileio
    folder = tmp_path / 'new' / 'deeper'
    target = folder / 'quant_params.pth'

    def partial_save(obj, f, *args, **kwargs):
        f.write(b'PK\x03\x04 half a zip')
        f.flush()
        _enospc()

    monkeypatch.setattr(torch, 'save', partial_save)
    with pytest.raises(OSError) as err:
        fileio.torch_save_atomic(dict(x=torch.ones(3)), str(target))
    assert err.value.errno == errno.ENOSPC
    assert err.value.filename == str(target)
    assert not (tmp_path / 'new').exists()  # folders it made: removed too

    # an existing file keeps its content, no temporary file is left
    folder.mkdir(parents=True)
    target.write_bytes(b'old')

    def partial_dump(obj, f, **kwargs):
        f.write('{"half": ')
        _enospc()

    monkeypatch.setattr(fileio.json, 'dump', partial_dump)
    with pytest.raises(OSError):
        fileio.write_json_atomic(str(folder / 'r.json'), dict(a=1))
    with pytest.raises(OSError):
        fileio.torch_save_atomic(dict(x=1), str(target))
    assert sorted(os.listdir(folder)) == ['quant_params.pth']
    assert target.read_bytes() == b'old'


def test_full_disk_is_one_line(tmp_path, capsys, monkeypatch,
                               demo_data_root):
    from mmengine.runner import Runner

    from dfq_dense.utils import fileio

    def test_writes_results(self):
        monkeypatch.setattr(fileio.json, 'dump', lambda *a, **k: _enospc())
        fileio.write_json_atomic(osp.join(self.work_dir, 'dfq_results.json'),
                                 dict(metrics={}))

    monkeypatch.setattr(Runner, 'test', test_writes_results)
    work = tmp_path / 'work'
    code, err = run_main(capsys, [SEG, '--work-dir', str(work)])
    assert_one_line(code, err, 'no space left on device while writing '
                    f'{work}/dfq_results.json')
    leftovers = [f for _, _, files in os.walk(work) for f in files
                 if f.startswith('.tmp.') or f == 'dfq_results.json']
    assert leftovers == []


# ------------------------------------------------------ 5. dataset hint
def _fake_dataset(tmp_path, task):
    """The demo data in COCO's / ADE20K's standard layout (symlinks)."""
    from dfq_dense.demo import generate_demo_dataset
    demo = generate_demo_dataset(osp.join(REPO, 'data', 'dfq_demo'))
    if task == 'det':
        root = tmp_path / 'coco'
        (root / 'annotations').mkdir(parents=True)
        os.symlink(osp.join(demo, 'annotations', 'instances_val.json'),
                   root / 'annotations' / 'instances_val2017.json')
        os.symlink(osp.join(demo, 'images', 'validation'), root / 'val2017')
    else:
        root = tmp_path / 'ade'
        for sub in ('images', 'annotations'):
            (root / sub).mkdir(parents=True)
            os.symlink(osp.join(demo, sub, 'validation'),
                       root / sub / 'validation')
    return str(root)


@pytest.mark.parametrize('task,config', [
    ('det', 'configs/mask_rcnn_swin_t_w8a8.py'),
    ('seg', 'configs/upernet_swin_t_w8a8.py')])
def test_dataset_hint_command_works(tmp_path, capsys, monkeypatch, task,
                                    config):
    """The missing-dataset message suggests --data-root and the equivalent
    --cfg-options; both get the run past the dataset check."""
    import re
    monkeypatch.chdir(tmp_path)  # no data/ here
    config = osp.join(REPO, config)
    code, err = run_main(capsys, [config, 'ckpt.pth'])
    assert_one_line(code, err, 'dataset', 'not found', '--data-root DIR')
    root = _fake_dataset(tmp_path, task)
    options = re.search(r'--cfg-options (.*?)\)', err[0]).group(1)
    options = options.replace('DIR', root).split()
    for extra in (['--data-root', root], ['--cfg-options'] + options):
        code, err = run_main(capsys, [config, 'ckpt.pth'] + extra)
        # past the dataset check: now the (absent) checkpoint is the problem
        assert_one_line(code, err, 'checkpoint not found: ckpt.pth')
    # what --data-root sets is what the dataset and the metric read
    from dfq_dense.engine.runner import (check_dataset, load_config,
                                         set_data_root)
    cfg = set_data_root(load_config(config), root)
    check_dataset(cfg)
    assert cfg.test_dataloader.dataset.data_root == root
    if task == 'det':
        assert cfg.test_evaluator.ann_file == osp.join(
            root, 'annotations/instances_val2017.json')


def test_data_root_runs_a_demo_config(tmp_path, stop_at_test,
                                      demo_data_root):
    """A config whose data root is wrong runs with --data-root: the test
    dataset the Runner builds reads the given folder."""
    cfg = tmp_path / 'moved.py'
    cfg.write_text(
        f"_base_ = '{DET}'\n"
        "demo_dataset = None\n"
        "wrong = 'nowhere/'\n"
        "val_dataloader = dict(dataset=dict(data_root=wrong))\n"
        "test_dataloader = dict(dataset=dict(data_root=wrong))\n"
        "test_evaluator = dict(ann_file=wrong + "
        "'annotations/instances_val.json')\n")
    args = dfq_test.parse_args([str(cfg), '--work-dir', str(tmp_path / 'w'),
                                '--data-root', demo_data_root])
    with pytest.raises(Reached):
        dfq_test.run(args)
    loop = stop_at_test['loop']
    dataset = loop.dataloader.dataset
    assert len(dataset) == 200
    assert dataset.data_root == osp.normpath(demo_data_root)
    ann = stop_at_test['runner'].cfg.test_evaluator.ann_file
    assert ann == osp.join(osp.normpath(demo_data_root),
                           'annotations/instances_val.json')


# ------------------------------------- 5. README: another data source
def test_readme_method_override_runs(tmp_path, capsys, stop_at_test,
                                     demo_data_root):
    """The README's example switches the demo config (PSAQ-ViT) to
    GaussianNoise: PSAQ-ViT's own settings are dropped with a notice."""
    from dfq_dense.synth import GaussianNoise
    readme = ' '.join(open(osp.join(REPO, 'README.md')).read().split())
    assert ('--cfg-options dfq.quantizer.w_bits=4 dfq.synthesizer.type='
            'GaussianNoise dfq.synthesizer.num_images=16') in readme
    args = dfq_test.parse_args([
        SEG, '--work-dir', str(tmp_path / 'w'), '--cfg-options',
        'dfq.quantizer.w_bits=4', 'dfq.synthesizer.type=GaussianNoise',
        'dfq.synthesizer.num_images=16', 'dfq.quantizer.scope=backbone',
        'dfq.quantizer.first_last_bits=8',
        "dfq.quantizer.skip=['backbone.patch_embed.*']"])
    with pytest.raises(Reached):
        dfq_test.run(args)
    out = capsys.readouterr().out.splitlines()
    notice = [line for line in out if 'replaces PSAQViT' in line]
    # What the demo config sets that GaussianNoise does not take (PSAQ-ViT's
    # own settings) is dropped, named in one notice.
    import inspect

    from dfq_dense.engine.runner import load_config
    takes = set(inspect.signature(GaussianNoise).parameters)
    for cls in GaussianNoise.__mro__:
        if '__init__' in vars(cls):
            takes |= set(inspect.signature(cls.__init__).parameters)
    dropped = [k for k in load_config(SEG).dfq.synthesizer
               if k not in takes and k != 'type']
    if dropped:
        assert notice == [
            'dfq_test: notice: dfq.synthesizer.type=GaussianNoise replaces '
            f'PSAQViT: dropped its setting(s) {", ".join(dropped)} '
            '(GaussianNoise does not take them, or they are specific to a '
            'method)']
    else:
        assert notice == []
    loop = stop_at_test['loop']
    assert isinstance(loop.synthesizer, GaussianNoise)
    assert loop.synthesizer.num_images == 16
    assert 'max_samples' not in loop.dfq.synthesizer
    # a setting given on the command line is never dropped silently
    work = tmp_path / 'x'
    code, err = run_main(capsys, [
        SEG, '--work-dir', str(work), '--cfg-options',
        'dfq.synthesizer.type=GaussianNoise', 'dfq.synthesizer.max_samples=5'])
    assert_one_line(code, err, "GaussianNoise does not take ['max_samples']")


def test_method_switch_drops_method_specific_settings(tmp_path):
    from dfq_dense.engine.dfq_config import parse_dfq_config
    from dfq_dense.engine.runner import load_config
    cfg = tmp_path / 'spdfq.py'
    cfg.write_text(
        f"_base_ = '{SEG}'\n"
        "dfq = dict(synthesizer=dict(_delete_=True, type='SPDFQ', "
        "num_images=2, iterations=3, num_patches=2, "
        "components=dict(apa=True, msr=False)))\n")
    # SPDFQ's components and num_patches mean nothing to MimiQ: dropped
    out = load_config(str(cfg), {'dfq.synthesizer.type': 'MimiQ'})
    assert dict(out.dfq.synthesizer) == dict(type='MimiQ', num_images=2,
                                             iterations=3)
    assert parse_dfq_config(out.dfq).synthesizer.type == 'MimiQ'
    # what the command line gives is kept
    out = load_config(str(cfg), {
        'dfq.synthesizer.type': 'MimiQ',
        'dfq.synthesizer.components': dict(head_similarity=False)})
    assert out.dfq.synthesizer.components == dict(head_similarity=False)
    # no type change: nothing dropped
    out = load_config(str(cfg), {'dfq.synthesizer.type': 'SPDFQ'})
    assert out.dfq.synthesizer.num_patches == 2


def test_cli_stderr_is_exactly_one_line(tmp_path, demo_data_root):
    """Through a real process: nothing but the error line on stderr (no
    import-time or model-building warnings), exit code 2, no work dir."""
    import subprocess
    work = tmp_path / 'work'
    proc = subprocess.run(
        [sys.executable, osp.join(REPO, 'tools', 'dfq_test.py'), DET,
         SEG_CKPT, '--work-dir', str(work)],
        capture_output=True, text=True, cwd=REPO,
        env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert proc.returncode == 2
    assert proc.stderr.count('\n') == 1, proc.stderr
    assert proc.stderr.startswith('dfq_test: error: checkpoint ')
    assert not work.exists()


def test_cascade_without_checkpoint_says_how_to_convert(tmp_path, capsys,
                                                        monkeypatch):
    """The papers' Cascade models exist only as official Swin checkpoints:
    without CHECKPOINT the line names the file and the conversion."""
    monkeypatch.chdir(tmp_path)
    config = osp.join(REPO, 'configs/cascade_mask_rcnn_swin_s_w8a8.py')
    code, err = run_main(capsys, [config, '--data-root',
                                  _fake_dataset(tmp_path, 'det')])
    assert_one_line(code, err, 'no checkpoint',
                    'cascade_mask_rcnn_swin_small_patch4_window7.pth',
                    'tools/convert_checkpoint.py')
