"""The run folder (docs/ARCHITECTURE.md "Run folder"): ``config.json``, ``status.json``,
``metrics.jsonl``, ``tokenizer.json``, ``checkpoints/``, final ``model.safetensors``.

Every JSON file is written atomically (temp file + ``os.replace``); ``metrics.jsonl`` is
appended a line at a time and cut back to the resumed step on resume.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

STATUSES = ("running", "finished", "crashed", "diverged", "interrupted")


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _clean(obj: Any) -> Any:
    """JSON-safe: non-finite floats become the strings "nan", "inf", "-inf"."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_json(path: Path, obj: Any) -> None:
    """Atomic JSON write: ``path.tmp-PID`` then ``os.replace``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(_clean(obj), indent=2) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


class RunDir:
    """Paths and writers of one run folder."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.config = self.path / "config.json"
        self.status_file = self.path / "status.json"
        self.metrics = self.path / "metrics.jsonl"
        self.checkpoints = self.path / "checkpoints"
        self.model = self.path / "model.safetensors"
        self._status: dict[str, Any] = {}

    def create(self) -> None:
        self.checkpoints.mkdir(parents=True, exist_ok=True)

    def is_run(self) -> bool:
        return self.config.is_file()

    # -- status ---------------------------------------------------------------------------------

    def read_status(self) -> dict[str, Any]:
        try:
            return read_json(self.status_file)
        except (OSError, ValueError):
            return {}

    def set_status(self, status: str, step: int, message: str = "", **extra: Any) -> None:
        """Update ``status.json`` (keeps ``started`` and ``data_fingerprint`` across calls)."""
        assert status in STATUSES, status
        if not self._status:
            self._status = self.read_status()
        self._status.update(extra)
        self._status.update(status=status, step=int(step), message=message, updated=utc_now())
        self._status.setdefault("started", self._status["updated"])
        write_json(self.status_file, self._status)

    # -- metrics --------------------------------------------------------------------------------

    def truncate_metrics(self, step: int) -> None:
        """Drop metrics lines after ``step`` (written by a run killed after its checkpoint)."""
        if not self.metrics.is_file():
            return
        keep = []
        for line in self.metrics.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line)
            except (ValueError, KeyError, TypeError):
                continue  # a half-written last line
        tmp = self.metrics.with_name(f".{self.metrics.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(k + "\n" for k in keep))
        os.replace(tmp, self.metrics)


class MetricsWriter:
    """Appends one JSON object per line to ``metrics.jsonl`` (flushed at once)."""

    def __init__(self, path: Path) -> None:
        self._f = open(path, "a", buffering=1)  # noqa: SIM115 (closed by close())

    def write(self, row: dict[str, Any]) -> None:
        self._f.write(json.dumps(_clean(row)) + "\n")

    def close(self) -> None:
        self._f.close()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every parseable line of a ``metrics.jsonl`` (a half-written last line is skipped)."""
    rows = []
    p = Path(path)
    if not p.is_file():
        return rows
    for line in p.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows
