"""outlierlab's training step vs a plain nanoGPT-style PyTorch loop of the same size and maths.

A: ``outlierlab.train.Trainer.run_step()`` in this process, the loop body ``outlierlab train``
   runs (model, AdamW, lr schedule, grad clipping, finiteness checks, callbacks, metrics.jsonl
   every ``log_every`` steps, status.json; monitor off, no progress display, no eval or
   checkpoint inside the timed steps).
B: the plain loop below (~100 lines: model, get_batch, AdamW, clipping, cosine lr, a JSON log
   line every ``log_every`` steps) — what a user would write by hand.

Interleaving: one outlierlab step (``run_step``), then one plain-loop step, each timed, so A
and B alternate step by step, warm, on the same machine state within a second. Times are summed
over windows of ``window`` steps (default 10: one metrics.jsonl line per window); the headline
is the median over windows of tokens/s(A) / tokens/s(B), taken over the sizes (the worst size).

Before timing, a maths check: the plain model loaded with outlierlab's initial weights gives the
same loss and gradient norm on the same batch.

    python benchmarks/train_step.py [--quick] [--sizes S,M,L] [--profile]
"""

from __future__ import annotations

import json
import math
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import _common

SIZES = _common.SIZES  # name: (n_layer, d_model, n_head, seq_len, batch_size)
LR, BETAS, EPS, WD, CLIP, WARMUP = 3e-3, (0.9, 0.95), 1e-8, 0.1, 1.0, 0.1


# ================================================================ the plain loop (B), nanoGPT style
@dataclass
class PlainConfig:
    vocab_size: int
    n_layer: int
    d_model: int
    n_head: int
    seq_len: int


class PlainAttention(nn.Module):
    def __init__(self, c: PlainConfig):
        super().__init__()
        self.n_head = c.n_head
        self.qkv = nn.Linear(c.d_model, 3 * c.d_model, bias=False)
        self.proj = nn.Linear(c.d_model, c.d_model, bias=False)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        return self.proj(y.transpose(1, 2).contiguous().view(B, T, C))


class PlainBlock(nn.Module):
    def __init__(self, c: PlainConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(c.d_model, bias=False)
        self.ln2 = nn.LayerNorm(c.d_model, bias=False)
        self.attn = PlainAttention(c)
        self.fc = nn.Linear(c.d_model, 4 * c.d_model, bias=False)
        self.fc_proj = nn.Linear(4 * c.d_model, c.d_model, bias=False)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.fc_proj(F.relu(self.fc(self.ln2(x))))


class PlainGPT(nn.Module):
    def __init__(self, c: PlainConfig):
        super().__init__()
        self.wte = nn.Embedding(c.vocab_size, c.d_model)
        self.wpe = nn.Embedding(c.seq_len, c.d_model)
        self.blocks = nn.ModuleList(PlainBlock(c) for _ in range(c.n_layer))
        self.ln_f = nn.LayerNorm(c.d_model, bias=False)
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1)))
        for b in self.blocks:
            x = b(x)
        logits = self.lm_head(self.ln_f(x))
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


