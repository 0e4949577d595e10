"""Layer sensitivity: which linears cause a scheme's damage, and which to keep in 16-bit.

On a calibrated fake-quantised copy (:func:`~outlierlab.quant.wrap.wrap` +
:func:`~outlierlab.quant.calibrate.calibrate`) every :class:`QuantLinear` can be switched back
to its full-precision function (``enabled = False``: unquantised weight, no activation
quantiser). With the FP model's next-token log-probabilities p computed once on the same windows,
the damage of quantising the set S of linears is

    D(S) = mean over tokens of KL(p ‖ q_S)   (nats; more sensitive than perplexity to small
                                              damage), and the perplexity of q_S,

and per linear (or block) L:

- ``alone``: D({L}), the damage L does on its own;
- ``without``: D(all) − D(all ∖ {L}), the damage keeping L in 16-bit would recover;
- ``output_error``: ‖z_{L} − z‖ / ‖z‖ over all logits z of the windows when only L is quantised,
  the error its quantisation leaves at the model's output ("Beyond Outliers"' error-propagation
  measure; :mod:`outlierlab.quant.predictors`).

To stay fast the search is hierarchical and mostly ``alone``: every block alone (all its
linears together), then every linear alone in the blocks that hold ``share`` of the blocks'
summed ``alone`` damage (at most ``MAX_TOP_BLOCKS``), and ``without`` for those blocks only.
Passes are shared: the block outputs of two reference runs (nothing quantised, everything
quantised) are kept, and an evaluation of S starts at the first block where S differs from the
nearer reference (blocks before it return their kept output), so quantising only block i's
linears costs the blocks from i on, and so does all-but-block-i.

The **recommendation** is found by real evaluations, not by adding up predictions (damage is
not additive: two linears' damages overlap, or only show together). Every linear gets a score,
an estimate of its ``alone`` damage (:func:`_ranking`); the prefixes of that ranking of sizes
1, 2, 4, … are each **verified** by an evaluation with exactly that set in 16-bit until one
recovers ``share`` of D(all), then a bisection between the last prefix that fell short and the
first that reached it finds the shortest (at most ``MAX_VERIFY`` evaluations). Keeping every
linear recovers everything, so the search ends with a verified set that reaches the target,
or says it ran out of evaluations. Experts stored as 3-D parameters and residual/norm
quantisers stay as the scheme has them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from outlierlab.quant.calibrate import CalibCache, calibrate
from outlierlab.quant.config import QuantConfig
from outlierlab.quant.evaluate import layer_stats, logits_of, model_device
from outlierlab.quant.wrap import quant_linears, wrap

MAX_TOP_BLOCKS = 6  # blocks whose linears are evaluated one by one
MAX_VERIFY = 16  # real evaluations of the recommendation at most


class _Damage:
    """D(S), the perplexity and the output error of the quantised copy with only the linears in
    S quantised (module docstring: block outputs of the two reference runs are kept)."""

    @torch.no_grad()
    def __init__(self, model: nn.Module, qmodel: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 batch_size: int) -> None:  # fmt: skip
        self.qmodel, self.x, self.y, self.bs = qmodel, x, y, batch_size
        self.layers = quant_linears(qmodel)
        self.dev = model_device(qmodel)
        self.fp_logits = [logits_of(model, xb.to(self.dev)).float() for xb in x.split(batch_size)]
        # KL(p ‖ q) = Σ p log p − Σ p log q: the first sum once, the second one product a call
        self.fp_p = [torch.softmax(z, -1) for z in self.fp_logits]
        self.fp_plogp = [_dot(p, torch.log_softmax(z, -1))
                         for p, z in zip(self.fp_p, self.fp_logits)]  # fmt: skip
        self.fp_sq = sum(float(torch.linalg.vector_norm(z)) ** 2 for z in self.fp_logits)
        self.blocks = _blocks(qmodel)
        self.block_of = {}  # linear → index of its block (absent: outside every block)
        for name in self.layers:
            i = next((i for i, (p, _) in enumerate(self.blocks) if name.startswith(p + ".")), None)
            if i is not None:
                self.block_of[name] = i
        self.outside = [n for n in self.layers if n not in self.block_of]
        self.kept: dict[str, list[list[Any]]] = {}  # reference → per batch, per block output
        self.evaluations = 0
        self.block_passes = 0.0  # block forwards run, in units of one whole pass

    def _first_difference(self, members: set[str]) -> int:
        """Index of the first block holding a linear in ``members`` (len(blocks) if none; 0 if a
        linear outside every block is in it)."""
        if any(n in members for n in self.outside):
            return 0
        return min((self.block_of[n] for n in members if n in self.block_of),
                   default=len(self.blocks))  # fmt: skip

    @torch.no_grad()
    def __call__(self, quantised: set[str], stats: bool = False) -> dict[str, Any]:
        """D(``quantised``); the first calls with nothing and with everything quantised keep
        their block outputs (the references); ``stats``: also the per-linear
        :func:`~outlierlab.quant.evaluate.layer_stats` rows of this pass."""
        every = set(self.layers)
        ref, start = None, 0
        for name, diff in (("none", set(quantised)), ("all", every - set(quantised))):
            if name in self.kept and self._first_difference(diff) > start:
                ref, start = name, self._first_difference(diff)
        keep = None
        if quantised == set() and "none" not in self.kept:
            keep = "none"
        elif quantised == every and "all" not in self.kept:
            keep = "all"
        for name, m in self.layers.items():
            m.enabled = name in quantised
        kl = ce = err = 0.0
        n = 0
        kept_now: list[list[Any]] = []
        report = None
        try:
            with layer_stats(self.qmodel, kurtosis=False) if stats else _nothing() as rows:
                for b, (p, plogp, zp, xb, yb) in enumerate(zip(self.fp_p, self.fp_plogp,
                                                               self.fp_logits,
                                                               self.x.split(self.bs),
                                                               self.y.split(self.bs))):  # fmt: skip
                    cached = None if ref is None else self.kept[ref][b]
                    with _skip_blocks(self.blocks, start, cached), \
                            _keep_outputs(self.blocks, keep is not None) as outs:  # fmt: skip
                        z = logits_of(self.qmodel, xb.to(self.dev)).float()
                    if keep is not None:
                        kept_now.append(outs)
                    err += float(torch.linalg.vector_norm(z - zp)) ** 2
                    lq = torch.log_softmax(z, -1)
                    del z
                    kl += plogp - _dot(p, lq)
                    ce += float(F.nll_loss(lq.reshape(-1, lq.shape[-1]),
                                           yb.to(self.dev).reshape(-1), reduction="sum"))
                    n += yb.numel()
                if stats:
                    report = rows()
        finally:
            for m in self.layers.values():
                m.enabled = True
        if keep is not None:
            self.kept[keep] = kept_now
        self.evaluations += 1
        self.block_passes += (len(self.blocks) - start) / max(1, len(self.blocks))
        rel = math.sqrt(err / self.fp_sq) if self.fp_sq else 0.0
        out: dict[str, Any] = {"kl": kl / n, "ppl": math.exp(ce / n), "output_error": rel}
        if report is not None:
            out["layer_stats"] = report
        return out


def _dot(p: torch.Tensor, logq: torch.Tensor) -> float:
    """Σ p · log q over every token and word: per token in float32 (torch's cascade sum), over
    tokens in float64."""
    return float((p * logq).sum(-1).double().sum())


@contextmanager
def _nothing():
    yield None


def _blocks(qmodel: nn.Module) -> list[tuple[str, nn.Module]]:
    """(module name, block) of the residual stream's blocks, in order ([] if none found)."""
    from outlierlab.structure import StructureError, discover

    try:
        blocks = discover(qmodel).blocks
    except StructureError:
        return []
    names = {id(m): n for n, m in qmodel.named_modules()}
    return [(names[id(b)], b) for b in blocks if names.get(id(b))]


@contextmanager
def _skip_blocks(blocks: list[tuple[str, nn.Module]], start: int, cached: list[Any] | None):
    """Blocks before ``start`` return their kept outputs ``cached[i]`` instead of computing."""
    if cached is None or start == 0:
        yield
        return
    patched = []  # (block, the instance's own forward if it had one, e.g. a library's hook)
    try:
        for i in range(start):
            block = blocks[i][1]
            patched.append((block, block.__dict__.get("forward")))
            block.forward = (lambda out: lambda *a, **k: out)(cached[i])
        yield
    finally:
        for block, own in patched:
            if own is None:
                del block.forward
            else:
                block.forward = own


@contextmanager
def _keep_outputs(blocks: list[tuple[str, nn.Module]], keep: bool):
    """Yields the list the blocks' outputs of this forward are appended to (``keep``)."""
    outs: list[Any] = []
    handles = []
    if keep:
        handles = [b.register_forward_hook(lambda m, a, o: outs.append(o)) for _, b in blocks]
    try:
        yield outs
    finally:
        for h in handles:
            h.remove()


def _groups(damage: _Damage) -> dict[str, list[str]]:
    """Linears by the block that holds them (``blocks.{i}``), the rest under ``other``."""
    out: dict[str, list[str]] = {}
    for name in damage.layers:
        i = damage.block_of.get(name)
        out.setdefault("other" if i is None else f"blocks.{i}", []).append(name)
    return out


@torch.no_grad()
def layer_sensitivity(
    model: nn.Module,
    cfg: QuantConfig,
    calib: Sequence[torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int = 4,
    share: float = 0.9,
    cache: CalibCache | None = None,
    check: tuple[torch.Tensor, torch.Tensor] | None = None,
    check_full: bool = False,
) -> dict[str, Any]:
    """Blocks' and linears' damage of scheme ``cfg`` on windows x, y and the verified
    recommendation of what to keep in 16-bit (module docstring).
    ``cache`` shares calibration with other schemes on ``model``; ``check`` (windows, targets):
    also the perplexity on those windows with the recommended set kept (``check_ppl``), e.g.
    the page's evaluation windows; ``check_full``: also with every linear quantised
    (``check_full_ppl``; the scheme's own row gives it when it is on the page).
    ``layer_stats``: per linear, the activation and weight SQNR of the fully quantised copy on
    x (the same pass as D(all))."""
    if not 0 < share <= 1:
        raise ValueError(f"share={share} is not allowed; allowed: 0 < share ≤ 1")
    if cfg.rotation is not None:
        raise ValueError(f"scheme {cfg.name!r} rotates the model; sensitivity needs a scheme "
                         "that quantises the model's own linears")  # fmt: skip
    model.eval()
    qmodel = wrap(model, cfg)
    calibrate(qmodel, cfg, calib, logits_of, cache)
    damage = _Damage(model, qmodel, x, y, batch_size)
    every = set(damage.layers)
    damage(set())  # the reference with nothing quantised (kept block outputs)
    full = damage(every, stats=True)
    stats = full.pop("layer_stats")
    groups = _groups(damage)

    def row(name: str, members: list[str]) -> dict[str, Any]:
        alone = damage(set(members))
        return {"name": name, "linears": len(members), "alone_kl": alone["kl"],
                "alone_ppl": alone["ppl"], "output_error": alone["output_error"],
                "without_kl": None, "without_ppl": None}  # fmt: skip

    def add_without(r: dict[str, Any], members: list[str]) -> None:
        rest = damage(every - set(members))
        r["without_kl"], r["without_ppl"] = full["kl"] - rest["kl"], rest["ppl"]

    block_rows = [row(name, members) for name, members in groups.items()]
    top = _top_blocks(block_rows, share)
    for r in block_rows:
        if r["name"] in top:
            add_without(r, groups[r["name"]])
    layer_rows = []
    for b in top:
        for n in groups[b]:
            layer_rows.append({**row(n, [n]), "block": b})
    ranking = _ranking(block_rows, layer_rows, groups, stats)
    rec = _recommend(lambda keep: damage(every - set(keep)), full["kl"], ranking, share)
    if check is not None:
        from outlierlab.quant.evaluate import perplexity

        if check_full:
            rec["check_full_ppl"] = perplexity(qmodel, check[0], check[1], batch_size)[0]
        for name, m in damage.layers.items():
            m.enabled = name not in rec["keep_16bit"]
        try:
            rec["check_ppl"] = perplexity(qmodel, check[0], check[1], batch_size)[0]
        finally:
            for m in damage.layers.values():
                m.enabled = True
        rec["check_windows"] = int(check[0].shape[0])
    return {
        "scheme": cfg.name,
        "windows": int(x.shape[0]),
        "seq_len": int(x.shape[1]),
        "share": share,
        "full": full,
        "blocks": block_rows,
        "groups": groups,
        "searched_blocks": top,
        "layers": sorted(layer_rows, key=lambda r: -r["alone_kl"]),
        "layer_stats": stats,
        "ranking": [{"name": n, "score": s} for n, s in ranking],
        "recommendation": rec,
        "evaluations": damage.evaluations,
        "block_passes": damage.block_passes,
    }


def _top_blocks(block_rows: list[dict[str, Any]], share: float) -> list[str]:
    """The blocks (largest ``alone`` first, positive only) holding ``share`` of the blocks'
    summed ``alone`` damage, at most :data:`MAX_TOP_BLOCKS`."""
    ranked = sorted((r for r in block_rows if r["alone_kl"] > 0), key=lambda r: -r["alone_kl"])
    total = sum(r["alone_kl"] for r in ranked)
    top, acc = [], 0.0
    for r in ranked[:MAX_TOP_BLOCKS]:
        if acc >= share * total:
            break
        top.append(r["name"])
        acc += r["alone_kl"]
    return top


def _noise(stat: dict[str, Any] | None) -> float:
    """A linear's quantisation noise relative to its signal, 10^(−SQNR/10) of its input plus
    its weight (0 where not measured): how the unexplained damage of a block is shared."""
    if stat is None:
        return 0.0
    return sum(10 ** (-v / 10) for v in (stat.get("act_sqnr_db"), stat.get("weight_sqnr_db"))
               if v is not None and math.isfinite(v))  # fmt: skip


def _ranking(block_rows: list[dict[str, Any]], layer_rows: list[dict[str, Any]],
             groups: dict[str, list[str]],
             stats: list[dict[str, Any]]) -> list[tuple[str, float]]:  # fmt: skip
    """Every linear with its score (an estimate of its damage alone, KL), largest first:
    a searched linear's own ``alone`` plus the share of its block's ``alone`` that its linears'
    ``alone`` do not explain (damage that only shows when they are quantised together); a linear
    of an unsearched block its share of the block's ``alone``. Shares follow each linear's
    relative quantisation noise (:func:`_noise`, from the fully quantised pass's SQNR), evenly
    where none is measured. Ties keep model order."""
    by_stat = {r["name"]: r for r in stats}
    own = {r["name"]: max(r["alone_kl"], 0.0) for r in layer_rows}
    scores: dict[str, float] = {}
    for b in block_rows:
        members = groups[b["name"]]
        rest = max(b["alone_kl"], 0.0) - sum(own.get(n, 0.0) for n in members)
        noise = [_noise(by_stat.get(n)) for n in members]
        total = sum(noise)
        for n, v in zip(members, noise):
            part = v / total if total > 0 else 1 / len(members)
            scores[n] = own.get(n, 0.0) + max(rest, 0.0) * part
    order = {n: i for i, n in enumerate(n for b in block_rows for n in groups[b["name"]])}
    return sorted(scores.items(), key=lambda kv: (-kv[1], order[kv[0]]))


def _recommend(verify: Callable[[list[str]], dict[str, Any]], full_kl: float,
               ranking: list[tuple[str, float]], share: float,
               max_verify: int = MAX_VERIFY) -> dict[str, Any]:  # fmt: skip
    """The shortest prefix of ``ranking`` whose *verified* recovery reaches ``share`` of
    ``full_kl``: ``verify(keep)`` is a real evaluation with the linears in ``keep`` in 16-bit
    (its ``kl``). Prefix sizes 1, 2, 4, … until one reaches the target, then bisection between
    the last that fell short and the first that reached it; at most ``max_verify`` evaluations
    (damage is not additive, so the prediction, the summed scores, only reports). Keeping every
    linear recovers everything, so the target is reached unless the evaluations run out."""
    names = [n for n, _ in ranking]
    target = share * full_kl
    tried: dict[int, dict[str, Any]] = {}
    history: list[dict[str, Any]] = []

    def reaches(k: int) -> bool:
        if k not in tried:
            tried[k] = verify(names[:k])
            history.append({"keep": k, "kl": tried[k]["kl"]})
        return full_kl - tried[k]["kl"] >= target

    lo, hi = 0, None  # the longest prefix known to fall short, the shortest known to reach
    if full_kl <= 0 or not names:
        hi = 0
        tried[0] = {"kl": max(full_kl, 0.0), "ppl": None}
    k = 1
    while hi is None and len(history) < max_verify:
        if reaches(k):
            hi = k
        elif k >= len(names):
            break
        else:
            lo, k = k, min(2 * k, len(names))
    while hi is not None and hi - lo > 1 and len(history) < max_verify:
        mid = (lo + hi) // 2
        if reaches(mid):
            hi = mid
        else:
            lo = mid
    best = hi if hi is not None else max(tried, key=lambda k: full_kl - tried[k]["kl"])
    keep = names[:best]
    verified = tried[best]
    score = dict(ranking)
    predicted = sum(score[n] for n in keep)
    return {
        "keep_16bit": keep,
        "predicted_recovery": predicted / full_kl if full_kl > 0 else None,
        "verified_recovery": (full_kl - verified["kl"]) / full_kl if full_kl > 0 else None,
        "verified_kl": verified["kl"],
        "verified_ppl": verified["ppl"],
        "verifications": len(history),
        "history": history,
        "reached": hi is not None,
    }
