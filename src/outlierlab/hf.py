"""Hugging Face support: offline loading of a local folder and logits of any HF causal LM.

Imported lazily: ``import outlierlab`` never imports ``transformers``; this module imports it only
inside :func:`load`. Where to measure an HF model is :mod:`outlierlab.structure`'s job.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from outlierlab.errors import DataError, ModelLoadError, first_line

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
        value = getattr(cfg, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:  # XLNet: -1
            seq_len = getattr(cfg, key)
            break
    return model, TransformersTokenizer(tok), seq_len


def logits(model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    """(B, T) token ids → (B, T, vocab) logits of an HF model with an LM head."""
    from outlierlab.structure import forward_tokens

    out = forward_tokens(model, idx)
    lg = getattr(out, "logits", None)
    if lg is None:
        raise ModelLoadError(f"{type(model).__name__} has no language-model head (no logits)")
    return lg