class PlainLoop:
    """model + AdamW (decay on 2-D non-embedding weights) + warm-up/cosine lr + clip + log."""

    def __init__(self, c: PlainConfig, data: np.ndarray, batch_size: int, steps: int, log):
        self.c, self.data, self.bs, self.steps, self.log = c, data, batch_size, steps, log
        self.model = PlainGPT(c)
        emb = {id(self.model.wte.weight), id(self.model.wpe.weight)}
        ps = list(self.model.parameters())
        decay = [p for p in ps if p.dim() >= 2 and id(p) not in emb]
        rest = [p for p in ps if not (p.dim() >= 2 and id(p) not in emb)]
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": WD}, {"params": rest, "weight_decay": 0.0}],
            lr=LR, betas=BETAS, eps=EPS,
        )  # fmt: skip
        self.it, self.t_log = 0, time.perf_counter()

    def get_batch(self):
        T = self.c.seq_len
        ix = torch.randint(len(self.data) - T, (self.bs,))
        x = torch.stack([torch.from_numpy(self.data[i : i + T].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(self.data[i + 1 : i + 1 + T].astype(np.int64))
                         for i in ix])  # fmt: skip
        return x, y

    def get_lr(self, it):
        warm = round(WARMUP * self.steps)
        if it < warm:
            return LR * (it + 1) / warm
        p = min((it - warm) / max(self.steps - warm, 1), 1.0)
        return LR * 0.5 * (1.0 + math.cos(math.pi * p))

    def step(self):
        lr = self.get_lr(self.it % self.steps)
        for g in self.opt.param_groups:
            g["lr"] = lr
        x, y = self.get_batch()
        _, loss = self.model(x, y)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), CLIP)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.it += 1
        if self.it % 10 == 0:  # log_every, like metrics.jsonl
            now = time.perf_counter()
            tps = 10 * self.bs * self.c.seq_len / (now - self.t_log)
            row = {"step": self.it, "loss": loss.item(), "lr": lr, "grad_norm": norm.item(),
                   "tokens_per_s": tps}  # fmt: skip
            self.log.write(json.dumps(row) + "\n")
            self.log.flush()
            self.t_log = now


# ================================================================ outlierlab (A) and the harness
def run_config(size: str, steps: int, out: Path, **train_overrides):
    """The default training preset at ``size``, monitor off, no eval/ckpt inside the run."""
    return _common.bench_config(
        size, out, f"train.steps={steps}", f"optim.lr={LR}",
        f"optim.betas={BETAS[0]},{BETAS[1]}", f"optim.eps={EPS}", f"optim.weight_decay={WD}",
        f"optim.grad_clip={CLIP}", f"optim.warmup={WARMUP}", "optim.schedule=cosine",
        "log.kurtosis_every=0", *(f"{k}={v}" for k, v in train_overrides.items()),
    )  # fmt: skip


def check_same_maths(cfg, data: np.ndarray) -> str:
    """Load outlierlab's initial weights into the plain model: same loss and grad norm."""
    from outlierlab.model import GPT

    torch.manual_seed(0)
    ol = GPT(cfg.model)
    m = cfg.model
    plain = PlainGPT(PlainConfig(m.vocab_size, m.n_layer, m.d_model, m.n_head, m.seq_len))
    a, b = list(ol.parameters()), list(plain.parameters())
    assert [p.shape for p in a] == [p.shape for p in b], "parameter layouts differ"
    with torch.no_grad():
        for p, q in zip(a, b):
            q.copy_(p)
    x = torch.from_numpy(data[: 4 * m.seq_len].astype(np.int64)).view(4, m.seq_len)
    y = torch.from_numpy(data[1 : 4 * m.seq_len + 1].astype(np.int64)).view(4, m.seq_len)
    norms, losses = [], []
    for net in (ol, plain):
        _, loss = net(x, y)
        loss.backward()
        losses.append(loss.item())
        norms.append(torch.nn.utils.clip_grad_norm_(net.parameters(), 1e9).item())
    dl, dn = abs(losses[0] - losses[1]), abs(norms[0] - norms[1]) / norms[0]
    if dl > 1e-5 or dn > 1e-4:
        raise SystemExit(f"maths differ: loss {losses}, grad norm {norms}")
    return f"|Δloss|={dl:.1e} rel|Δgrad_norm|={dn:.1e}"


