"""Where a sweep's points run: ``local`` (worker threads on this machine, each point's
``train``/``quantize`` a subprocess) or ``submitit`` (one cluster job per pending point through
`submitit <https://github.com/facebookincubator/submitit>`_: SLURM, or its local executor).

:func:`outlierlab.experiments.sweep.run_sweep` runs its ``run_point`` through either, so
skip-if-finished, resume, the folder lock and quantisation behave the same; the state lives in
the run folders, which a cluster's nodes must share with the submitting machine (the usual
shared file system). This module knows nothing of sweeps (no import of ``sweep``).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from outlierlab.errors import ConfigError

LAUNCHERS = ("local", "submitit")
SUBMITIT_FOLDER = ".submitit"
"""Job scripts, pickles and logs of a ``submitit`` sweep, under the sweep folder."""
T = TypeVar("T")
DEFAULT_TIMEOUT_MIN = 24 * 60
"""Job time limit unless ``timeout_min`` is given (submitit's own default is minutes)."""


def run_local(n: int, job: Callable[[int, Callable[[], bool], Callable[[str], None]], T], *,
              workers: int, echo: Callable[[str], None]) -> list[T]:
    """``[job(i, stop, say) for i in range(n)]`` on ``workers`` threads (each job's work is
    in subprocesses). On Ctrl-C ``stop()`` turns true, so nothing new starts, and running jobs
    are waited for (their subprocesses got the signal too and checkpoint)."""
    lock = threading.Lock()
    stop = threading.Event()

    def say(msg: str) -> None:
        with lock:
            echo(msg)

    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        return list(pool.map(lambda i: job(i, stop.is_set, say), range(n)))
    except KeyboardInterrupt:
        stop.set()
        say("interrupted: waiting for running runs to checkpoint; resume with the same command")
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def parse_params(items: list[str]) -> dict[str, str]:
    """``["key=value", ...]`` (``--launcher-param``) as a dict; a malformed item is refused."""
    params: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ConfigError(f"--launcher-param {item!r} is not allowed; allowed: KEY=VALUE, "
                              "e.g. slurm_partition=gpu or timeout_min=120")
        params[key.strip()] = value.strip()
    return params


def _typed(key: str, value: str) -> Any:
    """A parameter's value as submitit wants it: the type submitit declares for its shared
    parameters, else an int, float or bool when it reads as one, else the string."""
    import submitit

    declared = submitit.AutoExecutor._typed_parameters().get(key)
    if declared is str:
        return value
    if declared is bool or value.lower() in ("true", "false"):
        if value.lower() not in ("true", "false"):
            raise ConfigError(f"--launcher-param {key}={value} is not allowed; allowed: "
                              "true or false")
        return value.lower() == "true"
    for kind in (int, float):
        try:
            v = kind(value)
        except ValueError:
            continue
        if declared is int and kind is float:
            break
        return v
    if declared in (int, float):
        raise ConfigError(f"--launcher-param {key}={value} is not allowed; allowed: "
                          f"{'an integer' if declared is int else 'a number'}")
    return value


def submitit_executor(out: str | Path, params: dict[str, str],
                      name: str = "outlierlab-sweep") -> Any:
    """A submitit ``AutoExecutor`` writing under ``OUT/.submitit``, with ``params`` (strings from
    the command line) as executor parameters; ``cluster`` (``slurm``, ``local``, ``debug``)
    picks the executor, else submitit detects SLURM. A bad parameter is a :class:`ConfigError`
    naming it."""
    try:
        import submitit
    except ImportError:
        raise ConfigError("--launcher submitit needs the submitit package; install it with "
                          "pip install 'outlierlab[cluster]'") from None
    made = [d for d in (Path(out), Path(out) / SUBMITIT_FOLDER) if not d.exists()]
    try:
        return _executor(submitit, Path(out) / SUBMITIT_FOLDER / "%j", dict(params), name)
    except ConfigError:
        for d in reversed(made):  # submitit makes its folder at once: leave nothing behind
            with contextlib.suppress(OSError):
                d.rmdir()  # only if still empty
        raise


def _executor(submitit: Any, folder: Path, params: dict[str, str], name: str) -> Any:
    cluster = params.pop("cluster", None)
    try:
        executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    except (ValueError, RuntimeError) as e:
        raise ConfigError(f"--launcher submitit: {str(e).splitlines()[0]}; allowed clusters: "
                          "slurm (detected when sbatch is on PATH), local, debug") from None
    typed = {k: _typed(k, v) for k, v in params.items()}
    typed.setdefault("timeout_min", DEFAULT_TIMEOUT_MIN)
    typed.setdefault("name", name)
    try:
        executor.update_parameters(**typed)
    except (NameError, AssertionError, TypeError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"--launcher-param: {first}; allowed: submitit's shared parameters "
                          "(timeout_min, mem_gb, nodes, cpus_per_task, gpus_per_node, "
                          "tasks_per_node, name) or ones prefixed by the executor, e.g. "
                          "slurm_partition") from None
    return executor


@dataclass
class JobResult:
    """One submitted call: its job id and log, and what it returned or why it failed."""

    job_id: str
    log: str
    value: Any = None
    error: str = ""


def run_submitit(executor: Any, calls: list[tuple[str, Callable[..., Any], tuple, dict]], *,
                 echo: Callable[[str], None]) -> list[JobResult]:
    """Submit each ``(tag, fn, args, kwargs)`` as one job (a job array on SLURM), wait for
    all, and return their results in order; a job that dies (time limit, pre-emption, an
    exception) gives its error's last line instead of a value."""
    if not calls:
        return []
    with executor.batch():
        jobs = [executor.submit(fn, *args, **kwargs) for _, fn, args, kwargs in calls]
    for (tag, *_), j in zip(calls, jobs):
        echo(f"{tag}: submitted as job {j.job_id} (log: {j.paths.stdout})")
    results = []
    try:
        for (tag, *_), j in zip(calls, jobs):
            r = JobResult(str(j.job_id), str(j.paths.stdout))
            try:
                r.value = j.result()
            except Exception as e:  # the job died; the caller reads the run folder
                r.error = (str(e).strip().splitlines() or [type(e).__name__])[-1]
            echo(f"{tag}: job {r.job_id} {'failed: ' + r.error if r.error else 'done'}")
            results.append(r)
    except KeyboardInterrupt:
        echo("interrupted: submitted jobs keep running "
             f"({', '.join(str(j.job_id) for j in jobs)}); re-run the same command to "
             "collect them (a point whose job still runs is skipped as in use)")
        raise
    return results
