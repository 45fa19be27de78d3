"""The real two-process command on a CPU-only machine.

``torchrun --nproc_per_node=2 tools/dfq_test.py CONFIG --launcher pytorch``
goes through mmengine's ``init_dist`` (gloo here, no GPU), shards the
synthesis batches and the calibration batches across the two ranks and
must give exactly what one process gives: the same images, the same
quantization parameters (percentile activations, whose samples are merged
across ranks) and the same metrics.  Slow (two demo runs, about 30 s on 2
cores).

Every rank must also leave with its process group torn down: a rank that
exited with gloo's group alive while the other still ran aborted now and
then in C++ ("terminate called without an active exception", exit -6) and
torchrun killed the whole run.
"""
import json
import os
import os.path as osp
import subprocess
import sys

import torch

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIG = osp.join(REPO, 'configs/demo/upernet_swin_demo_w8a8.py')
OPTS = [
    'test_dataloader.dataset.indices=16',
    'dfq.synthesizer.num_images=4', 'dfq.synthesizer.batch_size=2',
    'dfq.synthesizer.iterations=3', 'dfq.calib_batch_size=1',
    'dfq.quantizer.act.observer.type=PercentileObserver',
    'dfq.quantizer.act.observer.percentile=99.9',
    'dfq.quantizer.matmul.observer.type=PercentileObserver',
    'dfq.quantizer.matmul.observer.percentile=99.9',
]


# tools/dfq_test.py, then a line saying whether the rank's process group
# is still alive when the tool returns.
CHECK_TEARDOWN = """
import runpy, sys
import torch.distributed as dist

sys.argv[0] = {tool!r}
try:
    runpy.run_path({tool!r}, run_name='__main__')
    code = 0
except SystemExit as err:
    code = err.code
alive = dist.is_initialized()
print(f'process group alive at exit: {{alive}}', file=sys.stderr)
sys.exit(1 if alive else code)
"""


def _run(cmd, work):
    proc = subprocess.run(
        cmd + [CONFIG, '--work-dir', str(work), '--cfg-options'] + OPTS,
        capture_output=True, text=True, cwd=REPO, timeout=900,
        env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert proc.returncode == 0, proc.stderr[-4000:]
    if 'torch.distributed.run' in cmd:
        assert proc.stderr.count('process group alive at exit: False') == 2
    with open(work / 'dfq_results.json') as f:
        results = json.load(f)
    images = torch.load(str(work / 'synthetic' / 'synthetic_images.pth'),
                        weights_only=True)['images']
    params = torch.load(str(work / 'quant_params.pth'),
                        weights_only=True)['tensors']
    return results, images, params


def test_two_processes_give_what_one_process_gives(tmp_path, demo_data_root):
    tool = osp.join(REPO, 'tools', 'dfq_test.py')
    one = _run([sys.executable, tool], tmp_path / 'one')
    wrapped = tmp_path / 'dfq_test_teardown.py'
    wrapped.write_text(CHECK_TEARDOWN.format(tool=tool))
    two = _run([sys.executable, '-m', 'torch.distributed.run', '--standalone',
                '--nproc_per_node=2', str(wrapped), '--launcher', 'pytorch'],
               tmp_path / 'two')
    assert one[0]['world_size'] == 1 and two[0]['world_size'] == 2
    assert torch.equal(one[1], two[1])
    assert one[2].keys() == two[2].keys()
    scales = [k for k in one[2] if k.endswith('.scale')]
    assert len(scales) > 50
    for key in one[2]:
        assert torch.equal(one[2][key], two[2][key]), key
    assert one[0]['metrics'] == two[0]['metrics']
    assert one[0]['quantization']['total'] == two[0]['quantization']['total']
