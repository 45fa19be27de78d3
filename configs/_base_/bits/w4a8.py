# W4A8: 4-bit weights, 8-bit activations (and matmul operands).
dfq_bits = dict(w_bits=4, a_bits=8)
