"""Sharded training (``train.parallel=fsdp``): FSDP2 and distributed checkpoints (issue 24).

- :func:`shard`: ``fully_shard`` on every transformer block, then on the root (embeddings,
  final norm, head), with a bf16 :class:`MixedPrecisionPolicy` (fp32 reduction) on CUDA when
  the run trains in bf16. Each rank holds 1/N of every parameter, gradient and optimiser
  state; the trainer builds the optimiser after sharding (on the shards) and before any
  forward.
- :func:`check_optimizer`: optimisers that need whole matrices (SOAP, Shampoo, OrthoAdam: an
  eigendecomposition or an orthogonal basis of each matrix) are refused in one line; AdamW,
  AdaFactor, Muon and SGD run on the shards (DTensor maths, tested against one process).
- :func:`save_checkpoint` / :func:`load_checkpoint`: ``checkpoints/step-N/dcp/`` written by
  ``torch.distributed.checkpoint`` (one ``__R_0.distcp`` file per rank and a ``.metadata``
  index; model and optimiser state keyed by parameter name), beside ``state.json``. A DCP
  checkpoint loads at any rank count (1 process: an unsharded model), so a run resumes on
  another number of ranks. Written into a temporary folder that rank 0 renames into place,
  like the DDP checkpoints (``checkpoint.py``).
- :func:`export`: the full weights gathered to rank 0 and written as ``model.safetensors`` +
  ``model_config.json`` (``GPT.save``) at the run's root, so ``measure`` / ``quantize`` load an
  FSDP run as any other. safetensors cannot hold a sharded state dict, hence the gather.

With one process (``train.parallel=fsdp`` without torchrun) the model is not sharded; the
checkpoints are DCP all the same, so the run can continue on several ranks.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from outlierlab import safe_io
from outlierlab.errors import CheckpointError, ConfigError, first_line
from outlierlab.run_folder import CHECKPOINT_STATE, RunFolder, write_json
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


def save_checkpoint(run: RunFolder, step: int, model: nn.Module, optimizer: Any,
                    state: dict[str, Any], keep: int, dist: distributed.Dist) -> Path:  # fmt: skip
    """Every rank: write ``checkpoints/step-{step}`` of ``run`` as DCP shards plus (rank 0)
    ``state.json``, atomically (a temporary folder rank 0 renames), then rank 0 deletes all
    but the newest ``keep``."""
    import torch.distributed.checkpoint as dcp

    from outlierlab.train import checkpoint as ckpt

    root, final = run.checkpoints, run.checkpoint_path(step)
    tmp = root / distributed.broadcast_object(f"{ckpt._TMP}{step}-{os.getpid()}", dist)
    error: BaseException | None = None
    if dist.is_main:
        root.mkdir(parents=True, exist_ok=True)
        safe_io.remove(tmp)
        tmp.mkdir()
    if dist.enabled:
        torch.distributed.barrier()
    try:
        dcp.save(_state(model, optimizer), checkpoint_id=str(tmp / DCP_DIR))
    except Exception as exc:  # every rank learns that one failed
        error = exc
    errors = [e for e in distributed.all_gather_object(
        None if error is None else first_line(error), dist) if e]  # fmt: skip
    try:
        if errors:
            raise OSError(f"{final}: writing the DCP checkpoint failed ({errors[0]})")
        if dist.is_main:
            write_json(tmp / CHECKPOINT_STATE, {**state, "step": step})
            if final.exists():
                ckpt._delete(final)
            os.replace(tmp, final)
            for _, p in run.checkpoint_list()[:-keep]:
                ckpt._delete(p)
    except BaseException as exc:
        if dist.is_main:
            safe_io.remove(tmp)
        new = safe_io.as_os_error(exc, final) if isinstance(exc, Exception) else exc
        if new is exc:
            raise
        raise new from None
    finally:
        if dist.enabled:
            torch.distributed.barrier()
    return final


def load_checkpoint(path: Path, model: nn.Module, optimizer: Any) -> dict[str, Any]:
    """Every rank: load a DCP checkpoint into ``model`` and ``optimizer`` (sharded or not, at
    any rank count); return its ``state.json``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    from outlierlab.run_folder import read_json_object

    try:
        sd = _state(model, optimizer)
        dcp.load(sd, checkpoint_id=str(path / DCP_DIR))
        set_state_dict(model, optimizer, model_state_dict=sd["model"],
                       optim_state_dict=sd["optim"])  # fmt: skip
        return read_json_object(path / CHECKPOINT_STATE)
    except CheckpointError:
        raise
    except Exception as exc:  # corrupt, foreign or mismatched files
        raise CheckpointError(
            f"{path}: cannot resume from this DCP checkpoint ({first_line(exc)})") from exc


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
