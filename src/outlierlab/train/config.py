"""The ``train`` and ``log`` sections of a run config: loop length, batch, cadence, device and
precision; outlier-feature monitoring and metric sinks. Validated on construction."""

from __future__ import annotations

import re
from dataclasses import dataclass

from outlierlab.fields import EXTENDABLE, RESUMABLE, SEED, bad, choice, flag, number, setting

DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


MAX_COUNT = 10**9
"""The largest step count (or batch size, cadence, ...) a config may ask for."""


@dataclass
class TrainConfig:
    """Loop length, batch, evaluation and checkpoint cadence, device and precision."""

    steps: int = setting(1000, EXTENDABLE)
    """Optimiser steps."""
    batch_size: int = 16
    """Sequences per micro-batch per rank. Global batch = batch_size × grad_accum × ranks."""
    grad_accum: int = 1
    """Micro-batches per optimiser step (per rank)."""
    seed: int = setting(0, SEED)
    """Seeds the model init and the batch sampler."""
    log_every: int = setting(10, RESUMABLE)
    """Write a metrics.jsonl line (and a progress line when not on a terminal) every k steps."""
    eval_every: int = setting(200, RESUMABLE)
    """Validation loss every k steps (and at the end); 0 = only at the end."""
    eval_windows: int = setting(64, EXTENDABLE)
    """Number of fixed validation windows (seq_len tokens each)."""
    eval_docs: int = setting(0, EXTENDABLE)
    """Draw the validation windows across this many documents of the validation split
    (:func:`outlierlab.data.document_windows`, fixed per corpus); 0 = the split's first
    ``eval_windows`` consecutive windows (a few documents)."""
    ckpt_every: int = setting(250, RESUMABLE)
    """Checkpoint every k steps (and at the end); 0 = only at the end."""
    keep_ckpts: int = setting(2, RESUMABLE)
    """Keep the last N checkpoints."""
    sync_every: int = setting(50, RESUMABLE)
    """Read the loss, gradient norm and stop flag on the host every k steps (and on every
    log, eval, checkpoint and measured step); the steps between run without a host-device
    sync. A non-finite loss on such a step is found, and the run reported diverged naming
    that step, at the next read; a stop signal is honoured at the next read (single process:
    at once). docs/train.md."""
    device: str = setting("auto", RESUMABLE)
    """auto (cuda if available, else cpu), cpu, cuda, cuda:N. Whether this machine has it is
    checked when the run starts (``train.distributed.pick_device``)."""
    parallel: str = "ddp"
    """How several ranks (torchrun) share the work: ddp (every rank holds the whole model;
    gradients all-reduced) or fsdp (FSDP2: parameters, gradients and optimiser state sharded
    over the ranks; DCP checkpoints that resume at another rank count; full weights exported
    at the end). Fixed for a run. docs/train.md."""
    precision: str = "auto"
    """auto (fp32 on CPU, bf16 autocast on CUDA), fp32, bf16."""
    compile: bool = setting(False, RESUMABLE)
    """torch.compile the model."""
    threads: int = setting(0, RESUMABLE)
    """CPU threads for torch (``torch.set_num_threads``) during the run; 0 = leave as is. Tiny
    models run fastest on 1, and 2+ threads on an oversubscribed machine can be many times
    slower."""
    tweo_weight: float = 0.0
    """TWEO (Liang et al. 2025): λ of the penalty λ·(1/L)·Σ_l mean(|h_l|^p) on the block outputs
    h_l added to the training loss (logged as ``loss_penalty``; ``loss`` stays the
    cross-entropy); 0 = off. docs/mitigations.md."""
    tweo_p: float = 4.0
    """TWEO's exponent p ≥ 1 (high powers weigh the largest activations most)."""

    def __post_init__(self) -> None:
        for k in ("steps", "batch_size", "grad_accum", "log_every", "eval_windows", "keep_ckpts",
                  "sync_every"):
            number(f"train.{k}", getattr(self, k), lo=1, hi=MAX_COUNT, integer=True)
        for k in ("eval_every", "ckpt_every"):
            number(f"train.{k}", getattr(self, k), lo=0, hi=MAX_COUNT, integer=True)
        for k in ("seed", "threads"):
            number(f"train.{k}", getattr(self, k), lo=0, integer=True)
        number("train.eval_docs", self.eval_docs, lo=0, hi=MAX_COUNT, integer=True)
        choice("train.precision", self.precision, ("auto", "fp32", "bf16"))
        choice("train.parallel", self.parallel, ("ddp", "fsdp"))
        if not (isinstance(self.device, str) and DEVICE.fullmatch(self.device)):
            raise bad("train.device", self.device, "auto, cpu, cuda, cuda:N (N = 0, 1, ...)")
        flag("train.compile", self.compile)
        self.tweo_weight = number("train.tweo_weight", self.tweo_weight, lo=0)
        self.tweo_p = number("train.tweo_p", self.tweo_p, lo=1)


@dataclass
class LogConfig:
    """Outlier-feature monitoring and metric sinks."""

    kurtosis_every: int = setting(50, RESUMABLE)
    """Measure Kurt/MMR/cos-sim of the residual stream on the training batch every k steps;
    0 = never."""
    profile_every: int = setting(0, RESUMABLE)
    """Log the massive-activation profile (max |x|, max/median, Kurt without token 0, attention
    sinks; :mod:`outlierlab.profile`) of the training batch every k steps; 0 = never."""
    tensorboard: bool = setting(False, RESUMABLE)
    """Write TensorBoard events to RUN_DIR/tb."""
    wandb: bool = setting(False, RESUMABLE)
    """Log to Weights & Biases (needs ``pip install wandb``)."""
    wandb_project: str = setting("outlierlab", RESUMABLE)
    """W&B project name."""

    def __post_init__(self) -> None:
        number("log.kurtosis_every", self.kurtosis_every, lo=0, integer=True)
        number("log.profile_every", self.profile_every, lo=0, integer=True)
        flag("log.tensorboard", self.tensorboard)
        flag("log.wandb", self.wandb)
