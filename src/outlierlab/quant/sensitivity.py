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
- ``without``: D(all) − D(all ∖ {L}), the damage keeping L in 16-bit would recover.

To stay fast the search is hierarchical: every block first (all its linears together), then the
linears of the blocks that hold ``share`` of the blocks' recoverable damage. The
**recommendation** is greedy on ``without`` (largest first) until the predicted recovery (their
sum) reaches ``share`` of D(all), then **verified** by a real evaluation with exactly that set in
16-bit (more layers are added while the verified recovery falls short, a few times at most).
Experts stored as 3-D parameters and residual/norm quantisers stay as the scheme has them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from outlierlab.quant.calibrate import CalibCache, calibrate
from outlierlab.quant.config import QuantConfig
from outlierlab.quant.evaluate import logits_of, model_device
from outlierlab.quant.wrap import quant_linears, wrap

MAX_TOP_BLOCKS = 4  # blocks whose linears are searched one by one
MAX_VERIFY = 4  # real evaluations of the recommendation at most


class _Damage:
    """D(S) and the perplexity of the quantised copy with only the linears in S quantised."""

    @torch.no_grad()
    def __init__(self, model: nn.Module, qmodel: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 batch_size: int) -> None:  # fmt: skip
        self.qmodel, self.x, self.y, self.bs = qmodel, x, y, batch_size
        self.layers = quant_linears(qmodel)
        self.dev = model_device(qmodel)
        self.fp = [torch.log_softmax(logits_of(model, xb.to(self.dev)).float(), -1)
                   for xb in x.split(batch_size)]  # fmt: skip
        self.evaluations = 0

    @torch.no_grad()
    def __call__(self, quantised: set[str]) -> dict[str, float]:
        for name, m in self.layers.items():
            m.enabled = name in quantised
        kl = ce = 0.0
        n = 0
        for lp, xb, yb in zip(self.fp, self.x.split(self.bs), self.y.split(self.bs)):
            lq = torch.log_softmax(logits_of(self.qmodel, xb.to(self.dev)).float(), -1)
            kl += float(F.kl_div(lq, lp, log_target=True, reduction="sum"))
            ce += float(F.cross_entropy(lq.reshape(-1, lq.shape[-1]), yb.to(self.dev).reshape(-1),
                                        reduction="sum"))  # fmt: skip
            n += yb.numel()
        for m in self.layers.values():
            m.enabled = True
        self.evaluations += 1
        return {"kl": kl / n, "ppl": math.exp(ce / n)}


def _groups(model: nn.Module, names: Sequence[str]) -> dict[str, list[str]]:
    """Linears by the block that holds them (``blocks.{i}``), the rest under ``other``."""
    from outlierlab.structure import StructureError, discover

    try:
        blocks = discover(model).blocks
    except StructureError:
        blocks = []
    module_names = {id(m): n for n, m in model.named_modules()}
    prefixes = [(module_names.get(id(b), ""), f"blocks.{i}") for i, b in enumerate(blocks)]
    out: dict[str, list[str]] = {}
    for name in names:
        key = next((k for p, k in prefixes if p and name.startswith(p + ".")), "other")
        out.setdefault(key, []).append(name)
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
) -> dict[str, Any]:
    """Blocks' and linears' ``alone`` / ``without`` damage of scheme ``cfg`` on windows x, y
    and the verified recommendation of what to keep in 16-bit (module docstring)."""
    if not 0 < share <= 1:
        raise ValueError(f"share={share} is not allowed; allowed: 0 < share ≤ 1")
    model.eval()
    qmodel = wrap(model, cfg)
    calibrate(qmodel, cfg, calib, logits_of, cache)
    damage = _Damage(model, qmodel, x, y, batch_size)
    every = set(damage.layers)
    full = damage(every)
    groups = _groups(model, list(damage.layers))

    def rows(units: dict[str, list[str]]) -> list[dict[str, Any]]:
        out = []
        for name, members in units.items():
            alone = damage(set(members))
            rest = damage(every - set(members))
            out.append({"name": name, "linears": len(members), "alone_kl": alone["kl"],
                        "alone_ppl": alone["ppl"], "without_kl": full["kl"] - rest["kl"],
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
    rec = _recommend(damage, every, full, layer_rows, share)
    return {
        "scheme": cfg.name,
        "windows": int(x.shape[0]),
        "seq_len": int(x.shape[1]),
        "share": share,
        "full": full,
        "blocks": block_rows,
        "searched_blocks": top,
        "layers": sorted(layer_rows, key=lambda r: -r["without_kl"]),
        "recommendation": rec,
        "evaluations": damage.evaluations,
    }


def _recommend(damage: _Damage, every: set[str], full: dict[str, float],
               layer_rows: list[dict[str, Any]], share: float) -> dict[str, Any]:  # fmt: skip
    """Greedy on ``without`` until the predicted recovery reaches ``share``; then verified,
    adding the next layers while the real recovery falls short (at most MAX_VERIFY tries)."""
    ranked = [r for r in sorted(layer_rows, key=lambda r: -r["without_kl"]) if r["without_kl"] > 0]
    target = share * full["kl"]
    keep: list[str] = []
    predicted = 0.0
    for r in ranked:
        if predicted >= target:
            break
        keep.append(r["name"])
        predicted += r["without_kl"]
    verified = damage(every - set(keep))
    tries = 1
    rest = ranked[len(keep):]
    while full["kl"] - verified["kl"] < target and rest and tries < MAX_VERIFY:
        keep.append(rest.pop(0)["name"])
        verified = damage(every - set(keep))
        tries += 1
    recovered = full["kl"] - verified["kl"]
    return {
        "keep_16bit": keep,
        "predicted_recovery": predicted / full["kl"] if full["kl"] > 0 else None,
        "verified_recovery": recovered / full["kl"] if full["kl"] > 0 else None,
        "verified_kl": verified["kl"],
        "verified_ppl": verified["ppl"],
        "verifications": tries,
    }
