"""GPU check: outlierlab's CUDA paths are correct, and how well a 124M-class GPT uses the card.

One prepared script for one H100/H200 in under 8 minutes, installation included
(``benchmarks/gpu_check.sh`` runs it, after installing the wheels ``benchmarks/gpu_wheels.sh``
put in ``.whl/`` and checking every runtime requirement of ``pyproject.toml``). Sections, each
with a time budget (a section that would overrun is skipped and reported as such), the
correctness ones first:

1. ``matmul``: the card's bf16 (and tf32) matmul ceiling, a large ``torch.matmul`` timed with
   CUDA events, beside the datasheet's dense bf16 peak (H100/H200: 989 TFLOP/s).
2. ``correctness``: one GPT, one batch; fp32 eager vs a float64 CPU reference, and bf16
   autocast, ``torch.compile`` (inductor; fp32 and bf16) vs fp32: loss and gradient norm
   within tolerance; then 30 AdamW steps (fp32, bf16 autocast, compiled bf16) from the same
   weights on the same batches: the loss curves agree and fall.
3. ``train_loop``: the real ``outlierlab.train.train`` on CUDA (``precision=bf16``,
   ``compile=true``) vs ``precision=fp32``: both finish, final losses agree.
4. ``ddp``: ``torchrun --nproc_per_node=2`` training on the one GPU (gloo: NCCL refuses two ranks
   on one device) against one process accumulating the same global batch: same final loss.
5. ``fsdp``: the same with ``train.parallel=fsdp`` (FSDP2, bf16 mixed precision policy on
   CUDA), against the same one process: final loss within bf16 tolerance, final weights
   exported.
6. ``throughput``: 12 × 768, T = 1024, vocab 50304 (GPT-2 small class) training steps
   (outlierlab GPT, registry AdamW, the trainer's ``TrainStep``: clipping, bf16 autocast)
   compiled and eager: tokens/s, MFU = tokens/s × ``model.flops_per_token()`` / the measured
   bf16 ceiling and / the datasheet peak (the headline). Goal MFU ≥ 40 %. Then the same size
   through the real training loop (``compile=true``, bytes corpus).
7. ``monitor``: monitor overhead on the GPU: eager steps with the monitor every step / every 10
   steps vs off, and compiled steps plus the loop's extra eager monitor forward every 10 steps.

Writes ``gpu_results.json`` and ``gpu_results.md`` to ``$OUT`` if set, else to ``benchmarks/``
(a dry run: ``gpu_results_dry.*`` to ``$OUT`` or a temporary folder), after every section, so a
time-out keeps what was measured.
Exit status 1 if any correctness check fails (or errors), else 0. ``--dry-run`` runs every code
path on the CPU with tiny sizes (compile with the ``eager`` backend) to check the script itself.

    python benchmarks/gpu_check.py [--dry-run] [--budget 540]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

import torch  # noqa: E402

import _common  # noqa: E402

NOMINAL_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, datasheet


# ================================================================ bookkeeping
class GpuReport:
    """Sections, checks and figures of one GPU check; written as JSON and Markdown."""

    def __init__(self, t_start: float, budget: float, dry: bool) -> None:
        self.t0, self.budget, self.dry = t_start, budget, dry
        self.data: dict = {"sections": {}, "checks": []}

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.t0)

    def check(self, name: str, value: float, limit: float, detail: str = "") -> bool:
        ok = math.isfinite(value) and value <= limit
        self.data["checks"].append({"name": name, "value": value, "limit": limit, "ok": ok,
                                    "detail": detail})  # fmt: skip
        print(f"  [{'ok' if ok else 'FAIL'}] {name}: {value:.3g} (limit {limit:g}) {detail}",
              flush=True)  # fmt: skip
        return ok

    @contextlib.contextmanager
    def section(self, name: str, need_s: float, correctness: bool = False):
        """Run a section if ``need_s`` seconds are left; record its time and any error."""
        sec = self.data["sections"].setdefault(name, {})
        if self.left() < need_s:
            sec["status"] = f"skipped: {self.left():.0f} s left, needs ~{need_s:.0f} s"
            print(f"== {name}: {sec['status']}", flush=True)
            yield None
            return
        print(f"== {name} ({self.left():.0f} s left)", flush=True)
        t = time.perf_counter()
        try:
            yield sec
            sec.setdefault("status", "done")
        except Exception as exc:  # a broken section is reported, the rest still run
            sec["status"] = f"error: {type(exc).__name__}: {exc}"
            sec["traceback"] = traceback.format_exc()
            print(sec["traceback"], flush=True)
            if correctness:
                self.data["checks"].append({"name": f"{name} ran", "ok": False,
                                            "detail": sec["status"]})  # fmt: skip
        finally:
            sec["seconds"] = round(time.perf_counter() - t, 1)
            self.write()  # after every section: a time-out keeps what was measured

    @property
    def failed(self) -> list[dict]:
        return [c for c in self.data["checks"] if not c["ok"]]

    def write(self) -> Path:
        if os.environ.get("OUT"):
            out = Path(os.environ["OUT"])
        elif self.dry:  # a dry run's figures are not results: keep them out of the checkout
            self._dry_out = getattr(self, "_dry_out", None) or Path(
                tempfile.mkdtemp(prefix="gpu-check-dry-"))
            out = self._dry_out
        else:
            out = HERE
        out.mkdir(parents=True, exist_ok=True)
        self.data["wall_s"] = round(time.perf_counter() - self.t0, 1)
        self.data["correct"] = not self.failed
        name = "gpu_results_dry" if self.dry else "gpu_results"
        (out / f"{name}.json").write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        (out / f"{name}.md").write_text(self.markdown())
        return out / f"{name}.md"

    def markdown(self) -> str:
        d = self.data
        lines = [f"# GPU check{' (dry run on CPU)' if self.dry else ''}", "",
                 " | ".join(f"{k}={v}" for k, v in d.get("machine", {}).items()), "",
                 "## Correctness", "", "| check | value | limit | ok |", "|---|---|---|---|"]
        for c in d["checks"]:
            v = c.get("value")
            lines.append(f"| {c['name']} {c.get('detail', '')} | "
                         f"{'' if v is None else f'{v:.3g}'} | {c.get('limit', '')} | "
                         f"{'yes' if c['ok'] else 'NO'} |")  # fmt: skip
        lines += ["", "## Figures", "", "| section | figure | value |", "|---|---|---|"]
        for s, sec in d["sections"].items():
            for k, v in sec.items():
                if k in ("traceback",):
                    continue
                lines.append(f"| {s} | {k} | {v:.4g} |" if isinstance(v, float)
                             else f"| {s} | {k} | {v} |")  # fmt: skip
        lines += ["", f"wall {d.get('wall_s')} s; correct: {d.get('correct')}", ""]
        return "\n".join(lines)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def autocast(dev: torch.device, on: bool):
    if not on:
        return contextlib.nullcontext()
    return torch.autocast(device_type=dev.type, dtype=torch.bfloat16)


def compile_fn(dry: bool):
    """``torch.compile`` (inductor) on the GPU; the ``eager`` backend in a dry run (the
    dynamo path without minutes of CPU code generation)."""
    return (lambda m: torch.compile(m, backend="eager")) if dry else torch.compile


# ================================================================ 1. matmul ceiling
def matmul_tflops(dev: torch.device, dtype: torch.dtype, n: int, iters: int) -> float:
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(dev)
    if dev.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            a @ b
        end.record()
        sync(dev)
        sec = start.elapsed_time(end) / 1e3
    else:
        t = time.perf_counter()
        for _ in range(iters):
            a @ b
        sec = time.perf_counter() - t
    return 2 * n**3 * iters / sec / 1e12


# ================================================================ model helpers
def make_model(dev, n_layer, d_model, n_head, seq_len, vocab, seed=0):
    from outlierlab.model import GPT, GPTConfig

    torch.manual_seed(seed)
    cfg = GPTConfig.preset("pre-ln", n_layer=n_layer, d_model=d_model, n_head=n_head,
                           seq_len=seq_len, vocab_size=vocab)  # fmt: skip
    return GPT(cfg).to(dev)


def adamw(model, lr=1e-3):
    from outlierlab.optim import OptimConfig, build_optimizer

    return build_optimizer(model, OptimConfig(name="adamw", lr=lr))


def loss_and_gradnorm(net, x, y, dev, bf16: bool) -> tuple[float, float]:
    for p in net.parameters():
        p.grad = None
    with autocast(dev, bf16):
        _, loss = net(x, y)
    loss.backward()
    params = [p for p in net.parameters() if p.grad is not None]
    gn = torch.linalg.vector_norm(torch.stack([p.grad.float().norm() for p in params]))
    return float(loss), float(gn)


# ================================================================ 2. correctness
def correctness(rep: GpuReport, sec: dict, dev, dry: bool) -> None:
    L, d, h, T, V, B = (2, 64, 2, 64, 257, 4) if dry else (4, 256, 4, 256, 4096, 8)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
    model = make_model(dev, L, d, h, T, V)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, V, (B, T), generator=g).to(dev)
    y = torch.randint(0, V, (B, T), generator=g).to(dev)

    ref = copy.deepcopy(model).double().cpu()
    l64, g64 = loss_and_gradnorm(ref, x.cpu(), y.cpu(), torch.device("cpu"), False)
    l32, g32 = loss_and_gradnorm(model, x, y, dev, False)
    sec.update(loss_fp64=l64, loss_fp32=l32)
    rep.check("fp32 loss vs fp64 (rel)", rel(l32, l64), 1e-4)
    rep.check("fp32 grad norm vs fp64 (rel)", rel(g32, g64), 1e-3)
    lbf, gbf = loss_and_gradnorm(model, x, y, dev, True)
    sec["loss_bf16"] = lbf
    rep.check("bf16 autocast loss vs fp32 (rel)", rel(lbf, l32), 1e-2)
    rep.check("bf16 autocast grad norm vs fp32 (rel)", rel(gbf, g32), 5e-2)
    if dev.type == "cuda":  # what the training loop uses on CUDA
        torch.set_float32_matmul_precision("high")
    compiled = compile_fn(dry)(model)
    lc, gc = loss_and_gradnorm(compiled, x, y, dev, False)
    sec["loss_compiled_fp32"] = lc
    rep.check("compiled fp32 (tf32) loss vs fp32 (rel)", rel(lc, l32), 2e-3)
    rep.check("compiled fp32 (tf32) grad norm vs fp32 (rel)", rel(gc, g32), 2e-2)
    lcb, gcb = loss_and_gradnorm(compiled, x, y, dev, True)
    sec["loss_compiled_bf16"] = lcb
    rep.check("compiled bf16 loss vs fp32 (rel)", rel(lcb, l32), 1e-2)
    rep.check("compiled bf16 grad norm vs fp32 (rel)", rel(gcb, g32), 5e-2)

    # 30 AdamW steps on 4 batches cycled (the model memorises them, so the loss falls)
    steps = 10 if dry else 30
    batches = [(torch.randint(0, V, (B, T), generator=g).to(dev),) for _ in range(4)]
    batches = [(b[0][:, :-1].contiguous(), b[0][:, 1:].contiguous()) for b in batches]
    curves = {}
    for name, bf16, comp in (("fp32", False, False), ("bf16", True, False),
                             ("compiled_bf16", True, True)):  # fmt: skip
        m = copy.deepcopy(model)
        step = train_step(m, adamw(m, lr=3e-3), dev, bf16, net=compile_fn(dry)(m) if comp else m)
        curve = [step(*batches[i % 4]).loss for i in range(steps)]
        curves[name] = curve
    sec["curves"] = {k: [round(v, 4) for v in c[:: max(1, steps // 10)]] + [round(c[-1], 4)]
                     for k, c in curves.items()}  # fmt: skip
    ref_c = curves["fp32"]
    rep.check("fp32 training: final / first loss", ref_c[-1] / ref_c[0], 0.95)
    for name in ("bf16", "compiled_bf16"):
        dev_max = max(rel(a, b) for a, b in zip(curves[name], ref_c))
        rep.check(f"{name} training curve vs fp32 (max rel)", dev_max, 3e-2, f"{steps} steps")


# ================================================================ 3. the real training loop
def loop_config(size, dev, out, precision, compile_, steps, batch, kurt_every=0):
    from outlierlab import config

    L, d, h, T = size
    return config.load("default", overrides=[
        f"model.n_layer={L}", f"model.d_model={d}", f"model.n_head={h}", f"model.seq_len={T}",
        f"train.batch_size={batch}", f"train.steps={steps}", "train.eval_every=0",
        "train.ckpt_every=0", "train.eval_windows=4", "train.log_every=10",
        f"log.kurtosis_every={kurt_every}", f"train.device={dev.type}",
        f"train.precision={precision}", f"train.compile={str(compile_).lower()}", f"out={out}",
        "optim.warmup=0",
    ])  # fmt: skip


def train_loop(rep: GpuReport, sec: dict, dev, dry: bool, tmp: Path) -> None:
    from outlierlab.train import train

    size = (2, 64, 2, 64) if dry else (4, 256, 4, 256)
    steps = 10 if dry else 40
    runs = {"fp32": ("fp32", False), "bf16_compiled": ("bf16", not dry)}
    if dry:  # CPU inductor takes minutes; the dry run checks bf16 autocast through the loop
        runs["bf16_compiled"] = ("bf16", False)
    res = {}
    for name, (prec, comp) in runs.items():
        torch.manual_seed(0)
        r = train(loop_config(size, dev, tmp / name, prec, comp, steps, 8, kurt_every=10),
                  progress=False)  # fmt: skip
        res[name] = r
        sec[f"{name}_status"] = r.status
        sec[f"{name}_loss"] = r.loss
        sec[f"{name}_kurtosis_mean"] = r.kurtosis_mean
    ok = all(r.status == "finished" for r in res.values())
    rep.check("train loop runs finished (0 = yes)", 0.0 if ok else 1.0, 0.0)
    rep.check("train loop bf16+compile final loss vs fp32 (rel)",
              rel(res["bf16_compiled"].loss, res["fp32"].loss), 5e-2, f"{steps} steps")


# ================================================================ 4. throughput and MFU
def train_step(model, opt, dev, bf16: bool, net=None):
    """The training loop's own step (``outlierlab.train.TrainStep``: forward, backward, global
    norm clipping at 1.0, finiteness check, update) on ``model``; ``net`` runs the forward
    (e.g. ``model`` compiled). ``step(x, y).loss`` is the loss as a float."""
    from outlierlab.train import TrainStep

    return TrainStep(model, opt, net=net, clip=1.0, dtype=torch.bfloat16 if bf16 else None)


def throughput(rep: GpuReport, sec: dict, dev, dry: bool, peak_tflops: float,
               datasheet_tflops: float | None = None) -> dict:
    L, d, h, T, V, B = (2, 64, 2, 64, 257, 4) if dry else (12, 768, 12, 1024, 50304, 16)
    warm, n = (2, 3) if dry else (5, 20)
    model = make_model(dev, L, d, h, T, V)
    opt = adamw(model)
    fpt = model.flops_per_token(T)
    sec.update(shape=f"{L}x{d}, T={T}, B={B}, vocab={V}", params=model.num_params(),
               flops_per_token=fpt)  # fmt: skip
    g = torch.Generator().manual_seed(2)
    data = []  # four (x, y) batches, contiguous, rotated through
    for _ in range(4):
        w = torch.randint(0, V, (B, T + 1), generator=g)
        data.append((w[:, :-1].contiguous().to(dev), w[:, 1:].contiguous().to(dev)))
    out = {}
    for name, comp in (("compiled", True), ("eager", False)):
        net = compile_fn(dry)(model) if comp else model
        step = train_step(model, opt, dev, bf16=True, net=net)
        t = time.perf_counter()
        for i in range(warm):
            step(*data[i % 4])
        sync(dev)
        sec[f"{name}_warmup_s"] = round(time.perf_counter() - t, 1)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        for i in range(n):
            loss = step(*data[i % 4]).loss
        sync(dev)
        sec_per_step = (time.perf_counter() - t) / n
        tps = B * T / sec_per_step
        mfu = tps * fpt / (peak_tflops * 1e12)
        sec[f"{name}_tokens_per_s"] = round(tps)
        sec[f"{name}_ms_per_step"] = round(1e3 * sec_per_step, 2)
        sec[f"{name}_mfu"] = round(mfu, 4)
        if datasheet_tflops:  # MFU as usually quoted: of the card's dense bf16 datasheet peak
            sec[f"{name}_mfu_datasheet"] = round(tps * fpt / (datasheet_tflops * 1e12), 4)
        if dev.type == "cuda":
            sec[f"{name}_peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if not math.isfinite(float(loss)):
            rep.check(f"throughput {name} loss finite (0 = yes)", 1.0, 0.0)
        out[name] = (tps, mfu)
        print(f"  {name}: {tps:,.0f} tok/s, MFU {mfu:.1%} of measured bf16 peak"
              + (f", {sec[f'{name}_mfu_datasheet']:.1%} of the datasheet's"
                 if datasheet_tflops else ""), flush=True)  # fmt: skip
    sec["compile_speedup"] = round(out["compiled"][0] / out["eager"][0], 3)
    sec["mfu_goal_0.40_met"] = out["compiled"][1] >= 0.40
    if datasheet_tflops:
        sec["datasheet_bf16_tflops"] = datasheet_tflops
    return {"model": model, "opt": opt, "data": data, "shape": (L, d, h, T, V, B)}


def loop_throughput(rep: GpuReport, sec: dict, dev, dry: bool, peak_tflops: float,
                    tmp: Path, datasheet_tflops: float | None = None) -> None:  # fmt: skip
    """The 124M-class model through the real loop (bytes corpus, so vocab 257), compiled."""
    size, batch = ((2, 64, 2, 64), 4) if dry else ((12, 768, 12, 1024), 16)
    cfg = loop_config(size, dev, tmp / "loop-124m", "bf16", not dry, 1, batch)
    rounds, block = (1, 3) if dry else (2, 10)
    t = _common.LoopInterleaver({"loop": cfg}, block=block, rounds=rounds).run()
    from outlierlab.model import GPT

    fpt = GPT(cfg.model).flops_per_token()
    tps = block * batch * size[3] / min(t.seconds["loop"])
    if datasheet_tflops:
        sec["mfu_datasheet"] = round(tps * fpt / (datasheet_tflops * 1e12), 4)
    sec.update(shape=f"{size[0]}x{size[1]}, T={size[3]}, B={batch}, vocab 257 (bytes)",
               tokens_per_s=round(tps), mfu=round(tps * fpt / (peak_tflops * 1e12), 4),
               block_seconds=[round(s, 3) for s in t.seconds["loop"]])  # fmt: skip
    print(f"  train loop: {tps:,.0f} tok/s, MFU {sec['mfu']:.1%}", flush=True)


# ================================================================ 5. monitor overhead
def monitor_overhead(rep: GpuReport, sec: dict, dev, dry: bool, st: dict) -> None:
    from outlierlab.measuring import MeasureEvery

    model, opt, data = st["model"], st["opt"], st["data"]
    block, rounds = (3, 1) if dry else (10, 3)
    eager = train_step(model, opt, dev, bf16=True)
    compiled = train_step(model, opt, dev, bf16=True, net=compile_fn(dry)(model))

    def run(step, every: int, replay: bool = False):
        """``block`` steps measured as the Trainer measures: steps s (1-based) with
        ``s % every == 0``, hooked throughout or (``replay``, as with compile) only for an extra
        eager no-grad forward after the update."""

        def go():
            m = MeasureEvery(every)
            if every and not replay:
                m.open(model)
            for i in range(block):
                x, y = data[i % 4]
                m.begin_step(i + 1)
                step(x, y)
                if replay and m.due(i + 1):
                    m.open(model)
                    m.begin_step(i + 1)
                    with torch.no_grad(), autocast(dev, True):
                        model(x)
                m.end_step()
                if replay:
                    m.close()
            m.close()
            sync(dev)

        return go

    t = _common.interleave({
        "eager_off": run(eager, 0), "eager_every1": run(eager, 1),
        "eager_every10": run(eager, 10),
        "compiled_off": run(compiled, 0), "compiled_every10": run(compiled, 10, True),
    }, rounds, warmup=1)  # fmt: skip
    for k in ("eager_every1", "eager_every10"):
        sec[f"{k}_slowdown"] = round(t.ratio(k, "eager_off") - 1, 4)
    sec["compiled_every10_slowdown"] = round(t.ratio("compiled_every10", "compiled_off") - 1, 4)
    sec["block_steps"] = block
    print(f"  monitor slowdown: eager every step {sec['eager_every1_slowdown']:+.1%}, every 10 "
          f"{sec['eager_every10_slowdown']:+.1%}; compiled + extra eager forward every 10 "
          f"{sec['compiled_every10_slowdown']:+.1%}", flush=True)


# ================================================================ 6. DDP over two processes
def _one_vs_two_ranks(sec: dict, common: list[str], tmp: Path, name: str) -> tuple[dict, dict]:
    """Train ``common`` as one process accumulating 2 micro-batches (``TMP/NAME1``) and as
    ``torchrun --nproc_per_node=2`` on the one device over gloo (``TMP/NAME2``); times and exit
    codes into ``sec``; the last loss row of each."""
    import subprocess

    env = {**os.environ, "OUTLIERLAB_DIST_BACKEND": "gloo", "OMP_NUM_THREADS": "1"}
    one = [sys.executable, "-m", "outlierlab", "train", *common, "train.grad_accum=2",
           f"out={tmp / f'{name}1'}"]  # fmt: skip
    two = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "outlierlab", "train", *common, f"out={tmp / f'{name}2'}"]  # fmt: skip
    for label, cmd in (("one_process", one), ("two_ranks", two)):
        t = time.perf_counter()
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
        sec[f"{label}_s"] = round(time.perf_counter() - t, 1)
        sec[f"{label}_rc"] = r.returncode
        if r.returncode:
            print(r.stdout[-2000:], r.stderr[-3000:], flush=True)
    rows = []
    for run in (f"{name}1", f"{name}2"):
        lines = (tmp / run / "metrics.jsonl").read_text().splitlines()
        rows.append([json.loads(x) for x in lines if '"loss"' in x][-1])
    sec["loss_one_process"], sec["loss_two_ranks"] = rows[0]["loss"], rows[1]["loss"]
    return rows[0], rows[1]


def ddp(rep: GpuReport, sec: dict, dev, dry: bool, tmp: Path) -> None:
    """``torchrun --nproc_per_node=2 -m outlierlab train`` on one device (two ranks on one GPU
    over gloo, which NCCL refuses), against one process with the same global batch through
    gradient accumulation: the same final loss (the trainer's DDP contract)."""
    steps = 6 if dry else 20
    common = ["--preset", "tiny", f"train.steps={steps}", "train.eval_every=0",
              "train.ckpt_every=0", "train.batch_size=8", "log.kurtosis_every=2",
              f"train.device={'cpu' if dev.type == 'cpu' else 'cuda:0'}",
              "train.precision=fp32", "optim.warmup=0"]  # fmt: skip
    one, two = _one_vs_two_ranks(sec, common, tmp, "ddp")
    rep.check("DDP 2 ranks vs 1 process (accumulation): final loss (rel)",
              rel(two["loss"], one["loss"]), 1e-4, f"{steps} steps")


# ================================================================ 7. FSDP over two processes
def fsdp(rep: GpuReport, sec: dict, dev, dry: bool, tmp: Path) -> None:
    """``train.parallel=fsdp`` on two ranks on the one device (gloo; on CUDA with bf16, the
    FSDP2 mixed precision policy) against one process (not sharded) accumulating the same
    global batch: the same final loss (bf16: to 2 %), final weights exported at the root."""
    steps = 6 if dry else 20
    prec = "fp32" if dry else "bf16"
    common = ["--preset", "tiny", f"train.steps={steps}", "train.eval_every=0",
              "train.ckpt_every=3" if dry else "train.ckpt_every=10", "train.batch_size=8",
              "log.kurtosis_every=2", "train.parallel=fsdp",
              f"train.device={'cpu' if dev.type == 'cpu' else 'cuda:0'}",
              f"train.precision={prec}", "optim.warmup=0"]  # fmt: skip
    one, two = _one_vs_two_ranks(sec, common, tmp, "fsdp")
    sec["dcp_files"] = len(list((tmp / "fsdp2" / "checkpoints").glob("step-*/dcp/*.distcp")))
    rep.check(f"FSDP 2 ranks vs 1 process (accumulation, {prec}): final loss (rel)",
              rel(two["loss"], one["loss"]), 1e-4 if dry else 2e-2,
              f"{steps} steps")  # fmt: skip
    exported = (tmp / "fsdp2" / "model.safetensors").is_file()
    rep.check("FSDP final weights exported (0 = yes)", 0.0 if exported else 1.0, 0.0)


# ================================================================ main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: check the script")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for all sections (default 420: gpu_check.sh ≤ 8 minutes in "
                        "all; 1100 with --dry-run, CPU)")
    args = p.parse_args(argv)
    if args.budget is None:
        args.budget = 1100.0 if args.dry_run else 420.0
    t_start = time.perf_counter()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    dry = args.dry_run
    rep = GpuReport(t_start, args.budget, dry)
    if not dry and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --dry-run to check the script on a CPU)")
        rep.data["checks"].append({"name": "CUDA available", "ok": False, "detail": ""})
        rep.write()
        return 1
    dev = torch.device("cpu" if dry else "cuda")
    name = torch.cuda.get_device_name(0) if dev.type == "cuda" else platform.processor() or "cpu"
    rep.data["machine"] = {"device": name, "torch": torch.__version__,
                           "python": platform.python_version(),
                           "date": _common.machine()["date"]}  # fmt: skip
    if dev.type == "cuda":
        rep.data["machine"]["cuda"] = torch.version.cuda
        rep.data["machine"]["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    print(" | ".join(f"{k}={v}" for k, v in rep.data["machine"].items()), flush=True)
    if dry:
        _common.set_threads(None)
    cache = tempfile.mkdtemp(prefix="outlierlab-gpu-cache-")
    os.environ.setdefault("OUTLIERLAB_CACHE", cache)  # a bare machine: build the corpus here
    peak = float("nan")
    nominal = next((v for k, v in NOMINAL_BF16_TFLOPS.items() if k in name), None)
    if dry:  # the dry run exercises the datasheet path with a made-up CPU "peak"
        nominal = 1.0
    st = None
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp_s:
        tmp = Path(tmp_s)
        with rep.section("matmul", 10) as sec:
            if sec is not None:
                n, iters = (256, 5) if dry else (8192, 30)
                peak = matmul_tflops(dev, torch.bfloat16, n, iters)
                sec["bf16_tflops"] = float(f"{peak:.4g}")
                if dev.type == "cuda":
                    torch.backends.cuda.matmul.allow_tf32 = True
                    sec["tf32_tflops"] = float(f"{matmul_tflops(dev, torch.float32, n, iters):.4g}")
                    torch.backends.cuda.matmul.allow_tf32 = False
                if nominal:
                    sec["bf16_of_datasheet"] = round(peak / nominal, 3)
                print(f"  bf16 matmul: {peak:.1f} TFLOP/s", flush=True)
        with rep.section("correctness", 90, correctness=True) as sec:
            if sec is not None:
                correctness(rep, sec, dev, dry)
        with rep.section("train_loop", 120, correctness=True) as sec:
            if sec is not None:
                train_loop(rep, sec, dev, dry, tmp)
        with rep.section("ddp", 60, correctness=True) as sec:
            if sec is not None:
                ddp(rep, sec, dev, dry, tmp)
        with rep.section("fsdp", 60, correctness=True) as sec:
            if sec is not None:
                fsdp(rep, sec, dev, dry, tmp)
        with rep.section("throughput", 120) as sec:
            if sec is not None:
                st = throughput(rep, sec, dev, dry, peak, nominal)
        with rep.section("monitor", 60) as sec:
            if sec is not None and st is None:
                sec["status"] = "skipped: no throughput model"
            elif sec is not None:
                monitor_overhead(rep, sec, dev, dry, st)
        st = None
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        with rep.section("train_loop_throughput", 120) as sec:
            if sec is not None:
                loop_throughput(rep, sec, dev, dry, peak, tmp, nominal)
    path = rep.write()
    print(path.read_text())
    bad = rep.failed
    print(f"correctness: {'FAILED ' + ', '.join(c['name'] for c in bad) if bad else 'ok'}")
    thr = rep.data["sections"].get("throughput", {})
    mfu = thr.get("compiled_mfu_datasheet", thr.get("compiled_mfu", float("nan")))
    print(f"ratio={mfu:.3f}" if isinstance(mfu, float) else "ratio=nan")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
