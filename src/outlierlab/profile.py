"""Massive-activation profile of a model on token windows (``outlierlab measure --profile``).

Per measurement point (the monitor's points, residual stream by default), streamed over batches:

- **top-k |x|** with their (window, token position, channel) and signed value: massive
  activations sit in a few fixed channels and on a few tokens, mostly the first one
  (Sun et al. 2024, "Massive activations in large language models", §2);
- **max/median ratio over the whole tensor**: ``max |x| / median |x|`` over every element
  (Sun et al.'s criterion for a massive activation is ≥ 100 and ≈ 1000× the median; not paper
  Eq. 2, which is a per-token mean, :func:`outlierlab.metrics.max_median_ratio`). The max is exact;
  the median is over all values while a point has seen ≤ ``MEDIAN_SAMPLES`` of them, else over a
  seeded uniform subsample of that many per batch;
- **Kurt on all tokens and on tokens other than the first** (science §1 Eq. 1 via
  :func:`outlierlab.metrics.kurtosis` on the per-neuron RMS vector): the gap is the first-token
  effect (attention sinks carry the massive activation, Sun et al. §3; OrthoAdam, Kaul et al.
  2025, attribute it to the optimiser's basis);
- **OSP's per-token excess kurtosis** (:func:`outlierlab.metrics.token_excess_kurtosis`,
  Outlier-Safe Pre-Training, Park et al. 2025), averaged over all tokens.

Per attention layer, the **attention sink** (Xiao et al. 2024; Sun et al. §3): ``m_h`` = the mean
over windows and query positions q ≥ 1 of head h's attention probability on token 0 (query 0 can
only attend to itself); reported as the fraction of heads with ``m_h > 0.5`` and the mean of m_h
over heads. The attention probabilities come from :mod:`outlierlab.structure`'s attention points
(an HF model runs eager attention meanwhile; outlierlab's GPT recomputes them in float32).
"""

from __future__ import annotations

import contextlib
import heapq
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from outlierlab import metrics
from outlierlab.structure import (
    StructureError,
    attention_points,
    discover,
    forward_tokens,
    hook_points,
)
from outlierlab.train.callbacks import Callback, TrainerView

DEFAULT_TOP_K = 10
SINK_THRESHOLD = 0.5
MEDIAN_SAMPLES = 1 << 16  # values per batch per point kept for the whole-tensor median


