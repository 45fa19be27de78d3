"""configs/leaderboard/published.yaml: the registry of published figures."""
import copy
import glob
import os.path as osp
import re

import pytest
import yaml

from dfq_dense.engine.runner import load_config
from dfq_dense.zoo.published import (REGISTRY, PublishedRegistryError,
                                     find_entries, fp_entry_for_checkpoint,
                                     load_published, validate_published)

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
REAL_CONFIGS = sorted(glob.glob(osp.join(REPO, 'configs', '*_w?a?.py')))


@pytest.fixture(scope='module')
def entries():
    return load_published()


def test_registry_validates(entries):
    assert REGISTRY == osp.join(REPO, 'configs', 'leaderboard',
                                'published.yaml')
    assert len(entries) >= 20
    assert all(e['quoted'] is True for e in entries)
    assert len({e['id'] for e in entries}) == len(entries)


def _config_checkpoint(cfg):
    return cfg.get('load_from') or cfg.get('official_checkpoint')


def _config_fp_figures(path):
    """The FP figures a config's comment states."""
    text = open(path).read()
    box = re.search(r'box AP\s+([\d.]+),\s+mask\s+(?:#\s*)?AP\s+([\d.]+)',
                    text)
    if box:
        return dict(box_ap=float(box.group(1)), mask_ap=float(box.group(2)))
    miou = re.search(r'mIoU ([\d.]+)', text)
    return dict(miou=float(miou.group(1))) if miou else None


@pytest.mark.parametrize('path', REAL_CONFIGS, ids=osp.basename)
def test_every_config_checkpoint_has_its_fp_entry(path, entries):
    cfg = load_config(path)
    checkpoint = _config_checkpoint(cfg)
    assert checkpoint, f'{path}: neither load_from nor official_checkpoint'
    entry = fp_entry_for_checkpoint(checkpoint, entries)
    assert entry is not None, f'no FP entry for {osp.basename(checkpoint)}'
    if 'url' in entry['checkpoint']:
        assert entry['checkpoint']['url'] == checkpoint
    # The figure the config's comment quotes is the registry's.
    assert _config_fp_figures(path) == entry['metrics']
    assert entry['metrics'] == entry['fp_reference']
    expected_source = ('official-swin-det' if cfg.get('load_from') is None
                       else 'mmdet-zoo' if cfg.default_scope == 'mmdet'
                       else 'mmseg-zoo')
    assert entry['checkpoint']['source'] == expected_source


REPQ = [
    ('Mask R-CNN', 'Swin-T', 'W4A4', (36.1, 36.0), (46.0, 41.6)),
    ('Mask R-CNN', 'Swin-T', 'W6A6', (45.1, 41.2), (46.0, 41.6)),
    ('Mask R-CNN', 'Swin-S', 'W4A4', (44.2, 40.2), (48.5, 43.3)),
    ('Mask R-CNN', 'Swin-S', 'W6A6', (47.8, 43.0), (48.5, 43.3)),
    ('Cascade Mask R-CNN', 'Swin-T', 'W4A4', (47.0, 41.4), (50.4, 43.7)),
    ('Cascade Mask R-CNN', 'Swin-T', 'W6A6', (50.0, 43.5), (50.4, 43.7)),
    ('Cascade Mask R-CNN', 'Swin-S', 'W4A4', (49.3, 43.1), (51.9, 45.0)),
    ('Cascade Mask R-CNN', 'Swin-S', 'W6A6', (51.4, 44.6), (51.9, 45.0)),
]


@pytest.mark.parametrize('model,backbone,bits,result,fp', REPQ)
def test_repq_vit_rows(entries, model, backbone, bits, result, fp):
    rows = find_entries(entries, method='RepQ-ViT', model=model,
                        backbone=backbone, bits=bits)
    assert len(rows) == 1
    row = rows[0]
    assert row['venue'] == 'ICCV 2023'
    assert (row['metrics']['box_ap'], row['metrics']['mask_ap']) == result
    assert (row['fp_reference']['box_ap'],
            row['fp_reference']['mask_ap']) == fp
    assert row['calibration']['data'] == 'real'
    assert row['calibration']['images'] == 1
    assert row['checkpoint']['source'] == 'official-swin-det'
    # The FP reference is the official checkpoint's own FP entry.
    fp_entry = fp_entry_for_checkpoint(row['checkpoint']['file'], entries)
    assert fp_entry['metrics'] == row['fp_reference']


