"""Run a :class:`~outlierlab.experiments.grid.Grid`: each point an ordinary
``python -m outlierlab train`` subprocess in its own folder, then ``outlierlab quantize`` for
each of the grid's schemes.

State is read from each run folder (docs/ARCHITECTURE.md), so a sweep can be re-run at any
time: finished runs are skipped, interrupted or crashed ones resumed (``--resume``), diverged
ones kept as results; quantisation results newer than the final weights are kept. Nothing is
shared between runs but the output folder, so ``--dry-run``'s commands can go to any scheduler.
``workers`` runs that many points at once, each with ``OMP_NUM_THREADS = cores // workers``
(or ``threads``); ``launcher="submitit"`` makes each pending point a cluster job instead
(:mod:`outlierlab.experiments.launch`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from outlierlab import config
from outlierlab.errors import ConfigError, RunFolderError
from outlierlab.experiments import launch
from outlierlab.experiments.grid import Grid, GridPoint, check_grid
from outlierlab.fields import flatten
from outlierlab.jsonable import write_json
from outlierlab.run_folder import RunFolder, utc_now

MANIFEST = "sweep.json"
"""The manifest of a whole grid; a part's is ``sweep-<part>.json`` (:attr:`Grid.manifest`)."""


def run_state(run_dir: Path) -> str:
    """``new``, ``finished``, ``diverged`` or ``resume`` (interrupted, crashed or stale)."""
    run = RunFolder(run_dir)
    if not run.is_run:
        return "new"
    status = _status(run_dir)
    if status == "finished" and run.final_model:
        return "finished"
    if status == "diverged":
        return "diverged"
    return "resume"


RESOLVED_AT_RUN = frozenset({"out", "model.vocab_size"})
"""Config fields a run fills in itself (its folder; the tokenizer's vocabulary size): not part
of a point's identity (:func:`settings_mismatch`)."""


def settings_mismatch(grid: Grid, point: GridPoint, run_dir: Path) -> list[str]:
    """How the run already in ``run_dir`` differs from ``point`` (``field: stored ≠ wanted``),
    [] when it is the same run or the folder holds none. The point is resolved as ``outlierlab
    train`` would; a field the stored config lacks (written before the field existed) is not
    counted."""
    run = RunFolder(run_dir)
    if not run.is_run or not run.config_file.is_file():
        return []
    try:
        have = flatten(json.loads(run.config_file.read_text()))
    except (OSError, ValueError) as exc:
        return [f"config.json unreadable ({exc})"]
    want = flatten(config.load(grid.preset, None, point.args()).to_dict())
    return [f"{k}: {have[k]!r} ≠ {want[k]!r}" for k in sorted(want)
            if k in have and k not in RESOLVED_AT_RUN and have[k] != want[k]]


def check_folders(grid: Grid, out: Path) -> None:
    """:class:`ConfigError` when a run folder a point would reuse holds a run of other settings
    (an older version of the grid, another grid's run of the same name): the sweep would skip
    or resume it as if it were that point."""
    bad = [(p.name, diff) for p in grid.points
           if (diff := settings_mismatch(grid, p, out / p.name))]
    if bad:
        name, diff = bad[0]
        more = f" (and {len(bad) - 1} more run(s))" if len(bad) > 1 else ""
        raise ConfigError(f"{out / name} holds a run of other settings than the grid's point "
                          f"{name}: {'; '.join(diff[:3])}{more}; allowed: an output folder "
                          "without such runs (choose another --out, or move them away)")


def train_command(grid: Grid, point: GridPoint, run_dir: Path, python: str,
                  resume: bool = False) -> list[str]:
    """The exact ``outlierlab train`` command of one point; a resumed run takes its config
    from its own ``config.json``."""
    cmd = [python, "-m", "outlierlab", "train"]
    if resume:
        return [*cmd, "--resume", str(run_dir)]
    if grid.preset:
        cmd += ["--preset", grid.preset]
    return cmd + point.args() + [f"out={run_dir}"]


def quant_path(run_dir: Path, scheme: str) -> Path:
    return RunFolder(run_dir).quant_file(scheme)