class PointProfile:
    """Streaming sums for one point; :meth:`update` takes (B, T, d) with ``window0`` the index
    of the batch's first window."""

    def __init__(self, name: str, top_k: int) -> None:
        self.name, self.top_k = name, top_k
        self.sq_all: torch.Tensor | None = None  # Σ_tokens x² per channel, float64
        self.sq_rest: torch.Tensor | None = None  # the same over tokens at positions ≥ 1
        self.n_all = self.n_rest = 0
        self.osp_sum = 0.0  # Σ over tokens of the per-token excess kurtosis
        self.abs_max = 0.0
        self.samples: list[torch.Tensor] = []
        self.top: list[tuple[float, int, int, int, float]] = []  # (|x|, window, pos, ch, x)

    def update(self, x: torch.Tensor, window0: int) -> None:
        x = x.detach().double()
        if x.dim() == 2:
            x = x.unsqueeze(0)
        elif x.dim() > 3:  # parallel streams per token (hyper-connections, AltUp): rows of d
            x = x.reshape(x.shape[0], -1, x.shape[-1])
        b, t, d = x.shape
        sq = x.square()
        all_, rest = sq.sum((0, 1)), sq[:, 1:].sum((0, 1))
        self.sq_all = all_ if self.sq_all is None else self.sq_all + all_
        self.sq_rest = rest if self.sq_rest is None else self.sq_rest + rest
        self.n_all += b * t
        self.n_rest += b * (t - 1)
        self.osp_sum += metrics.token_excess_kurtosis(x) * b * t
        a = x.abs().reshape(-1)
        self.abs_max = max(self.abs_max, float(a.max()))
        if a.numel() > MEDIAN_SAMPLES:
            g = torch.Generator().manual_seed(window0)
            a = a[torch.randperm(a.numel(), generator=g)[:MEDIAN_SAMPLES]]
        self.samples.append(a.float())
        vals, idx = x.abs().reshape(-1).topk(min(self.top_k, b * t * d))
        flat = x.reshape(-1)
        for v, i in zip(vals.tolist(), idx.tolist()):
            win, rem = divmod(i, t * d)
            item = (v, window0 + win, rem // d, rem % d, float(flat[i]))
            if len(self.top) < self.top_k:
                heapq.heappush(self.top, item)
            elif v > self.top[0][0]:
                heapq.heapreplace(self.top, item)

    def result(self) -> dict[str, Any]:
        def kurt(sq: torch.Tensor | None, n: int) -> float:
            return float("nan") if sq is None or n == 0 else metrics.kurtosis((sq / n).sqrt()[None])

        median = float("nan")
        if self.samples:  # an even count: the mean of the two middle values, as metrics does
            s = torch.cat(self.samples).double().sort().values
            median = float((s[(len(s) - 1) // 2] + s[len(s) // 2]) / 2)
        top = sorted(self.top, reverse=True)
        return {
            "name": self.name,
            "tokens": self.n_all,
            "top": [{"value": v, "window": w, "token": p, "channel": c} for _, w, p, c, v in top],
            "max_abs": self.abs_max,
            "median_abs": median,
            "max_median_ratio": self.abs_max / median if median > 0 else float("inf"),
            "kurtosis": kurt(self.sq_all, self.n_all),
            "kurtosis_no_first": kurt(self.sq_rest, self.n_rest),
            "token_excess_kurtosis": self.osp_sum / self.n_all if self.n_all else float("nan"),
        }


class SinkAccumulator:
    """Σ over (window, query q ≥ 1) of each head's attention probability on token 0."""

    def __init__(self) -> None:
        self.mass: dict[str, torch.Tensor] = {}
        self.count: dict[str, int] = {}

    def update(self, layer: str, probs: torch.Tensor) -> None:
        """``probs``: (B, H, T, T) attention probabilities (rows sum to 1)."""
        p = probs.detach().double()[:, :, 1:, 0]  # (B, H, T-1)
        if p.numel() == 0:
            return
        s = p.sum((0, 2))
        self.mass[layer] = s if layer not in self.mass else self.mass[layer] + s
        self.count[layer] = self.count.get(layer, 0) + p.shape[0] * p.shape[2]

    def result(self) -> list[dict[str, Any]]:
        rows = []
        for layer, s in self.mass.items():
            m = s / self.count[layer]
            rows.append({
                "layer": layer,
                "heads": int(m.numel()),
                "sink_share": float((m > SINK_THRESHOLD).double().mean()),
                "mass_token0": float(m.mean()),
                "mass_token0_per_head": [float(v) for v in m],
            })  # fmt: skip
        return rows


class _SinkTap:
    """An attention point's sink (:class:`outlierlab.structure.AttentionPoint`): every
    sequence, its probabilities added to the layer's :class:`SinkAccumulator` sums."""

    def __init__(self, sinks: SinkAccumulator, layer: str) -> None:
        self.sinks, self.layer = sinks, layer

    def rows(self, batch: int, seq_len: int, device: torch.device) -> None:
        return None

    def __call__(self, probs: torch.Tensor) -> None:
        self.sinks.update(self.layer, probs)


@torch.no_grad()
def profile(
    model: nn.Module,
    x: torch.Tensor,
    batch_size: int = 8,
    points: str | Sequence[str] = "auto",
    top_k: int = DEFAULT_TOP_K,
    attention: bool = True,
) -> dict[str, Any]:
    """The massive-activation profile of ``model`` on token windows ``x`` (N, T):
    ``{"points": [...], "attention": [...] or None}`` (module docstring for every field).
    Points and attention layers are :mod:`outlierlab.structure`'s, as the monitor's."""
    from outlierlab.monitor import resolve_points

    chosen = resolve_points(model, points)
    profs = {p.name: PointProfile(p.name, top_k) for p in chosen}
    sinks = SinkAccumulator() if attention else None
    window0 = [0]

    def record(name: str, t: torch.Tensor) -> None:
        if t.is_floating_point():
            profs[name].update(t, window0[0])

    device = next(model.parameters()).device
    with contextlib.ExitStack() as stack:
        for h in hook_points(chosen, record):
            stack.callback(h.remove)
        if sinks is not None:
            try:
                structure = discover(model)
            except StructureError:
                structure = None  # glob points on a model without blocks: no attention
            if structure is not None:
                taps = stack.enter_context(attention_points(model, structure))
                for name, tap in taps.items():
                    tap.set_sink(_SinkTap(sinks, name))
        for i in range(0, x.shape[0], batch_size):
            window0[0] = i
            forward_tokens(model, x[i : i + batch_size].to(device))
    att = sinks.result() if sinks is not None else None
    return {"points": [p.result() for p in profs.values()], "attention": att or None}


def print_profile(prof: dict[str, Any], console: Any = None) -> None:
    """Two rich tables: per point the largest |x| and where it sits, max/median, Kurt with and
    without the first token, OSP kurtosis; per attention layer the sink share and mass."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=max(100, Console().width))

    def num(v: float | None, spec: str = ".2f") -> str:
        return "nan" if v is None or v != v else format(v, spec)

    table = Table(title="massive activations (Sun et al. 2024)", title_justify="left")
    cols = ("point", "max |x|", "window:token, channel", "max/median", "Kurt", "Kurt w/o tok 0",
            "OSP kurt")  # fmt: skip
    for col in cols:
        table.add_column(col, justify="left" if col == "point" else "right")
    for p in prof["points"]:
        top = p["top"][0] if p["top"] else None
        where = "-" if top is None else f"{top['window']}:{top['token']}, ch {top['channel']}"
        table.add_row(
            p["name"], num(top and top["value"], ".4g"), where, num(p["max_median_ratio"], ".1f"),
            num(p["kurtosis"]), num(p["kurtosis_no_first"]), num(p["token_excess_kurtosis"]),
        )  # fmt: skip
    console.print(table)
    if prof.get("attention"):
        att = Table(title="attention sinks (mass on token 0, queries ≥ 1)", title_justify="left")
        for col in ("layer", "heads", f"share > {SINK_THRESHOLD:g}", "mean mass"):
            att.add_column(col, justify="left" if col == "layer" else "right")
        for a in prof["attention"]:
            att.add_row(a["layer"], str(a["heads"]), num(a["sink_share"]), num(a["mass_token0"]))
        console.print(att)


def profile_row(prof: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The per-point and per-layer scalars of a :func:`profile` as metrics-row fields:
    ``massive_max`` (max |x|), ``massive_ratio`` (max/median of |x| over the tensor),
    ``kurtosis_no_first`` (Kurt without token 0), and per attention layer ``sink_share`` and
    ``sink_mass`` (mean mass on token 0)."""
    row: dict[str, dict[str, float]] = {
        "massive_max": {p["name"]: p["max_abs"] for p in prof["points"]},
        "massive_ratio": {p["name"]: p["max_median_ratio"] for p in prof["points"]},
        "kurtosis_no_first": {p["name"]: p["kurtosis_no_first"] for p in prof["points"]},
    }
    if prof.get("attention"):
        row["sink_share"] = {a["layer"]: a["sink_share"] for a in prof["attention"]}
        row["sink_mass"] = {a["layer"]: a["mass_token0"] for a in prof["attention"]}
    return row


class ProfileEvery(Callback):
    """Trainer callback (``log.profile_every``): every ``every``-th optimiser step, the
    massive-activation profile of this rank's micro-batches of the step's batch, after the
    update, in one extra no-grad eval-mode forward, added to that step's metrics row
    (:func:`profile_row`). Uses no global RNG, so resumed runs log the same values."""

    def __init__(self, every: int) -> None:
        self.every = int(every)

    def on_step_end(self, trainer: TrainerView, step: int, row: dict[str, Any]) -> None:
        from outlierlab.monitor import due

        if not due(step, self.every):
            return
        model = trainer.model
        was_training = model.training
        model.eval()
        try:
            x = torch.cat(trainer.local_micro_batches())
            with trainer.autocast():
                prof = profile(model, x, batch_size=trainer.cfg.train.batch_size, top_k=1)
        finally:
            model.train(was_training)
        row.update(profile_row(prof))