def test_psaq_vit_v2_rows(entries):
    rows = {e['task']: e for e in find_entries(
        entries, method='PSAQ-ViT V2', backbone='Swin-S', bits='W8A8')}
    assert set(rows) == {'instance_segmentation', 'semantic_segmentation',
                         'classification'}
    det = rows['instance_segmentation']
    assert det['model'] == 'Cascade Mask R-CNN'
    assert det['metrics'] == dict(box_ap=50.9, mask_ap=44.1)
    assert det['fp_reference'] == dict(box_ap=51.9, mask_ap=45.0)
    assert rows['semantic_segmentation']['metrics'] == dict(miou=47.2)
    assert rows['classification']['metrics'] == dict(top1=82.13)
    for row in rows.values():
        assert row['calibration']['data'] == 'data-free'
        assert 'not verified here' in row['note']


def _valid(entries):
    return copy.deepcopy(entries[-1])


@pytest.mark.parametrize('change,message', [
    (lambda e: e.pop('source'), 'missing field(s) source'),
    (lambda e: e.update(quoted=False), 'quoted must be true'),
    (lambda e: e.update(bits='W8'), "bits must be 'FP' or 'W<w>A<a>'"),
    (lambda e: e.update(bits='W1A8'), "bits must be 'FP' or 'W<w>A<a>'"),
    (lambda e: e.update(venue='ICCV'), 'venue must be'),
    (lambda e: e.update(metrics=dict(top1='82')), 'must be a number'),
    (lambda e: e.update(metrics=dict(miou=47.2)), 'exactly the keys'),
    (lambda e: e.update(extra=1), 'unknown field(s) extra'),
    (lambda e: e.pop('note'), 'needs a note'),
    (lambda e: e['checkpoint'].update(source='somewhere'),
     'checkpoint.source must be one of'),
    (lambda e: e['calibration'].update(images=0),
     'calibration.images must be a positive integer'),
    (lambda e: e['calibration'].update(data='none'),
     "calibration.data is 'none' exactly for bits 'FP'"),
])
def test_schema_rejects_bad_entries(entries, change, message):
    entry = _valid(entries)
    change(entry)
    with pytest.raises(PublishedRegistryError) as err:
        validate_published(dict(entries=[entry]))
    assert message in str(err.value)
    assert len(str(err.value).splitlines()) == 1
    assert entry['id'] in str(err.value)


def test_duplicate_ids_and_bad_files(tmp_path, entries):
    entry = _valid(entries)
    with pytest.raises(PublishedRegistryError, match='duplicate id'):
        validate_published(dict(entries=[entry, copy.deepcopy(entry)]))
    bad = tmp_path / 'bad.yaml'
    bad.write_text('entries: [a: 1\n')
    with pytest.raises(PublishedRegistryError, match='not valid YAML'):
        load_published(str(bad))
    plain = tmp_path / 'plain.yaml'
    plain.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(PublishedRegistryError, match='"entries"'):
        load_published(str(plain))


def test_psaq_vit_imagenet_rows(entries):
    """PSAQ-ViT (V1) ImageNet rows: the Results table of the official
    README (github.com/zkkli/PSAQ-ViT), transcribed here as
    model: (FP, W4/A8, W8/A8)."""
    readme = {'DeiT-T': (72.21, 65.57, 71.56), 'DeiT-S': (79.85, 73.23, 76.92),
              'DeiT-B': (81.85, 77.05, 79.10), 'Swin-T': (81.35, 71.79, 75.35),
              'Swin-S': (83.20, 75.14, 76.64)}
    rows = find_entries(entries, method='PSAQ-ViT', task='classification')
    assert len(rows) == 10
    for row in rows:
        fp, w4a8, w8a8 = readme[row['backbone']]
        want = dict(W4A8=w4a8, W8A8=w8a8)[row['bits']]
        assert row['metrics'] == dict(top1=want), row['id']
        assert row['fp_reference'] == dict(top1=fp), row['id']
        assert row['calibration'] == dict(data='data-free', images=32,
                                          split=None)
        src = 'official-deit-cls' if row['backbone'].startswith('DeiT') \
            else 'official-swin-cls'
        assert row['checkpoint']['source'] == src
        assert 'Not verified here' in row['note']
