"""outlierlab: measure, avoid and price outlier features in transformers.

Implements He et al., *Understanding and Minimising Outlier Features in Transformer Training*
(NeurIPS 2024, arXiv 2405.19279). Importing this package never imports ``transformers`` or
``lightning``.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["OutlierMonitor", "__version__", "metrics"]


def __getattr__(name: str):  # lazy, so `import outlierlab` stays cheap
    if name == "metrics":
        import importlib

        return importlib.import_module("outlierlab.metrics")
    if name == "OutlierMonitor":
        from outlierlab.monitor import OutlierMonitor

        return OutlierMonitor
    raise AttributeError(f"module 'outlierlab' has no attribute {name!r}")
