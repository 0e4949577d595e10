"""Checkpoints: the :class:`Checkpointer` component, which owns when a run is checkpointed, the
atomic write, rotation and restore, and the :class:`Stateful` collection it saves.

What is saved is collected from named :class:`Stateful` objects (``state_dict()`` /
``load_state_dict()``): ``model``, ``optimizer``, ``progress`` (step, tokens, global batch),
``sampler`` and ``rng`` (:class:`RNGState`: every rank's torch/numpy/python RNG states). The
learning-rate schedule is a pure function of the step (:func:`outlierlab.optim.lr_factor`) and
the monitor's subsample seeds are derived from the step (:mod:`outlierlab.measuring`), so the
restored ``progress`` restores both: they hold no state of their own.

How it is written is the :class:`CheckpointFormat`'s job, kept apart from the collection so a
sharded writer (FSDP / ``torch.distributed.checkpoint``) can replace :class:`FolderFormat`,
the one-writer format: the weights as a saved GPT folder (loadable on its own by
``outlierlab measure`` / ``quantize``), the optimiser with ``torch.save`` (loadable with
``weights_only=True``) and the rest as ``state.json``. The file names are the run-folder
layer's (:class:`~outlierlab.run_folder.CheckpointFiles`).

A checkpoint is written into a temporary folder and renamed into place, so a crash or SIGKILL
at any moment leaves either the previous checkpoint or the new one, never half of one. Only
the last ``keep`` are kept; an old one is renamed away before it is deleted, so a kill during
the deletion leaves nothing that looks like a checkpoint.
"""

from __future__ import annotations

import base64
import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from outlierlab import safe_io
from outlierlab.errors import CheckpointError, ConfigError, first_line
from outlierlab.jsonable import write_json
from outlierlab.run_folder import CheckpointFiles, RunFolder, read_json_object, utc_now
from outlierlab.train import distributed

MAX_STEP = 10**9
"""The largest step a checkpoint (or ``train.steps``) may hold."""


