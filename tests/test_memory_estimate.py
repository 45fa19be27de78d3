"""The synthesis memory estimate said before a run (dfq_dense.engine.memory)."""

import pytest
import torch

from dfq_dense.engine import memory


def test_peak_saved_bytes_counts_live_saved_tensors():
    """Against the tensors autograd must keep, counted by hand: a*b keeps
    only b (the gradient reaches a alone), exp keeps its output; after the
    first backward frees the graph the second chain starts from zero."""
    a = torch.randn(1000, requires_grad=True)   # 4000 bytes
    b = torch.randn(1000)

    def chain():
        y = (a * b).exp()   # keeps b and exp's output: 8000
        y.sum().backward()
        z = a.sin()         # saves a (4000)
        z.sum().backward()
        return y

    peak, _ = memory.peak_saved_bytes(chain)
    assert peak == 8000
    # one storage saved twice counts once
    peak, _ = memory.peak_saved_bytes(lambda: (a * a).sum().backward())
    assert peak == 4000
    # parameters are not activations: w * b2 keeps b2 (for w) and w (for
    # b2), only b2 counts
    w = torch.nn.Parameter(torch.randn(1000))
    b2 = torch.randn(1000, requires_grad=True)
    peak, _ = memory.peak_saved_bytes(lambda: (w * b2).sum().backward())
    assert peak == 4000


def test_estimate_scales_and_warns_with_the_fix():
    pytest.importorskip('mmdet')
    from mmdet.models.backbones import SwinTransformer
    from torch import nn

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = SwinTransformer(
                embed_dims=16, depths=(1, 1), num_heads=(1, 2),
                window_size=7, strides=(4, 2), out_indices=(0, 1))

    model = Model().eval()
    cfg = dict(type='PSAQViT', num_images=8, batch_size=8, iterations=3)
    est = memory.synthesis_estimate(model, cfg, (448, 448))
    per_probe = est['per_image'] / 4          # 448^2 = 4 x the probe
    assert est['per_image'] > 0 and est['images_per_forward'] == 8
    assert est['per_forward'] == pytest.approx(8 * est['per_image'])
    small = memory.synthesis_estimate(model, dict(cfg, batch_size=1),
                                      (224, 224))
    assert small is None  # below SKIP_BELOW: not probed
    lines = []
    est = memory.check_synthesis_memory(
        model, cfg, (448, 448), 'cpu', available=int(3 * per_probe * 4),
        log=lambda msg, **kw: lines.append(msg))
    assert len(lines) == 1
    assert 'dfq.synthesizer.with_cp=True' in lines[0]
    assert 'dfq.synthesizer.micro_batch_size=' in lines[0]
    assert est['fix'][0] == 'dfq.synthesizer.with_cp=True'
    # enough memory: nothing said
    lines.clear()
    memory.check_synthesis_memory(
        model, cfg, (448, 448), 'cpu', available=10 ** 12,
        log=lambda msg, **kw: lines.append(msg))
    assert lines == []
    # baselines optimise nothing
    assert memory.synthesis_estimate(
        model, dict(type='GaussianNoise', batch_size=8), (448, 448)) is None
