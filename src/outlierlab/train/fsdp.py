"""Sharded training (``train.parallel=fsdp``): FSDP2 and distributed checkpoints (issue 24).

- :func:`shard`: ``fully_shard`` on every transformer block, then on the root (embeddings,
  final norm, head), with a bf16 :class:`MixedPrecisionPolicy` (fp32 reduction) on CUDA when
  the run trains in bf16. Each rank holds 1/N of every parameter, gradient and optimiser
  state; the trainer builds the optimiser after sharding (on the shards) and before any
  forward.
- :func:`check_optimizer`: optimisers that need whole matrices (SOAP, Shampoo, OrthoAdam: an
  eigendecomposition or an orthogonal basis of each matrix) are refused in one line; AdamW,
  AdaFactor, Muon and SGD run on the shards (DTensor maths, tested against one process).
- :class:`DCPFormat`, the :class:`~outlierlab.train.checkpoint.Checkpointer`'s format for
  FSDP runs: ``checkpoints/step-N/dcp/`` written by ``torch.distributed.checkpoint`` (one
  ``__R_0.distcp`` file per rank and a ``.metadata`` index; model and optimiser state keyed by
  parameter name), beside ``state.json``. A DCP checkpoint loads at any rank count (1 process:
  an unsharded model), so a run resumes on another number of ranks. The Checkpointer writes it
  into a temporary folder that rank 0 renames into place, as for DDP runs.
- :func:`export`: the full weights gathered to rank 0 and written as ``model.safetensors`` +
  ``model_config.json`` (``GPT.save``) at the run's root, so ``measure`` / ``quantize`` load an
  FSDP run as any other. safetensors cannot hold a sharded state dict, hence the gather.

With one process (``train.parallel=fsdp`` without torchrun) the model is not sharded; the
checkpoints are DCP all the same, so the run can continue on several ranks.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from outlierlab.errors import CheckpointError, ConfigError, first_line
from outlierlab.jsonable import write_json
from outlierlab.train import distributed

DCP_DIR = "dcp"
"""The folder of a checkpoint that holds its DCP files."""

SHARDABLE = ("adafactor", "adamw", "muon", "sgd")
"""Optimisers that run on FSDP shards; the others need whole matrices."""


def check_optimizer(name: str) -> None:
    """Refuse an optimiser that cannot run on shards (a ``ConfigError`` in one line)."""
    if name not in SHARDABLE:
        raise ConfigError(
            f"optim.name={name} cannot train with train.parallel=fsdp: it needs whole matrices "
            f"(eigendecompositions or orthogonal bases), which FSDP shards; allowed with fsdp: "
            f"{', '.join(SHARDABLE)} (or train.parallel=ddp)"
        )


def shard(model: nn.Module, dtype: torch.dtype | None, device: torch.device) -> nn.Module:
    """``fully_shard`` every block of ``model.blocks``, then ``model`` (in place); a bf16
    parameter / fp32 reduction policy on CUDA when ``dtype`` is bf16. Returns ``model``."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kw: dict[str, Any] = {}
    if device.type == "cuda" and dtype is not None:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for block in model.blocks:
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def reshard(model: nn.Module) -> None:
    """Free the gathered parameters a no-grad forward left (the root group keeps them
    after a forward with no backward)."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def _state(model: nn.Module, optimizer: Any) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer)
    return {"model": msd, "optim": osd}


def is_dcp(path: Path) -> bool:
    """Whether the checkpoint folder ``path`` holds a DCP checkpoint."""
    return (path / DCP_DIR / ".metadata").is_file()


class DCPFormat:
    """The :class:`~outlierlab.train.checkpoint.CheckpointFormat` of ``train.parallel=fsdp``:
    the model and optimiser as DCP shards in ``dcp/`` (every rank writes its own), the other
    states in ``state.json`` as :class:`~outlierlab.train.checkpoint.FolderFormat` writes it
    (rank 0). Loads at any rank count."""

    def save(self, folder: Path, states: Mapping[str, Any], dist: distributed.Dist) -> None:
        import torch.distributed.checkpoint as dcp

        from outlierlab.run_folder import CheckpointFiles, utc_now

        # every rank writes into rank 0's temporary folder (its name holds rank 0's pid)
        folder = Path(distributed.broadcast_object(str(folder), dist))
        rest = {name: s.state_dict() for name, s in states.items()
                if name not in ("model", "optimizer")}  # collective (RNGState gathers)
        dcp.save(_state(states["model"], states["optimizer"]),
                 checkpoint_id=str(folder / DCP_DIR))  # fmt: skip
        if not dist.is_main:
            return
        progress = rest.pop("progress", {})
        rng = rest.pop("rng", None)
        state = {**progress, **rest, "saved": utc_now()}
        if rng is not None:
            state["rng"] = rng["ranks"]
        write_json(CheckpointFiles(folder).state, state)  # last: the folder is complete

    def load(self, folder: Path, states: Mapping[str, Any], device: torch.device | str
             ) -> dict[str, Any]:  # fmt: skip
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        from outlierlab.run_folder import CheckpointFiles, read_json_object
        from outlierlab.train.checkpoint import check_state

        if not is_dcp(folder):
            raise CheckpointError(f"{folder} is not a DCP checkpoint (train.parallel=ddp wrote "
                                  "it); resume it with train.parallel=ddp")
        model, optimizer = states["model"], states["optimizer"]
        try:
            sd = _state(model, optimizer)
            dcp.load(sd, checkpoint_id=str(folder / DCP_DIR))
            set_state_dict(model, optimizer, model_state_dict=sd["model"],
                           optim_state_dict=sd["optim"])  # fmt: skip
            state = read_json_object(CheckpointFiles(folder).state)
        except CheckpointError:
            raise
        except Exception as exc:  # corrupt, foreign or mismatched files
            raise CheckpointError(f"{folder}: cannot resume from this DCP checkpoint "
                                  f"({first_line(exc)})") from exc
        check_state(state, folder)
        return {"progress": state, "sampler": state["sampler"], "rng": {"ranks": state["rng"]},
                **{k: state[k] for k in states if k not in ("model", "optimizer", "progress",
                                                            "sampler", "rng") and k in state}}


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every rank: the whole model's weights on the CPU, on rank 0 (an empty dict on the
    others)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not is_sharded(model):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts)


def export(model: nn.Module, directory: Path, dist: distributed.Dist) -> Path | None:
    """Every rank: gather the full weights; rank 0 writes them with ``GPT.save`` into
    ``directory`` (``model.safetensors``, ``model_config.json``)."""
    if not is_sharded(model):
        return model.save(directory) if dist.is_main else None
    full = full_state_dict(model)
    if not dist.is_main:
        return None
    from outlierlab.model import GPT

    plain = GPT(model.config)
    plain.load_state_dict(full)
    return plain.save(directory)
