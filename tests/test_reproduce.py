"""The reproduction guide: every quantized published row of a detector or
segmentor has a config that matches it, and the README's guide table is
the rendering of the registry and the committed FLOP counts."""
import os.path as osp

import pytest

from dfq_dense.engine.runner import load_config
from dfq_dense.report import reproduce
from dfq_dense.zoo.published import load_published

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
QUANTIZED = [e for e in load_published() if e['bits'] != 'FP']
DEPTHS = {'Swin-T': [2, 2, 6, 2], 'Swin-S': [2, 2, 18, 2],
          'Swin-B': [2, 2, 18, 2]}
MODEL_TYPES = {'Mask R-CNN': 'MaskRCNN', 'Cascade Mask R-CNN': 'CascadeRCNN',
               'UperNet': 'EncoderDecoder'}
SYNTH = {'RepQ-ViT': 'RealImages', 'PSAQ-ViT V2': 'PSAQViTV2'}


@pytest.mark.parametrize('entry', [e for e in QUANTIZED
                                   if e['task'] != 'classification'],
                         ids=lambda e: e['id'])
def test_each_published_dense_row_has_a_matching_config(entry):
    path = reproduce.config_of(entry)
    assert path is not None, f'configs/reproduce/{entry["id"]}.py missing'
    cfg = load_config(osp.join(REPO, path))
    assert cfg.model.type == MODEL_TYPES[entry['model']]
    assert list(cfg.model.backbone.depths) == DEPTHS[entry['backbone']]
    w, a = (int(v) for v in entry['bits'][1:].split('A'))
    assert (cfg.dfq.quantizer.w_bits, cfg.dfq.quantizer.a_bits) == (w, a)
    assert cfg.dfq.synthesizer.type == SYNTH[entry['method']]
    # the official checkpoint of the row, converted by the user
    assert cfg.official_checkpoint == entry['checkpoint']['url']
    assert cfg.load_from is None
    if entry['method'] == 'RepQ-ViT':  # real data, its quantizer
        assert cfg.dfq.quantizer.reparam is True
        assert cfg.dfq.synthesizer.num_images == \
            entry['calibration']['images']
    # the converter knows the model
    assert reproduce.MODELS[(entry['model'], entry['backbone'])]


def test_readme_guide_matches_the_registry_and_the_flop_counts():
    with open(osp.join(REPO, 'README.md')) as f:
        text = f.read()
    start = text.index('<!-- reproduce-guide:start -->\n') + len(
        '<!-- reproduce-guide:start -->\n')
    block = text[start:text.index('\n<!-- reproduce-guide:end -->')]
    rows = reproduce.guide_rows()
    assert block == reproduce.markdown(rows)
    # every row with a config has its estimate; only classification rows
    # lack a config so far, and the table says so
    for r in rows:
        if r['config'] is not None:
            assert r['estimate'] is not None, r['id']
        else:
            assert r['task'] == 'classification', r['id']
