"""Post-training fake quantisation: what outlier features cost (science §4).

``scheme("w8a8-tensor")`` → :class:`QuantConfig`; :func:`wrap` makes a fake-quantised deep copy
of a model; :func:`calibrate` fixes its ranges on training batches;
:func:`quantize_and_evaluate` runs the whole comparison on fixed validation windows;
:class:`CalibCache` shares calibration work between schemes on one model.
"""

from __future__ import annotations

from outlierlab.quant import paper as _paper  # noqa: F401  (registers PaperSites)
from outlierlab.quant.calibrate import CalibCache, calibrate
from outlierlab.quant.config import SCHEMES, QuantConfig, scheme
from outlierlab.quant.evaluate import (
    calibration_batches,
    layer_report,
    logits_of,
    perplexity,
    perplexity_and_report,
    quantize_and_evaluate,
)
from outlierlab.quant.wrap import QuantLinear, head_names, linear_names, quant_linears, wrap

__all__ = [
    "SCHEMES",
    "CalibCache",
    "QuantConfig",
    "QuantLinear",
    "calibrate",
    "calibration_batches",
    "head_names",
    "layer_report",
    "linear_names",
    "logits_of",
    "perplexity",
    "perplexity_and_report",
    "quant_linears",
    "quantize_and_evaluate",
    "scheme",
    "wrap",
]
