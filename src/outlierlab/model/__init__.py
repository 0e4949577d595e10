"""The GPT of SPEC §2: ``GPTConfig`` (validated dataclass + presets) and ``GPT``.

``GPT`` and ``export_hf`` are imported lazily, so reading ``GPTConfig`` or ``PRESETS`` (the
claims, config validation) does not import torch.
"""

from __future__ import annotations

from importlib import import_module

from outlierlab.model.config import PRESETS, GPTConfig

_LAZY = {"GPT": "outlierlab.model.gpt", "export_hf": "outlierlab.model.hf_export"}

__all__ = ["GPT", "PRESETS", "GPTConfig", "export_hf"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'outlierlab.model' has no attribute {name!r}")
