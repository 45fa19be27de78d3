# Clipping ranges searched for the lowest quantization error: activations and
# matmul operands by an MSE grid search over [a * min, a * max]; weights per
# output channel by OMSE (grid + golden-section search of ||W - Q(W)||), as
# in every setting but the naive one.
dfq_quantizer = dict(
    scope='model',
    skip=[],
    weight=dict(observer=dict(type='OMSEObserver')),
    act=dict(observer=dict(type='MSEObserver', grid=100)),
    matmul=dict(observer=dict(type='MSEObserver', grid=100)),
    softmax=None)
