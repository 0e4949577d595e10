"""Tolerances the tests share, each with its reason (import: ``from tolerances import ...``)."""

F32_SUMS = 1e-6
"""Relative: the per-neuron sums of a CPU batch that is not float64 are taken in float32 over
chunks of a few thousand tokens (each sum within ``stats.F32_SUM_RTOL`` of its terms'
magnitudes); Kurt and the authors' metrics built from them agree with float64 one-shot
formulas to this (observed ~1e-8; a wrong sum is off by far more). Float64 input keeps
float64 sums and the tight tolerances."""

F32_SUMS_ABS = 1e-9
"""Absolute companion of :data:`F32_SUMS` for values near 0 (``corr_authors``)."""