@runtime_checkable
class Stateful(Protocol):
    """Something a checkpoint saves and restores (``nn.Module`` and ``torch.optim.Optimizer``
    are; so are the sampler, :class:`RNGState` and :class:`RunProgress`)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


# -- the RNG states -----------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """torch (CPU and CUDA), numpy and python RNG states of this process, JSON-able."""
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
    """Restore what :func:`rng_state` returned."""
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


class RNGState:
    """:class:`Stateful` for the global RNGs of every rank: ``state_dict()`` gathers each
    rank's :func:`rng_state` (a collective: every rank calls it) as ``{"ranks": [...]}``;
    ``load_state_dict`` restores this rank's (rank 0's when the run now has more ranks than
    saved: dropout masks then differ from a run that never stopped, the data do not)."""

    def __init__(self, dist: distributed.Dist) -> None:
        self.dist = dist

    def state_dict(self) -> dict[str, Any]:
        return {"ranks": distributed.all_gather_object(rng_state(), self.dist)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ranks = state["ranks"]
        set_rng_state(ranks[self.dist.rank] if self.dist.rank < len(ranks) else ranks[0])


class RunProgress:
    """:class:`Stateful` for how far a run got: ``step`` and ``tokens``, read from and restored
    into ``owner`` (the trainer), with the global batch and rank count they were counted in.
    A resume must keep the global batch (``batch_size × grad_accum × ranks``): the sampler's
    position and the schedule are counted in it."""

    def __init__(self, owner: Any, global_batch: int, world_size: int) -> None:
        self.owner, self.global_batch, self.world_size = owner, global_batch, world_size

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.owner.step, "tokens": self.owner.tokens,
                "global_batch": self.global_batch, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("global_batch", self.global_batch)
        if saved != self.global_batch:
            raise ConfigError(f"global batch (train.batch_size × grad_accum × ranks) was {saved}, "
                              f"now {self.global_batch}")
        self.owner.step, self.owner.tokens = int(state["step"]), int(state["tokens"])


# -- the file format ----------------------------------------------------------------------------


class CheckpointFormat(Protocol):
    """How a checkpoint's states are written into (and read from) one folder. ``save`` is
    called on every rank with the same folder (a state may be collective, e.g.
    :class:`RNGState`); rank 0 has created it just before, so a format whose other ranks write
    files too (a sharded, DCP one) synchronises before writing. ``load`` runs on every rank."""

    def save(self, folder: Path, states: Mapping[str, Stateful], dist: distributed.Dist) -> None:
        ...

    def load(self, folder: Path, states: Mapping[str, Stateful], device: torch.device | str
             ) -> dict[str, Any]:
        """Restore ``model`` and ``optimizer`` in place; return the other states' dicts
        (checked by :func:`check_state`) for the :class:`Checkpointer` to restore."""
        ...


class FolderFormat:
    """One writer (rank 0): the weights as a saved GPT folder, the optimiser with
    ``torch.save``, every other state in ``state.json`` (``progress``'s fields at its top
    level, the others under their names)."""

    def save(self, folder: Path, states: Mapping[str, Stateful], dist: distributed.Dist) -> None:
        # Every rank collects (RNGState gathers all ranks' states); only rank 0 writes.
        rest = {name: s.state_dict() for name, s in states.items()
                if name not in ("model", "optimizer")}
        if not dist.is_main:
            return
        files, model = CheckpointFiles(folder), states["model"]
        if hasattr(model, "save"):  # a GPT: a saved-model folder (weights + model config)
            model.save(folder)
        else:
            from safetensors.torch import save_model

            save_model(model, str(files.weights))
        torch.save(states["optimizer"].state_dict(), files.optimizer)
        progress = rest.pop("progress", {})
        rng = rest.pop("rng", None)
        state = {**progress, **rest, "saved": utc_now()}
        if rng is not None:
            state["rng"] = rng["ranks"]  # a list, one per rank, as earlier versions wrote
        write_json(files.state, state)  # last: a folder with state.json is complete

    def load(self, folder: Path, states: Mapping[str, Stateful], device: torch.device | str
             ) -> dict[str, Any]:
        from safetensors.torch import load_model

        files = CheckpointFiles(folder)
        try:
            missing, unexpected = load_model(states["model"], str(files.weights), strict=False,
                                             device=str(device))
            if missing or unexpected:
                raise CheckpointError(
                    f"{folder}: weights do not match the model (missing {sorted(missing)[:3]}, "
                    f"unexpected {sorted(unexpected)[:3]})"
                )
            states["optimizer"].load_state_dict(
                torch.load(files.optimizer, map_location=device, weights_only=True)
            )
            state = read_json_object(files.state)
        except CheckpointError:
            raise
        except Exception as exc:  # corrupt or foreign files
            raise CheckpointError(
                f"{folder}: cannot resume from this checkpoint ({first_line(exc)})") from exc
        check_state(state, folder)
        return {"progress": state, "sampler": state["sampler"], "rng": {"ranks": state["rng"]},
                **{k: state[k] for k in states if k not in ("model", "optimizer", "progress",
                                                            "sampler", "rng") and k in state}}


# -- the component ------------------------------------------------------------------------------


class Checkpointer:
    """A run's checkpoints (``checkpoints/step-N`` of ``run``): decides when to save
    (:meth:`should_save`), writes atomically, keeps the newest ``keep``, restores the newest.

    ``states`` are the named :class:`Stateful` objects saved and restored (see the module
    docstring); ``format`` writes them (:class:`FolderFormat` unless given)."""

    def __init__(self, run: RunFolder, states: Mapping[str, Stateful], dist: distributed.Dist,
                 *, every: int = 0, keep: int = 1, format: CheckpointFormat | None = None
                 ) -> None:  # fmt: skip
        self.run, self.states, self.dist = run, dict(states), dist
        self.every, self.keep = every, keep
        self.format: CheckpointFormat = format or FolderFormat()
        self.saved_at = -1  # the step of the newest checkpoint (the same on every rank)

    def should_save(self, step: int, last_step: bool = False) -> bool:
        """Every ``every`` steps and at the last step (or a stop), unless ``step`` is saved."""
        return step != self.saved_at and (last_step or bool(self.every and step % self.every == 0))

    def save(self, step: int, last_step: bool = False) -> bool:
        """Checkpoint ``step`` if :meth:`should_save` (on every rank: collective states; rank 0
        writes). Returns whether it did."""
        if not self.should_save(step, last_step):
            return False
        self.saved_at = step
        if not self.dist.is_main:
            self.format.save(self.run.checkpoint_tmp(step), self.states, self.dist)
            return True
        run = self.run
        tmp, final = run.checkpoint_tmp(step), run.checkpoint_path(step)
        run.checkpoints.mkdir(parents=True, exist_ok=True)
        safe_io.remove(tmp)
        try:
            tmp.mkdir()
            self.format.save(tmp, self.states, self.dist)
        except BaseException as exc:  # a full disk, a kill: no half-written folder is left
            safe_io.remove(tmp)
            new = safe_io.as_os_error(exc, final)
            if new is exc:
                raise
            raise new from None
        if final.exists():
            run.retire_checkpoint(final)
        os.replace(tmp, final)
        for _, p in run.checkpoint_list()[:-self.keep]:
            run.retire_checkpoint(p)
        return True

    @property
    def latest(self) -> Path | None:
        """The newest complete checkpoint folder."""
        return self.run.latest_checkpoint

    def restore(self) -> Path | None:
        """Restore every state from the newest checkpoint (after rank 0 removed what killed
        writes left); returns its folder, or None when there is none."""
        if self.dist.is_main:
            self.run.clean_partial_checkpoints()
        last = self.latest
        if last is None:
            return None
        saved = self.format.load(last, self.states, self.dist.device)
        try:
            self.states["progress"].load_state_dict(saved["progress"])
        except ConfigError as exc:
            raise ConfigError(f"cannot resume {self.run.path}: {exc}") from None
        self.saved_at = self.states["progress"].state_dict()["step"]
        try:
            for name, state in saved.items():
                if name != "progress" and name in self.states:
                    self.states[name].load_state_dict(state)
        except (ValueError, TypeError, KeyError, IndexError, RuntimeError) as exc:
            raise CheckpointError(f"{CheckpointFiles(last).state}: cannot restore the sampler "
                                  f"or RNG state ({first_line(exc)}); delete this checkpoint "
                                  "to use an older one") from None
        return last


def check_state(state: Mapping[str, Any], path: Path) -> None:
    """``state.json`` of a checkpoint holds what a resume needs, of the right types
    (→ :class:`CheckpointError` naming the file and the field)."""
    where = CheckpointFiles(path).state

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
