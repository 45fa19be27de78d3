"""Classification track (dfq_dense.cls): the ImageNet val folder dataset,
the top-1 / top-5 metric, the timm classifier wrapper, its weights and an
mmengine Runner.test() on the shipped configs.

All on a tiny generated class-folder tree and a tiny timm Swin (2 stages,
embed dim 16, 32x32 input); nothing is downloaded.
"""
import os
import os.path as osp

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dfq_dense.cls import (ImageFolderError, ImageNetAccuracy,
                           ImageNetValDataset, TimmClassifier,
                           WeightsNotFoundError)
from dfq_dense.cls.timm_utils import cached_weights
from dfq_dense.utils.checkpoint import CheckpointMismatchError

import timm  # noqa: E402  (a runtime dependency: no skip)

SWIN = 'swin_tiny_patch4_window7_224'
SWIN_URL = ('https://github.com/SwinTransformer/storage/releases/download/'
            'v1.0.0/swin_tiny_patch4_window7_224.pth')
SWIN_HF = 'timm/swin_tiny_patch4_window7_224.ms_in1k'
# A 2-stage Swin small enough for the CPU: 8x8 tokens, 4x4 windows.
TINY = dict(embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=4,
            img_size=32)
TINY_DATA = dict(input_size=(3, 32, 32))
# Real wnids, created out of order: labels must follow the sorted order.
WNIDS = ['n01484850', 'n01440764', 'n01443537']
CONFIGS = {
    'swin_t_fp.py': 'swin_tiny_patch4_window7_224.ms_in1k',
    'swin_s_fp.py': 'swin_small_patch4_window7_224.ms_in1k',
    'deit_t_fp.py': 'deit_tiny_patch16_224.fb_in1k',
    'deit_s_fp.py': 'deit_small_patch16_224.fb_in1k',
    'deit_b_fp.py': 'deit_base_patch16_224.fb_in1k',
}


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory):
    """3 class folders, 2 images each, of different sizes and aspect
    ratios (the resize and crop matter), one grayscale (the RGB
    conversion matters), lower- and upper-case extensions, and a text file
    that is no image."""
    root = tmp_path_factory.mktemp('imagenet') / 'val'
    rng = np.random.RandomState(0)
    sizes = [(70, 50), (64, 64), (48, 90), (100, 40), (37, 53), (80, 80)]
    i = 0
    for wnid in WNIDS:
        os.makedirs(root / wnid)
        for j in range(2):
            h, w = sizes[i]
            arr = rng.randint(0, 256, (h, w, 3), dtype=np.uint8)
            img = Image.fromarray(arr)
            if i == 4:
                img = img.convert('L')
            ext = '.jpeg' if j else '.JPEG'
            img.save(root / wnid / f'ILSVRC2012_val_{i:08d}{ext}',
                     quality=90)
            i += 1
    (root / WNIDS[0] / 'README.txt').write_text('not an image')
    return str(root)


def _tiny_timm(num_classes=3, seed=0):
    torch.manual_seed(seed)
    return timm.create_model(SWIN, pretrained=False,
                             num_classes=num_classes, **TINY).eval()


def _timm_full_transform(model, overrides=None):
    """timm's eval transform as timm applies it (ToTensor + Normalize)."""
    cfg = timm.data.resolve_data_config(dict(overrides or {}), model=model)
    return timm.data.create_transform(**cfg, is_training=False)


def _one_line(err):
    text = str(err.value)
    assert '\n' not in text, text
    return text


@pytest.fixture
def offline_caches(tmp_path, monkeypatch):
    """Empty timm caches (torch hub dir, Hugging Face hub cache)."""
    import huggingface_hub.constants
    hub = tmp_path / 'torch_hub'
    hf = tmp_path / 'hf_cache'
    hub.mkdir()
    hf.mkdir()
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(hub))
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(hf))
    yield hub, hf
    torch.hub.set_dir(old)


