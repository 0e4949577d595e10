"""JSON helpers with no knowledge of any folder layout: :func:`json_safe` (NaN/inf → ``null``)
and :func:`write_json`, the package's one JSON writer (atomic). The monitor, the data cache and
the run-folder layer all use them; this module imports nothing of outlierlab's but
:mod:`~outlierlab.safe_io`."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from outlierlab import safe_io


def json_safe(obj: Any) -> Any:
    """JSON-safe copy: non-finite floats become ``null`` (tuples become lists)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def to_number_or_str(x: Any) -> Any:
    """``json.dumps(default=...)`` for what JSON lacks: numpy and torch scalars become floats,
    anything else its ``str``."""
    try:
        return float(x)
    except (TypeError, ValueError):
        return str(x)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as JSON atomically (:mod:`~outlierlab.safe_io`: an ``O_EXCL|O_NOFOLLOW``
    temporary file, then ``os.replace``; removed on any error), creating the parent folder;
    NaN/inf become ``null``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return safe_io.write_text(path, json.dumps(json_safe(obj), indent=2) + "\n")
