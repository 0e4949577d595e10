"""The training loop: ``train(cfg, resume=False) -> RunResult``.

One optimiser step = ``grad_accum`` micro-batches of ``batch_size`` sequences on each of the
``world_size`` ranks. Every rank draws the same global batch (``batch_size × grad_accum ×
world_size`` windows) from the sampler seeded by ``train.seed``; rank r takes micro-batch
``a · world_size + r`` at accumulation step a. So a 2-rank run sees exactly the micro-batches of
a 1-rank run with twice the accumulation, and resuming on another number of ranks with the same
global batch continues the same data stream.

Faults: SIGINT/SIGTERM finish the current step, save a checkpoint and return status
``interrupted``; a non-finite loss or gradient norm skips the update, writes no checkpoint and
returns status ``diverged`` naming the step; any other exception marks the run ``crashed``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from outlierlab.config import RunConfig, changed_maths_fields
from outlierlab.errors import CheckpointError, ConfigError, OutlierlabError, RunFolderError
from outlierlab.optim import build_optimizer, lr_factor, set_lr
from outlierlab.run_folder import RunFolder, utc_now
from outlierlab.train import checkpoint as ckpt
from outlierlab.train import distributed
from outlierlab.train.progress import Progress
from outlierlab.train.sinks import Sinks

EXIT_CODES = {"finished": 0, "diverged": 3, "interrupted": 130, "crashed": 1}


@dataclass
class RunResult:
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


class _StopFlag:
    """SIGINT/SIGTERM set a flag the loop checks after each step; a second SIGINT raises."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def default_out(cfg: RunConfig) -> str:
    return f"runs/{cfg.model.block}-{cfg.optim.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def resolve_precision(cfg: RunConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or ``None`` for plain fp32."""
    p = cfg.train.precision
    if p == "auto":
        p = "bf16" if device.type == "cuda" else "fp32"
    return torch.bfloat16 if p == "bf16" else None


@torch.no_grad()
def evaluate(model, x, y, batch_size: int, device, amp, d: distributed.Dist) -> float:
    """Mean next-token loss over the fixed validation windows (sharded over ranks)."""
    was_training = model.training
    model.eval()
    idx = torch.arange(d.rank, len(x), d.world_size)
    tot = torch.zeros(2, dtype=torch.float64, device=device)
    for i in range(0, len(idx), batch_size):
        j = idx[i : i + batch_size]
        with amp():
            _, loss = model(x[j].to(device), y[j].to(device))
        tot[0] += loss.double() * len(j)
        tot[1] += len(j)
    distributed.all_reduce_(tot, d)
    model.train(was_training)
    return float(tot[0] / tot[1])


def _prepare_run_dir(cfg: RunConfig, run: RunFolder, resume: bool, fingerprint: dict,
                     allow_data_change: bool) -> None:
    if resume:
        if not run.is_run:
            raise CheckpointError(f"{run.path} is not a run folder (no config.json) to resume")
        saved = RunConfig.from_dict(run.config)
        changed = changed_maths_fields(saved, cfg)
        if changed:
            a, b = saved.flat(), cfg.flat()
            k = changed[0]
            raise ConfigError(
                f"cannot resume {run.path}: {k} differs ({a[k]!r} in the run, {b[k]!r} now) and "
                f"changes the maths; only {', '.join(['train.steps', 'logging/eval cadence'])} "
                "may change on resume"
            )
        changed = run.data_changes(fingerprint)
        if changed and not allow_data_change:
            raise ConfigError(
                f"cannot resume {run.path}: its data changed since the run started "
                f"({', '.join(changed[:4])} differ); pass --allow-data-change to continue on "
                "the new data (the old fingerprint is kept in status.json)"
            )
    elif run.config_file.exists():
        raise ConfigError(
            f"{run.path} already holds a run; resume it with --resume {run.path} or choose "
            "another out="
        )


