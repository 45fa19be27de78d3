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
