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
