# W4A4: 4-bit weights, 4-bit activations (and matmul operands).
dfq_bits = dict(w_bits=4, a_bits=4)
