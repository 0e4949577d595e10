"""The GPT of science §2: ``GPTConfig`` (validated dataclass + presets) and ``GPT``.

``GPT``, ``export_hf`` and the drop-in mitigations (``attention``, ``attention_probs``,
``tweo_penalty``; docs/mitigations.md) are imported lazily, so reading ``GPTConfig`` or
``PRESETS`` (the claims, config validation) does not import torch.
"""

from __future__ import annotations

from importlib import import_module

from outlierlab.model.config import PRESETS, GPTConfig

_LAZY = {
    "GPT": "outlierlab.model.gpt",
    "export_hf": "outlierlab.model.hf_export",
    "attention": "outlierlab.model.attn",
    "attention_probs": "outlierlab.model.attn",
    "tweo_penalty": "outlierlab.model.penalty",
}

__all__ = ["GPT", "PRESETS", "GPTConfig", "attention", "attention_probs", "export_hf",
           "tweo_penalty"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'outlierlab.model' has no attribute {name!r}")
