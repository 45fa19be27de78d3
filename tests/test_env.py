import torch


def test_stack_imports():
    import mmcv
    import mmdet
    import mmengine
    import mmseg
    import timm  # noqa: F401

    import dfq_dense
    assert mmcv.__version__ == '2.1.0'
    assert mmdet.__version__ == '3.3.0'
    assert mmseg.__version__ == '1.2.2'
    assert mmengine.__version__ == '0.10.7'
    assert dfq_dense.__version__


def test_mmcv_nms_cpu():
    from mmcv.ops import nms
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]],
                         dtype=torch.float32)
    scores = torch.tensor([0.9, 0.8, 0.7])
    # IoU of the first two boxes is 81/100 > 0.5: the second is suppressed.
    _, keep = nms(boxes, scores, iou_threshold=0.5)
    assert keep.tolist() == [0, 2]


def test_mmcv_roi_align_cpu():
    from mmcv.ops import RoIAlign
    # A linear ramp: bilinear RoIAlign must return the ramp's value at each
    # bin centre, which is worked out by hand below.
    feat = torch.arange(8, dtype=torch.float32).repeat(8, 1)[None, None]
    roi = torch.tensor([[0, 0, 0, 4, 4]], dtype=torch.float32)
    out = RoIAlign((2, 2), spatial_scale=1.0, sampling_ratio=1,
                   aligned=True)(feat, roi)
    # aligned=True shifts the RoI by -0.5 px to [-0.5, 3.5]: two bins of
    # width 2, one sample at each centre, x = 0.5 and 2.5.
    assert torch.allclose(out[0, 0], torch.tensor([[0.5, 2.5], [0.5, 2.5]]))
