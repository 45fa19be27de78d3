import os

# Under CPU contention torch's default threading is ~10x slower here.
os.environ.setdefault('OMP_NUM_THREADS', '1')

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ['OMP_NUM_THREADS']))

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='session')
def repo_root():
    return REPO


@pytest.fixture(scope='session')
def demo_data_root(tmp_path_factory):
    """The full demo dataset (shared with the tools: data/dfq_demo), with
    the demo classifier's object crops (``data/dfq_demo/cls``)."""
    from dfq_dense.demo import generate_demo_crops, generate_demo_dataset
    root = generate_demo_dataset(os.path.join(REPO, 'data', 'dfq_demo'))
    generate_demo_crops(root)
    return root


@pytest.fixture(autouse=True)
def _no_logger_from_an_earlier_test():
    """mmengine keeps its current MMLogger between tests, and its console
    handler writes to the ``sys.stdout`` of the test that built it (pytest's
    capture, closed when that test ends): a later ``print_log`` through it
    writes "--- Logging error ---" on stderr, which breaks the one-line
    stderr checks of whatever test runs next.  Each test starts without
    the loggers of the ones before."""
    yield
    from mmengine.logging import MMLogger
    MMLogger._instance_dict.clear()
