"""Count host-device syncs: what ``benchmarks/host_syncs.py`` and the tests use to show that a
plain training step (not logged, evaluated, checkpointed or measured) reads nothing on the
host (issue 24; ``train.sync_every``, docs/train.md).

    with SyncCounter(device) as syncs:
        trainer.run_step()
    syncs.count, syncs.calls     # how many, and where from (``method file:line``)

Two ways of counting, one per device:

- CUDA: torch's own detector, ``torch.cuda.set_sync_debug_mode("warn")``, which warns on
  every operation that makes the host wait for the GPU (``.item()``, ``.tolist()``, a
  blocking copy, ``torch.cuda.synchronize``...); each warning counts one.
- CPU (no such detector): every call of a method that reads a tensor's value on the host —
  ``item``, ``tolist``, ``cpu``, ``numpy``, ``bool()``, ``float()``, ``int()`` — and of
  ``torch.cuda.synchronize``, except the calls torch's own modules make (an optimiser reading
  its step counter, which lives on the host on a GPU too). Each of these would be a sync
  were the tensor on a GPU.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import torch

_READERS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")
_TORCH_DIR = str(Path(torch.__file__).resolve().parent)


class SyncCounter:
    """Context manager counting host-device syncs on ``device`` while it is open (see the
    module docstring); ``count`` and ``calls`` (a short description of each)."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.calls: list[str] = []
        self._saved: dict[str, Any] = {}
        self._warnings: Any = None
        self._mode: int | None = None

    @property
    def count(self) -> int:
        return self.poll()

    def reset(self) -> None:
        self.calls = []

    def __enter__(self) -> SyncCounter:
        if self.device.type == "cuda":
            self._mode = torch.cuda.get_sync_debug_mode()
            self._warnings = warnings.catch_warnings(record=True)
            self._log = self._warnings.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            return self
        for name in _READERS:
            self._saved[name] = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, self._wrap(name, self._saved[name]))
        self._saved["synchronize"] = torch.cuda.synchronize
        torch.cuda.synchronize = self._wrap("cuda.synchronize", torch.cuda.synchronize,
                                            method=False)  # fmt: skip
        return self

    def _wrap(self, name: str, fn, method: bool = True):
        counter = self

        def wrapper(*args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if not caller.startswith(_TORCH_DIR):
                frame = sys._getframe(1)
                counter.calls.append(f"{name} {Path(caller).name}:{frame.f_lineno}")
            return fn(*args, **kwargs)

        wrapper.__name__ = getattr(fn, "__name__", name)
        return wrapper

    def poll(self) -> int:
        """Move the CUDA detector's warnings so far into :attr:`calls`; the count."""
        if self._warnings is not None:
            for w in self._log:
                if "synchroniz" in str(w.message):
                    self.calls.append(f"cuda sync {Path(w.filename).name}:{w.lineno}")
            self._log.clear()
        return len(self.calls)

    def __exit__(self, *exc: object) -> None:
        if self._warnings is not None:
            torch.cuda.set_sync_debug_mode(self._mode)
            self.poll()
            self._warnings.__exit__(*exc)
            self._warnings = None
            return
        for name, fn in self._saved.items():
            if name == "synchronize":
                torch.cuda.synchronize = fn
            else:
                setattr(torch.Tensor, name, fn)
        self._saved = {}
