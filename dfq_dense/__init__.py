"""dfq-dense: data-free quantization benchmark for Swin dense predictors."""
__version__ = '0.1.0'

from .utils import checkpoint as _checkpoint  # noqa: F401,E402  (allow-list)
from . import registry  # noqa: F401,E402
from .config_scope import register_config_scope  # noqa: E402

# Before any config is read: lets a config anywhere inherit the suite's
# configs as _base_ = 'dfq_dense::...' (see dfq_dense/config_scope.py).
register_config_scope()

__all__ = ['__version__', 'registry']
