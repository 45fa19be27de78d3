"""dfq-dense: data-free quantization benchmark for Swin dense predictors."""
__version__ = '0.1.0'

from .utils import checkpoint as _checkpoint  # noqa: F401,E402  (allow-list)
from . import registry  # noqa: F401,E402

__all__ = ['__version__', 'registry']
