"""The calibration finish (qparams of the value-keeping observers) is
bit-identical to the straightforward grid evaluation it replaced: the
reference below evaluates the candidates in chunks of whole tensors and
takes the float64 differences in one go (the algorithm of the first
version of ``_grid_errors``); the observers are run once with each, on many
random cases, and must give the same scales and zero points."""
import importlib.util
import inspect
import sys

import torch

from dfq_dense.quant import calibrators as C
from dfq_dense.quant.observers import calibration_step, range_to_qparams

import pytest  # noqa: E402,I001


def reference_grid_errors(s, lo, hi, bits, symmetric, eps, reduce='mean',
                          sd=None):
    """Errors ``(G, C)`` float64 of fake-quantizing ``s`` ``(C, m)`` with
    each candidate range ``lo`` / ``hi`` ``(G, C)``: ``round(s / scale) +
    zp``, clamped, dequantized (the conventions of
    ``dfq_dense.quant.fake_quant``), squared difference to ``s`` in
    float64, mean or sum per row; whole-tensor chunks of candidates."""
    scale, zp, qmin, qmax = range_to_qparams(lo, hi, bits, symmetric, eps)
    sd = s.double() if sd is None else sd
    step = max(1, (1 << 18) // max(1, s.numel()))
    out = []
    for g0 in range(0, scale.shape[0], step):
        sc = scale[g0:g0 + step, :, None]
        z = zp[g0:g0 + step, :, None].to(s.dtype)
        q = s * (1.0 / sc)
        q.round_().add_(z).clamp_(qmin, qmax).sub_(z).mul_(sc)
        d = q.double().sub_(sd)
        d.mul_(d)
        out.append(d.mean(dim=-1) if reduce == 'mean' else d.sum(dim=-1))
    return torch.cat(out), scale, zp


@pytest.fixture(scope='module')
def head():
    """The calibrators module with the reference grid evaluation
    (registration decorators removed, so nothing is registered twice)."""
    src = inspect.getsource(C).replace('@TASK_UTILS.register_module()\n',
                                       '')
    name = 'dfq_dense.quant._calibrators_reference'
    spec = importlib.util.spec_from_loader(name, loader=None)
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = 'dfq_dense.quant'
    exec(compile(src, 'calibrators_reference.py', 'exec'), mod.__dict__)
    sys.modules.pop(name, None)
    mod._grid_errors = reference_grid_errors
    return mod


def _data(gen, shape, kind):
    x = torch.randn(*shape, generator=gen)
    if kind == 'heavy':
        x = x * torch.rand(*shape, generator=gen).pow(-0.5)
    elif kind == 'relu':
        x = x.clamp(min=0) * 3
    elif kind == 'shifted':
        x = x * 0.1 + 2
    elif kind == 'coarse':
        x = torch.randint(-4, 5, shape, generator=gen).float() / 4
    return x


def _same(new, old, batches, bits, symmetric):
    for i, x in enumerate(batches):
        with calibration_step(i):
            new.observe(x)
            old.observe(x)
    a = new.compute_qparams(bits, symmetric)
    b = old.compute_qparams(bits, symmetric)
    assert torch.equal(a[0], b[0]), (a[0], b[0])
    assert torch.equal(a[1], b[1]), (a[1], b[1])
    assert a[2:] == b[2:]


CASES = [
    # (class, kwargs, batch shapes)
    ('OMSEObserver', {}, [(64, 32, 3, 3)]),
    ('OMSEObserver', {}, [(384, 1536)]),
    ('OMSEObserver', {}, [(1536, 384)]),
    ('OMSEObserver', {}, [(7, 5)]),
    ('OMSEObserver', dict(granularity='tensor'), [(96, 200)]),
    ('OMSEObserver', dict(refine_iters=3, grid=17), [(40, 70000)]),
    ('OMSEObserver', dict(max_samples=300), [(8, 1000), (8, 500)]),
    ('MSEObserver', {}, [(2, 64, 50, 50), (2, 64, 30, 30)]),
    ('MSEObserver', dict(max_samples=4096), [(3000, ), (9000, )]),
    ('MSEObserver', dict(granularity='channel', ch_axis=1,
                         max_samples=2048), [(4, 96, 30)]),
    ('MSEObserver', dict(max_samples=None), [(300, 1100)]),
    ('PercentileSearchObserver', {}, [(2, 96, 64, 64)]),
    ('PercentileSearchObserver', dict(granularity='channel', ch_axis=-1,
                                      max_samples=2048),
     [(1, 3000, 192), (1, 700, 192)]),
    ('PercentileSearchObserver', dict(max_samples=None), [(50, 500)]),
    ('PercentileObserver', {}, [(2, 64, 80, 80)]),
    ('PercentileObserver', dict(granularity='channel', tail=64), [(16, 900)]),
]


@pytest.mark.parametrize('case', range(len(CASES)))
@pytest.mark.parametrize('kind', ['normal', 'heavy', 'relu', 'shifted',
                                  'coarse'])
def test_qparams_identical_to_head(head, case, kind):
    cls, kwargs, shapes = CASES[case]
    gen = torch.Generator().manual_seed(1000 * case + len(kind))
    batches = [_data(gen, s, kind) for s in shapes]
    for bits, symmetric in ((8, True), (8, False), (4, True), (4, False)):
        new = getattr(C, cls)(**kwargs)
        old = getattr(head, cls)(**kwargs)
        _same(new, old, batches, bits, symmetric)


def test_grid_errors_identical_to_head(head):
    gen = torch.Generator().manual_seed(0)
    for trial in range(40):
        c = int(torch.randint(1, 300, (1, ), generator=gen))
        m = int(torch.randint(1, 5000, (1, ), generator=gen))
        g = int(torch.randint(1, 120, (1, ), generator=gen))
        s = _data(gen, (c, m), ['normal', 'heavy', 'relu', 'shifted',
                                'coarse'][trial % 5])
        alphas = torch.rand(g, c, generator=gen)
        lo, hi = s.amin(1) * alphas, s.amax(1) * alphas
        for symmetric in (True, False):
            for reduce in ('mean', 'sum'):
                a = C._grid_errors(s, lo, hi, 8, symmetric, 1e-8, reduce)
                b = head._grid_errors(s, lo, hi, 8, symmetric, 1e-8, reduce)
                for x, y in zip(a, b):
                    assert torch.equal(x, y)
