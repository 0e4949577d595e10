"""``load_model(path)``: one entry point for an outlierlab run/model folder or a local HF folder.

See ARCHITECTURE.md "Loading". Which folder is which:

- ``model_config.json`` in the folder → an outlierlab model (``GPT.save``, or a finished run);
- ``config.json`` with ``model`` and ``data`` sections but no ``model_config.json`` → a run that
  has not finished: its latest complete ``checkpoints/step-N/``;
- ``config.json`` with ``model_type`` → a Hugging Face folder (:func:`outlierlab.hf.load`);
- a ``.gguf`` file, or a folder holding exactly one and no config → a GGUF model
  (:func:`outlierlab.gguf.load`, an HF model, kind ``"hf"``).

An outlierlab model's tokenizer comes from the run's ``config.json`` (``data.tokenizer``:
``bytes``, or ``tokenizer.json`` in the run folder); a bare saved model uses its folder's
``tokenizer.json`` when there is one, else bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from outlierlab.errors import ModelLoadError


@dataclass
class LoadedModel:
    """A model in eval mode with its tokenizer (``encode``, ``decode``, ``vocab_size``,
    ``eot_id``)."""

    model: nn.Module
    tokenizer: Any
    kind: str  # "outlierlab" or "hf"
    path: Path
    seq_len: int | None  # max context; None when the model has no limit

    def __call__(self, idx: torch.Tensor) -> Any:
        """A forward pass on (B, T) token ids (whatever the model returns)."""
        return self.model(input_ids=idx) if self.kind == "hf" else self.model(idx)

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids → (B, T, vocab) logits, for either kind."""
        if self.kind == "hf":
            from outlierlab import hf

            return hf.logits(self.model, idx)
        return self.model(idx)


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_run_config(cfg: dict | None) -> bool:
    return bool(cfg) and isinstance(cfg.get("model"), dict) and isinstance(cfg.get("data"), dict)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Load an outlierlab run / saved GPT folder, a local Hugging Face folder or a GGUF file
    (offline)."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(
            f"{path} does not exist; expected a run folder, a saved GPT folder or an HF folder"
        )
    from outlierlab import gguf

    if (gguf_file := gguf.find_gguf(path)) is not None:  # a .gguf file, or a folder holding one
        model, tok, seq_len = gguf.load(gguf_file, device)
        return LoadedModel(model, tok, "hf", gguf_file, seq_len)
    if not path.is_dir():
        raise ModelLoadError(f"{path} is not a folder; expected a model folder or a .gguf file")
    cfg = _read_json(path / "config.json")
    if (path / "model_config.json").is_file():
        run = path
        if path.parent.name == "checkpoints" and cfg is None:  # RUN/checkpoints/step-N
            parent_cfg = _read_json(path.parent.parent / "config.json")
            if _is_run_config(parent_cfg):
                run, cfg = path.parent.parent, parent_cfg
        return _load_outlierlab(path, run, cfg, device)
    if _is_run_config(cfg):
        from outlierlab.train.checkpoint import latest_checkpoint

        ckpt = latest_checkpoint(path / "checkpoints")
        if ckpt is None:
            raise ModelLoadError(f"run folder {path} has no final model and no checkpoint yet")
        return _load_outlierlab(ckpt, path, cfg, device)
    if cfg is not None and "model_type" in cfg:
        from outlierlab import hf

        model, tok, seq_len = hf.load(path, device)
        return LoadedModel(model, tok, "hf", path, seq_len)
    raise ModelLoadError(
        f"{path} holds no model: expected model_config.json (outlierlab) or config.json with "
        f"model_type (Hugging Face)"
    )


def _load_outlierlab(folder: Path, run: Path, cfg: dict | None, device) -> LoadedModel:
    from outlierlab.data import load_tokenizer
    from outlierlab.model import GPT

    model = GPT.load(folder, map_location=device)
    spec = "bytes"
    if _is_run_config(cfg):
        spec = cfg["data"].get("tokenizer", "bytes")
        if spec != "bytes":
            spec = str(run / "tokenizer.json")
            if not Path(spec).is_file():
                raise ModelLoadError(f"run folder {run} has no tokenizer.json for its tokenizer")
    elif (run / "tokenizer.json").is_file():
        spec = str(run / "tokenizer.json")
    tok = load_tokenizer(spec)
    vocab = model.config.vocab_size
    if tok.vocab_size > vocab:
        raise ModelLoadError(
            f"{folder}: tokenizer has {tok.vocab_size} tokens but the model only {vocab}"
        )
    return LoadedModel(model, tok, "outlierlab", run, model.config.seq_len)
