"""The GPT of SPEC §2: ``GPTConfig`` (validated dataclass + presets) and ``GPT``."""

from __future__ import annotations

from outlierlab.model.config import PRESETS, GPTConfig
from outlierlab.model.gpt import GPT
from outlierlab.model.hf_export import export_hf  # imports transformers only when called

__all__ = ["GPT", "PRESETS", "GPTConfig", "export_hf"]