# --------------------------------------------------------------------------
# dataset
# --------------------------------------------------------------------------
def test_dataset_matches_timm_transform_and_labels(image_folder):
    from torchvision.datasets import ImageFolder
    name = f'{SWIN}.ms_in1k'
    ds = ImageNetValDataset(data_root=image_folder, model_name=name,
                            num_classes=3)
    assert len(ds) == 6  # README.txt skipped
    assert ds.metainfo['classes'] == tuple(sorted(WNIDS))

    # timm's own folder dataset with timm's own eval transform of the model,
    # once without normalisation (what the dataset gives) and once in full
    # (what dataset + the classifier's preprocessor must give).
    model = timm.create_model(name, pretrained=False)
    cfg = timm.data.resolve_data_config({}, model=model)
    assert cfg['crop_pct'] == 0.9 and cfg['interpolation'] == 'bicubic'
    raw = timm.data.ImageDataset(image_folder, transform=timm.data.
                                 create_transform(**cfg, is_training=False,
                                                  normalize=False))
    full = _timm_full_transform(model)
    by_path = {raw.filename(i, absolute=True): i for i in range(len(raw))}
    # torchvision's ImageFolder: the label convention of the brief.
    tv = dict(ImageFolder(image_folder).samples)

    preprocessor = TimmClassifier(SWIN, pretrained=False, num_classes=3,
                                  model_kwargs=TINY).data_preprocessor
    for i in range(len(ds)):
        sample = ds[i]
        path = sample['data_samples'].img_path
        timm_img, timm_label = raw[by_path[path]]
        assert sample['inputs'].dtype == torch.uint8
        assert sample['inputs'].shape == (3, 224, 224)
        assert torch.equal(sample['inputs'], timm_img)
        label = int(sample['data_samples'].gt_label)
        assert label == timm_label == tv[path]
        assert label == sorted(WNIDS).index(osp.basename(osp.dirname(path)))
        # uint8 -> (x - 255 mean) / (255 std) vs ToTensor + Normalize: the
        # same values up to float32 rounding.
        batch = preprocessor(dict(inputs=[sample['inputs']]), False)
        with Image.open(path) as img:
            expected = full(img.convert('RGB'))
        torch.testing.assert_close(batch['inputs'][0], expected,
                                   atol=2e-6, rtol=0)


def test_dataset_data_config_override(image_folder):
    ds = ImageNetValDataset(data_root=image_folder, model_name=SWIN,
                            model_kwargs=TINY, data_config=TINY_DATA,
                            num_classes=3)
    sample = ds[0]
    assert sample['inputs'].shape == (3, 32, 32)
    assert sample['data_samples'].img_shape == (32, 32)
    # (h, w) of the file: sample 0 is the first file of the first sorted
    # class, WNIDS[1], i.e. the third image written.
    assert sample['data_samples'].ori_shape == (48, 90)
    assert sample['data_samples'].img_path.endswith(
        'ILSVRC2012_val_00000002.JPEG')


def test_dataset_errors_are_one_line(image_folder, tmp_path):
    missing = str(tmp_path / 'no_such' / 'val')
    with pytest.raises(ImageFolderError) as err:
        ImageNetValDataset(data_root=missing, model_name=SWIN)
    text = _one_line(err)
    assert missing in text and '<wnid class folder>/*.JPEG' in text
    # A subset of the classes would shift labels: refused.
    with pytest.raises(ImageFolderError) as err:
        ImageNetValDataset(data_root=image_folder, model_name=SWIN)
    assert 'has 3 class folders, expected 1000' in _one_line(err)
    (tmp_path / 'empty' / 'n01440764').mkdir(parents=True)
    with pytest.raises(ImageFolderError) as err:
        ImageNetValDataset(data_root=str(tmp_path / 'empty'),
                           model_name=SWIN, num_classes=1)
    assert 'has no images' in _one_line(err)


