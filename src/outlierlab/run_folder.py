"""The run folder (docs/ARCHITECTURE.md "Run folder"): the only code that knows its layout.

``RunFolder(path)`` names every file of a run and reads and writes them: the resolved config,
``status.json``, ``metrics.jsonl``, the run's tokenizer, its checkpoints and final model, and
an exclusive lock held by whoever writes into the folder (JSON through
:func:`~outlierlab.jsonable.write_json`, atomic). :func:`find_runs` is the one run discovery.

Reading is strict: a malformed file raises :class:`~outlierlab.errors.RunFolderError` with one
line naming it, so listings can show that run as unreadable and carry on with the others.
Imports nothing heavy (``outlierlab runs`` stays fast); the data module is imported lazily.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from outlierlab import safe_io
from outlierlab.errors import (
    ConfigError,
    RunFolderError,
    RunInUseError,
    first_line,
    path_reason,
)
from outlierlab.fields import SECTIONS
from outlierlab.jsonable import json_safe, write_json

RENAMED_SCHEMES = {"w8a8-paper": "w8a8-outputs"}
"""Schemes whose name changed meaning (issue 23: the old ``w8a8-paper`` is ``w8a8-outputs``,
and ``w8a8-paper`` now means Bondarenko et al.'s sites); a result of the old meaning has a
``config`` (every ``outlierlab quantize`` result has) without ``paper_sites``."""


def legacy_scheme(scheme: str, result: dict[str, Any]) -> str | None:
    """The new name of a result saved under ``scheme``'s old meaning, else None."""
    config = result.get("config")
    if scheme in RENAMED_SCHEMES and isinstance(config, dict) and "paper_sites" not in config:
        return RENAMED_SCHEMES[scheme]
    return None


RUN_CONFIG_FILE = "config.json"
"""The resolved run config (``RunConfig.to_dict()``); a Hugging Face folder's ``config.json``
has ``model_type`` instead."""
STATUS_FILE = "status.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_STATE = "state.json"
"""A checkpoint folder is complete once it holds this file (written last, then renamed in)."""
OPTIM_FILE = "optim.pt"
"""A checkpoint's optimiser state (``torch.save``; loadable with ``weights_only=True``)."""
MODEL_FILE = "model.safetensors"
"""The weights of a saved GPT folder (``GPT.save``): a run's root, or a checkpoint."""
MODEL_CONFIG_FILE = "model_config.json"
"""A saved GPT folder's model config and weights checksum (``GPT.save``)."""
HF_CONFIG_FILE = "config.json"
"""A Hugging Face model folder's config (``model_type``); the same name as a run's config."""
QUANT_DIR = "quant"
MEASURE_FILE = "measure.json"  # `outlierlab measure RUN --save`: the final model on held-out text
LOCK_FILE = ".lock"
TB_DIR = "tb"
SWEEP_LOG = "sweep.log"
"""The console output of the ``train``/``quantize`` processes a sweep ran for this run."""
STATUSES = ("running", "finished", "crashed", "diverged", "interrupted")
OWN_FILES = frozenset({LOCK_FILE, SWEEP_LOG})
"""What may stand in a folder before a new run starts in it (the lock, a sweep's log)."""
_TMP, _OLD = ".tmp-step-", ".old-step-"  # a checkpoint being written / being deleted
_STEP_DIR = re.compile(r"^step-(\d+)$")


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object from ``path`` (→ :class:`RunFolderError` naming the file otherwise)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise RunFolderError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise RunFolderError(f"{path}: not a UTF-8 text file") from None
    except ValueError as exc:  # JSONDecodeError
        raise RunFolderError(f"{path}: not valid JSON ({first_line(exc)[:200]})") from None
    if not isinstance(data, dict):
        raise RunFolderError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


class RunFolder:
    """One run folder: its paths, readers and writers (see the module docstring)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.config_file = self.path / RUN_CONFIG_FILE
        self.status_file = self.path / STATUS_FILE
        self.metrics_file = self.path / METRICS_FILE
        self.checkpoints = self.path / CHECKPOINTS_DIR
        self.model_file = self.path / MODEL_FILE
        self.quant_dir = self.path / QUANT_DIR
        self.measure_file = self.path / MEASURE_FILE
        self.lock_file = self.path / LOCK_FILE
        self.tb_dir = self.path / TB_DIR
        self.sweep_log = self.path / SWEEP_LOG
        self._status: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    @property
    def tokenizer_file(self) -> Path:
        from outlierlab.data.tokenizer import TOKENIZER_FILE

        return self.path / TOKENIZER_FILE

    def quant_file(self, scheme: str) -> Path:
        """``quant/<scheme>.json``: one quantisation result."""
        return self.quant_dir / f"{scheme}.json"

    def quant_results(self) -> dict[str, dict[str, Any]]:
        """Every saved quantisation result, ``{scheme: result}`` (``quant/<scheme>.json``; an
        older ``quant/results.json`` is filed under the scheme it names; a ``w8a8-paper.json``
        written before issue 23 under the scheme's new name, ``w8a8-outputs``, unless that has
        a file of its own)."""
        found: dict[str, dict[str, Any]] = {}
        legacy: dict[str, dict[str, Any]] = {}
        if self.quant_dir.is_dir():
            for q in sorted(self.quant_dir.glob("*.json")):
                d = read_json_object(q)
                scheme = str(d.get("scheme", q.stem)) if q.stem == "results" else q.stem
                if renamed := legacy_scheme(scheme, d):
                    legacy[renamed] = {**d, "scheme": renamed}
                else:
                    found[scheme] = d
        return {**legacy, **found}

    def is_legacy_quant(self, scheme: str) -> bool:
        """Whether ``quant/<scheme>.json`` holds a result of the scheme's old meaning."""
        q = self.quant_file(scheme)
        return scheme in RENAMED_SCHEMES and q.is_file() and bool(
            legacy_scheme(scheme, read_json_object(q)))

    def file_legacy_quant(self, scheme: str) -> None:
        """Move a legacy ``quant/<scheme>.json`` to its new name before the scheme is run again
        (kept when that name has a file already: nothing is overwritten)."""
        if self.is_legacy_quant(scheme):
            new = self.quant_file(RENAMED_SCHEMES[scheme])
            if not new.exists():
                os.replace(self.quant_file(scheme), new)

    @classmethod
    def of_checkpoint(cls, folder: str | os.PathLike) -> RunFolder | None:
        """The run whose ``checkpoints/step-N`` is ``folder``, or None."""
        folder = Path(folder)
        if folder.parent.name == CHECKPOINTS_DIR and _STEP_DIR.match(folder.name):
            run = cls(folder.parent.parent)
            return run if run.is_run else None
        return None

    # -- what the folder holds ------------------------------------------------------------------

    @property
    def is_run(self) -> bool:
        """The folder holds a run: a ``config.json`` that is not a Hugging Face model's."""
        if not self.config_file.is_file():
            return False
        try:
            return "model_type" not in read_json_object(self.config_file)
        except RunFolderError:
            return True  # a run whose config is damaged: still a run (listed as unreadable)

    @property
    def config(self) -> dict[str, Any]:
        """The resolved run config (``RunConfig.to_dict()``); every present section a table."""
        cfg = read_json_object(self.config_file)
        for name in SECTIONS:
            if name in cfg and not isinstance(cfg[name], dict):
                raise RunFolderError(
                    f"{self.config_file}: section {name!r} is {json.dumps(cfg[name])[:40]}, "
                    "expected a table"
                )
        return cfg

    def section(self, name: str) -> dict[str, Any]:
        """One config section (``{}`` when absent)."""
        return self.config.get(name, {})

    def write_config(self, config: dict[str, Any]) -> None:
        write_json(self.config_file, config)

    @property
    def data_config(self):
        """The run's :class:`~outlierlab.data.DataConfig`, its tokenizer pointing at the run's
        own ``tokenizer.json`` (the exact one it trained with) when it has one."""
        from outlierlab.data import DataConfig

        if not isinstance(self.config.get("data"), dict):
            raise RunFolderError(f"{self.config_file}: no data section; not an outlierlab run")
        cfg = DataConfig.from_dict(self.section("data"))
        if cfg.tokenizer != "bytes" and self.tokenizer_file.is_file():
            cfg.tokenizer = str(self.tokenizer_file)
        return cfg

    @property
    def tokenizer(self):
        """The run's tokenizer (``bytes``, or its ``tokenizer.json``)."""
        from outlierlab.data import load_tokenizer

        spec = self.data_config.tokenizer
        if spec != "bytes" and spec != str(self.tokenizer_file):
            raise RunFolderError(
                f"run folder {self.path} has no tokenizer.json for its tokenizer {spec!r}"
            )
        return load_tokenizer(spec)

    def check_new(self) -> None:
        """A new run is written only into a folder that is absent or empty (its lock and a
        sweep's log aside): a folder holding anything else is not ours to overwrite."""
        try:
            names = sorted(p.name for p in self.path.iterdir() if p.name not in OWN_FILES)
        except FileNotFoundError:
            return
        if self.is_run or (self.config_file.is_symlink() and not self.config_file.exists()):
            raise ConfigError(f"{self.path} already holds a run; resume it with --resume "
                              f"{self.path} or choose another out=")
        if names:
            shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            raise RunFolderError(
                f"{self.path} is not empty and is not a run (it holds {shown}); outlierlab "
                "writes a new run only into a new or empty folder: choose another out=")

    def check_resumable(self) -> None:
        """A run resumes from a complete checkpoint; without one it may only restart from step
        0 when it never got anywhere (no final model, not finished or interrupted)."""
        if (self.checkpoints.exists() and not self.checkpoints.is_dir()) or (
                self.checkpoints.is_symlink()):
            raise RunFolderError(f"cannot resume {self.path}: {self.checkpoints} is not a "
                                 "folder; allowed: the run's own checkpoints/ folder")
        if self.checkpoint_list():
            return
        try:
            status = self.status.get("status")
        except RunFolderError:
            status = None
        if self.final_model or status in ("finished", "interrupted"):
            raise RunFolderError(
                f"cannot resume {self.path}: it has no complete checkpoint in "
                f"{self.checkpoints} to continue from, and restarting would replace its "
                "weights and metrics; train a new run with another out=")

    # -- status ---------------------------------------------------------------------------------

    @property
    def status(self) -> dict[str, Any]:
        """``status.json`` (``{}`` when there is none yet)."""
        if not self.status_file.exists():
            return {}
        return read_json_object(self.status_file)

    def set_status(self, status: str, step: int, message: str = "", **extra: Any) -> None:
        """Update ``status.json``, keeping ``started`` and the other fields across calls. A new
        ``data_fingerprint`` never silently replaces the recorded one: the old one moves to
        ``data_history`` with the step it held until."""
        assert status in STATUSES, status
        if not self._status:
            try:
                self._status = self.status
            except RunFolderError:
                self._status = {}  # a damaged status is replaced by the writer holding the lock
        old_fp = self._status.get("data_fingerprint")
        new_fp = extra.get("data_fingerprint")
        if old_fp is not None and new_fp is not None and new_fp != old_fp:
            history = list(self._status.get("data_history", []))
            history.append({"until_step": int(step), "fingerprint": old_fp})
            self._status["data_history"] = history
        self._status.update(extra)
        self._status.update(status=status, step=int(step), message=message, updated=utc_now())
        self._status.setdefault("started", self._status["updated"])
        write_json(self.status_file, self._status)

    def note(self, **fields: Any) -> None:
        """Add ``fields`` to a readable ``status.json`` without changing the run's status (a
        resume that failed before writing anything: ``resume_failed``)."""
        try:
            status = self.status
        except RunFolderError:
            return
        if status:
            write_json(self.status_file, {**status, **fields})

    def data_changes(self, fingerprint: dict[str, Any]) -> list[str]:
        """Fields of the recorded data fingerprint that differ from ``fingerprint`` (none when
        the run recorded none)."""
        old = self.status.get("data_fingerprint")
        if not isinstance(old, dict):
            return []
        return sorted(k for k in old.keys() | fingerprint.keys()
                      if old.get(k) != fingerprint.get(k))

    # -- metrics --------------------------------------------------------------------------------

    @property
    def metrics(self) -> list[dict[str, Any]]:
        """Every logged row (a JSON object with an integer ``step``) of ``metrics.jsonl``; a line
        cut short by a kill is skipped. Bytes that are not UTF-8 → :class:`RunFolderError`."""
        return list(self._metric_rows())

    def _metric_rows(self) -> Iterable[dict[str, Any]]:
        try:
            text = self.metrics_file.read_text(encoding="utf-8")
        except FileNotFoundError:
            return
        except OSError as exc:
            raise RunFolderError(f"{self.metrics_file}: cannot read ({exc.strerror})") from None
        except UnicodeDecodeError as exc:
            raise RunFolderError(f"{self.metrics_file}: not UTF-8 text ({exc.reason} at byte "
                                 f"{exc.start})") from None
        for line in text.splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                yield row

    def metrics_writer(self) -> MetricsWriter:
        return MetricsWriter(self.metrics_file)

    def truncate_metrics(self, step: int) -> None:
        """Drop rows after ``step`` (written by a run killed after its last checkpoint)."""
        if not self.metrics_file.is_file():
            return
        keep = [json.dumps(r) + "\n" for r in self._metric_rows() if r["step"] <= step]
        safe_io.write_text(self.metrics_file, "".join(keep))

    # -- checkpoints and weights ----------------------------------------------------------------

    def checkpoint_path(self, step: int) -> Path:
        return self.checkpoints / f"step-{step}"

    def checkpoint_list(self) -> list[tuple[int, Path]]:
        """Complete checkpoints ``(step, folder)``, oldest first."""
        if not self.checkpoints.is_dir():
            return []
        found = []
        for p in self.checkpoints.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and (p / CHECKPOINT_STATE).is_file():
                found.append((int(m.group(1)), p))
        return sorted(found)

    @staticmethod
    def checkpoint_step(folder: str | os.PathLike) -> int | None:
        """The step of a ``checkpoints/step-N`` folder (from its name), or None."""
        m = _STEP_DIR.match(Path(folder).name)
        return int(m.group(1)) if m else None

    def checkpoint_tmp(self, step: int) -> Path:
        """Where checkpoint ``step`` is written before it is renamed into place: the same name
        on every rank (a sharded writer's ranks all write into it); the run's lock keeps out a
        second trainer, and a leftover of a killed write is removed before it is reused."""
        return self.checkpoints / f"{_TMP}{step}"

    def retire_checkpoint(self, folder: Path) -> None:
        """Rename ``folder`` out of the checkpoint namespace, then delete it: a kill half-way
        through leaves a ``.old-step-*`` folder (removed by :meth:`clean_partial_checkpoints`),
        never a half-deleted ``step-N`` that looks like a checkpoint."""
        old = folder.with_name(f"{_OLD}{folder.name[len('step-'):]}-{os.getpid()}")
        os.replace(folder, old)
        shutil.rmtree(old, ignore_errors=True)

    def clean_partial_checkpoints(self) -> None:
        """Remove what killed writes and deletions left: temporary and renamed-away folders,
        and ``step-N`` folders without their state file (half-deleted by older versions)."""
        if not self.checkpoints.is_dir():
            return
        complete = {p for _, p in self.checkpoint_list()}
        for p in self.checkpoints.iterdir():
            if p.name.startswith((_TMP, _OLD)) or (
                    p.is_dir() and _STEP_DIR.match(p.name) and p not in complete):
                shutil.rmtree(p, ignore_errors=True)

    @property
    def latest_checkpoint(self) -> Path | None:
        found = self.checkpoint_list()
        return found[-1][1] if found else None

    @property
    def final_model(self) -> Path | None:
        """The run's root when it holds final weights (a ``GPT.save`` folder), else None."""
        ok = self.model_file.is_file() and (self.path / MODEL_CONFIG_FILE).is_file()
        return self.path if ok else None

    def remove_final_model(self) -> None:
        """Delete the root weights (a run being extended: they are no longer its newest state)."""
        for name in (MODEL_CONFIG_FILE, MODEL_FILE):
            (self.path / name).unlink(missing_ok=True)

    def newest_model(self) -> tuple[Path, int | None, str] | None:
        """``(folder, step, what)`` of the newest weights: the final model of a finished run,
        else the latest checkpoint, else root weights of unknown step; None when there are none."""
        status = self.status
        ckpts = self.checkpoint_list()
        final = self.final_model
        step = status.get("step") if isinstance(status.get("step"), int) else None
        if final and status.get("status") == "finished" and (
                not ckpts or step is None or step >= ckpts[-1][0]):
            return final, step, "final model"
        if ckpts:
            n, folder = ckpts[-1]
            return folder, n, f"{CHECKPOINTS_DIR}/{folder.name}"
        if final:
            return final, step, "final model"
        return None

    def open_sweep_log(self):
        """``sweep.log`` opened for appending (the folder created; never through a link)."""
        self.path.mkdir(parents=True, exist_ok=True)
        return safe_io.open_append(self.sweep_log)

    # -- the lock -------------------------------------------------------------------------------

    def lock(self, purpose: str) -> RunLock:
        """Take the folder's exclusive lock (→ :class:`RunInUseError` if a live process holds
        it). Use as a context manager or call ``release()``; ``purpose`` (e.g. ``outlierlab
        train``) is shown to whoever is refused."""
        return RunLock(self, purpose).acquire()

    def lock_holder(self) -> dict[str, Any] | None:
        """Who holds the lock now (``pid``, ``host``, ``purpose``, ``started``), or None."""
        return RunLock(self, "").holder()


@dataclass(frozen=True)
class CheckpointFiles:
    """The files of one checkpoint folder (``checkpoints/step-N``, or its temporary name while
    it is written): a saved GPT folder (weights and model config) plus the optimiser state and
    ``state.json`` (step, tokens, sampler, RNG states)."""

    folder: Path

    @property
    def weights(self) -> Path:
        return self.folder / MODEL_FILE

    @property
    def optimizer(self) -> Path:
        return self.folder / OPTIM_FILE

    @property
    def state(self) -> Path:
        return self.folder / CHECKPOINT_STATE


def is_saved_model(folder: str | os.PathLike) -> bool:
    """``folder`` holds a saved GPT (``GPT.save``: a run's root, a checkpoint, a bare folder)."""
    return (Path(folder) / MODEL_CONFIG_FILE).is_file()


def holds_model_config(folder: str | os.PathLike) -> bool:
    """``folder`` holds a model config of either kind (a saved GPT's, or a run's or Hugging
    Face model's ``config.json``): it is not a folder of loose GGUF files."""
    return any((Path(folder) / f).exists() for f in (RUN_CONFIG_FILE, MODEL_CONFIG_FILE))


class MetricsWriter:
    """Appends one JSON object per line to ``metrics.jsonl`` (flushed at once)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f = safe_io.open_append(path)  # never through a symlink

    def write(self, row: dict[str, Any]) -> None:
        try:
            self._f.write(json.dumps(json_safe(row)) + "\n")
        except OSError as exc:  # a full disk: name the file
            raise safe_io.as_os_error(exc, self.path) from None

    def close(self) -> None:
        self._f.close()


class RunLock:
    """``RUN/.lock``: an exclusive ``flock`` on the file, which holds the holder's pid, host,
    purpose and start time. The kernel drops a ``flock`` when its process dies (even by
    SIGKILL), so a stale file (a dead pid) is simply taken over. Where ``flock`` is not
    supported (some network filesystems) the pid in the file decides: a live pid on this host,
    or any pid on another host, holds the folder."""

    def __init__(self, run: RunFolder, purpose: str) -> None:
        self.run, self.purpose = run, purpose
        self.path = run.lock_file
        self._fd: int | None = None
        self._created = False
        self.previous: dict[str, Any] | None = None
        """The stale holder taken over, if any."""

    def __enter__(self) -> RunLock:
        return self if self._fd is not None else self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> RunLock:
        self._created = not self.run.path.exists()
        while True:
            try:
                self.run.path.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | safe_io.NOFOLLOW, 0o644)
            except OSError as exc:
                if self.path.is_symlink():
                    raise RunFolderError(
                        f"{self.path} is a symbolic link; outlierlab never writes through "
                        "links: remove it, then retry") from None
                why = path_reason(exc) or exc.strerror or str(exc)
                raise RunFolderError(f"cannot write the run folder {self.run.path} ({why}); "
                                     "choose a writable folder") from None
            try:
                if _holds(_try_flock(fd), info := _read_holder(fd)):
                    raise RunInUseError(self._refusal(info))
                self.previous = info
                try:  # a releaser may have unlinked the file we locked: lock the new one
                    if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                        break
                except FileNotFoundError:
                    pass
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "purpose": self.purpose,
                "started": utc_now()}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        except OSError as exc:  # a full disk: leave no empty lock file or folder behind
            self._fd = fd
            self.release()
            raise safe_io.as_os_error(exc, self.path) from None
        self._fd = fd
        return self

    def release(self) -> None:
        """Remove the lock file (while still holding it) and drop the lock; a folder the lock
        created and nothing else filled is removed too."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)
            self._fd = None
        if self._created:
            with contextlib.suppress(OSError):
                self.run.path.rmdir()  # only when empty

    def holder(self) -> dict[str, Any] | None:
        try:
            fd = os.open(self.path, os.O_RDWR)
        except OSError:
            return None
        try:
            state, info = _try_flock(fd), _read_holder(fd)
            return (info or {}) if _holds(state, info) else None
        finally:
            os.close(fd)  # closing drops a lock taken just to test

    def _refusal(self, info: dict[str, Any] | None) -> str:
        info = info or {}
        who = f"pid {info.get('pid', '?')}"
        if info.get("host") and info["host"] != socket.gethostname():
            who += f" on {info['host']}"
        what = ", ".join(
            f"{'started ' if k == 'started' else ''}{info[k]}"
            for k in ("purpose", "started") if info.get(k))
        return (f"{self.run.path} is in use by {who}" + (f" ({what})" if what else "")
                + "; wait for it to end or stop it, then retry")


def _try_flock(fd: int) -> str:
    """A non-blocking exclusive flock: ``taken``, ``held`` (by another open file, another
    process) or ``unsupported`` (not POSIX, or a filesystem without flock)."""
    try:
        import fcntl
    except ImportError:
        return "unsupported"
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return "held"
    except OSError:  # ENOLCK, EOPNOTSUPP, ...
        return "unsupported"
    return "taken"


def _holds(state: str, info: dict[str, Any] | None) -> bool:
    """Whether someone else holds the lock: the flock says so, or, without flock, the pid in the
    file is another live process."""
    return state == "held" or (state == "unsupported" and _alive_elsewhere(info))


def _read_holder(fd: int) -> dict[str, Any] | None:
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode("utf-8", "replace") or "null")
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _alive_elsewhere(info: dict[str, Any] | None) -> bool:
    """A holder that is another live process (or on another host: cannot tell, assume so)."""
    if not info or not isinstance(info.get("pid"), int):
        return False
    if info.get("host") != socket.gethostname():
        return True
    if info["pid"] == os.getpid():
        return False
    try:
        os.kill(info["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def find_runs(paths: Iterable[str | os.PathLike], depth: int = 3) -> list[RunFolder]:
    """The run folders among ``paths``: a path that is a run, else the runs found under it up
    to ``depth`` levels down (a sweep folder, a folder of sweeps); other folders (reports,
    logs) are skipped. Sorted by path within each argument, without repeats."""
    found: list[RunFolder] = []
    seen: set[Path] = set()

    def walk(folder: Path, levels: int) -> None:
        run = RunFolder(folder)
        if run.is_run:
            key = folder.resolve()
            if key not in seen:
                seen.add(key)
                found.append(run)
            return
        if levels == 0:
            return
        try:
            children = sorted(p for p in folder.iterdir()
                              if p.is_dir() and not p.name.startswith("."))
        except OSError:
            return
        for child in children:
            walk(child, levels - 1)

    for p in map(Path, paths):
        if p.is_dir():
            walk(p, depth)
    return found
