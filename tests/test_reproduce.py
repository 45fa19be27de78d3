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


# timm model of each published classification backbone, and the official
# PSAQ-ViT eval crop and synthesis lr of its family (zkkli/PSAQ-ViT
# utils/data_utils.py and generate_data.py).
TIMM = {'DeiT-T': 'deit_tiny_patch16_224', 'DeiT-S': 'deit_small_patch16_224',
        'DeiT-B': 'deit_base_patch16_224',
        'Swin-T': 'swin_tiny_patch4_window7_224',
        'Swin-S': 'swin_small_patch4_window7_224'}
PSAQ_EVAL = {'DeiT': (0.875, 0.20), 'Swin': (0.9, 0.25)}


@pytest.mark.parametrize('entry', [e for e in QUANTIZED
                                   if e['task'] == 'classification' and
                                   e['method'] == 'PSAQ-ViT'],
                         ids=lambda e: e['id'])
def test_each_psaq_vit_imagenet_row_has_the_official_recipe(entry):
    path = reproduce.config_of(entry)
    assert path is not None, f'configs/reproduce/{entry["id"]}.py missing'
    cfg = load_config(osp.join(REPO, path))
    assert cfg.model.type == 'dfq_dense.TimmClassifier'
    assert cfg.model.model_name.split('.')[0] == TIMM[entry['backbone']]
    assert cfg.model.num_classes == 1000
    # the file of the row, loaded as it is (timm converts the official keys)
    assert cfg.official_checkpoint == entry['checkpoint']['url']
    assert cfg.official_checkpoint.endswith(entry['checkpoint']['file'])
    w, a = (int(v) for v in entry['bits'][1:].split('A'))
    assert (cfg.dfq.quantizer.w_bits, cfg.dfq.quantizer.a_bits) == (w, a)
    s = cfg.dfq.synthesizer
    assert s.type == 'PSAQViT' and s.label_head == 'classifier'
    # one batch of the row's 32 images, as the official --calib-batchsize
    assert s.num_images == s.batch_size == entry['calibration']['images']
    crop, lr = PSAQ_EVAL[entry['backbone'].split('-')[0]]
    assert s.lr == lr
    for dc in (cfg.model.data_config,
               cfg.test_dataloader.dataset.data_config):
        assert dc.crop_pct == crop and dc.interpolation == 'bicubic'
    assert cfg.test_dataloader.dataset.model_name == cfg.model.model_name


def test_psaq_vit_v2_imagenet_row_config():
    entry = next(e for e in QUANTIZED
                 if e['id'] == 'psaq-vit-v2_imagenet_swin-s_w8a8')
    cfg = load_config(osp.join(REPO, reproduce.config_of(entry)))
    assert cfg.model.model_name.split('.')[0] == TIMM['Swin-S']
    assert cfg.official_checkpoint == entry['checkpoint']['url']
    assert (cfg.dfq.quantizer.w_bits, cfg.dfq.quantizer.a_bits) == (8, 8)
    s, a = cfg.dfq.synthesizer, cfg.dfq.adapter
    # no category guidance: no label loss on the start images; the rounds
    # compare the class probabilities (measure None -> KL on logits)
    assert s.type == 'PSAQViTV2' and s.get('label_head') is None
    assert a.type == 'PSAQViTV2Rounds' and a.measure is None
    from dfq_dense.adapt import resolve_outputs
    assert resolve_outputs('PSAQViTV2Rounds', 'auto', a.measure,
                           _tiny_timm_swin()) == ('classifier', 'kl')


def _tiny_timm_swin():
    import torch.nn as nn
    import timm
    m = nn.Module()
    m.backbone = timm.create_model(
        'swin_tiny_patch4_window7_224', pretrained=False, num_classes=5,
        img_size=32, embed_dim=8, depths=(1, 1), num_heads=(1, 2),
        window_size=4)
    return m


def test_readme_guide_matches_the_registry_and_the_flop_counts():
    with open(osp.join(REPO, 'README.md')) as f:
        text = f.read()
    start = text.index('<!-- reproduce-guide:start -->\n') + len(
        '<!-- reproduce-guide:start -->\n')
    block = text[start:text.index('\n<!-- reproduce-guide:end -->')]
    rows = reproduce.guide_rows()
    assert block == reproduce.markdown(rows)
    # every row has its config and its estimate, the classification rows
    # too (their timm classifiers are in the FLOP counts)
    assert any(r['task'] == 'classification' for r in rows)
    for r in rows:
        assert r['config'] is not None, r['id']
        assert r['estimate'] is not None, r['id']
    assert 'no FLOP count' not in block


def test_classification_row_estimate_by_hand():
    """DeiT-S W8A8 (PSAQ-ViT): one batch of 32 images x 2 rounds x 500
    iterations of the committed per-image iteration count, calibration on
    the 32 images, ImageNet val's 50000 images, at 10 TFLOPS."""
    import json
    with open(osp.join(REPO, 'results', 'benchmarks', 'flops.json')) as f:
        counts = json.load(f)['sections']['flops']['rows']
    model = 'deit_small_patch16_224'
    f_eval, = [r['flops'] for r in counts
               if r['model'] == model and r['kind'] == 'eval']
    f_syn, = [r['flops'] for r in counts if r['model'] == model and
              r['kind'] == 'synthesis' and r['method'] == 'psaq_vit']
    row, = [r for r in reproduce.guide_rows()
            if r['id'] == 'psaq-vit_imagenet_deit-s_w8a8']
    assert row['model'] == model
    one, eight = row['estimate']['gpus']['1'], row['estimate']['gpus']['8']
    rate = 10e12
    assert one['synthesis_s'] == pytest.approx(f_syn * 1000 * 32 / rate)
    assert one['calibration_s'] == pytest.approx(f_eval * 32 / rate)
    assert one['evaluation_s'] == pytest.approx(f_eval * 50000 / rate)
    assert one['adaptation_s'] == 0
    assert one['total_s'] == pytest.approx(
        (f_syn * 32000 + f_eval * (32 + 50000)) / rate)
    # eight GPUs: the one batch on one rank; 4 calibration and 6250 test
    # images per rank
    assert eight['synthesis_s'] == pytest.approx(one['synthesis_s'])
    assert eight['total_s'] == pytest.approx(
        (f_syn * 32000 + f_eval * (4 + 6250)) / rate)
    # the committed counts: DeiT-S is 4.6 GMACs a forward (timm's model
    # card);
    # an iteration is more than a forward and its backward to the pixels
    assert f_eval / 1e9 == pytest.approx(9.2, abs=0.1)
    assert f_syn > 2 * f_eval
