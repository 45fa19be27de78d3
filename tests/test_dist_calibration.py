"""Two real processes (gloo on loopback) end with identical qparams."""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dfq_dense.quant import (enable_calibration, finish_calibration,
                             quant_state_dict, quantize_model)


def _tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(),
                               torch.nn.Conv2d(8, 4, 1))


def _calibrate(model, data):
    quantize_model(model, w_bits=8, a_bits=8)
    enable_calibration(model)
    with torch.no_grad():
        model(data)
    finish_calibration(model)
    return quant_state_dict(model)


def _rank_data(rank):
    # Each rank sees different data with a different range.
    gen = torch.Generator().manual_seed(100 + rank)
    return torch.randn(2, 3, 8, 8, generator=gen) * (1 + 3 * rank)


def _worker(rank, world, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}',
                            rank=rank, world_size=world)
    try:
        state = _calibrate(_tiny_model(), _rank_data(rank))
        torch.save(state, os.path.join(out_dir, f'rank{rank}.pth'))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_ranks_end_with_identical_qparams(tmp_path):
    world = 2
    mp.spawn(_worker, args=(world, _free_port(), str(tmp_path)),
             nprocs=world, join=True)
    states = [torch.load(tmp_path / f'rank{r}.pth') for r in range(world)]
    # Single-process reference on the union of both ranks' data: the synced
    # min/max must equal the global min/max.
    ref = _calibrate(_tiny_model(),
                     torch.cat([_rank_data(r) for r in range(world)]))
    assert states[0].keys() == states[1].keys() == ref.keys()
    for name in ref:
        for key in ('scale', 'zero_point'):
            assert torch.equal(states[0][name][key], states[1][name][key])
            assert torch.equal(states[0][name][key], ref[name][key]), name
    # And the ranks' own data alone would have given different qparams.
    alone = _calibrate(_tiny_model(), _rank_data(0))
    assert any(not torch.equal(alone[n]['scale'], ref[n]['scale'])
               for n in ref)


# ------------------------------------------------ sharded calibration
# Batches 0..7 split over 2 ranks (batch b on rank b % 2), each observed
# inside calibration_step(b): after sync() every observer must hold what
# one process observing all 8 batches in order computes, bit for bit.
NUM_BATCHES = 8


def _observer_zoo():
    from dfq_dense.quant import (MinMaxObserver, MovingAverageMinMaxObserver,
                                 MSEObserver, OMSEObserver,
                                 PercentileObserver,
                                 PercentileSearchObserver)
    ch = dict(granularity='channel', ch_axis=-1)
    return {
        'minmax': MinMaxObserver(),
        'minmax_ch': MinMaxObserver(**ch),
        'ema': MovingAverageMinMaxObserver(momentum=0.3),
        'ema_ch': MovingAverageMinMaxObserver(momentum=0.3, **ch),
        # small sample and tails: merges of both, estimated percentile
        'pct': PercentileObserver(99.0, max_samples=256, tail=64),
        'pct_exact': PercentileObserver(99.99),
        'pct_ch': PercentileObserver(99.0, max_samples=128, tail=32, **ch),
        'search': PercentileSearchObserver(max_samples=256, tail=64),
        'search_ch': PercentileSearchObserver(max_samples=128, **ch),
        'mse': MSEObserver(grid=30, max_samples=256),
        'mse_ch': MSEObserver(grid=30, max_samples=128, **ch),
        'omse': OMSEObserver(grid=30, refine_iters=5, granularity='tensor'),
        'omse_ch': OMSEObserver(grid=30, refine_iters=5, ch_axis=-1),
        'omse_bounded': OMSEObserver(grid=30, refine_iters=5,
                                     granularity='tensor', max_samples=256),
    }


def _batch(b):
    """Batch b: its own distribution and size, 4 channels (last dim)."""
    gen = torch.Generator().manual_seed(1000 + b)
    n = 300 + 97 * b
    x = torch.randn(n, 4, generator=gen) * (1 + b) + (b - 3)
    if b % 3 == 0:
        x = x ** 3  # heavy tails
    return x


def _observe_batch(observers, b):
    from dfq_dense.quant.observers import calibration_step
    x = _batch(b)
    with calibration_step(b):
        for obs in observers.values():
            # two calls inside the batch (like the RPN head on FPN levels)
            obs.observe(x[:len(x) // 3])
            obs.observe(x[len(x) // 3:])


def _results(observers):
    out = {}
    for name, obs in observers.items():
        for bits, sym in ((8, False), (4, True)):
            scale, zp, _, _ = obs.compute_qparams(bits, sym)
            out[f'{name}/{bits}'] = (scale.clone(), zp.clone())
    return out


def _sharded_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 4, 1))
    quantize_model(model, w_bits=4, a_bits=8,
                   weight=dict(observer=dict(type='OMSEObserver')),
                   act=dict(observer=dict(type='PercentileSearchObserver',
                                          max_samples=512, tail=256)))
    enable_calibration(model)
    return model


def _image_batch(b):
    gen = torch.Generator().manual_seed(2000 + b)
    return torch.randn(2, 3, 12, 12, generator=gen) * (1 + b % 4)


def _run_model(model, batches):
    from dfq_dense.quant.observers import calibration_step
    with torch.no_grad():
        for b in batches:
            with calibration_step(b):
                model(_image_batch(b))
    finish_calibration(model)
    return quant_state_dict(model)


def _sharded_worker(rank, world, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}',
                            rank=rank, world_size=world)
    try:
        observers = _observer_zoo()
        mine = [b for b in range(NUM_BATCHES) if b % world == rank]
        for b in mine:
            _observe_batch(observers, b)
        for obs in observers.values():
            obs.sync()
        state = dict(observers=_results(observers),
                     counts={n: o.count for n, o in observers.items()
                             if hasattr(o, 'count')},
                     model=_run_model(_sharded_model(), mine))
        torch.save(state, os.path.join(out_dir, f'sharded{rank}.pth'))
    finally:
        dist.destroy_process_group()


def test_sharded_calibration_equals_one_process(tmp_path):
    world = 2
    mp.spawn(_sharded_worker, args=(world, _free_port(), str(tmp_path)),
             nprocs=world, join=True)
    states = [torch.load(tmp_path / f'sharded{r}.pth') for r in range(world)]
    ref = _observer_zoo()
    for b in range(NUM_BATCHES):
        _observe_batch(ref, b)
    expected = _results(ref)
    total = sum(len(_batch(b)) for b in range(NUM_BATCHES))
    for state in states:
        assert state['observers'].keys() == expected.keys()
        for key, (scale, zp) in expected.items():
            got_scale, got_zp = state['observers'][key]
            assert torch.equal(got_scale, scale), key
            assert torch.equal(got_zp, zp), key
        assert state['counts']['pct'] == state['counts']['omse'] == 4 * total
        assert state['counts']['pct_ch'] == total  # values per channel
    # the sample/tail merges mattered: the estimated percentile differs
    # from one rank's own data
    alone = _observer_zoo()
    for b in range(0, NUM_BATCHES, 2):
        _observe_batch(alone, b)
    assert not torch.equal(_results(alone)['pct/8'][0],
                           expected['pct/8'][0])
    ref_model = _run_model(_sharded_model(), range(NUM_BATCHES))
    for state in states:
        assert state['model'].keys() == ref_model.keys()
        for name, qp in ref_model.items():
            assert torch.equal(state['model'][name]['scale'], qp['scale']), \
                name
            assert torch.equal(state['model'][name]['zero_point'],
                               qp['zero_point']), name
