"""Checkpoints: ``checkpoints/step-N/`` with ``model.safetensors`` + ``model_config.json``
(``GPT.save``), ``optim.pt`` (optimiser state, loadable with ``torch.load(weights_only=True)``)
and ``state.json`` (step, tokens, RNG states, sampler state).

A checkpoint is written into a temporary folder and renamed into place, so a crash or SIGKILL
at any moment leaves either the previous checkpoint or the new one, never half of one. Only
the last ``keep`` are kept.
"""

from __future__ import annotations

import base64
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from outlierlab.errors import CheckpointError
from outlierlab.train.run_dir import read_json, write_json

_STEP_DIR = re.compile(r"^step-(\d+)$")


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


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root`` (those with ``state.json``), oldest first."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / "state.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def save_checkpoint(
    root: Path, step: int, model: nn.Module, optimizer: Any, state: dict[str, Any], keep: int
) -> Path:
    """Write ``root/step-{step}`` atomically, then delete all but the newest ``keep``."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-step-{step}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    if hasattr(model, "save"):
        model.save(tmp)
    else:
        from safetensors.torch import save_model

        save_model(model, str(tmp / "model.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optim.pt")
    write_json(tmp / "state.json", {**state, "step": step})
    final = root / f"step-{step}"
    old = None
    if final.exists():
        old = root / f".old-step-{step}-{os.getpid()}"
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    for _, p in list_checkpoints(root)[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def clean_partial(root: Path) -> None:
    """Remove temporary folders left by a checkpoint write that was killed."""
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith((".tmp-step-", ".old-step-")):
                shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: Any, device: torch.device | str = "cpu"
) -> dict[str, Any]:
    """Load weights and optimiser state in place; return ``state.json``."""
    from safetensors.torch import load_model

    try:
        missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False,
                                         device=str(device))
        if missing or unexpected:
            raise CheckpointError(
                f"{path}: weights do not match the model (missing {sorted(missing)[:3]}, "
                f"unexpected {sorted(unexpected)[:3]})"
            )
        optimizer.load_state_dict(
            torch.load(path / "optim.pt", map_location=device, weights_only=True)
        )
        return read_json(path / "state.json")
    except CheckpointError:
        raise
    except Exception as exc:  # corrupt or foreign files
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: cannot resume from this checkpoint ({msg})") from exc
