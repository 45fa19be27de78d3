"""PSAQ-ViT V2's synthesis: the V1 images its rounds start from.

V2 keeps V1's patch-similarity entropy and adds rounds in which the images
are made harder for the quantized student and the student is trained on
them.  The images of the first round are V1's (:class:`PSAQViTV2`, the
data source, ``dfq.synthesizer``); the rounds change the student and are the
adapter :class:`~dfq_dense.adapt.psaq_v2.PSAQViTV2Rounds` (``dfq.adapter``).
"""
from ..registry import MODELS
from .psaq import PSAQViT

__all__ = ['PSAQViTV2']


@MODELS.register_module()
class PSAQViTV2(PSAQViT):
    """The initial images of PSAQ-ViT V2: :class:`PSAQViT`'s synthesis with
    ``iterations=200`` by default instead of V1's 500, since the images keep
    evolving in the rounds of
    :class:`~dfq_dense.adapt.psaq_v2.PSAQViTV2Rounds`.  Takes
    :class:`PSAQViT`'s arguments.
    """

    def __init__(self,
                 num_images: int = 8,
                 batch_size: int = 8,
                 img_size=None,
                 iterations: int = 200,
                 seed: int = 0,
                 log_interval: int = 50,
                 **kwargs):
        super().__init__(num_images=num_images, batch_size=batch_size,
                         img_size=img_size, iterations=iterations, seed=seed,
                         log_interval=log_interval, **kwargs)
