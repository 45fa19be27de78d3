"""The ``(adapt)`` stage: steps that change the calibrated quantized student.

Synthesis (``dfq_dense.synth``) only makes images from the FP model; what a
method does to the quantized student afterwards lives here, registered in
:data:`dfq_dense.registry.ADAPTERS` and built from ``dfq.adapter``.  This
package may import ``synth`` and ``quant``; neither imports it.
"""
