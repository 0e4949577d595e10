"""Hugging Face support: residual-stream points of known families and offline loading.

Imported lazily: ``import outlierlab`` never imports ``transformers``; this module imports it only
inside :func:`load` (point discovery needs nothing but the model object).

Point names follow ARCHITECTURE.md: ``embed.resid_post`` is the embedding output as the first
block sees it (HF ``hidden_states[0]``: positions, scaling and embedding norm included) and
``blocks.{i}.resid_post`` the output of block i, before any final norm.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from outlierlab.errors import DataError, ModelLoadError, first_line

# model_type → (block list, embedding-output module) relative to ``model.base_model``.
# ``None`` for the embedding: no single module outputs hidden_states[0] (OPT adds positions,
# Gemma scales, inside forward), so the input of block 0 is taken instead.
FAMILIES: dict[str, tuple[str, str | None]] = {
    "gpt2": ("h", "drop"),
    "opt": ("decoder.layers", None),
    "gpt_neox": ("layers", "emb_dropout"),
    "llama": ("layers", "embed_tokens"),
    "mistral": ("layers", "embed_tokens"),
    "mixtral": ("layers", "embed_tokens"),
    "qwen2": ("layers", "embed_tokens"),
    "qwen3": ("layers", "embed_tokens"),
    "phi3": ("layers", "embed_tokens"),
    "olmo": ("layers", "embed_tokens"),
    "olmo2": ("layers", "embed_tokens"),
    "gemma": ("layers", None),
    "gemma2": ("layers", None),
    "bert": ("encoder.layer", "embeddings"),
    "roberta": ("encoder.layer", "embeddings"),
}


@dataclass(frozen=True)
class Point:
    """A measurement point: the ``output`` of ``module``, or its first ``input``."""

    name: str
    module: nn.Module
    kind: str = "output"


def points(model: nn.Module) -> list[Point] | None:
    """Residual-stream points of a known HF family, in model order; None when unknown."""
    cfg = getattr(model, "config", None)
    family = FAMILIES.get(getattr(cfg, "model_type", None) or "")
    if family is None:
        return None
    base = getattr(model, "base_model", model)
    blocks_path, embed_path = family
    try:
        blocks = base.get_submodule(blocks_path)
        embed = base.get_submodule(embed_path) if embed_path else blocks[0]
    except (AttributeError, IndexError, TypeError):
        return None
    out = [Point("embed.resid_post", embed, "output" if embed_path else "input")]
    out += [Point(f"blocks.{i}.resid_post", b) for i, b in enumerate(blocks)]
    return out


def residual_points(model: nn.Module) -> dict[str, nn.Module] | None:
    """The ``residual_points()`` protocol for HF models: point name → module whose *output* is
    the point. Families whose embedding output is no module's output (OPT, Gemma) lack
    ``embed.resid_post`` here; :class:`~outlierlab.monitor.OutlierMonitor` measures it anyway."""
    found = points(model)
    if found is None:
        return None
    return {p.name: p.module for p in found if p.kind == "output"}


# --- loading ---------------------------------------------------------------------------------


class TransformersTokenizer:
    """A ``transformers`` tokenizer behind outlierlab's tokenizer protocol (``encode``, ``decode``,
    ``vocab_size``, ``eot_id``, ``save``)."""

    def __init__(self, tok: Any):
        self.tok = tok
        self.vocab_size = len(tok)
        ids = (tok.eos_token_id, tok.sep_token_id, tok.pad_token_id)
        self.eot_id: int | None = next((i for i in ids if i is not None), None)

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False, verbose=False))

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids))

    def save(self, path: str | Path) -> None:
        self.tok.save_pretrained(str(path))


WEIGHT_FILES = ("*.safetensors", "pytorch_model.bin", "pytorch_model-*.bin")


def load(path: str | Path, device: str | torch.device = "cpu"):
    """Load a local HF folder offline (``local_files_only=True``, ``trust_remote_code=False``).

    Returns ``(model in eval mode, TransformersTokenizer, max context or None)``.
    """
    path = Path(path)
    if not any(next(path.glob(p), None) for p in WEIGHT_FILES):
        raise ModelLoadError(
            f"{path} has no weights; expected model.safetensors or pytorch_model.bin"
        )
    try:
        import transformers
    except ImportError as exc:
        raise ModelLoadError(
            "loading a Hugging Face folder needs transformers: pip install 'outlierlab[hf]'"
        ) from exc
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # the CLI's stderr is for one-line errors
    try:
        return _load(transformers, path, device)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _load(transformers: Any, path: Path, device: str | torch.device):
    opts = {"local_files_only": True, "trust_remote_code": False}
    try:
        cfg = transformers.AutoConfig.from_pretrained(path, **opts)
    except (ValueError, KeyError, OSError) as exc:
        raise ModelLoadError(
            f"{path}/config.json is not a loadable HF config: {first_line(exc)}") from exc
    model_cls = None
    for arch in getattr(cfg, "architectures", None) or []:
        model_cls = getattr(transformers, arch, None)
        if model_cls is not None:
            break
    try:
        if model_cls is None:
            try:
                model = transformers.AutoModelForCausalLM.from_pretrained(path, **opts)
            except ValueError:
                model = transformers.AutoModel.from_pretrained(path, **opts)
        else:
            model = model_cls.from_pretrained(path, **opts)
    except Exception as exc:  # safetensors and torch raise several types for bad files
        why = first_line(exc).replace("For details look at the above report!",
                                      "--verbose shows transformers' loading report")
        raise ModelLoadError(f"cannot load the weights in {path}: {why}") from exc
    try:
        tok = transformers.AutoTokenizer.from_pretrained(path, **opts)
    except (OSError, ValueError, TypeError) as exc:
        raise DataError(
            f"{path} has no usable tokenizer (tokenizer.json / tokenizer_config.json)"
        ) from exc
    model.to(device).eval()
    seq_len = None
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        if isinstance(getattr(cfg, key, None), int):
            seq_len = getattr(cfg, key)
            break
    return model, TransformersTokenizer(tok), seq_len


def logits(model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    """(B, T) token ids → (B, T, vocab) logits of an HF model with an LM head."""
    out = model(input_ids=idx)
    lg = getattr(out, "logits", None)
    if lg is None:
        raise ModelLoadError(f"{type(model).__name__} has no language-model head (no logits)")
    return lg
