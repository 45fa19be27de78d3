"""The leaderboard models as configs: Cascade Mask R-CNN Swin-T/S 3x (the
official Swin detection model), Mask R-CNN Swin-T 1x and UperNet Swin-B,
each at W8A8 / W6A6 / W4A8 / W4A4."""
import glob
import os.path as osp

import pytest
import torch
from mmengine.registry import init_default_scope

from dfq_dense.engine.dfq_config import parse_dfq_config
from dfq_dense.engine.runner import load_config

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
BITS = ('w8a8', 'w6a6', 'w4a8', 'w4a4')
# name -> (scope, embed dims, depths, heads)
MODELS = {
    'cascade_mask_rcnn_swin_t': ('mmdet', 96, [2, 2, 6, 2], [3, 6, 12, 24]),
    'cascade_mask_rcnn_swin_s': ('mmdet', 96, [2, 2, 18, 2], [3, 6, 12, 24]),
    'mask_rcnn_swin_t_1x': ('mmdet', 96, [2, 2, 6, 2], [3, 6, 12, 24]),
    'upernet_swin_b': ('mmseg', 128, [2, 2, 18, 2], [4, 8, 16, 32]),
}
NEW_CONFIGS = [f'{m}_{b}.py' for m in MODELS for b in BITS]
ZOO_URLS = {
    'mask_rcnn_swin_t_1x':
    'mask_rcnn_swin-t-p4-w7_fpn_1x_coco_20210902_120937-9d6b7cfa.pth',
    'upernet_swin_b':
    'upernet_swin_base_patch4_window7_512x512_160k_ade20k_pretrain_224x224_'
    '1K_20210526_192340-593b0e13.pth',
}


def _model_of(name):
    return name.rsplit('_', 1)[0]


def _build(cfg):
    if cfg.default_scope == 'mmdet':
        from mmdet.registry import MODELS as REGISTRY
    else:
        from mmseg.registry import MODELS as REGISTRY
    init_default_scope(cfg.default_scope)
    return REGISTRY.build(cfg.model)


def test_all_new_configs_exist():
    names = {osp.basename(p) for p in glob.glob(
        osp.join(REPO, 'configs', '*_w?a?.py'))}
    assert set(NEW_CONFIGS) <= names


@pytest.mark.parametrize('name', NEW_CONFIGS)
def test_new_config_parses_with_right_bits(name):
    cfg = load_config(osp.join(REPO, 'configs', name))
    dfq = parse_dfq_config(cfg.dfq)
    bits = name[-7:-3]
    assert f'w{dfq.quantizer.w_bits}a{dfq.quantizer.a_bits}' == bits
    assert cfg.test_cfg.type == 'dfq_dense.DFQTestLoop'
    assert dfq.synthesizer.type == 'PSAQViT'
    # W4A4 takes the percentile quantizer, as the other W4A4 configs do.
    observer = cfg.dfq.quantizer.act.observer.type
    assert observer == ('PercentileObserver' if bits == 'w4a4' else
                        'MinMaxObserver')
    model = _model_of(name)
    scope = MODELS[model][0]
    assert cfg.default_scope == scope
    if model.startswith('cascade'):
        long = 'tiny' if '_swin_t' in model else 'small'
        assert cfg.load_from is None  # official file: convert it first
        assert cfg.official_checkpoint == (
            'https://github.com/SwinTransformer/storage/releases/download/'
            f'v1.0.2/cascade_mask_rcnn_swin_{long}_patch4_window7.pth')
    else:
        assert cfg.load_from.startswith('https://download.openmmlab.com/')
        assert cfg.load_from.endswith(ZOO_URLS[model])
    if scope == 'mmdet':
        assert cfg.test_dataloader.dataset.data_root == 'data/coco/'
        assert cfg.test_dataloader.dataset.ann_file == \
            'annotations/instances_val2017.json'
        assert set(cfg.test_evaluator.metric) == {'bbox', 'segm'}
    else:
        assert cfg.test_dataloader.dataset.data_root == \
            'data/ade/ADEChallengeData2016'


@pytest.mark.parametrize('model', list(MODELS))
def test_new_model_builds_with_right_backbone(model):
    cfg = load_config(osp.join(REPO, 'configs', f'{model}_w8a8.py'))
    _, embed, depths, heads = MODELS[model]
    built = _build(cfg)
    backbone = built.backbone
    assert [len(stage.blocks) for stage in backbone.stages] == depths
    assert backbone.patch_embed.projection.out_channels == embed
    assert [stage.blocks[0].attn.w_msa.num_heads
            for stage in backbone.stages] == heads
    assert backbone.stages[0].blocks[0].attn.w_msa.window_size == (7, 7)
    assert cfg.model.backbone.out_indices == (0, 1, 2, 3)
    dims = [embed * 2 ** i for i in range(4)]
    if model.startswith('upernet'):
        assert list(built.decode_head.in_channels) == dims
        assert built.auxiliary_head.in_channels == dims[2]
        assert built.decode_head.num_classes == 150
    else:
        assert list(built.neck.in_channels) == dims


