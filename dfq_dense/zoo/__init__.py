"""Model zoo support: official-checkpoint conversion (:mod:`.convert`) and
the registry of published results (:mod:`.published`)."""
from .convert import (CONVERTER_VERSION, KNOWN_MODELS, ConversionError,
                      convert_file, convert_state_dict, merging_permutation)
from .published import (PublishedRegistryError, fp_entry_for_checkpoint,
                        load_published)

__all__ = [
    'CONVERTER_VERSION', 'KNOWN_MODELS', 'ConversionError', 'convert_file',
    'convert_state_dict', 'merging_permutation', 'PublishedRegistryError',
    'fp_entry_for_checkpoint', 'load_published'
]