def quant_command(run_dir: Path, scheme: str, python: str,
                  extra: tuple[str, ...] = ()) -> list[str]:
    """The exact ``outlierlab quantize`` command writing ``RUN_DIR/quant/<scheme>.json``; a
    scheme without a rotation also gets ``--predictors`` (the per-block predictor table the
    report gathers across runs, :mod:`outlierlab.experiments.predictors`; about a second)."""
    from outlierlab.quant import scheme as scheme_config

    pred = ["--predictors"] if scheme_config(scheme).rotation is None else []
    return [python, "-m", "outlierlab", "quantize", str(run_dir), "--scheme", scheme,
            *extra, *pred, "--json", str(quant_path(run_dir, scheme))]


def quant_done(run_dir: Path, scheme: str) -> bool:
    """A result newer than the final weights exists (and is not of the scheme's old meaning,
    :func:`outlierlab.run_folder.legacy_scheme`)."""
    run = RunFolder(run_dir)
    return _newer_than_weights(quant_path(run_dir, scheme), run) \
        and not run.is_legacy_quant(scheme)


def _newer_than_weights(result: Path, run: RunFolder) -> bool:
    """``result`` exists and is not older than the run's final weights (none: any result)."""
    w = run.model_file
    return result.is_file() and (not w.is_file() or result.stat().st_mtime >= w.stat().st_mtime)


def measure_command(run_dir: Path, python: str, extra: tuple[str, ...] = ()) -> list[str]:
    """The exact ``outlierlab measure`` command writing ``RUN_DIR/measure.json``."""
    return [python, "-m", "outlierlab", "measure", str(run_dir), "--save", *extra]


def measure_done(run_dir: Path) -> bool:
    """A ``measure.json`` newer than the final weights exists."""
    run = RunFolder(run_dir)
    return _newer_than_weights(run.measure_file, run)


@dataclass
class Outcome:
    """What the sweep did with one point."""

    name: str
    run_dir: str
    before: str
    """State found: new, finished, diverged, resume."""
    trained: bool = False
    status: str = ""
    """status.json after the sweep."""
    train_s: float = 0.0
    quantized: list[str] = field(default_factory=list)
    quant_failed: list[str] = field(default_factory=list)
    quant_s: float = 0.0
    measured: bool | None = None
    """``measure --save`` succeeded (True), failed (False), or was not run (None)."""
    message: str = ""


@dataclass
class SweepSummary:
    out: Path
    outcomes: list[Outcome]
    wall_s: float
    manifest: str = MANIFEST
    """The manifest's file name in ``out``."""

    @property
    def trained(self) -> list[str]:
        return [o.name for o in self.outcomes if o.trained]

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes
                if o.status not in ("finished", "diverged") or o.quant_failed]

    @property
    def ok(self) -> bool:
        return not self.failed