@pytest.mark.parametrize('size,depths', [('t', [2, 2, 6, 2]),
                                         ('s', [2, 2, 18, 2])])
def test_cascade_is_the_official_model(size, depths):
    from mmdet.models.roi_heads.bbox_heads import ConvFCBBoxHead
    from mmdet.models.losses import GIoULoss
    cfg = load_config(osp.join(
        REPO, 'configs', f'cascade_mask_rcnn_swin_{size}_w4a4.py'))
    bb = cfg.model.backbone
    assert (bb.type, bb.embed_dims, bb.window_size, bb.drop_path_rate) == \
        ('SwinTransformer', 96, 7, 0.2)
    assert bb.depths == depths and bb.num_heads == [3, 6, 12, 24]
    assert cfg.model.neck.in_channels == [96, 192, 384, 768]
    # Official test pipeline and test_cfg.
    resize = [t for t in cfg.test_dataloader.dataset.pipeline
              if t.type == 'Resize']
    assert len(resize) == 1 and tuple(resize[0].scale) == (1333, 800) and \
        resize[0].keep_ratio
    rpn, rcnn = cfg.model.test_cfg.rpn, cfg.model.test_cfg.rcnn
    assert (rpn.nms_pre, rpn.max_per_img, rpn.nms.iou_threshold,
            rpn.min_bbox_size) == (1000, 1000, 0.7, 0)
    assert (rcnn.score_thr, rcnn.nms.iou_threshold, rcnn.max_per_img,
            rcnn.mask_thr_binary) == (0.05, 0.5, 100, 0.5)
    model = _build(cfg)
    roi = model.roi_head
    assert roi.num_stages == 3 and len(roi.bbox_head) == 3
    stds = [[0.1, 0.1, 0.2, 0.2], [0.05, 0.05, 0.1, 0.1],
            [0.033, 0.033, 0.067, 0.067]]
    for head, std in zip(roi.bbox_head, stds):
        assert type(head) is ConvFCBBoxHead
        assert (head.num_shared_convs, head.num_shared_fcs) == (4, 1)
        assert (head.num_cls_convs, head.num_cls_fcs, head.num_reg_convs,
                head.num_reg_fcs) == (0, 0, 0, 0)
        assert all(conv.norm_name == 'bn' for conv in head.shared_convs)
        assert head.shared_fcs[0].out_features == 1024
        assert isinstance(head.loss_bbox, GIoULoss)
        assert head.loss_bbox.loss_weight == 10.0
        assert head.reg_decoded_bbox and not head.reg_class_agnostic
        assert head.fc_reg.out_features == 80 * 4
        assert head.fc_cls.out_features == 81
        assert list(head.bbox_coder.stds) == std
    # One FCN mask head (4 convs) per stage, as in mmdet 2.11.
    assert len(roi.mask_head) == 3
    assert all(h.num_convs == 4 for h in roi.mask_head)


def test_cascade_swin_t_forward_on_cpu():
    """Random weights, one 224x224 image, test mode: detections come out
    (boxes, scores, labels, masks) without error."""
    from mmdet.structures import DetDataSample
    cfg = load_config(osp.join(
        REPO, 'configs', 'cascade_mask_rcnn_swin_t_w8a8.py'))
    # Keep every proposal / detection: random weights score low.
    cfg.model.test_cfg.rcnn.score_thr = 0.0
    cfg.model.test_cfg.rpn.nms_pre = 50
    cfg.model.test_cfg.rpn.max_per_img = 20
    torch.manual_seed(0)
    model = _build(cfg).eval()
    sample = DetDataSample(metainfo=dict(
        img_shape=(224, 224), ori_shape=(224, 224), pad_shape=(224, 224),
        scale_factor=(1.0, 1.0), batch_input_shape=(224, 224)))
    data = dict(inputs=[torch.randint(0, 256, (3, 224, 224),
                                      dtype=torch.uint8)],
                data_samples=[sample])
    with torch.no_grad():
        out = model.test_step(data)
    assert len(out) == 1
    pred = out[0].pred_instances
    n = len(pred)
    assert 0 < n <= 100
    assert pred.bboxes.shape == (n, 4) and pred.scores.shape == (n,)
    assert pred.masks.shape[-2:] == (224, 224)
    assert torch.isfinite(pred.bboxes).all()
