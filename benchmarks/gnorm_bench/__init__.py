"""The benchmarks' shared code: ``common`` (cases, data, float64 reference, accuracy bounds,
machine, timing of blocked calls), ``impls`` (the implementations compared), ``report``
(bench.py's report), ``device`` (device time in the loop form), ``hlo_structure`` (kernels
and bytes of an optimized HLO program)."""
