# RepQ-ViT style (SPDFQ's quantizer): the inputs of qkv, fc1 and the
# patch-merging reduction (post-LayerNorm) are calibrated per channel and then
# reparameterised into the LayerNorm, so they run per tensor; activations use
# RepQ-ViT's percentile search (the one of 99.9 / 99.99 / 99.999 / 100 with
# the lowest quantization error); weights per output channel by OMSE; the
# post-softmax attention with the log-sqrt(2) quantizer.
dfq_quantizer = dict(
    scope='model',
    skip=[],
    weight=dict(observer=dict(type='OMSEObserver')),
    act=dict(observer=dict(type='PercentileSearchObserver')),
    matmul=dict(observer=dict(type='PercentileSearchObserver')),
    softmax=dict(mode='log_sqrt2'),
    reparam=True,
    overrides={
        role: dict(act=dict(
            granularity='channel',
            observer=dict(type='PercentileSearchObserver',
                          max_samples=2048)))
        for role in ('qkv', 'fc1', 'reduction')
    })