def train(cfg: RunConfig, resume: bool = False, *, progress: bool = True,
          allow_data_change: bool = False) -> RunResult:
    """Train ``cfg`` into the run folder ``cfg.out`` (see docs/ARCHITECTURE.md); with
    ``resume``, continue from its latest checkpoint (refused when its data changed, unless
    ``allow_data_change``). The folder is locked for the run. ``progress=False`` silences the
    console."""
    from outlierlab.data import BatchSampler, prepare, validation_windows
    from outlierlab.model import GPT

    t_start = time.perf_counter()
    threads = torch.get_num_threads()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    d = distributed.init(cfg.train.device)
    lock = None
    try:
        cfg = dataclasses.replace(cfg)
        if not cfg.out:
            cfg.out = distributed.broadcast_object(default_out(cfg), d)
        run = RunFolder(cfg.out)
        tc, oc = cfg.train, cfg.optim
        show = progress and d.is_main

        # ---- data (rank 0 builds the cache first), model vocabulary from the tokenizer
        if d.is_main:
            data = prepare(cfg.data, progress=show)
        if d.enabled:
            torch.distributed.barrier()
        if not d.is_main:
            data = prepare(cfg.data, progress=False)
        cfg.model = dataclasses.replace(cfg.model, vocab_size=data.tokenizer.vocab_size)
        error = None
        if d.is_main:  # decide once: rank 0 writes config.json soon after
            try:
                lock = run.lock("outlierlab train")
                _prepare_run_dir(cfg, run, resume, data.fingerprint, allow_data_change)
            except OutlierlabError as exc:
                error = exc
        error = distributed.broadcast_object(error, d)
        if error:
            raise error

        # ---- model, optimiser, sampler (seeded identically on every rank)
        random.seed(tc.seed)
        np.random.seed(tc.seed)
        torch.manual_seed(tc.seed)
        raw = GPT(cfg.model).to(d.device)
        optimizer = build_optimizer(raw, oc)
        micro, accum, world = tc.batch_size, tc.grad_accum, d.world_size
        global_batch = micro * accum * world
        seq_len = cfg.model.seq_len
        sampler = BatchSampler(data.train, seq_len, global_batch, seed=tc.seed)
        vx, vy = validation_windows(data.val, seq_len, tc.eval_windows)

        # ---- resume state
        step = 0
        tokens = 0
        saved_at = -1  # step of the newest checkpoint (the same on every rank)
        if resume:
            if d.is_main:
                ckpt.clean_partial(run)
            last_ckpt = run.latest_checkpoint
            if last_ckpt is not None:
                state = ckpt.load_checkpoint(last_ckpt, raw, optimizer, d.device)
                saved_at = int(state["step"])
                if state.get("global_batch", global_batch) != global_batch:
                    raise ConfigError(
                        f"cannot resume {run.path}: global batch (train.batch_size × "
                        f"grad_accum × ranks) was {state['global_batch']}, now {global_batch}"
                    )
                step, tokens = int(state["step"]), int(state["tokens"])
                sampler.load_state_dict(state["sampler"])
                rngs = state["rng"]
                ckpt.set_rng_state(rngs[d.rank] if d.rank < len(rngs) else rngs[0])
        if step >= tc.steps and resume and run.final_model:
            return _result(run, "finished", step, "already finished", t_start)

        # ---- run folder (rank 0 writes)
        if show:
            print(f"outlierlab train: {run.path}  ({raw.num_params():,} parameters, "
                  f"{global_batch * seq_len:,} tokens/step, {world} rank(s), {d.device})")
            print(cfg.to_toml(), flush=True)
        writer = sinks = None
        if d.is_main:
            sinks = Sinks(cfg.log, run.path, cfg.to_dict())  # fails early if wandb is missing
            if resume and run.final_model:  # extending a finished run: root weights go stale
                run.remove_final_model()
            run.write_config(cfg.to_dict())
            if cfg.data.tokenizer != "bytes":
                data.tokenizer.save(run.path)
            run.truncate_metrics(step)
            run.set_status("running", step, "", data_fingerprint=data.fingerprint,
                           started=run.status.get("started", utc_now()))
            writer = run.metrics_writer()

        # ---- wrappers: DDP, compile, autocast, monitor
        model = raw
        if d.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            model = DDP(raw, device_ids=[d.device] if d.device.type == "cuda" else None)
        if tc.compile:
            model = torch.compile(model)
        if d.device.type == "cuda":
            torch.set_float32_matmul_precision("high")
        dtype = resolve_precision(cfg, d.device)

        def amp():
            if dtype is None:
                return contextlib.nullcontext()
            return torch.autocast(device_type=d.device.type, dtype=dtype)

        k_every = cfg.log.kurtosis_every
        monitor = None
        stack = contextlib.ExitStack()
        if k_every and not tc.compile:
            from outlierlab.monitor import OutlierMonitor

            monitor = stack.enter_context(OutlierMonitor(raw))
            monitor.enabled = False
        stop = stack.enter_context(_StopFlag())
        bar = stack.enter_context(Progress(tc.steps, step, enabled=show))

        warmup = oc.warmup_steps(tc.steps)
        decay = round(oc.decay_frac * tc.steps)
        clip = oc.grad_clip if oc.grad_clip > 0 else float("inf")
        params = [p for p in raw.parameters() if p.requires_grad]
        status, message = "finished", ""
        last = {}
        t_log, tok_log, paused = time.perf_counter(), tokens, 0.0
        raw.train()

        def save(at: int) -> Path | None:
            nonlocal saved_at
            saved_at = at
            rng = distributed.all_gather_object(ckpt.rng_state(), d)
            if not d.is_main:
                return None
            state = {"tokens": tokens, "global_batch": global_batch, "world_size": world,
                     "sampler": sampler.state_dict(), "rng": rng, "saved": utc_now()}
            return ckpt.save_checkpoint(run, at, raw, optimizer, state,
                                        tc.keep_ckpts)

        with stack:
            while step < tc.steps:
                lr = set_lr(optimizer, lr_factor(step, tc.steps, oc.schedule, warmup,
                                                 oc.min_lr_ratio, decay))
                n = step + 1  # the step being taken, 1-based
                measure = bool(k_every) and n % k_every == 0
                x, y = sampler.next()
                loss_sum = torch.zeros((), device=d.device)
                for a in range(accum):
                    i = (a * world + d.rank) * micro
                    xb = x[i : i + micro].to(d.device, non_blocking=True)
                    yb = y[i : i + micro].to(d.device, non_blocking=True)
                    if monitor is not None:
                        monitor.enabled = measure  # every micro-batch of the global batch
                    sync = a == accum - 1 or not d.enabled
                    with (contextlib.nullcontext() if sync else model.no_sync()), amp():
                        _, loss = model(xb, yb)
                    (loss / accum).backward()
                    loss_sum += loss.detach().float()
                if monitor is not None:
                    monitor.enabled = False
                grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
                flags = torch.stack([
                    loss_sum / accum,
                    grad_norm.float().to(d.device),
                    torch.tensor(float(stop.requested is not None), device=d.device),
                ])  # fmt: skip
                if d.enabled:
                    distributed.all_reduce_(flags, d)
                    flags[:2] /= world
                loss_v, gn_v, stop_v = flags.tolist()
                if not (math.isfinite(loss_v) and math.isfinite(gn_v)):
                    what = "loss" if not math.isfinite(loss_v) else "gradient norm"
                    good = run.latest_checkpoint
                    status = "diverged"
                    message = (
                        f"non-finite {what} ({loss_v if what == 'loss' else gn_v}) at step {n}; "
                        f"stopped; last good checkpoint: {good if good else 'none'}"
                    )
                    break
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step, tokens = n, tokens + global_batch * seq_len
                bar.update(step)

                row: dict[str, Any] = {}
                if measure:
                    res = _measure(monitor, raw, x, micro, amp, d)
                    row.update(res)
                is_last = step == tc.steps
                if (tc.eval_every and step % tc.eval_every == 0) or is_last:
                    t0 = time.perf_counter()
                    val = evaluate(raw, vx, vy, micro, d.device, amp, d)
                    row.update(val_loss=val, val_ppl=math.exp(min(val, 700.0)))
                    paused += time.perf_counter() - t0
                if row or step % tc.log_every == 0 or is_last:
                    now = time.perf_counter()
                    busy = max(now - t_log - paused, 1e-9)
                    row = {"step": step, "tokens": tokens, "loss": loss_v, "lr": lr,
                           "grad_norm": gn_v, "tokens_per_s": (tokens - tok_log) / busy, **row}
                    t_log, tok_log, paused = now, tokens, 0.0
                    last.update(row)
                    if d.is_main:
                        writer.write(row)
                        sinks.log(row)
                        if step % tc.log_every == 0:  # not on every measured step
                            run.set_status("running", step)
                    bar.log(row)
                stopping = stop_v > 0
                if (tc.ckpt_every and step % tc.ckpt_every == 0 and not is_last) or stopping:
                    t0 = time.perf_counter()
                    save(step)
                    paused += time.perf_counter() - t0
                if stopping:
                    status = "interrupted"
                    message = (
                        f"stopped by {stop.requested or 'a signal'} at step {step}; "
                        f"resume with: outlierlab train --resume {run.path}"
                    )
                    break

            if status == "finished":
                if saved_at != step:
                    save(step)
                if d.is_main:
                    raw.save(run.path)
                message = f"finished {step} steps"

        if d.is_main:
            run.set_status(status, step, message)
            writer.close()
            sinks.close()
        if show and status == "finished":
            print(f"{status}: {message}", flush=True)
        return _result(run, status, step, message, t_start, last)
    except BaseException as exc:
        if d.is_main and lock is not None and run.status_file.exists():
            if isinstance(exc, KeyboardInterrupt):
                run.set_status("interrupted", locals().get("step", 0), "KeyboardInterrupt")
            elif not isinstance(exc, (ConfigError, CheckpointError, RunFolderError)):
                msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                run.set_status("crashed", locals().get("step", 0), msg)
        raise
    finally:
        if lock is not None:
            lock.release()
        distributed.close(d)
        torch.set_num_threads(threads)


