"""One optimiser step and the validation loss: the maths of training, without a run folder.

:class:`TrainStep` is what :meth:`outlierlab.train.Trainer.train_step` runs on each global
batch, and what ``benchmarks/gpu_check.py`` times on its own models and batches.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from outlierlab.train import distributed


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``train.precision`` (``auto``: bf16 on CUDA), ``None`` for fp32."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return torch.bfloat16 if precision == "bf16" else None


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` to ``dtype``, or a no-op context for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass
class StepResult:
    """Loss and gradient norm averaged over ranks; ``stop``: some rank asked to stop;
    ``penalty``: the weighted TWEO term added to the loss (None without one). A non-finite
    step read late (``back`` > 0) reports the first non-finite step's loss and gradient norm,
    ``back`` steps before the step that read it."""

    loss: float
    grad_norm: float
    stop: bool = False
    penalty: float | None = None
    back: int = 0

    @property
    def finite(self) -> bool:
        return math.isfinite(self.loss) and math.isfinite(self.grad_norm)


class TrainStep:
    """Forward + backward over ``accum`` micro-batches of ``micro`` sequences (this rank's
    share of the global batch, see ``trainer.py``), global-norm clipping, then the update, skipped
    when the loss or gradient norm is not finite. ``net`` is the module that runs the forward
    (``model`` itself, or it wrapped by DDP and/or ``torch.compile``). ``tweo=(λ, p)`` with
    λ > 0 adds λ·(1/L)·Σ_l mean|h_l|^p of the block outputs to the loss that is backpropagated
    (:mod:`outlierlab.model.penalty`); the reported ``loss`` stays the model's own.

    Host syncs: a step called with ``read=False`` reads nothing on the host (no ``.item()``,
    no host-to-device copy of a flag, no all-reduce): its loss, gradient norm and penalty stay
    on the device, its update is taken unconditionally, and it returns None. The next step
    with ``read=True`` (or :meth:`read`) fetches them all in one transfer (one all-reduce
    across ranks); if one of them was not finite it reports the first such step (``back``
    steps earlier) and skips its own update: a run that diverges on an unread step is found
    at the next read, its weights already spoiled (the trainer saves nothing after that)."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        net: nn.Module | None = None,
        micro: int | None = None,
        accum: int = 1,
        clip: float = 0.0,
        dtype: torch.dtype | None = None,
        dist: distributed.Dist | None = None,
        tweo: tuple[float, float] | None = None,
    ) -> None:
        self.model, self.optimizer = model, optimizer
        self.net = model if net is None else net
        self.micro, self.accum = micro, accum
        self.clip = clip if clip > 0 else float("inf")
        self.dtype = dtype
        self.dist = dist or distributed.Dist(device=next(model.parameters()).device)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.penalty = None
        self.pending: list[torch.Tensor] = []  # unread steps' [loss, grad norm, penalty]
        self.sharded = hasattr(self.net, "set_requires_gradient_sync")  # an FSDP2 module
        if tweo is not None and tweo[0] > 0:
            from outlierlab.model.penalty import BlockOutputPenalty

            self.tweo_weight, self.penalty = tweo[0], BlockOutputPenalty(model, tweo[1])

    def autocast(self):
        return autocast(self.dist.device, self.dtype)

    def micro_batches(self, x: torch.Tensor) -> list[torch.Tensor]:
        """This rank's micro-batches of the global batch ``x``: rank r takes micro-batch
        ``a · world_size + r`` at accumulation step a."""
        micro = self.micro or len(x) // (self.accum * self.dist.world_size)
        w, r = self.dist.world_size, self.dist.rank
        return [x[(a * w + r) * micro : (a * w + r + 1) * micro] for a in range(self.accum)]

    def __call__(self, x: torch.Tensor, y: torch.Tensor, stop: bool = False,
                 read: bool = True) -> StepResult | None:  # fmt: skip
        """One step on the global batch ``x, y``; ``stop``: this rank asks to stop (passed to
        the other ranks on a read step only). Returns the step's result, or None when
        ``read`` is false."""
        dist, dev = self.dist, self.dist.device
        loss_sum = torch.zeros((), device=dev)
        pen_sum = torch.zeros((), device=dev)
        if self.penalty is not None:
            self.penalty.take()  # drop what forwards outside this step left
        for a, (xb, yb) in enumerate(zip(self.micro_batches(x), self.micro_batches(y))):
            # non_blocking: on CUDA the copy overlaps the previous micro-batch's backward
            xb = xb.to(dev, non_blocking=True)
            yb = yb.to(dev, non_blocking=True)
            # DDP all-reduces gradients in backward; only the last micro-batch needs to (the
            # others accumulate locally under no_sync), which saves accum − 1 all-reduces
            sync = a == self.accum - 1 or not dist.enabled
            if self.sharded:  # FSDP2: reduce-scatter the gradients on the last micro-batch only
                self.net.set_requires_gradient_sync(sync)
            quiet = contextlib.nullcontext() if sync or self.sharded else self.net.no_sync()
            with quiet, self.autocast():
                _, loss = self.net(xb, yb)
            total = loss
            if self.penalty is not None and (pen := self.penalty.take()) is not None:
                total = loss + self.tweo_weight * pen
                pen_sum += self.tweo_weight * pen.detach().float()
            (total / self.accum).backward()
            loss_sum += loss.detach().float()  # on the device: no host sync per micro-batch
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor, the same on every rank
            grad_norm = grad_norm.full_tensor()
        self.pending.append(torch.stack([loss_sum / self.accum, grad_norm.float().to(dev),
                                         pen_sum / self.accum]))  # fmt: skip
        if not read:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            return None
        out = self.read(stop)
        if out.finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return out

    def read(self, stop: bool = False) -> StepResult:
        """Fetch the unread steps' values (one device-to-host transfer; one all-reduce over
        ranks, every rank must call it at the same step): the newest step's result, or the
        first non-finite one's with ``back`` = how many steps before the newest it was."""
        dist, dev = self.dist, self.dist.device
        if not self.pending:
            raise RuntimeError("TrainStep.read: no step to read")
        rows = torch.stack(self.pending).float()
        self.pending = []
        # the grad norm is already global (DDP/FSDP reduce the gradients); loss and penalty
        # are this rank's: averaged over ranks. The stop flag rides in an extra column.
        flags = torch.cat([rows, torch.zeros(len(rows), 1, device=dev)], dim=1)
        if stop:
            flags[-1, 3] = 1.0
        if dist.enabled:
            distributed.all_reduce_(flags, dist)
            flags[:, :3] /= dist.world_size  # loss, grad norm, penalty; not the stop column
        values = flags.tolist()
        back, row = 0, values[-1]
        for i, r in enumerate(values):
            if not (math.isfinite(r[0]) and math.isfinite(r[1])):
                back, row = len(values) - 1 - i, r
                break
        return StepResult(row[0], row[1], values[-1][3] > 0,
                          row[2] if self.penalty is not None else None, back)  # fmt: skip


