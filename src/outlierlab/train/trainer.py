"""The :class:`Trainer`: one training run of a :class:`~outlierlab.config.RunConfig` into its
run folder (docs/ARCHITECTURE.md), built once and driven by :meth:`Trainer.fit`.

    with Trainer(cfg, resume=False, progress=True, callbacks=[...]) as trainer:
        result = trainer.fit()          # train_step / validate / log / save until done

Construction joins the process group (``distributed.init``), prepares the data (rank 0 builds
the token cache first), checks the run folder, builds the model, optimiser and sampler (seeded
identically on every rank), restores the newest checkpoint on ``resume``, writes the run
folder (rank 0) and wraps the model (DDP, ``torch.compile``, autocast).

Data layout: one optimiser step = ``grad_accum`` micro-batches of ``batch_size`` sequences on
each of the ``world_size`` ranks. Every rank draws the same global batch (``batch_size ×
grad_accum × world_size`` windows) from the sampler seeded by ``train.seed``; rank r takes
micro-batch ``a · world_size + r`` at accumulation step a. So a 2-rank run sees exactly the
micro-batches of a 1-rank run with twice the accumulation, and resuming on another number of
ranks with the same global batch continues the same data stream.

Faults: SIGINT/SIGTERM finish the current step, save a checkpoint and end with status
``interrupted``; a non-finite loss or gradient norm skips the update, writes no checkpoint and
ends with status ``diverged`` naming the step; any other exception marks the run ``crashed``
(a second Ctrl-C: ``interrupted`` at once). A failure before the run folder is written (a
resume whose checkpoint cannot be restored) keeps the run's own status and adds a
``resume_failed`` note; a full disk keeps the last status written. A mistake found on rank 0
(an existing run, a changed config or data on resume, a folder another process holds) is
raised with its own type on every rank. Rank 0 holds the run folder's lock from the check
until :meth:`close`.

Run-folder I/O goes through the :class:`~outlierlab.train.checkpoint.Checkpointer`
(checkpoints) and six methods: :meth:`_claim_run_folder`, :meth:`_check_run_folder`,
:meth:`_open_run_folder`, :meth:`_write_row`, :meth:`_set_status` and
:meth:`_note_resume_failure`; each names files only through
:class:`~outlierlab.run_folder.RunFolder`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import signal
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from outlierlab import version_info
from outlierlab.config import RunConfig, changed_maths_fields
from outlierlab.errors import (
    EXIT_CODES,
    CheckpointError,
    ConfigError,
    RunFolderError,
    first_line,
)
from outlierlab.optim import build_optimizer, lr_factor, set_lr
from outlierlab.run_folder import MetricsWriter, RunFolder, RunLock, utc_now
from outlierlab.train import distributed, fsdp
from outlierlab.train.callbacks import Callbacks, TrainerCallback
from outlierlab.train.checkpoint import Checkpointer, RNGState, RunProgress
from outlierlab.train.progress import Progress
from outlierlab.train.sinks import Sinks
from outlierlab.train.step import StepResult, TrainStep, mean_loss, resolve_precision


@dataclass
class TrainResult:
    """What a finished (or stopped) run reports; ``status`` as in ``status.json``."""

    run_dir: Path
    status: str
    step: int
    message: str = ""
    loss: float | None = None
    val_loss: float | None = None
    kurtosis_mean: float | None = None
    kurtosis_max: float | None = None
    tokens_per_s: float | None = None
    wall_s: float = 0.0

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.status]


class StopFlag:
    """SIGINT/SIGTERM set a flag the loop checks after each step; a second SIGINT raises.
    Handlers are installed only in the main thread (elsewhere signals cannot be caught)."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def default_out(cfg: RunConfig) -> str:
    return f"runs/{cfg.model.block}-{cfg.optim.name}-{time.strftime('%Y%m%d-%H%M%S')}"


