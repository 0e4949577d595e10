"""DDP from the environment ``torchrun`` sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``):
gloo on CPU, NCCL on CUDA. Without those variables everything is a single process.

Data layout (see ``trainer.py``): every rank draws the same global batch from the same seed and
takes its own micro-batches, so N ranks see exactly the micro-batches one process with
``grad_accum × N`` would, and a run's data does not depend on how many ranks ran it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as tdist

from outlierlab.fields import bad


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(spec: str, local_rank: int = 0) -> torch.device:
    """``train.device`` on this machine; a CUDA device it does not have is a ``ConfigError``."""
    given = spec
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda":
        spec = f"cuda:{local_rank}"
    device = torch.device(spec)
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device.type == "cuda" and (device.index or 0) >= n:
        have = f"cuda:0..cuda:{n - 1}" if n else "no CUDA device on this machine"
        raise bad("train.device", given, f"auto, cpu ({have})")
    return device


BACKEND_ENV = "OUTLIERLAB_DIST_BACKEND"


def backend_for(dev: torch.device) -> str:
    """NCCL on CUDA, gloo on CPU; ``$OUTLIERLAB_DIST_BACKEND=gloo`` forces gloo (several ranks
    on one GPU, which NCCL refuses: ``benchmarks/gpu_check.py``'s DDP check)."""
    forced = os.environ.get(BACKEND_ENV)
    if forced:
        if forced not in ("gloo", "nccl"):
            raise bad(BACKEND_ENV, forced, "gloo, nccl")
        return forced
    return "nccl" if dev.type == "cuda" else "gloo"


def init(device: str = "auto") -> Dist:
    """Join the process group when launched by torchrun; otherwise a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local)
    if world > 1 and not tdist.is_initialized():
        backend = backend_for(dev)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        tdist.init_process_group(backend=backend, rank=rank, world_size=world)
    return Dist(rank, world, local, dev)


def close(dist: Dist, orderly: bool = True) -> None:
    """Leave the process group. ``orderly`` (a run that ended well on every rank): wait for
    every rank first, so no rank tears its connections down while a peer still holds them (a
    gloo peer seeing its connection close can abort, SIGABRT); after an error the ranks may not
    all get here, so no barrier."""
    if dist.enabled and tdist.is_initialized():
        if orderly:
            tdist.barrier()
        tdist.destroy_process_group()


def all_reduce_(t: torch.Tensor, dist: Dist, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (no-op for a single process)."""
    if dist.enabled:
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX if op == "max" else tdist.ReduceOp.SUM)
    return t


def all_gather_object(obj, dist: Dist) -> list:
    if not dist.enabled:
        return [obj]
    out = [None] * dist.world_size
    tdist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, dist: Dist):
    if not dist.enabled:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]
