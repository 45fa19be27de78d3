# W8A8: 8-bit weights, 8-bit activations (and matmul operands).
dfq_bits = dict(w_bits=8, a_bits=8)