# --------------------------------------------------------------------------
# metric
# --------------------------------------------------------------------------
def test_metric_matches_numpy():
    rng = np.random.RandomState(1)
    n, c = 257, 20
    logits = rng.randn(n, c).astype(np.float32)
    labels = rng.randint(0, c, n)
    # Push the label up for some samples, so top-1 and top-5 are neither
    # chance nor 100 %.
    boost = rng.rand(n) < 0.4
    logits[np.arange(n)[boost], labels[boost]] += 1.5
    order = np.argsort(-logits, axis=1)
    want_top1 = 100.0 * np.mean(order[:, 0] == labels)
    want_top5 = 100.0 * np.mean((order[:, :5] == labels[:, None]).any(1))
    assert 0 < want_top1 < want_top5 < 100

    metric = ImageNetAccuracy()
    for start in range(0, n, 64):  # batches, as the test loop feeds them
        metric.process(None, [
            dict(logits=torch.from_numpy(logits[i]),
                 gt_label=torch.tensor(labels[i]))
            for i in range(start, min(start + 64, n))])
    result = metric.evaluate(n)
    assert set(result) == {'imagenet/top1', 'imagenet/top5'}
    assert result['imagenet/top1'] == pytest.approx(want_top1, abs=1e-9)
    assert result['imagenet/top5'] == pytest.approx(want_top5, abs=1e-9)


# --------------------------------------------------------------------------
# classifier
# --------------------------------------------------------------------------
def test_classifier_matches_timm_model(image_folder, tmp_path):
    ref = _tiny_timm()
    path = str(tmp_path / 'tiny.pth')
    torch.save(ref.state_dict(), path)
    clf = TimmClassifier(SWIN, num_classes=3, checkpoint=path,
                         model_kwargs=TINY).eval()
    assert clf.backbone.__class__ is ref.__class__
    assert clf.weights == path

    ds = ImageNetValDataset(data_root=image_folder, model_name=SWIN,
                            model_kwargs=TINY, data_config=TINY_DATA,
                            num_classes=3)
    samples = [ds[i] for i in range(len(ds))]
    batch = dict(inputs=[s['inputs'] for s in samples],
                 data_samples=[s['data_samples'] for s in samples])
    with torch.no_grad():
        preds = clf.test_step(batch)
        # The timm model called directly on timm's own full eval transform.
        full = _timm_full_transform(ref, TINY_DATA)
        images = []
        for s in samples:
            with Image.open(s['data_samples'].img_path) as img:
                images.append(full(img.convert('RGB')))
        want = ref(torch.stack(images))
    assert len(preds) == len(samples)
    for pred, sample, row in zip(preds, samples, want):
        torch.testing.assert_close(pred.logits, row, atol=1e-5, rtol=1e-5)
        assert int(pred.pred_label) == int(row.argmax())
        assert int(pred.gt_label) == int(sample['data_samples'].gt_label)
        assert pred.img_path == sample['data_samples'].img_path

    # tensor and loss modes on the same preprocessed batch.
    data = clf.data_preprocessor(batch, False)
    with torch.no_grad():
        logits = clf(data['inputs'], mode='tensor')
        loss = clf(**data, mode='loss')['loss']
    labels = torch.stack([s['data_samples'].gt_label for s in samples])
    torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, F.cross_entropy(want, labels),
                               atol=1e-5, rtol=1e-5)
    # init_weights (what a training Runner calls) keeps the loaded weights.
    clf.init_weights()
    for key, value in ref.state_dict().items():
        assert torch.equal(clf.backbone.state_dict()[key], value), key


def _official_swin_layout(state_dict):
    """A timm Swin state dict in the official release's layout: weights
    under 'model', patch merging at the end of the previous stage, the head
    as 'head.', plus the relative position indices the release stores."""
    import re
    out = {}
    for key, value in state_dict.items():
        key = re.sub(r'layers\.(\d+)\.downsample',
                     lambda m: f'layers.{int(m.group(1)) - 1}.downsample',
                     key)
        out[key.replace('head.fc.', 'head.')] = value
    out['layers.0.blocks.0.attn.relative_position_index'] = torch.zeros(
        16, 16, dtype=torch.long)
    return {'model': out}


