"""``OutlierMonitor``: outlier-feature metrics (science §1) of any ``nn.Module`` via forward hooks.

    with OutlierMonitor(model) as mon:          # residual stream, found automatically
        model(batch)
    mon.results()   # {"embed.resid_post": {"kurtosis": ..., "mmr": ..., ...}, ...}

Points: ``"auto"`` is the residual stream that :func:`outlierlab.structure.discover` finds
(``model.residual_points()``, or the block list of any Hugging Face model); otherwise glob
patterns over point names and module names (``["blocks.*.resid_post"]``,
``["transformer.h.*.mlp"]``); ``*`` stays within one dotted component, ``**`` crosses them
(:func:`glob_regex`).

Per measured forward and point the hook (under ``no_grad``, on a detached tensor, no ``.item()``)
adds to a :class:`~outlierlab.stats.StatsAccumulator`: per-neuron Σx² over all non-padding
tokens (Eq. 1, exact for any number of forwards), Eq. 2 on a seeded subsample of at most
``mmr_max_tokens`` tokens (``None``: all, exact), and the mean off-diagonal token cosine
similarity on a seeded subsample of at most ``cos_max_tokens`` tokens (the unit rows summed as
one float32 matrix-vector product); ``cos_sim`` is the mean of that value over measured
forwards. It also keeps the token-centred per-neuron sums of the authors' metrics
(``kurtosis_authors``, ``corr_authors``: exact over all tokens). Nothing else is kept: no
activations, no graphs.

Attention entropy (``attn_entropy``): the monitor gives each attention point
(:class:`outlierlab.structure.AttentionPoint`, ``blocks.{i}.attn``) a sink for the measured
forwards only and sums the entropy of every query's attention distribution
(:func:`~outlierlab.metrics.attention_entropy_sum`) over a seeded subsample of whole sequences
holding at most ``attn_max_tokens`` query tokens (at least one sequence; the same sequences
for every layer); :meth:`OutlierMonitor.attention_entropy` gives the mean per layer.
``"auto"`` (the default) measures it where the model computes the probabilities itself at no
cost off measured forwards (outlierlab's GPT); ``True`` also for Hugging Face models, which then
run eager attention while hooked (the only kind that returns probabilities); ``False`` never.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from outlierlab import fused
from outlierlab.errors import ConfigError
from outlierlab.jsonable import json_safe
from outlierlab.metrics import OUTLIER_K, attention_entropy_sum, softmax_entropy_sum
from outlierlab.model.attn import causal_bias
from outlierlab.stats import StatsAccumulator
from outlierlab.structure import (  # noqa: F401 — auto_points, glob_regex: public here too
    AttentionPoint,
    StructureError,
    attention_points,
    auto_points,
    discover,
    glob_regex,
    hook_points,
    resolve_points,
)


class OutlierMonitor:
    """Forward hooks that stream science §1 metrics of chosen points (ARCHITECTURE.md contract).

    ``every=k`` measures forward calls 0, k, 2k, … of the root module (the rest cost an integer
    check); ``enabled`` switches measuring off altogether. Padding is excluded with
    :meth:`set_mask` or the root's ``attention_mask`` argument (1 = keep). ``mmr_max_tokens`` and
    ``cos_max_tokens`` bound the tokens Eq. 2 and cos-sim see per forward (one seeded
    permutation per forward; ``None``: all). ``extras=True`` adds ``kurtosis_centred``,
    ``token_excess_kurtosis`` and ``share_above_6`` (about 2× the hook's cost). ``k``: outlier
    neurons are those with RMS above k × the median. ``attn_entropy``: also the attention
    entropy per layer where the model exposes attention probabilities (module docstring).
    """

    def __init__(
        self,
        model: nn.Module,
        points: str | Sequence[str] = "auto",
        every: int = 1,
        cos_max_tokens: int | None = 1024,
        seed: int = 0,
        mmr_max_tokens: int | None = 256,
        k: float = OUTLIER_K,
        extras: bool = False,
        attn_entropy: bool | str = "auto",
        attn_max_tokens: int | None = 128,
    ):
        if not isinstance(every, int) or every < 1:
            raise ConfigError(f"every={every!r} is not allowed; allowed: an integer ≥ 1")
        for key, v in (("cos_max_tokens", cos_max_tokens), ("mmr_max_tokens", mmr_max_tokens),
                       ("attn_max_tokens", attn_max_tokens)):  # fmt: skip
            if v is not None and (not isinstance(v, int) or v < 2):
                raise ConfigError(f"{key}={v!r} is not allowed; allowed: an integer ≥ 2 or None")
        self.model, self.every, self.seed, self.k = model, every, seed, k
        self.cos_max_tokens, self.mmr_max_tokens = cos_max_tokens, mmr_max_tokens
        self.extras = extras
        self.points = resolve_points(model, points)
        self.attn_max_tokens = attn_max_tokens
        if attn_entropy not in (True, False, "auto"):
            raise ConfigError(f"attn_entropy={attn_entropy!r} is not allowed; allowed: True, "
                              "False, 'auto'")  # fmt: skip
        self.attn_entropy = attn_entropy
        self.attn_points: dict[str, AttentionPoint] = {}  # filled while hooked
        self._attn_ctx: contextlib.ExitStack | None = None
        self._sinks: dict[str, _EntropySink] = {}
        self._entropy: dict[str, torch.Tensor] = {}  # name → float64 [Σ entropy, query rows]
        self.enabled = True
        self._acc: dict[str, StatsAccumulator] = {}
        self._spare: dict[str, StatsAccumulator] = {}  # zeroed by reset, reused by _record
        self._handles: list[Any] = []
        self._calls = 0  # forward calls of the root
        self._measured = 0  # number of the next measured forward (seeds the subsamples)
        self._stride = 1  # added to it after each measured forward
        self._active = False
        self._mask: torch.Tensor | None = None
        self._fwd_mask: torch.Tensor | None = None
        self._perms: dict[tuple, torch.Tensor] = {}
        self._mask_pos = self._attention_mask_position(model)

    @staticmethod
    def _attention_mask_position(model: nn.Module) -> int | None:
        try:
            params = list(inspect.signature(model.forward).parameters)
        except (TypeError, ValueError):
            return None
        return params.index("attention_mask") if "attention_mask" in params else None

    # -- context manager ----------------------------------------------------------------------

    def __enter__(self) -> OutlierMonitor:
        if self._handles:
            return self
        try:
            self._handles.append(
                self.model.register_forward_pre_hook(self._root_pre, with_kwargs=True)
            )
            self._handles.append(
                self.model.register_forward_hook(self._root_post, always_call=True)
            )
            self._handles += hook_points(self.points, self._on_point)
            self._open_attention()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Remove every hook this monitor added (statistics are kept)."""
        while self._handles:
            self._handles.pop().remove()
        self._set_sinks(False)
        if self._attn_ctx is not None:  # the points stay listed: their results are kept
            ctx, self._attn_ctx = self._attn_ctx, None
            ctx.close()
        self._active = False
        self._fwd_mask = None

    # -- hooks --------------------------------------------------------------------------------

    def _root_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._active:  # re-entrant call of the root: part of the measured forward
            return
        call, self._calls = self._calls, self._calls + 1
        if not self.enabled or not due(call, self.every):
            return
        self._active = True
        self._perms.clear()
        mask = kwargs.get("attention_mask")
        if mask is None and self._mask_pos is not None and len(args) > self._mask_pos:
            mask = args[self._mask_pos]
        self._fwd_mask = mask if isinstance(mask, torch.Tensor) else None
        self._set_sinks(True)

    def _root_post(self, module: nn.Module, args: tuple, out: Any) -> None:
        if self._active:
            self._measured += self._stride
            self._set_sinks(False)
        self._active = False
        self._fwd_mask = None

    def _open_attention(self) -> None:
        """Open the attention points (:mod:`outlierlab.structure`): with ``attn_entropy``
        ``"auto"`` only those the model computes itself (outlierlab's GPT: no cost off measured
        forwards); with True also an HF model's, switching it to eager attention meanwhile."""
        if not self.attn_entropy:
            return
        try:
            structure = discover(self.model)
        except StructureError:
            return
        if self.attn_entropy == "auto" and any(i >= 0 for _, i in structure.attention.values()):
            return
        self._attn_ctx = contextlib.ExitStack()
        self.attn_points = self._attn_ctx.enter_context(attention_points(self.model, structure))
        self._sinks = {name: _EntropySink(self, name) for name in self.attn_points}

    def _set_sinks(self, on: bool) -> None:
        """Give every attention point this monitor's sink (``on``) or None."""
        for name, point in self.attn_points.items():
            point.set_sink(self._sinks[name] if on else None)

    def _sequences(self, batch: int, seq_len: int, device: torch.device) -> torch.Tensor | None:
        """The batch rows whose attention entropy this forward measures: a seeded subsample
        of ``max(1, attn_max_tokens // seq_len)`` sequences (None: all), one per forward."""
        cap = self.attn_max_tokens
        keep = batch if cap is None else max(1, cap // max(1, seq_len))
        if keep >= batch:
            return None
        key = ("sequences", batch, device)
        if key not in self._perms:
            g = torch.Generator().manual_seed(self.seed + self._measured)
            idx = torch.randperm(batch, generator=g)[:keep].sort().values
            self._perms[key] = idx.to(device)
        return self._perms[key]

    def _on_point(self, name: str, x: torch.Tensor) -> None:
        if self._active:
            self._record(name, x)

    def _record(self, name: str, x: torch.Tensor | None) -> None:
        if x is None or not x.is_floating_point() or x.dim() < 2:
            return
        with torch.no_grad():
            x = x.detach()
            d = x.shape[-1]
            rows = x.reshape(-1, d)
            mask = self._fwd_mask if self._fwd_mask is not None else self._mask
            if mask is not None:
                if tuple(mask.shape) != tuple(x.shape[:-1]):
                    raise ConfigError(
                        f"mask of shape {tuple(mask.shape)} does not fit point {name} with "
                        f"activations {tuple(x.shape)}; allowed: shape {tuple(x.shape[:-1])}"
                    )
                rows = rows[mask.reshape(-1).to(device=rows.device, dtype=torch.bool)]
            acc = self._acc.get(name)
            if acc is None:
                acc = self._spare.pop(name, None)  # reset's: its buffers are warm
                if acc is None or acc.d != d or acc.state.device != x.device:
                    acc = StatsAccumulator(d, device=x.device, extras=self.extras, authors=True)
                self._acc[name] = acc
            n = rows.shape[0]
            mmr_n, cos_n = self.mmr_max_tokens, self.cos_max_tokens
            sub_mmr = mmr_n is not None and n > mmr_n
            sub_cos = cos_n is not None and n > cos_n
            perm = self._perms.get((n, rows.device)) if sub_mmr or sub_cos else None
            if perm is None and (sub_mmr or sub_cos):  # one seeded permutation per forward
                g = torch.Generator().manual_seed(self.seed + self._measured)
                perm = torch.randperm(n, generator=g).to(rows.device)
                self._perms[(n, rows.device)] = perm
            acc.add_point(rows, perm, mmr_n, cos_n)

    # -- control ------------------------------------------------------------------------------

    def set_mask(self, mask: torch.Tensor | None) -> None:
        """Use ``mask`` (leading shape of the activations, true/1 = real token) for the next
        forwards until changed; ``None`` removes it. An ``attention_mask`` argument of the
        root's forward takes precedence for its own call."""
        self._mask = mask

    def number_forwards(self, start: int, stride: int = 1) -> None:
        """Number the next measured forward ``start`` (then ``start + stride``, …): its
        subsamples are seeded by ``seed + start``. Training loops derive it from the step and
        the global micro-batch (:class:`outlierlab.measuring.MeasureEvery`: rank r of w numbers
        its forwards r, r + w, …), so a resumed run, or the same batch on another number of
        ranks, draws the same ones."""
        self._measured, self._stride = start, stride

    def reset(self) -> None:
        """Forget all statistics (hooks stay). The accumulators are zeroed and kept aside for
        the same points' next forwards (no fresh buffers per measured step)."""
        for name, acc in self._acc.items():
            acc.reset()
            self._spare[name] = acc
        self._acc.clear()
        self._entropy.clear()

    # -- results ------------------------------------------------------------------------------

    def results(self, all_reduce: bool = False) -> dict[str, dict]:
        """Point name → metrics (``kurtosis``, ``mmr``, ``cos_sim``, ``outlier_neurons``,
        ``tokens``, ``kurtosis_authors``, ``corr_authors``; with ``extras`` also
        ``kurtosis_centred``, ``token_excess_kurtosis``, ``share_above_6``), in model order;
        only points measured so far. ``all_reduce`` sums over ``torch.distributed`` ranks
        (every rank must call it)."""
        out: dict[str, dict] = {}
        for p in self.points:
            acc = self._acc.get(p.name)
            if acc is None:
                continue
            if all_reduce:
                acc = acc.copy().all_reduce()
            out[p.name] = acc.result(self.k)
        return out

    def attention_entropy(self, all_reduce: bool = False) -> dict[str, float]:
        """Attention-layer name → mean entropy (nats) of its attention distributions over the
        measured forwards' sequences, heads and query positions, in model order; empty when the
        model exposes none. ``all_reduce`` sums over ``torch.distributed`` ranks (every rank
        must call it)."""
        out: dict[str, float] = {}
        for name in self.attn_points:
            acc = self._entropy.get(name)
            if acc is None:
                continue
            if all_reduce:
                import torch.distributed as dist

                acc = acc.clone()
                if dist.is_available() and dist.is_initialized():
                    dist.all_reduce(acc, op=dist.ReduceOp.SUM)
            total, rows = acc.tolist()
            out[name] = total / rows if rows else math.nan
        return out

    def summary(self, results: dict[str, dict] | None = None) -> dict[str, float]:
        """``kurtosis_mean``, ``kurtosis_max``, ``mmr_mean``, ``cos_sim_mean`` over the points
        (NaN values skipped; NaN when nothing was measured)."""
        res = self.results() if results is None else results

        def vals(key: str) -> list[float]:
            return [v[key] for v in res.values() if math.isfinite(v[key])]

        def mean(xs: list[float]) -> float:
            return sum(xs) / len(xs) if xs else math.nan

        kurt = vals("kurtosis")
        return {
            "kurtosis_mean": mean(kurt),
            "kurtosis_max": max(kurt) if kurt else math.nan,
            "mmr_mean": mean(vals("mmr")),
            "cos_sim_mean": mean(vals("cos_sim")),
        }

    def to_dict(self) -> dict:
        """``{"tokens", "points": [{"name", ...metrics}], "summary"}``, JSON-safe (NaN → None)."""
        res = self.results()
        tokens = max((v["tokens"] for v in res.values()), default=0)
        out = {
            "tokens": tokens,
            "points": [{"name": n, **v} for n, v in res.items()],
            "summary": self.summary(res),
        }
        entropy = self.attention_entropy()
        if entropy:
            out["attn_entropy"] = entropy
        return json_safe(out)

    def to_json(self, indent: int | None = 2) -> str:
        """:meth:`to_dict` as a JSON string."""
        return json.dumps(self.to_dict(), indent=indent)


class _EntropySink:
    """What the monitor puts in an attention module's ``probs_sink`` on measured forwards:
    ``rows`` picks the sequences, calling it adds their attention entropy to the layer's sums."""

    __slots__ = ("mon", "name")

    def __init__(self, mon: OutlierMonitor, name: str):
        self.mon, self.name = mon, name

    def rows(self, batch: int, seq_len: int, device: torch.device) -> torch.Tensor | None:
        return self.mon._sequences(batch, seq_len, device)

    def __call__(self, probs: torch.Tensor) -> None:
        """Add the entropy of ``probs`` (…, T_q, T_k)."""
        self._add(attention_entropy_sum(probs), probs[..., 0].numel(), probs.device)

    def causal_logits(self, z: torch.Tensor) -> None:
        """Add the entropy of softmax(z + causal mask) for a plain-softmax layer's float32
        logits ``z`` (…, T_q, T_k), handed over as scratch: on CPU one pass per row through
        :func:`outlierlab.fused.causal_entropy_sum` when numba is there, else the masked
        softmax and :func:`~outlierlab.metrics.softmax_entropy_sum` (no log per entry)."""
        if z.device.type == "cpu" and z.dtype == torch.float32 and z.is_contiguous() \
                and fused.available():  # fmt: skip
            total, rows = fused.causal_entropy_sum(z.numpy())
            self._add(total, rows, z.device)
            return
        z = z.add_(causal_bias(z.shape[-2], z.shape[-1], z.device, finite=True))
        self._add(softmax_entropy_sum(z.softmax(-1), z, overwrite=True), z[..., 0].numel(),
                  z.device)  # fmt: skip

    def _add(self, total: torch.Tensor | float, rows: int, device: torch.device) -> None:
        acc = self.mon._entropy.get(self.name)
        if acc is None:
            acc = torch.zeros(2, dtype=torch.float64, device=device)
            self.mon._entropy[self.name] = acc
        acc[0] += total
        acc[1] += rows


def due(count: int, every: int) -> bool:
    """Whether number ``count`` is measured when measuring every ``every``-th (0: never):
    forward calls 0, k, 2k, … here; optimiser steps k, 2k, … (1-based) in
    :class:`outlierlab.measuring.MeasureEvery`."""
    return every > 0 and count % every == 0