def _measure(monitor, raw, x, micro: int, amp, d: distributed.Dist) -> dict[str, Any]:
    """Per-point Kurt/MMR/cos-sim of the residual stream on this step's global batch ``x``
    (each rank measured its own micro-batches; statistics all-reduced). With ``compile`` the
    monitor is attached only for extra eager forwards of this rank's micro-batches, so the
    compiled graph never sees its hooks."""
    if monitor is None:
        from outlierlab.monitor import OutlierMonitor

        # rank r trained on micro-batches a·W + r: view (accum, W, micro, T), take column r
        mine = x.view(-1, d.world_size, micro, x.shape[-1])[:, d.rank]
        with OutlierMonitor(raw) as mon, torch.no_grad(), amp():
            for xb in mine:
                raw(xb.to(d.device))
    else:
        mon = monitor
    res = mon.results(all_reduce=d.enabled)
    summary = mon.summary(res)
    mon.reset()
    return {
        "kurtosis": {k: float(v["kurtosis"]) for k, v in res.items()},
        "mmr": {k: float(v["mmr"]) for k, v in res.items()},
        "cos_sim": {k: float(v["cos_sim"]) for k, v in res.items()},
        "kurtosis_mean": summary["kurtosis_mean"],
        "kurtosis_max": summary["kurtosis_max"],
    }


def _result(run: RunFolder, status: str, step: int, message: str, t_start: float,
            last: dict | None = None) -> RunResult:
    last = last or {}
    return RunResult(
        run_dir=run.path, status=status, step=step, message=message, loss=last.get("loss"),
        val_loss=last.get("val_loss"), kurtosis_mean=last.get("kurtosis_mean"),
        kurtosis_max=last.get("kurtosis_max"), tokens_per_s=last.get("tokens_per_s"),
        wall_s=time.perf_counter() - t_start,
    )