def test_checkpoint_round_trip_and_strictness(tmp_path):
    ref = _tiny_timm(seed=3)
    sd = ref.state_dict()

    def load(obj, name):
        path = str(tmp_path / name)
        torch.save(obj, path)
        clf = TimmClassifier(SWIN, num_classes=3, checkpoint=path,
                             model_kwargs=TINY)
        got = clf.backbone.state_dict()
        assert got.keys() == sd.keys()
        for key in sd:
            assert torch.equal(got[key], sd[key]), (name, key)

    load(sd, 'plain.pth')
    # a timm training checkpoint of a DDP model
    load({'state_dict': {f'module.{k}': v for k, v in sd.items()},
          'epoch': 3}, 'train.pth')
    # the official release's layout, converted by timm's Swin filter
    official = _official_swin_layout(sd)
    assert 'layers.0.downsample.reduction.weight' in official['model']
    load(official, 'official.pth')

    # strict: a missing and an unexpected key are one-line errors
    partial = dict(sd)
    partial.pop('head.fc.weight')
    path = str(tmp_path / 'partial.pth')
    torch.save(partial, path)
    with pytest.raises(CheckpointMismatchError) as err:
        TimmClassifier(SWIN, num_classes=3, checkpoint=path,
                       model_kwargs=TINY)
    assert '1 missing key(s) (head.fc.weight)' in _one_line(err)
    torch.save(dict(sd, extra=torch.zeros(1)), path)
    with pytest.raises(CheckpointMismatchError) as err:
        TimmClassifier(SWIN, num_classes=3, checkpoint=path,
                       model_kwargs=TINY)
    assert '1 unexpected key(s) (extra)' in _one_line(err)
    # another head size: a shape mismatch, not a silently dropped head
    with pytest.raises(CheckpointMismatchError) as err:
        TimmClassifier(SWIN, num_classes=5, checkpoint=str(
            tmp_path / 'plain.pth'), model_kwargs=TINY)
    assert 'head.fc.weight: checkpoint (3, 32), model (5, 32)' in \
        _one_line(err)


def test_official_deit_layout_loads(tmp_path):
    """The DeiT releases keep the weights under 'model' with timm's key
    names; they go through timm's ViT filter (with DeiT's layer-scale
    renaming) unchanged."""
    kwargs = dict(embed_dim=16, depth=1, num_heads=1, patch_size=8,
                  img_size=32)
    torch.manual_seed(7)
    ref = timm.create_model('deit_tiny_patch16_224', pretrained=False,
                            num_classes=3, **kwargs)
    path = str(tmp_path / 'deit.pth')
    torch.save({'model': ref.state_dict()}, path)
    clf = TimmClassifier('deit_tiny_patch16_224', num_classes=3,
                         checkpoint=path, model_kwargs=kwargs)
    for key, value in ref.state_dict().items():
        assert torch.equal(clf.backbone.state_dict()[key], value), key


def test_missing_weights_offline_is_one_line(offline_caches, tmp_path):
    with pytest.raises(WeightsNotFoundError) as err:
        TimmClassifier(SWIN, num_classes=3, model_kwargs=TINY)
    text = _one_line(err)
    assert SWIN_URL in text and SWIN_HF in text
    assert 'model.checkpoint=PATH' in text
    missing = str(tmp_path / 'nowhere.pth')
    with pytest.raises(WeightsNotFoundError) as err:
        TimmClassifier(SWIN, num_classes=3, checkpoint=missing,
                       model_kwargs=TINY)
    text = _one_line(err)
    assert missing in text and SWIN_URL in text


