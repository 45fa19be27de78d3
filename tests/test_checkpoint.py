import os

import numpy as np
import pytest
import torch
from mmengine.logging import MessageHub
from mmengine.runner import load_checkpoint, save_checkpoint

from dfq_dense.utils.checkpoint import UnsafeCheckpointError, safe_torch_load


def _mmengine_checkpoint(path):
    """A checkpoint shaped like the ones mmengine's Runner saves."""
    model = torch.nn.Linear(3, 2)
    hub = MessageHub.get_instance('dfq-test-ckpt')
    hub.update_scalar('train/loss', 0.5)
    hub.update_scalar('train/loss', np.float64(0.25))
    save_checkpoint(
        dict(state_dict=model.state_dict(),
             meta=dict(seed=np.int64(7), mean=np.array([1.5, 2.5]),
                       dtype=np.dtype('float32'), epoch=3, note='x'),
             message_hub=hub.state_dict()), path)
    return model


def test_mmengine_checkpoint_loads_through_mmengine(tmp_path):
    path = str(tmp_path / 'ckpt.pth')
    model = _mmengine_checkpoint(path)
    # weights_only=True on its own refuses this file (HistoryBuffer pickles
    # getattr); the dfq_dense loader must make mmengine's path work.
    other = torch.nn.Linear(3, 2)
    ckpt = load_checkpoint(other, path, map_location='cpu')
    assert torch.equal(other.weight, model.weight)
    assert ckpt['meta']['epoch'] == 3 and ckpt['meta']['note'] == 'x'
    # Reading it must not disturb the process's own HistoryBuffers (their
    # statistics methods live in a class-level dict).
    from mmengine.logging import HistoryBuffer
    buf = HistoryBuffer()
    buf.update(2.0)
    buf.update(4.0)
    assert buf.statistics('mean') == 3.0 and buf.statistics('max') == 4.0


def test_numpy_meta_loads_with_weights_only(tmp_path):
    path = str(tmp_path / 'np.pth')
    torch.save(dict(state_dict={'w': torch.ones(2)},
                    meta=dict(seed=np.int64(7), mean=np.array([1.5, 2.5]),
                              dtype=np.dtype('float32'))), path)
    ckpt = safe_torch_load(path)
    assert ckpt['meta']['seed'] == 7
    np.testing.assert_array_equal(ckpt['meta']['mean'], [1.5, 2.5])


class _Payload:
    """Pickles to a call of os.system: must never run on load."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}', ))


@pytest.mark.parametrize('where', ['meta', 'state_dict'])
def test_malicious_checkpoint_is_refused(tmp_path, where):
    marker = tmp_path / 'pwned'
    path = str(tmp_path / 'evil.pth')
    payload = {'state_dict': {'w': torch.ones(1)}, 'meta': {}}
    payload[where]['x'] = _Payload(marker)
    torch.save(payload, path)
    with pytest.raises(UnsafeCheckpointError) as err:
        load_checkpoint(torch.nn.Linear(1, 1), path, map_location='cpu')
    msg = str(err.value)
    assert 'system' in msg and '\n' not in msg
    assert not marker.exists()


def test_getattr_outside_mmengine_layout_is_refused(tmp_path):
    # getattr is tolerated (inert) only to read state_dict + plain meta of
    # mmengine checkpoints; a bare pickle using it is refused.
    path = str(tmp_path / 'getattr.pth')

    class Bound:
        def __reduce__(self):
            return (getattr, ('abc', 'upper'))

    torch.save([Bound()], path)
    with pytest.raises(UnsafeCheckpointError, match='getattr'):
        safe_torch_load(path)


def test_missing_checkpoint_is_one_line(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        safe_torch_load(str(tmp_path / 'nope.pth'))
    assert 'nope.pth' in str(err.value) and '\n' not in str(err.value)

