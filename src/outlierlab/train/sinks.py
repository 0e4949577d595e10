"""Optional metric sinks beside metrics.jsonl: TensorBoard (``log.tensorboard``) and
Weights & Biases (``log.wandb``), both imported only when asked for."""

from __future__ import annotations

from typing import Any

from outlierlab.errors import ConfigError
from outlierlab.run_folder import RunFolder


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """Flatten a metrics row to ``{"loss": .., "kurtosis/blocks.0.resid_post": ..}``."""
    out: dict[str, float] = {}
    for k, v in row.items():
        if k == "step":
            continue
        if isinstance(v, dict):
            out.update({f"{k}/{kk}": float(vv) for kk, vv in v.items() if _num(vv)})
        elif _num(v):
            out[k] = float(v)
    return out


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class Sinks:
    def __init__(self, log_cfg: Any, run: RunFolder, config: dict[str, Any]) -> None:
        self.tb = None
        self.wandb = None
        if log_cfg.wandb:
            try:
                import wandb
            except ImportError:
                raise ConfigError(
                    "log.wandb=true needs the wandb package (pip install 'outlierlab[wandb]'); "
                    "or set log.wandb=false"
                ) from None
            self.wandb = wandb.init(
                project=log_cfg.wandb_project, name=run.path.name, dir=str(run.path),
                config=config, resume="allow",
            )  # fmt: skip
        if log_cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError(
                    "log.tensorboard=true needs the tensorboard package "
                    "(pip install 'outlierlab[tensorboard]'); or set log.tensorboard=false"
                ) from None
            self.tb = SummaryWriter(log_dir=str(run.tb_dir))

    def log(self, row: dict[str, Any]) -> None:
        if self.tb is None and self.wandb is None:
            return
        values = scalars(row)
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, row["step"])
        if self.wandb is not None:
            self.wandb.log(values, step=row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
