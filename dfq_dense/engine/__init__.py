from .dfq_config import DFQConfigError, parse_dfq_config
from .dfq_loop import DFQTestLoop

__all__ = ['DFQConfigError', 'DFQTestLoop', 'parse_dfq_config']
