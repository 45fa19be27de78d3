dfq_quantizer = dict(w_bits=4, a_bits=8, scope='model', skip=[])
