"""Progress display: a rich live bar on a terminal, else one plain line every ``log_every``
steps (clean in CI logs and subprocess output)."""

from __future__ import annotations

import sys
from typing import Any


def line(row: dict[str, Any], total: int) -> str:
    """``step 10/100 | loss 4.1234 | lr 3.00e-03 | 12,345 tok/s | kurt 1.23``."""
    parts = [f"step {row['step']}/{total}", f"loss {row['loss']:.4f}"]
    if "lr" in row:
        parts.append(f"lr {row['lr']:.2e}")
    if row.get("tokens_per_s"):
        parts.append(f"{row['tokens_per_s']:,.0f} tok/s")
    if "kurtosis_mean" in row:
        parts.append(f"kurt {row['kurtosis_mean']:.2f} (max {row['kurtosis_max']:.2f})")
    if "val_loss" in row:
        parts.append(f"val {row['val_loss']:.4f} (ppl {row['val_ppl']:.2f})")
    return " | ".join(parts)


class Progress:
    """``update(step)`` every step; ``log(row)`` on logged steps; a context manager."""

    def __init__(self, total: int, start: int = 0, enabled: bool = True) -> None:
        self.total, self.enabled = total, enabled
        self.live = None
        self.kurt = "-"
        if enabled and sys.stdout.isatty():
            from rich import progress as rp

            self.live = rp.Progress(
                rp.TextColumn("[bold]train"), rp.BarColumn(), rp.MofNCompleteColumn(),
                rp.TimeRemainingColumn(), rp.TextColumn("{task.fields[info]}"),
            )  # fmt: skip
            self.task = self.live.add_task("train", total=total, completed=start, info="")

    def __enter__(self) -> Progress:
        if self.live is not None:
            self.live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.stop()

    def update(self, step: int) -> None:
        if self.live is not None:
            self.live.update(self.task, completed=step)

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.live is None:
            print(line(row, self.total), flush=True)
            return
        if "kurtosis_mean" in row:
            self.kurt = f"{row['kurtosis_mean']:.2f}"
        info = (
            f"loss {row['loss']:.4f}  lr {row['lr']:.2e}  "
            f"{row.get('tokens_per_s') or 0:,.0f} tok/s  kurt {self.kurt}"
        )
        self.live.update(self.task, completed=row["step"], info=info)
        if "val_loss" in row:
            self.live.console.print(line(row, self.total))

    def print(self, text: str) -> None:
        if not self.enabled:
            return
        if self.live is not None:
            self.live.console.print(text)
        else:
            print(text, flush=True)
