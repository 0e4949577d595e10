"""Text for a loaded model: one loader and one set of defaults for ``measure``, ``quantize`` and
``price`` (docs/real-models.md "Text").

- An outlierlab run folder without ``--data``: the run's own corpus, split and tokenizer
  (:func:`outlierlab.data.prepare`, from its token cache).
- Anything else (an HF folder, a GGUF file, a saved GPT, or a run with ``--data``): the source
  ``--data`` names (``stdlib`` by default; a file, folder, glob or ``.jsonl`` as for ``train``),
  split by document as the data module splits (:func:`outlierlab.data.split_documents`) and
  tokenised with the model's own tokenizer, each document followed by its end-of-text id, each
  side only as far as needed. ``measure --data X`` measures all of X (it calibrates nothing).

Windows are :func:`outlierlab.data.validation_windows` of the validation split: the first n, so a
command that needs fewer windows sees a prefix of another's (``measure`` on 64 windows measures
the 16 that ``quantize`` evaluates, and 48 more). Calibration batches are drawn from the train
split by :func:`outlierlab.quant.calibration_batches` (seeded).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from outlierlab.errors import ConfigError, DataError

DEFAULT_SEQ_LEN = 256
"""Tokens per window, capped at the model's context (128 for the presets' runs)."""
DEFAULT_EVAL_WINDOWS = 16
"""Validation windows for perplexity (``quantize``, ``price``): 4096 tokens at 256."""
DEFAULT_STATS_WINDOWS = 4
"""Windows (a prefix of the above) for the per-layer tables and the profile."""
DEFAULT_CALIB_BATCHES = 4
DEFAULT_BATCH_SIZE = 4
"""Calibration: 4 train batches of 4 windows (4096 tokens at 256)."""
DEFAULT_MEASURE_TOKENS = 16384
"""``measure``: at most this many tokens (64 windows at 256)."""
VAL_FRACTION = 0.05


def seq_len_for(loaded: Any, seq_len: int | None) -> int:
    """``seq_len`` checked against the model's context, or the default capped at it."""
    context = loaded.seq_len
    if seq_len is None:
        return min(DEFAULT_SEQ_LEN, context or DEFAULT_SEQ_LEN)
    if seq_len < 2 or (context is not None and seq_len > context):
        raise ConfigError(
            f"--seq-len {seq_len} is not allowed; allowed: 2..{context or 'any'} (the model's "
            "context)"
        )
    return seq_len


