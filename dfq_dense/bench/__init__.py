"""The benchmark harness behind ``tools/benchmark.py``.

Each module is one *section* of the harness (``synthesis``,
``calibration``, ``pse``, ``fakequant``): ``add_arguments(parser)``,
``run(args, device) -> (result, markdown)`` and the renderer of its
committed JSON, ``markdown(result)``.  :mod:`~dfq_dense.bench.common` holds
what they share (the environment record, the JSON file of sections,
process isolation, memory readings).

This package imports ``synth``, ``quant``, ``engine`` and ``utils``; nothing
in the suite imports it.
"""
SECTIONS = ('synthesis', 'calibration', 'pse', 'fakequant')
