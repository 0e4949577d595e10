"""``load_model(path)``: one entry point for an outlierlab run/model folder, a local HF folder
or a GGUF file.

See ARCHITECTURE.md "Loading". Which folder is which:

- a run folder (:class:`~outlierlab.run_folder.RunFolder`) → its newest weights: the final
  model of a finished run, else its latest complete checkpoint (a run being extended, or one
  that has not finished); :attr:`LoadedModel.step` says which;
- ``model_config.json`` in the folder → a saved GPT (``GPT.save``, or ``RUN/checkpoints/step-N``);
- ``config.json`` with ``model_type`` → a Hugging Face folder (:func:`outlierlab.hf.load`).
- a ``.gguf`` file, or a folder holding exactly one and no config → a GGUF model
  (:func:`outlierlab.gguf.load`: converted to an HF model; kind ``"gguf"``).

An outlierlab model's tokenizer comes from the run's ``config.json`` (``data.tokenizer``:
``bytes``, or ``tokenizer.json`` in the run folder); a bare saved model uses its folder's
``tokenizer.json`` when there is one, else bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from outlierlab.errors import ModelLoadError, RunFolderError
from outlierlab.run_folder import (
    HF_CONFIG_FILE,
    MODEL_CONFIG_FILE,
    CheckpointFiles,
    RunFolder,
    is_saved_model,
)


@dataclass
class LoadedModel:
    """A model in eval mode with its tokenizer (``encode``, ``decode``, ``vocab_size``,
    ``eot_id``)."""

    model: nn.Module
    tokenizer: Any
    kind: str  # "outlierlab", "hf" or "gguf" (an HF model converted from a GGUF file)
    path: Path
    seq_len: int | None  # max context; None when the model has no limit
    step: int | None = None  # training step of the weights, when known
    weights: Path | None = None  # the folder the weights came from
    what: str = ""  # "final model", "checkpoints/step-N", "saved model", ...

    def describe(self) -> str:
        """One line saying which weights were loaded (and their step, when known)."""
        at = f" at step {self.step}" if self.step is not None else ""
        what = f" ({self.what})" if self.what else ""
        return f"loaded {self.path}{at}{what}"

    def __call__(self, idx: torch.Tensor) -> Any:
        """A forward pass on (B, T) token ids (whatever the model returns)."""
        from outlierlab.structure import forward_tokens

        return forward_tokens(self.model, idx)

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids → (B, T, vocab) logits, for either kind."""
        if self.kind in ("hf", "gguf"):
            from outlierlab import hf

            return hf.logits(self.model, idx)
        return self.model(idx)


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
        model, tok, seq_len, entry = gguf.load(gguf_file, device)
        what = f"GGUF; its HF conversion is kept in {entry}" if entry else "GGUF"
        return LoadedModel(model, tok, "gguf", gguf_file, seq_len, what=what)
    if not path.is_dir():
        raise ModelLoadError(f"{path} is not a folder; expected a model folder or a .gguf file")
    run = RunFolder(path)
    try:
        if run.is_run:  # its newest weights: the final model once finished, else a checkpoint
            return _load_newest(run, device)
        if is_saved_model(path):  # a saved GPT folder, or RUN/checkpoints/step-N
            owner = RunFolder.of_checkpoint(path)
            step = RunFolder.checkpoint_step(path) if owner else None
            what = f"{owner.checkpoints.name}/{path.name}" if owner else "saved model"
            return _load_outlierlab(path, step, what, owner, device)
    except RunFolderError as exc:
        raise ModelLoadError(str(exc)) from None
    if run.config_file.is_file():  # not a run's config: a Hugging Face one (model_type)
        from outlierlab import hf

        model, tok, seq_len = hf.load(path, device)
        return LoadedModel(model, tok, "hf", path, seq_len)
    raise ModelLoadError(
        f"{path} holds no model: expected {MODEL_CONFIG_FILE} (outlierlab) or {HF_CONFIG_FILE} "
        "with model_type (Hugging Face)"
    )


def _load_newest(run: RunFolder, device, tries: int = 5) -> LoadedModel:
    """The run's newest weights. A run being trained rotates its checkpoints away while we
    read one: then the newest one is picked again (the weights, once read, are ours)."""
    for attempt in range(tries):
        newest = run.newest_model()
        if newest is None:
            raise ModelLoadError(f"run folder {run.path} has no final model and no checkpoint "
                                 "yet")
        try:
            return _load_outlierlab(*newest, run, device)
        except (ModelLoadError, OSError):
            gone = not CheckpointFiles(newest[0]).weights.is_file()
            if not gone or attempt == tries - 1:
                raise
    raise AssertionError("unreachable")


def _load_outlierlab(folder: Path, step: int | None, what: str, run: RunFolder | None,
                     device) -> LoadedModel:
    """``folder``'s GPT with the run's tokenizer (a bare folder: its tokenizer.json, or bytes)."""
    from outlierlab.data import load_tokenizer
    from outlierlab.model import GPT

    model = GPT.load(folder, map_location=device)
    if run is not None and isinstance(run.config.get("data"), dict):
        tok = run.tokenizer
    else:
        bare = RunFolder(folder).tokenizer_file
        tok = load_tokenizer(str(bare) if bare.is_file() else "bytes")
    vocab = model.config.vocab_size
    if tok.vocab_size > vocab:
        raise ModelLoadError(
            f"{folder}: tokenizer has {tok.vocab_size} tokens but the model only {vocab}"
        )
    return LoadedModel(model, tok, "outlierlab", run.path if run else folder,
                       model.config.seq_len, step=step, weights=folder, what=what)