@dataclass
class ModelData:
    """Train and validation token ids for one model, and where they came from."""

    train: np.ndarray
    val: np.ndarray
    seq_len: int
    source: str

    def windows(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``n`` validation windows (fewer when the split holds fewer): inputs and
        next-token targets, int64 (n, T); a text shorter than one window gives one short one."""
        if len(self.val) < 2:
            raise DataError(
                f"the text of {self.source} gives {len(self.val)} token(s) for this model; "
                "need at least 2"
            )
        if len(self.val) < self.seq_len + 1:
            ids = torch.from_numpy(self.val.astype(np.int64))
            return ids[None, :-1].clone(), ids[None, 1:].clone()
        from outlierlab.data import validation_windows

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fewer windows than asked: the shapes say so
            return validation_windows(self.val, self.seq_len, n)

    def calibration(self, batches: int, batch_size: int, seed: int = 0) -> list[torch.Tensor]:
        """``batches`` seeded train batches (B, T) for calibration."""
        from outlierlab.quant import calibration_batches

        return calibration_batches(self.train, self.seq_len, batch_size, batches, seed)

    def check_vocab(self, loaded: Any) -> None:
        """The token ids must fit the model's output vocabulary (a tokenizer larger than the
        model's embedding would index past it)."""
        from outlierlab.quant.evaluate import model_device

        top = int(max(self.train.max(initial=0), self.val.max(initial=0)))
        x = torch.tensor([[0, 0]], device=model_device(loaded.model))
        with torch.no_grad():
            vocab = loaded.logits(x).shape[-1]
        if top >= vocab:
            raise DataError(f"the data holds token id {top} but the model's vocabulary is {vocab}")


def load_data(
    loaded: Any, data: str | None, seq_len: int, val_windows: int, train_tokens: int = 0,
    whole: bool = False,
) -> ModelData:  # fmt: skip
    """The text for ``loaded`` (module docstring): enough validation tokens for
    ``val_windows`` windows of ``seq_len`` and (4 × ``train_tokens``, so calibration batches
    vary) training tokens. ``whole``: a given ``data`` is not split, all of it is "validation"
    (``measure --data``: text to measure, no calibration)."""
    from outlierlab.run_folder import RunFolder

    run = RunFolder(loaded.path) if loaded.kind == "outlierlab" else None
    if data is None and run is not None and run.is_run:
        from outlierlab.data import prepare

        prepared = prepare(run.data_config, progress=False)
        return ModelData(prepared.train, prepared.val, seq_len, f"{run.path} (its own data)")
    source = data or "stdlib"
    if whole and data is not None:
        from outlierlab.data import collect

        docs = [d for d in collect(source).documents if d.text.strip()]
        if not docs:
            raise DataError(f"--data {source} holds no text")
        val = encode(docs, loaded.tokenizer, val_windows * seq_len + 1)
        return ModelData(np.zeros(0, dtype=np.int64), val, seq_len, source)
    train, val = split_tokens(source, loaded.tokenizer, 4 * train_tokens,
                              val_windows * seq_len + 1)  # fmt: skip
    return ModelData(train, val, seq_len, source)


def split_tokens(
    source: str, tokenizer: Any, need_train: int, need_val: int,
    val_fraction: float = VAL_FRACTION,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Train and validation token arrays of ``source`` in ``tokenizer``'s ids: split by
    document, each side tokenised only until it holds ``need`` tokens."""
    from outlierlab.data import collect, split_documents

    train_docs, val_docs = split_documents(collect(source).documents, val_fraction)
    return encode(train_docs, tokenizer, need_train), encode(val_docs, tokenizer, need_val)


def encode(docs: list[Any], tokenizer: Any, need: int | None = None) -> np.ndarray:
    """Documents (``.text``) → one int64 stream, each followed by the end-of-text id when the
    tokenizer has one, stopping once ``need`` tokens are there (None: all)."""
    ids: list[int] = []
    for doc in docs:
        ids += tokenizer.encode(doc.text)
        if tokenizer.eot_id is not None:
            ids.append(tokenizer.eot_id)
        if need is not None and len(ids) >= need:
            break
    return np.asarray(ids, dtype=np.int64)


@dataclass
class EvalSet:
    """What ``quantize`` and ``price`` evaluate: the loaded model (structure checked), the
    measurement points, its text, the validation windows and the calibration batches."""

    loaded: Any
    points: Any
    data: ModelData
    val_x: torch.Tensor
    val_y: torch.Tensor
    calib: list[torch.Tensor]


def eval_set(
    path: Any, device: str, points: Any, data: str | None, seq_len: int | None,
    eval_windows: int, calib_batches: int, batch_size: int, seed: int = 0,
) -> EvalSet:  # fmt: skip
    """Load ``path``, print what was loaded and the structure line (a refusal comes now, in
    seconds, not after calibration), then the text, windows and calibration batches."""
    from outlierlab.loading import load_model
    from outlierlab.structure import check

    loaded = load_model(path, device=device)
    print(loaded.describe())
    points = points or "auto"
    print(check(loaded.model, points))
    seq_len = seq_len_for(loaded, seq_len)
    need_train = calib_batches * batch_size * seq_len + 1
    text = load_data(loaded, data, seq_len, eval_windows, need_train)
    val_x, val_y = text.windows(eval_windows)
    calib = text.calibration(calib_batches, batch_size, seed)
    text.check_vocab(loaded)
    return EvalSet(loaded, points, text, val_x, val_y, calib)