def threads_env(workers: int, threads: int | None = None) -> dict[str, str]:
    """Thread settings for one of ``workers`` concurrent runs: ``threads``, or the cores split
    evenly."""
    n = str(threads or max(1, available_cores() // max(1, workers)))
    return {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n}


def available_cores() -> int:
    """Cores this process may run on (a cluster job's allocation, not the whole node)."""
    with contextlib.suppress(AttributeError, OSError):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def _status(run_dir: Path) -> str:
    try:
        status = RunFolder(run_dir).status
    except RunFolderError:
        return "unreadable"
    return str(status.get("status", "unknown")) if status else "missing"


def _run(cmd: list[str], run: RunFolder, env: dict[str, str]) -> int:
    """Run ``cmd`` with its output appended to the run's ``sweep.log``. On Ctrl-C the child
    (same process group, so it got the SIGINT too) is given a minute to checkpoint and exit."""
    with run.open_sweep_log() as f:
        f.write(f"\n$ {shlex.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env,
                                stdin=subprocess.DEVNULL)
        try:
            return proc.wait()
        except KeyboardInterrupt:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise


def dry_run_lines(grid: Grid, out: Path, python: str, quantize: bool = True) -> list[str]:
    """One line per pending run: its train command, then ``&&`` its quantize commands; runs
    with nothing left to do appear as ``# skip`` comments."""
    lines = []
    for p in grid.points:
        d = out / p.name
        state = run_state(d)
        cmds = []
        if state in ("new", "resume"):
            cmds.append(train_command(grid, p, d, python, resume=state == "resume"))
        if quantize and state != "diverged":
            cmds += [quant_command(d, s, python, grid.quant_args) for s in grid.schemes
                     if not quant_done(d, s)]
            if grid.measure_args is not None and not measure_done(d):
                cmds.append(measure_command(d, python, grid.measure_args))
        if cmds:
            lines.append(" && ".join(shlex.join(c) for c in cmds))
        else:
            lines.append(f"# skip {p.name} ({state})")
    return lines


def pending(grid: Grid, point: GridPoint, out: Path, quantize: bool = True) -> bool:
    """Whether ``point`` has anything left to do: training (new or resumable), or a
    quantisation scheme (or the ``[measure]`` result) not yet saved for a finished run."""
    d = out / point.name
    state = run_state(d)
    if state in ("new", "resume"):
        return True
    return quantize and state == "finished" and (
        not all(quant_done(d, s) for s in grid.schemes)
        or (grid.measure_args is not None and not measure_done(d)))


def run_point(grid: Grid, point: GridPoint, out: Path, *, tag: str = "", workers: int = 1,
              threads: int | None = None, quantize: bool = True, python: str | None = None,
              stop: Callable[[], bool] = lambda: False,
              echo: Callable[[str], None] = print) -> Outcome:
    """Everything the sweep does for one point, wherever it runs (a local worker thread or a
    cluster job): skip it if its folder is locked, train or resume it if unfinished, then
    quantise it (and measure it, when the grid has a ``[measure]`` table) if finished.
    Python and thread settings are resolved where it runs."""
    d = out / point.name
    state = run_state(d)
    o = Outcome(point.name, str(d), state)
    tag = tag or point.name
    python = python or sys.executable
    env = {**os.environ, **threads_env(workers, threads)}
    if stop():
        o.status, o.message = _status(d), "not started: sweep interrupted"
        return o
    if busy := _in_use(d):
        o.status, o.message = "in use", busy
        echo(f"{tag}: {busy}")
        return o
    if state in ("new", "resume"):
        echo(f"{tag}: {'resuming' if state == 'resume' else 'training'} "
             f"(log: {RunFolder(d).sweep_log})")
        d.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        rc = _run(train_command(grid, point, d, python, resume=state == "resume"),
                  RunFolder(d), env)
        o.trained, o.train_s = True, time.perf_counter() - t
        o.status = _status(d)
        if rc not in (0, 3) and o.status in ("finished", "diverged"):
            o.status = "crashed"
        if o.status not in ("finished", "diverged"):
            o.message = _failure(rc, RunFolder(d).sweep_log)
        echo(f"{tag}: {o.status} in {o.train_s:.0f} s")
    else:
        o.status = _status(d)
        echo(f"{tag}: {state}, not retrained")
    if quantize and o.status == "finished" and not stop():
        _quantize_point(grid, d, o, python, env)
        if o.quantized or o.quant_failed:
            bad = f", failed: {', '.join(o.quant_failed)}" if o.quant_failed else ""
            echo(f"{tag}: quantised {', '.join(o.quantized) or 'nothing'}{bad} "
                 f"in {o.quant_s:.0f} s")
        if grid.measure_args is not None and not measure_done(d) and not stop():
            rc = _run(measure_command(d, python, grid.measure_args), RunFolder(d), env)
            o.measured = rc == 0 and measure_done(d)
            echo(f"{tag}: measured" if o.measured else f"{tag}: measure failed "
                 f"(see {RunFolder(d).sweep_log})")
    return o


def run_sweep(grid: Grid, out: str | Path, *, workers: int = 1, threads: int | None = None,
              quantize: bool = True, python: str | None = None, launcher: str = "local",
              launcher_params: dict[str, str] | None = None,
              echo: Callable[[str], None] = print) -> SweepSummary:
    """Train (or resume) every pending point, then quantise every finished one; writes
    ``OUT/sweep.json`` and each run's output to ``RUN_DIR/sweep.log``. Every point is checked
    first (:func:`~outlierlab.experiments.grid.check_grid`): nothing runs if one is bad.

    ``launcher`` ``local`` runs ``workers`` points at once on this machine; ``submitit`` submits
    each pending point as a job through submitit (SLURM, or its local executor), with
    ``launcher_params`` for the executor (:mod:`outlierlab.experiments.launch`). Both run
    :func:`run_point` for every point. A part of a grid (``part_of``) writes
    ``OUT/sweep-<part>.json`` instead, so its sibling's manifest is kept."""
    if workers < 1:
        raise ConfigError(f"--workers {workers} is not allowed; allowed: an integer ≥ 1")
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads {threads} is not allowed; allowed: an integer ≥ 1")
    if launcher not in launch.LAUNCHERS:
        raise ConfigError(f"--launcher {launcher} is not allowed; allowed: "
                          f"{', '.join(launch.LAUNCHERS)}")
    params = dict(launcher_params or {})
    if launcher == "local" and params:
        raise ConfigError(f"--launcher-param {next(iter(params))} is not allowed with "
                          "--launcher local; allowed: only with --launcher submitit")
    check_grid(grid)
    out = Path(out)
    check_folders(grid, out)
    executor = (launch.submitit_executor(out, params, name=f"outlierlab-{grid.name}")
                if launcher == "submitit" else None)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    n = len(grid.points)

    def tag(i: int) -> str:
        return f"[{i + 1}/{n}] {grid.points[i].name}"

    kw = {"threads": threads, "quantize": quantize, "python": python}
    if executor is None:
        outcomes = launch.run_local(
            n, lambda i, stop, say: run_point(grid, grid.points[i], out, tag=tag(i),
                                              workers=workers, stop=stop, echo=say, **kw),
            workers=workers, echo=echo)
        where: dict[str, object] = {
            "workers": workers, "threads": int(threads_env(workers, threads)["OMP_NUM_THREADS"])}
    else:
        # points with nothing left to do are looked at here, as the local launcher does
        todo = [i for i, p in enumerate(grid.points) if pending(grid, p, out, quantize)]
        before = {i: run_state(out / grid.points[i].name) for i in todo}
        found = {i: run_point(grid, p, out, tag=tag(i), echo=echo, **kw)
                 for i, p in enumerate(grid.points) if i not in todo}
        results = launch.run_submitit(
            executor, [(tag(i), run_point, (grid, grid.points[i], out), {"tag": tag(i), **kw})
                       for i in todo], echo=echo)
        for i, r in zip(todo, results):
            d = out / grid.points[i].name
            found[i] = r.value if not r.error else Outcome(
                grid.points[i].name, str(d), before[i], status="job failed",
                message=f"job {r.job_id} failed ({r.error}); run folder {_status(d)}; "
                f"see {r.log}")
        outcomes = [found[i] for i in range(n)]
        where = {"workers": len(todo), "threads": threads, "launcher_params": params,
                 "jobs": {grid.points[i].name: r.job_id for i, r in zip(todo, results)}}
    summary = SweepSummary(out, outcomes, time.perf_counter() - t0, grid.manifest)
    manifest = {"grid": grid.to_dict(), "launcher": launcher, **where,
                "wall_s": summary.wall_s, "finished_at": utc_now(),
                "outcomes": [asdict(o) for o in outcomes]}
    write_json(out / grid.manifest, manifest)
    return summary


def _quantize_point(grid: Grid, d: Path, o: Outcome, python: str, env: dict[str, str]) -> None:
    """Run every scheme of ``grid`` not yet saved for the run ``d``; record the outcome in ``o``."""
    t = time.perf_counter()
    for s in grid.schemes:
        if quant_done(d, s):
            continue
        RunFolder(d).file_legacy_quant(s)  # an old w8a8-paper result keeps its new name
        rc = _run(quant_command(d, s, python, grid.quant_args), RunFolder(d), env)
        (o.quantized if rc == 0 and quant_path(d, s).is_file() else o.quant_failed).append(s)
    o.quant_s = time.perf_counter() - t


def _in_use(run_dir: Path) -> str:
    """Why a point is skipped when another process holds its run folder, else ''."""
    holder = RunFolder(run_dir).lock_holder()
    if holder is None:
        return ""
    return (f"skipped: in use by pid {holder.get('pid', '?')} "
            f"({holder.get('purpose', 'another process')})")


def _failure(rc: int, log: Path) -> str:
    """What a failed ``train`` said: its one-line error when refused (exit 2: in use, bad
    input), else where its log is."""
    lines = []
    if rc == 2:
        with contextlib.suppress(OSError):
            lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    error = next((ln.strip() for ln in reversed(lines) if ": error: " in ln), "")
    return error or f"train exited {rc}; see {log}"