def test_weights_from_timm_caches(offline_caches):
    """The file timm would download, already in its caches, is used: torch
    hub's checkpoints/ for the url, the Hugging Face hub cache (preferred,
    as timm prefers it) for hf_hub_id, there as safetensors."""
    import safetensors.torch
    hub, hf = offline_caches
    ref_url, ref_hf = _tiny_timm(seed=4), _tiny_timm(seed=5)
    (hub / 'checkpoints').mkdir()
    url_file = str(hub / 'checkpoints' / osp.basename(SWIN_URL))
    torch.save(ref_url.state_dict(), url_file)
    clf = TimmClassifier(SWIN, num_classes=3, model_kwargs=TINY)
    assert clf.weights == url_file
    assert torch.equal(clf.backbone.head.fc.weight, ref_url.head.fc.weight)

    # the hub cache layout: models--org--name/{refs/main,snapshots/<rev>/}
    repo = hf / ('models--' + SWIN_HF.replace('/', '--'))
    snap = repo / 'snapshots' / ('0' * 40)
    snap.mkdir(parents=True)
    (repo / 'refs').mkdir()
    (repo / 'refs' / 'main').write_text('0' * 40)
    hf_file = str(snap / 'model.safetensors')
    safetensors.torch.save_file(
        {k: v.contiguous() for k, v in ref_hf.state_dict().items()}, hf_file)
    assert cached_weights(clf.backbone.pretrained_cfg) == hf_file
    clf = TimmClassifier(SWIN, num_classes=3, model_kwargs=TINY)
    assert clf.weights == hf_file
    assert torch.equal(clf.backbone.head.fc.weight, ref_hf.head.fc.weight)


# --------------------------------------------------------------------------
# configs and Runner.test()
# --------------------------------------------------------------------------
def test_configs_name_the_models(repo_root):
    from mmengine.config import Config
    from dfq_dense.cls.timm_utils import create_timm_model, timm_data_config
    for leaf, name in CONFIGS.items():
        cfg = Config.fromfile(osp.join(repo_root, 'configs', 'cls', leaf))
        assert cfg.model.model_name == name, leaf
        assert cfg.model.checkpoint is None
        ds = cfg.test_dataloader.dataset
        # the transform follows the same weights' pretrained_cfg
        assert ds.model_name == name and ds.num_classes == 1000
        assert ds.data_root == 'data/imagenet/val'
        assert cfg.test_evaluator.type == 'dfq_dense.ImageNetAccuracy'
        meta = create_timm_model(name, device='meta')
        assert meta.pretrained_cfg['tag'] == name.split('.')[1]
        assert timm_data_config(meta)['input_size'] == (3, 224, 224)


def test_runner_test_end_to_end(image_folder, repo_root, tmp_path):
    from mmengine.config import Config
    from mmengine.runner import Runner
    ref = _tiny_timm(seed=6)
    path = str(tmp_path / 'tiny.pth')
    torch.save(ref.state_dict(), path)

    cfg = Config.fromfile(osp.join(repo_root, 'configs', 'cls',
                                   'swin_t_fp.py'))
    cfg.model.update(model_name=SWIN, num_classes=3, checkpoint=path,
                     model_kwargs=TINY)
    cfg.test_dataloader.update(batch_size=4, num_workers=0,
                               persistent_workers=False)
    cfg.test_dataloader.dataset.update(
        data_root=image_folder, model_name=SWIN, model_kwargs=TINY,
        data_config=TINY_DATA, num_classes=3)
    cfg.work_dir = str(tmp_path / 'work')
    metrics = Runner.from_cfg(cfg).test()
    assert set(metrics) == {'imagenet/top1', 'imagenet/top5'}

    # the same top-1 from the timm model on timm's own transform and labels
    ds = timm.data.ImageDataset(image_folder,
                                transform=_timm_full_transform(ref,
                                                               TINY_DATA))
    with torch.no_grad():
        images, labels = zip(*[ds[i] for i in range(len(ds))])
        pred = ref(torch.stack(images)).argmax(1)
    want = 100.0 * (pred == torch.tensor(labels)).sum().item() / len(ds)
    assert metrics['imagenet/top1'] == pytest.approx(want, abs=1e-9)
    assert metrics['imagenet/top5'] == 100.0  # 3 classes: all in the top 5
