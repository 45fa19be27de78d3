# Activation and matmul ranges clipped at the 0.01th / 99.99th percentile of
# the calibration values (outliers no longer stretch the grid); weights per
# output channel by OMSE (grid + golden-section search of ||W - Q(W)||), as
# in every setting but the naive one.
dfq_quantizer = dict(
    scope='model',
    skip=[],
    weight=dict(observer=dict(type='OMSEObserver')),
    act=dict(observer=dict(type='PercentileObserver', percentile=99.99)),
    matmul=dict(observer=dict(type='PercentileObserver', percentile=99.99)),
    softmax=None)