def measure_size(size: str, rounds: int, window: int, warmup: int, tmp: Path) -> dict:
    """Tokens/s of outlierlab and the plain loop, alternating step by step; ``rounds`` windows
    of ``window`` steps each."""
    from outlierlab.data import prepare

    n = rounds * window  # timed steps of each
    steps = warmup + n + 1  # the last step (final eval + save) is not timed
    cfg = run_config(size, steps, tmp / f"run-{size}")
    data = prepare(cfg.data, progress=False)
    cfg.model.vocab_size = data.tokenizer.vocab_size
    train_tokens = np.asarray(data.train)
    maths = check_same_maths(cfg, train_tokens)
    L, d, h, T, B = SIZES[size]
    log = open(tmp / f"plain-{size}.jsonl", "w")  # noqa: SIM115
    torch.manual_seed(1)
    plain = PlainLoop(PlainConfig(data.tokenizer.vocab_size, L, d, h, T), train_tokens, B,
                      steps, log)  # fmt: skip
    t_ol: list[float] = []
    t_plain: list[float] = []
    with _common.trainers({"A": cfg}, steps) as loops:
        trainer = loops["A"]
        for _ in range(warmup):
            trainer.run_step()
            plain.step()
        for _ in range(n):
            t0 = time.perf_counter()
            trainer.run_step()
            t1 = time.perf_counter()
            plain.step()
            t_plain.append(time.perf_counter() - t1)
            t_ol.append(t1 - t0)
        res = trainer.fit()
    log.close()
    assert res.status == "finished", res
    w = _common.Timings(["A", "B"], {"A": t_ol, "B": t_plain}).windowed(window)
    t_ol, t_plain = w.seconds["A"], w.seconds["B"]
    tok = window * B * T
    speed = [p / o for o, p in zip(t_ol, t_plain)]  # tokens/s(A) / tokens/s(B)
    return {
        "size": size, "shape": f"{L}×{d}, T={T}, B={B}", "maths": maths,
        "ol_tps": tok / statistics.median(t_ol), "plain_tps": tok / statistics.median(t_plain),
        "speed": speed, "ratio": statistics.median(speed),
    }  # fmt: skip


def profile(size: str, tmp: Path, steps: int = 6) -> None:
    """Top CPU ops of outlierlab's steps vs the plain loop's (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    from outlierlab.data import prepare

    cfg = run_config(size, steps + 3, tmp / f"prof-{size}")
    data = prepare(cfg.data, progress=False)
    L, d, h, T, B = SIZES[size]
    with _common.trainers({"A": cfg}, steps + 3) as loops:
        for _ in range(2):
            loops["A"].run_step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                loops["A"].run_step()
        loops["A"].fit()
    print(f"--- outlierlab, {steps} steps, size {size}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    with open(tmp / "plain-prof.jsonl", "w") as log:
        plain = PlainLoop(PlainConfig(data.tokenizer.vocab_size, L, d, h, T),
                          np.asarray(data.train), B, steps + 3, log)  # fmt: skip
        for _ in range(3):
            plain.step()
        with profile(activities=[ProfilerActivity.CPU]) as p2:
            for _ in range(steps):
                plain.step()
    print(f"--- plain loop, {steps} steps, size {size}")
    print(p2.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def main(argv=None) -> float:
    def add(p):
        p.add_argument("--sizes", default=None, help="comma list of S,M,L (default all; "
                       "--quick: S,L)")
        p.add_argument("--window", type=int, default=10, help="steps per timed window")
        p.add_argument("--profile", action="store_true", help="torch.profiler op tables")

    args = _common.parse_args(__doc__.splitlines()[0], argv, add, rounds=8, quick_rounds=3)
    sizes = (args.sizes or ("S,L" if args.quick else "S,M,L")).split(",")
    _common.print_machine()
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        if args.profile:
            for s in sizes:
                profile(s, Path(tmp))
        rows, ratios = [], []
        for s in sizes:
            r = measure_size(s, args.rounds, args.window, warmup=3, tmp=Path(tmp))
            print(f"size {s} ({r['shape']}): maths check {r['maths']}; per-window ratios "
                  + " ".join(f"{x:.3f}" for x in r["speed"]), flush=True)
            rows.append([s, r["shape"], r["ol_tps"], r["plain_tps"], _common.spread(r["speed"])])
            ratios.append(r["ratio"])
    _common.print_table(
        ["size", "shape", "outlierlab tok/s", "plain tok/s", "ratio A/B median [min–max]"], rows
    )
    worst = min(ratios)
    verdict = "met" if worst >= 0.97 else "NOT met"
    _common.print_headline(worst, f"goal ≥ 0.97 on every size: {verdict} (headline: worst size)")
    return worst


if __name__ == "__main__":
    main()
