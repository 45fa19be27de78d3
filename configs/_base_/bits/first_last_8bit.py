# Keeps the patch embedding and the final prediction layers (fc_cls, fc_reg,
# conv_logits, rpn_cls, rpn_reg, conv_seg) at W8A8 whatever the bit setting:
#     quantizer=dict(**_base_.dfq_quantizer, **_base_.dfq_bits,
#                    **_base_.dfq_first_last)
# or on the command line: --cfg-options dfq.quantizer.first_last_bits=8
dfq_first_last = dict(first_last_bits=8)