class Trainer:
    """Train ``cfg`` into the run folder ``cfg.out``; with ``resume``, continue from its newest
    checkpoint. ``progress=False`` silences the console. ``callbacks``: see
    :mod:`outlierlab.train.callbacks`; ``log.kurtosis_every`` adds a
    :class:`~outlierlab.measuring.MeasureEvery`. A callback sees the trainer as a
    :class:`~outlierlab.train.callbacks.TrainerView`."""

    def __init__(self, cfg: RunConfig, resume: bool = False, *, progress: bool = True,
                 callbacks: Iterable[TrainerCallback] = (),
                 allow_data_change: bool = False) -> None:
        self.t_start = time.perf_counter()
        self._threads = torch.get_num_threads()
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.callbacks = Callbacks(callbacks)
        self.run: RunFolder | None = None
        self._lock: RunLock | None = None  # rank 0, from the run-folder check until close()
        self.step = self.tokens = 0
        self.status, self.message = "running", ""
        self.last: dict[str, Any] = {}  # the newest value of every logged field
        self.done = False  # nothing to do: resumed a finished run
        self._stack = contextlib.ExitStack()
        self._writer: MetricsWriter | None = None
        self._sinks: Sinks | None = None
        self._closed = self._began = self.show = self._opened = False
        self._restoring = False  # restoring a checkpoint: a failure there is noted as resume_failed
        self.dist = distributed.init(cfg.train.device)
        try:
            self._build(cfg, resume, progress, allow_data_change)
        except BaseException as exc:
            self.close(exc)
            raise

    # -- construction ---------------------------------------------------------------------------

    def _build(self, cfg: RunConfig, resume: bool, progress: bool,
               allow_data_change: bool) -> None:  # fmt: skip
        from outlierlab.data import BatchSampler, document_windows, prepare, validation_windows
        from outlierlab.model import GPT

        dist = self.dist
        cfg = dataclasses.replace(cfg)
        if not cfg.out:
            cfg.out = distributed.broadcast_object(default_out(cfg), dist)
        self.cfg, self.run = cfg, RunFolder(cfg.out)
        self.show = progress and dist.is_main
        tc = cfg.train
        self._on_all_ranks(lambda: self._claim_run_folder(resume))  # before any slow work
        if dist.is_main:  # rank 0 builds the token cache, then the others read it
            self.data = prepare(cfg.data, progress=self.show)
        if dist.enabled:
            torch.distributed.barrier()
        if not dist.is_main:
            self.data = prepare(cfg.data, progress=False)
        cfg.model = dataclasses.replace(cfg.model, vocab_size=self.data.tokenizer.vocab_size)
        self._on_all_ranks(lambda: self._check_run_folder(resume, allow_data_change))

        # Same seed on every rank: identical initial weights without a broadcast, and the
        # sampler (seeded alike) draws the same global batch everywhere; each rank then takes
        # its own micro-batches of it (module docstring).
        random.seed(tc.seed)
        np.random.seed(tc.seed)
        torch.manual_seed(tc.seed)
        self.model = GPT(cfg.model).to(dist.device)
        self.dtype = resolve_precision(tc.precision, dist.device)
        self.fsdp = tc.parallel == "fsdp"
        if self.fsdp and dist.enabled:  # shard before the optimiser: it holds the shards
            fsdp.shard(self.model, self.dtype, dist.device)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.global_batch = tc.batch_size * tc.grad_accum * dist.world_size
        self.sampler = BatchSampler(self.data.train, cfg.model.seq_len, self.global_batch,
                                    seed=tc.seed)  # fmt: skip
        if tc.eval_docs:
            self.val = document_windows(self.data.val, cfg.model.seq_len, tc.eval_windows,
                                        tc.eval_docs, self.data.tokenizer.eot_id)  # fmt: skip
        else:
            self.val = validation_windows(self.data.val, cfg.model.seq_len, tc.eval_windows)
        oc, warmup = cfg.optim, cfg.optim.warmup_steps(tc.steps)
        decay = round(oc.decay_frac * tc.steps)
        self._lr_factor = lambda step: lr_factor(step, tc.steps, oc.schedule, warmup,
                                                 oc.min_lr_ratio, decay)  # fmt: skip
        self.checkpointer = Checkpointer(
            self.run, {"model": self.model, "optimizer": self.optimizer,
                       "progress": RunProgress(self, self.global_batch, dist.world_size),
                       "sampler": self.sampler, "rng": RNGState(dist)},
            dist, every=tc.ckpt_every, keep=tc.keep_ckpts,
            format=fsdp.DCPFormat() if self.fsdp else None)  # fmt: skip
        if resume:
            self._restoring = True  # a failure from here on is noted as resume_failed
            self.checkpointer.restore()
        if self.step >= tc.steps and resume and self.run.final_model:
            self.status, self.message, self.done = "finished", "already finished", True
            return
        self._open_run_folder()
        self._wrap()
        if cfg.log.kurtosis_every:
            from outlierlab.measuring import MeasureEvery

            self.callbacks.append(MeasureEvery(cfg.log.kurtosis_every, replay=tc.compile))
        if cfg.log.profile_every:
            from outlierlab.profile import ProfileEvery

            self.callbacks.append(ProfileEvery(cfg.log.profile_every))
        self.stop = self._stack.enter_context(StopFlag())
        self.bar = self._stack.enter_context(Progress(tc.steps, self.step, enabled=self.show))

    def _on_all_ranks(self, check) -> None:
        """Run ``check`` on rank 0 and raise what it raised, with its type, on every rank."""
        error = None
        if self.dist.is_main:
            try:
                check()
            except Exception as exc:  # re-raised below, on every rank
                error = exc
        error = distributed.broadcast_object(error, self.dist)
        if error is not None:
            raise error

    def _wrap(self) -> None:
        """DDP, ``torch.compile`` and autocast around the bare model: :attr:`step_fn`."""
        tc, dist, net = self.cfg.train, self.dist, self.model
        if dist.enabled and not self.fsdp:  # FSDP: the model is sharded in place already
            from torch.nn.parallel import DistributedDataParallel as DDP

            net = DDP(self.model, device_ids=[dist.device] if dist.device.type == "cuda" else None)
        if tc.compile:
            net = torch.compile(net)
        if dist.device.type == "cuda":
            torch.set_float32_matmul_precision("high")
        self.step_fn = TrainStep(
            self.model, self.optimizer, net=net, micro=tc.batch_size, accum=tc.grad_accum,
            clip=self.cfg.optim.grad_clip, dtype=self.dtype, dist=dist,
            tweo=(tc.tweo_weight, tc.tweo_p),
        )  # fmt: skip

    # -- the run folder (rank 0 writes; the only methods that touch it) --------------------------

    def _claim_run_folder(self, resume: bool) -> None:
        """Take the folder's lock; a new run needs an absent or empty folder, a resumed one a
        run with a checkpoint to continue from (or nothing to lose)."""
        run = self.run
        self._lock = run.lock("outlierlab train")
        if not resume:
            run.check_new()
            return
        if not run.is_run:
            raise CheckpointError(f"{run.path} is not a run folder (no {run.config_file.name}) "
                                  "to resume")
        run.check_resumable()

    def _check_run_folder(self, resume: bool, allow_data_change: bool) -> None:
        """Before anything is written: a resumed run must have the same maths and data (unless
        ``allow_data_change``)."""
        run, cfg = self.run, self.cfg
        if not resume:
            return
        saved = RunConfig.from_dict(run.config)
        # the per-rank split of the global batch may change (another rank count): the global
        # batch itself is checked against the checkpoint (RunProgress)
        changed = [k for k in changed_maths_fields(saved, cfg)
                   if k not in ("train.batch_size", "train.grad_accum")]
        if changed:
            a, b, k = saved.flat(), cfg.flat(), changed[0]
            raise ConfigError(
                f"cannot resume {run.path}: {k} differs ({a[k]!r} in the run, {b[k]!r} now) and "
                "changes the maths; only train.steps, logging/eval cadence may change on resume"
            )
        changed = run.data_changes(self.data.fingerprint)
        if changed and not allow_data_change:
            raise ConfigError(
                f"cannot resume {run.path}: its data changed since the run started "
                f"({', '.join(changed[:4])} differ); pass --allow-data-change to continue on "
                f"the new data (the old fingerprint is kept in {run.status_file.name})"
            )

    def _open_run_folder(self) -> None:
        """Print the header; rank 0 writes config, tokenizer, status ``running`` and cuts
        ``metrics.jsonl`` back to the restored step."""
        cfg, run = self.cfg, self.run
        if self.show:
            print(f"outlierlab train: {run.path}  ({self.model.num_params():,} parameters, "
                  f"{self.global_batch * cfg.model.seq_len:,} tokens/step, "
                  f"{self.dist.world_size} rank(s), {self.dist.device})")
            print(cfg.to_toml(), flush=True)
        if not self.dist.is_main:
            return
        self._opened = True  # from here on, a failure is this run's: "crashed"
        self._sinks = Sinks(cfg.log, run, cfg.to_dict())  # fails early if wandb is missing
        if run.final_model:  # extending a finished run: its root weights go stale
            run.remove_final_model()
        run.write_config(cfg.to_dict())
        if cfg.data.tokenizer != "bytes":
            self.data.tokenizer.save(run.path)
        run.truncate_metrics(self.step if self.step else -1)  # step 0 is logged again
        dtype = resolve_precision(cfg.train.precision, self.dist.device)
        run.set_status("running", self.step, "", data_fingerprint=self.data.fingerprint,
                       started=run.status.get("started", utc_now()),
                       device=str(self.dist.device), precision="bf16" if dtype else "fp32",
                       world_size=self.dist.world_size, code=version_info())  # fmt: skip
        self._writer = run.metrics_writer()

    def _write_row(self, row: dict[str, Any]) -> None:
        """Rank 0: one ``metrics.jsonl`` line, the sinks, and ``status.json`` on log steps."""
        if self.dist.is_main:
            self._writer.write(row)
            self._sinks.log(row)
            if row["step"] % self.cfg.train.log_every == 0:  # not on every measured step
                self.run.set_status("running", row["step"])

    def _set_status(self, status: str, message: str) -> None:
        """Rank 0, holding the lock, once this run has written its folder: the run's status (a
        full disk keeps the last one written)."""
        if (self.dist.is_main and self._lock is not None and self._opened
                and self.run.status_file.exists()):
            with contextlib.suppress(OSError):
                self.run.set_status(status, self.step, message)

    def _note_resume_failure(self, message: str) -> None:
        """Rank 0, holding the lock: a restore that failed is noted in ``status.json``
        (``resume_failed``), the run's own status kept: it did not crash."""
        if self.dist.is_main and self._lock is not None:
            with contextlib.suppress(OSError):
                self.run.note(resume_failed={"at": utc_now(), "message": message})

    # -- the steps ------------------------------------------------------------------------------

    def train_step(self) -> dict[str, Any] | None:
        """One optimiser step on the next global batch, with ``on_step_begin`` before it.
        Returns ``{"loss", "lr", "grad_norm", "stop"}`` (averaged over ranks) on a read step
        (:meth:`reads`), ``{"lr", "stop": False}`` on the others (nothing read on the host), or
        None when a loss or gradient norm read was not finite: status ``diverged``."""
        n = self.step + 1  # the step being taken, 1-based
        lr = set_lr(self.optimizer, self._lr_factor(self.step))
        self.callbacks.on_step_begin(self, n)
        x, y = self.sampler.next()
        if self.dist.device.type == "cuda":  # pinned: the copies to the GPU do not block
            x, y = x.pin_memory(), y.pin_memory()
        self.batch = (x, y)
        read = self.reads(n)
        out = self.step_fn(x, y, stop=self.stop.requested is not None, read=read)
        if out is not None and not self._check(out, n):
            return None
        self.step, self.tokens = n, self.tokens + self.global_batch * self.cfg.model.seq_len
        self.bar.update(self.step)
        if out is None:
            return {"lr": lr, "stop": False}
        return {"loss": out.loss, "lr": lr, "grad_norm": out.grad_norm, "stop": out.stop,
                **({} if out.penalty is None else {"loss_penalty": out.penalty})}

    def reads(self, step: int) -> bool:
        """Whether step ``step`` reads its loss on the host: every ``train.sync_every`` steps,
        on log, eval, checkpoint, measured and the last step, and (one process) once a stop
        signal came. The same on every rank (a stop read is an all-reduce)."""
        tc, lc = self.cfg.train, self.cfg.log
        every = (tc.sync_every, tc.log_every, lc.kurtosis_every, lc.profile_every)
        return (step >= tc.steps or any(k and step % k == 0 for k in every)
                or self.should_validate(step) or self.checkpointer.should_save(step)
                or (self.stop.requested is not None and not self.dist.enabled))

    def _check(self, out: StepResult, n: int) -> bool:
        """False (status ``diverged``) when ``out``, read at step ``n``, holds a non-finite
        loss or gradient norm: the first such step is named, and the run's step set to the
        one before it."""
        if out.finite:
            return True
        what = "loss" if not math.isfinite(out.loss) else "gradient norm"
        bad = n - out.back
        good = self.checkpointer.latest
        self.status = "diverged"
        self.step = bad - 1
        self.tokens = self.step * self.global_batch * self.cfg.model.seq_len
        found = (f"; found at step {n} (the loss is read every train.sync_every steps)"
                 if out.back else "")
        self.message = (
            f"non-finite {what} ({out.loss if what == 'loss' else out.grad_norm}) at step "
            f"{bad}{found}; stopped; last good checkpoint: {good if good else 'none'}"
        )
        return False

    def local_micro_batches(self) -> list[torch.Tensor]:
        """This rank's micro-batches (inputs) of the last step's global batch."""
        return [xb.to(self.dist.device) for xb in self.step_fn.micro_batches(self.batch[0])]

    def autocast(self):
        """The training precision's autocast context (a no-op for fp32)."""
        return self.step_fn.autocast()

    def should_validate(self, step: int) -> bool:
        """Validation runs every ``train.eval_every`` steps and at the last step."""
        every = self.cfg.train.eval_every
        return bool(every and step % every == 0) or step == self.cfg.train.steps

    def validate(self) -> dict[str, Any]:
        """Validation loss and perplexity on the fixed windows (``val_loss``, ``val_ppl``);
        with ``log.kurtosis_every`` also the monitor's fields measured in the same forwards,
        prefixed ``val_`` (``val_kurtosis``, ``val_kurtosis_mean``, ``val_kurtosis_max``, ...):
        the held-out Kurt the claims use at the last step."""
        val, measured = self.measure(*self.val)
        return {"val_loss": val, "val_ppl": math.exp(min(val, 700.0)),
                **{f"val_{k}": v for k, v in measured.items()}}

    def measure(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, dict[str, Any]]:
        """Mean loss on windows ``x, y`` (no grad, eval mode, sharded over ranks) and, with
        ``log.kurtosis_every``, the monitor's row fields (:meth:`Measured.row`) of the same
        forwards, all-reduced; ``{}`` without. Consumes no random numbers."""
        from outlierlab.measuring import MeasureEvery

        meter = MeasureEvery(1) if self.cfg.log.kurtosis_every else None
        try:
            if meter is not None:
                meter.open(self.model)
                meter.begin_step(self.step)
            pad = None
            if fsdp.is_sharded(self.model):  # every rank runs as many forwards (collectives)
                pad = meter.paused if meter is not None else contextlib.nullcontext
            with torch.no_grad():
                loss = mean_loss(self.model, x, y, self.cfg.train.batch_size, self.dist,
                                 self.dtype, before=meter.number if meter else None,
                                 pad=pad)  # fmt: skip
            measured = meter.end_step(all_reduce=self.dist.enabled) if meter else None
        finally:
            if meter is not None:
                meter.close()
            if fsdp.is_sharded(self.model):
                fsdp.reshard(self.model)
        return loss, (measured.row() if measured is not None else {})

    def _step_zero(self) -> dict[str, Any]:
        """The row of step 0, before the first update: loss (and the monitor's fields) on the
        first training batch, left in the sampler, and the validation metrics."""
        state = self.sampler.state_dict()
        x, y = self.sampler.next()
        self.sampler.load_state_dict(state)  # put it back: step 1 trains on this very batch
        loss, measured = self.measure(x, y)
        return {"step": 0, "tokens": 0, "loss": loss, **measured, **self.validate()}

    def log(self, row: dict[str, Any]) -> None:
        """Write ``row`` (rank 0), show it, remember it, then ``on_log``."""
        self.last.update(row)
        self._write_row(row)
        self.bar.log(row)
        self.callbacks.on_log(self, row)

    def save(self, step: int, last_step: bool = False) -> bool:
        """Checkpoint ``step`` when the checkpointer says so (every ``train.ckpt_every`` steps,
        at the last step or a stop; never twice), then ``on_save``. Every rank calls it."""
        saved = self.checkpointer.save(step, last_step)
        if saved:
            self.callbacks.on_save(self, step)
        return saved

    # -- the loop -------------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        """:meth:`run_step` until ``train.steps``, a stop signal or divergence, then the last
        checkpoint and the final weights. Returns the result; :meth:`close` writes the status."""
        if self.done:
            return self.result()
        self.begin()
        while self.run_step():
            pass
        return self.finish()

    def begin(self) -> None:
        """Train mode, ``on_train_begin``, the throughput clock (idempotent)."""
        if self._began:
            return
        self.model.train()
        self.callbacks.on_train_begin(self)
        self._began = True
        if self.step == 0:
            self.log(self._step_zero())
        self._t_log, self._tok_log, self._paused = time.perf_counter(), self.tokens, 0.0

    def run_step(self) -> bool:
        """One step of the loop: :meth:`train_step`, ``on_step_end``, evaluation every
        ``eval_every`` and at the end, a metrics row every ``log_every`` (and whenever a
        callback or evaluation added to it), a checkpoint every ``ckpt_every`` or when asked
        to stop. False once the loop is over (all steps done, stopped or diverged)."""
        tc = self.cfg.train
        if self.status != "running" or self.step >= tc.steps:
            return False
        out = self.train_step()
        if out is None:
            return False
        row: dict[str, Any] = {}
        self.callbacks.on_step_end(self, self.step, row)
        is_last = self.step == tc.steps
        if self.should_validate(self.step):
            with self._paused_clock():
                row.update(self.validate())
        if row or self.step % tc.log_every == 0 or is_last:
            if "loss" not in out:  # a callback logged on an unread step: read it now
                res = self.step_fn.read()
                if not self._check(res, self.step):
                    return False
                out = {**out, "loss": res.loss, "grad_norm": res.grad_norm,
                       **({} if res.penalty is None else {"loss_penalty": res.penalty})}
            self.log(self._row(out, row))
        if out["stop"] or not is_last:  # a finished run's last checkpoint: finish()
            with self._paused_clock():
                self.save(self.step, last_step=out["stop"])
        if out["stop"]:
            self.status = "interrupted"
            self.message = (
                f"stopped by {self.stop.requested or 'a signal'} at step {self.step}; "
                f"resume with: outlierlab train --resume {self.run.path}"
            )
            return False
        return not is_last

    def finish(self) -> TrainResult:
        """After the loop: a finished run saves its last checkpoint and final weights;
        ``on_train_end``; the result."""
        if self.status == "running" and self.step >= self.cfg.train.steps:
            self.save(self.step, last_step=True)
            if self.fsdp:  # the full weights gathered to rank 0
                fsdp.export(self.model, self.run.path, self.dist)
            elif self.dist.is_main:
                self.model.save(self.run.path)
            self.status, self.message = "finished", f"finished {self.step} steps"
        self.callbacks.on_train_end(self, self.status)
        return self.result()

    def _row(self, out: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
        """The metrics row of this step: ``tokens_per_s`` since the last row, leaving out the
        time spent evaluating and saving."""
        now = time.perf_counter()
        busy = max(now - self._t_log - self._paused, 1e-9)
        row = {"step": self.step, "tokens": self.tokens, "loss": out["loss"], "lr": out["lr"],
               "grad_norm": out["grad_norm"],
               "tokens_per_s": (self.tokens - self._tok_log) / busy, **extra}  # fmt: skip
        if "loss_penalty" in out:  # TWEO (train.tweo_weight): λ·penalty, beside the CE loss
            row["loss_penalty"] = out["loss_penalty"]
        self._t_log, self._tok_log, self._paused = now, self.tokens, 0.0
        return row

    @contextlib.contextmanager
    def _paused_clock(self):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._paused += time.perf_counter() - t0

    def result(self) -> TrainResult:
        last = self.last
        return TrainResult(
            run_dir=self.run.path, status=self.status, step=self.step, message=self.message,
            loss=last.get("loss"), val_loss=last.get("val_loss"),
            kurtosis_mean=last.get("kurtosis_mean"), kurtosis_max=last.get("kurtosis_max"),
            tokens_per_s=last.get("tokens_per_s"), wall_s=time.perf_counter() - self.t_start,
        )  # fmt: skip

    # -- the end --------------------------------------------------------------------------------

    def close(self, exc: BaseException | None = None) -> None:
        """Write the final status (``exc``: the error that ended the run — ``interrupted`` for
        Ctrl-C, ``crashed`` for anything but a config or checkpoint mistake), close writers,
        hooks and signal handlers, leave the process group, restore torch's thread count.
        Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if exc is not None:
                self._fail(exc)
            elif not self.done:
                self._set_status(self.status, self.message)
        finally:
            try:
                self._stack.close()
                for f in (self._writer, self._sinks):
                    if f is not None:
                        f.close()
            finally:
                if self._lock is not None:
                    self._lock.release()
                distributed.close(self.dist, orderly=exc is None)
                torch.set_num_threads(self._threads)
        if self.show and self.status == "finished" and exc is None and not self.done:
            print(f"{self.status}: {self.message}", flush=True)

    def _fail(self, exc: BaseException) -> None:
        if isinstance(exc, KeyboardInterrupt):
            self.status = "interrupted"
            self._set_status(self.status, "KeyboardInterrupt")
        elif not self._opened:  # nothing of this run written: the folder's status stays
            if isinstance(exc, Exception) and self._restoring:
                self._note_resume_failure(first_line(exc))
        elif not isinstance(exc, (ConfigError, CheckpointError, RunFolderError)):
            self.status = "crashed"
            self._set_status(self.status, first_line(exc))
        if self._began:
            self.callbacks.on_train_end(self, self.status)

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(exc)
