"""Checkpoints: a run's ``checkpoints/step-N/`` (named by ``RunFolder``) holding the weights
(``GPT.save``), ``optim.pt`` (optimiser state, loadable with ``torch.load(weights_only=True)``)
and ``state.json`` (step, tokens, RNG states, sampler state).

A checkpoint is written into a temporary folder and renamed into place, so a crash or SIGKILL
at any moment leaves either the previous checkpoint or the new one, never half of one. Only
the last ``keep`` are kept; an old one is renamed away before it is deleted, so a kill during
the deletion leaves nothing that looks like a checkpoint.
"""

from __future__ import annotations

import base64
import os
import random
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from outlierlab import safe_io
from outlierlab.errors import CheckpointError, first_line
from outlierlab.run_folder import (
    CHECKPOINT_STATE,
    MODEL_FILE,
    RunFolder,
    read_json_object,
    write_json,
)

OPTIM_FILE = "optim.pt"
_TMP, _OLD = ".tmp-step-", ".old-step-"


def rng_state() -> dict[str, Any]:
    """torch (CPU and CUDA), numpy and python RNG states, JSON-able."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, words, gauss_next = random.getstate()
    state = {
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "python": [version, list(words), gauss_next],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [
            base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()
        ]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(
        torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8)
    )
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, words, gauss_next = state["python"]
    random.setstate((version, tuple(words), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(
            [torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)
             for s in state["cuda"]]
        )


def save_checkpoint(
    run: RunFolder, step: int, model: nn.Module, optimizer: Any, state: dict[str, Any], keep: int
) -> Path:
    """Write ``checkpoints/step-{step}`` of ``run`` atomically, then delete all but the newest
    ``keep``."""
    root = run.checkpoints
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{_TMP}{step}-{os.getpid()}"
    final = run.checkpoint_path(step)
    safe_io.remove(tmp)
    try:
        tmp.mkdir()
        if hasattr(model, "save"):
            model.save(tmp)
        else:
            from safetensors.torch import save_model

            save_model(model, str(tmp / MODEL_FILE))
        torch.save(optimizer.state_dict(), tmp / OPTIM_FILE)
        write_json(tmp / CHECKPOINT_STATE, {**state, "step": step})
    except BaseException as exc:  # a full disk, a kill: no half-written folder is left
        safe_io.remove(tmp)
        new = safe_io.as_os_error(exc, final)
        if new is exc:
            raise
        raise new from None
    if final.exists():
        _delete(final)
    os.replace(tmp, final)
    for _, p in run.checkpoint_list()[:-keep]:
        _delete(p)
    return final


def _delete(folder: Path) -> None:
    """Rename ``folder`` out of the checkpoint namespace, then delete it: a kill half-way
    through leaves a ``.old-step-*`` folder (removed by :func:`clean_partial`), never a
    half-deleted ``step-N`` that looks like a checkpoint."""
    old = folder.with_name(f"{_OLD}{folder.name[len('step-'):]}-{os.getpid()}")
    os.replace(folder, old)
    shutil.rmtree(old, ignore_errors=True)


def clean_partial(run: RunFolder) -> None:
    """Remove what killed writes and deletions left: temporary and renamed-away folders, and
    ``step-N`` folders without their state file (half-deleted by older versions)."""
    root = run.checkpoints
    if not root.is_dir():
        return
    complete = {p for _, p in run.checkpoint_list()}
    for p in root.iterdir():
        if p.name.startswith((_TMP, _OLD)) or (
                p.is_dir() and p.name.startswith("step-") and p not in complete):
            shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: Any, device: torch.device | str = "cpu"
) -> dict[str, Any]:
    """Load weights and optimiser state in place; return ``state.json``."""
    from safetensors.torch import load_model

    try:
        missing, unexpected = load_model(model, str(path / MODEL_FILE), strict=False,
                                         device=str(device))
        if missing or unexpected:
            raise CheckpointError(
                f"{path}: weights do not match the model (missing {sorted(missing)[:3]}, "
                f"unexpected {sorted(unexpected)[:3]})"
            )
        optimizer.load_state_dict(
            torch.load(path / OPTIM_FILE, map_location=device, weights_only=True)
        )
        return read_json_object(path / CHECKPOINT_STATE)
    except CheckpointError:
        raise
    except Exception as exc:  # corrupt or foreign files
        raise CheckpointError(
            f"{path}: cannot resume from this checkpoint ({first_line(exc)})") from exc


MAX_STEP = 10**9
"""The largest step a checkpoint (or ``train.steps``) may hold."""


def check_state(state: Mapping[str, Any], path: Path, world_size: int = 1) -> None:
    """``state.json`` of a checkpoint holds what a resume needs, of the right types
    (→ :class:`CheckpointError` naming the file and the field)."""
    where = path / CHECKPOINT_STATE

    def bad(field: str, allowed: str) -> CheckpointError:
        shown = repr(state[field])[:40] if field in state else "missing"
        return CheckpointError(f"{where}: {field} is {shown}; allowed: {allowed}; this "
                               "checkpoint cannot be resumed (delete it to use an older one)")

    for field in ("step", "tokens"):
        v = state.get(field)
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_STEP * 10**9:
            raise bad(field, "an integer ≥ 0" + (f" and ≤ {MAX_STEP}" if field == "step" else ""))
    if state["step"] > MAX_STEP:
        raise bad("step", f"an integer ≥ 0 and ≤ {MAX_STEP}")
    if not isinstance(state.get("sampler"), dict):
        raise bad("sampler", "the sampler's state (a JSON object)")
    rng = state.get("rng")
    if not (isinstance(rng, list) and rng and all(
            isinstance(r, dict) and {"torch", "numpy", "python"} <= r.keys() for r in rng)):
        raise bad("rng", "a list of RNG states (torch, numpy, python), one per rank")
    gb = state.get("global_batch")
    if gb is not None and (isinstance(gb, bool) or not isinstance(gb, int) or gb < 1):
        raise bad("global_batch", "an integer ≥ 1")