@torch.no_grad()
def mean_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int,
              dist: distributed.Dist, dtype: torch.dtype | None = None,
              before: Callable[[int], None] | None = None,
              pad: Callable[[], Any] | None = None) -> float:  # fmt: skip
    """Mean next-token loss over the fixed windows ``x, y`` (the validation windows, or the
    first training batch for step 0). The windows form groups of
    ``batch_size`` consecutive ones, one forward each, dealt to the ranks in turn (group g to
    rank g mod w): the same forwards whatever the rank count, so the monitor's per-forward
    statistics (cos-sim, subsamples) are too; ``before(g)`` is called before group g's.
    ``pad`` (FSDP, where every forward is a collective): ranks left with fewer groups run
    extra forwards of their first group inside ``pad()``, not counted, so every rank runs as
    many forwards as rank 0."""
    was_training = model.training
    model.eval()
    groups = range(0, len(x), batch_size)
    tot = torch.zeros(2, dtype=torch.float64, device=dist.device)
    mine = list(range(dist.rank, len(groups), dist.world_size))
    rounds = len(range(0, len(groups), dist.world_size)) if pad is not None else len(mine)
    for i in range(rounds):
        g = mine[i] if i < len(mine) else None
        j = torch.arange(groups[g if g is not None else 0],
                         min(groups[g if g is not None else 0] + batch_size, len(x)))
        if g is not None and before is not None:
            before(g)
        with (contextlib.nullcontext() if g is not None else pad()), autocast(dist.device, dtype):
            _, loss = model(x[j].to(dist.device), y[j].to(dist.device))
        if g is not None:
            tot[0] += loss.double() * len(j)
            tot[1] += len(j)
    distributed.all_reduce_(tot, dist)
    model.train(was_training)
    return float(tot[0] / tot[1])
