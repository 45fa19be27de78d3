# Naive quantizer (PSAQ-ViT, PSAQ-ViT V2): weights symmetric per output
# channel, activations and the q/k/v matmul operands asymmetric per tensor,
# all from min/max; the post-softmax attention stays FP; whole model.
dfq_quantizer = dict(
    scope='model',
    skip=[],
    weight=dict(observer=dict(type='MinMaxObserver')),
    act=dict(observer=dict(type='MinMaxObserver')),
    matmul=dict(observer=dict(type='MinMaxObserver')),
    softmax=None)
