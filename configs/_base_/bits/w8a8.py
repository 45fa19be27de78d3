# Naive quantizer (PSAQ-ViT): weights symmetric per output channel min/max,
# activations asymmetric per tensor min/max; whole model.
dfq_quantizer = dict(w_bits=8, a_bits=8, scope='model', skip=[])
