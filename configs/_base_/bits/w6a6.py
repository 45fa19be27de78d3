# W6A6: 6-bit weights, 6-bit activations (and matmul operands).
dfq_bits = dict(w_bits=6, a_bits=6)
