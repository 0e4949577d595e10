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

To stay fast the search is hierarchical: every block first (all its linears together), then the
linears of the blocks that hold ``share`` of the blocks' recoverable damage (at most
``MAX_TOP_BLOCKS``). Passes are shared: the block outputs of two reference runs (nothing
quantised, everything quantised) are kept, and an evaluation of S starts at the first block
where S differs from the nearer reference (blocks before it return their kept output), so
quantising only block i's linears costs the blocks from i on, and so does all-but-block-i.

The **recommendation** ranks the searched linears by max(``without``, ``alone``) (``without``
alone under-ranks a layer whose damage hides behind the others', ``alone`` one whose damage
only shows with the rest), takes the shortest prefix whose predicted recovery (sum of
``without``) reaches ``share`` of D(all), and **verifies** it by a real evaluation with exactly
that set in 16-bit; while the verified recovery falls short it adds the next-ranked linear
(searching the next block's linears when the ranked ones run out) and evaluates again, at most
``MAX_VERIFY`` times. Experts stored as 3-D parameters and residual/norm quantisers stay as the
scheme has them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from outlierlab.quant.calibrate import CalibCache, calibrate
from outlierlab.quant.config import QuantConfig
from outlierlab.quant.evaluate import layer_stats, logits_of, model_device
from outlierlab.quant.wrap import quant_linears, wrap

MAX_TOP_BLOCKS = 4  # blocks whose linears are searched one by one before the recommendation
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
        self.fp = [torch.log_softmax(z, -1) for z in self.fp_logits]
        self.fp_sq = sum(float(z.double().square().sum()) for z in self.fp_logits)
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
                for b, (lp, zp, xb, yb) in enumerate(zip(self.fp, self.fp_logits,
                                                         self.x.split(self.bs),
                                                         self.y.split(self.bs))):  # fmt: skip
                    cached = None if ref is None else self.kept[ref][b]
                    with _skip_blocks(self.blocks, start, cached), \
                            _keep_outputs(self.blocks, keep is not None) as outs:  # fmt: skip
                        z = logits_of(self.qmodel, xb.to(self.dev)).float()
                    if keep is not None:
                        kept_now.append(outs)
                    lq = torch.log_softmax(z, -1)
                    kl += float(F.kl_div(lq, lp, log_target=True, reduction="sum"))
                    ce += float(F.cross_entropy(lq.reshape(-1, lq.shape[-1]),
                                                yb.to(self.dev).reshape(-1),
                                                reduction="sum"))  # fmt: skip
                    err += float((z - zp).double().square().sum())
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
    """Blocks' and linears' ``alone`` / ``without`` damage of scheme ``cfg`` on windows x, y
    and the verified recommendation of what to keep in 16-bit (module docstring).
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

    def rows(units: dict[str, list[str]]) -> list[dict[str, Any]]:
        out = []
        for name, members in units.items():
            alone = damage(set(members))
            rest = damage(every - set(members))
            out.append({"name": name, "linears": len(members), "alone_kl": alone["kl"],
                        "alone_ppl": alone["ppl"], "output_error": alone["output_error"],
                        "without_kl": full["kl"] - rest["kl"],
                        "without_ppl": rest["ppl"]})  # fmt: skip
        return out

    block_rows = rows(groups)
    ranked = sorted(block_rows, key=lambda r: -r["without_kl"])
    total = sum(max(r["without_kl"], 0.0) for r in ranked)
    top, acc = [], 0.0
    for r in ranked[:MAX_TOP_BLOCKS]:
        if total > 0 and acc >= share * total:
            break
        top.append(r["name"])
        acc += max(r["without_kl"], 0.0)
    layer_rows = rows({n: [n] for b in top for n in groups[b]})
    for r in layer_rows:
        r["block"] = next(b for b in top if r["name"] in groups[b])

    def search_next() -> list[dict[str, Any]]:
        """The linears of the next-ranked unsearched block with positive damage ([] if none)."""
        nxt = next((r["name"] for r in ranked if r["name"] not in top and
                    max(r["without_kl"], r["alone_kl"]) > 0), None)  # fmt: skip
        if nxt is None:
            return []
        top.append(nxt)
        new = rows({n: [n] for n in groups[nxt]})
        for r in new:
            r["block"] = nxt
        layer_rows.extend(new)
        return new

    rec = _recommend(damage, every, full, layer_rows, share, search_next)
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
        "layers": sorted(layer_rows, key=lambda r: -r["without_kl"]),
        "layer_stats": stats,
        "recommendation": rec,
        "evaluations": damage.evaluations,
        "block_passes": damage.block_passes,
    }


def _score(r: dict[str, Any]) -> float:
    return max(r["without_kl"], r["alone_kl"])


def _recommend(damage: _Damage, every: set[str], full: dict[str, float],
               layer_rows: list[dict[str, Any]], share: float,
               search_next: Any) -> dict[str, Any]:  # fmt: skip
    """The shortest prefix of the linears ranked by :func:`_score` whose predicted recovery
    reaches ``share``, then verified, adding the next-ranked linear while the real recovery
    falls short (``search_next()`` searches another block when the ranked ones run out; at most
    MAX_VERIFY evaluations)."""
    ranked = [r for r in sorted(layer_rows, key=lambda r: -_score(r)) if _score(r) > 0]
    target = share * full["kl"]
    keep: list[str] = []
    predicted = 0.0
    for r in ranked:
        if predicted >= target:
            break
        keep.append(r["name"])
        predicted += max(r["without_kl"], 0.0)
    verified = damage(every - set(keep))
    tries = 1
    history = [{"keep": len(keep), "kl": verified["kl"]}]
    rest = ranked[len(keep):]
    while full["kl"] - verified["kl"] < target and tries < MAX_VERIFY:
        if not rest:
            rest = sorted((r for r in search_next() if _score(r) > 0), key=lambda r: -_score(r))
            if not rest:
                break
        r = rest.pop(0)
        keep.append(r["name"])
        predicted += max(r["without_kl"], 0.0)
        verified = damage(every - set(keep))
        tries += 1
        history.append({"keep": len(keep), "kl": verified["kl"]})
    recovered = full["kl"] - verified["kl"]
    return {
        "keep_16bit": keep,
        "predicted_recovery": predicted / full["kl"] if full["kl"] > 0 else None,
        "verified_recovery": recovered / full["kl"] if full["kl"] > 0 else None,
        "verified_kl": verified["kl"],
        "verified_ppl": verified["ppl"],
        "verifications": tries,
        "history": history,
        "reached": recovered >= target,
    }
