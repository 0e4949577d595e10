"""Fake-quantised copies of a model: every ``nn.Linear`` (and Hugging Face GPT-2's ``Conv1D``,
a linear with a transposed weight) becomes a :class:`QuantLinear` on a deep copy, so the
caller's model and the files on disk are never modified (science §4).

A :class:`QuantLinear` computes ``F.linear(A(x / s), Q(W · s), b)``: ``A`` the activation
quantiser of its input, ``Q`` the weight quantiser (applied once and cached), ``s`` the optional
SmoothQuant per-input-channel scale (1 without ``--smooth``). The LM head stays in full
precision unless asked for. Optionally the residual stream (embedding output and every block
output) passes through an activation quantiser too, via forward hooks on the copy.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from outlierlab.errors import ConfigError, ModelLoadError
from outlierlab.quant.config import QuantConfig
from outlierlab.quant.gptq import gptq_quantize
from outlierlab.quant.quantizers import (
    RUNNING_MOMENTUM,
    exact_percentile_range,
    fake_quant,
    fake_quant_fp8,
    fp8_scale,
    grid_quantize_weight,
    percentile_range,
    quantize_dynamic,
    quantize_fp8,
    quantize_weight,
    quantize_weight_groups,
    scale_zero_point,
)
from outlierlab.structure import Point, text_config

HEAD_NAMES = ("lm_head", "head", "unembed")
RESERVOIR_PER_BATCH = 1 << 16  # values kept per calibration batch for percentile ranges
RUNNING = ("running", "running-percentile")  # Bondarenko et al.'s running ranges


def is_conv1d(module: nn.Module) -> bool:
    """HF GPT-2's ``Conv1D``: y = x @ W + b with W of shape (in, out) (no transformers import)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def is_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` computing x Wᵀ + b (its own forward), or HF ``Conv1D``."""
    if isinstance(module, nn.Linear):
        return type(module).forward is nn.Linear.forward
    return is_conv1d(module)


def is_custom_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` subclass with a forward of its own (DeepSeek-V4's grouped output
    projection): wrapped like experts, its weight quantised in place and its forward kept."""
    return isinstance(module, nn.Linear) and not is_linear(module)


class ActStats:
    """Running sums for one quantiser's SQNR and range over the evaluated tokens."""

    def __init__(self) -> None:
        self.signal = 0.0  # Σ x²
        self.noise = 0.0  # Σ (x - q(x))²
        self.lo = float("inf")
        self.hi = float("-inf")

    def update(self, x: torch.Tensor, q: torch.Tensor) -> None:
        xf = x.detach().float()
        self.signal += float(xf.square().sum())
        self.noise += float((xf - q.detach().float()).square_().sum())
        lo, hi = torch.aminmax(xf)  # one pass for both ends
        self.lo = min(self.lo, float(lo))
        self.hi = max(self.hi, float(hi))


class ActQuant(nn.Module):
    """Activation fake-quantiser. ``mode``: ``off`` (identity), ``observe`` (identity, records
    the calibration range; with a ``running`` range it quantises with its range so far, as
    Bondarenko et al.'s range estimation does) or ``quant``. Per-tensor static ranges come from
    :meth:`finalize`; per-token ranges are computed from each input (dynamic).

    ``measure`` (set by the layer report): Kurt and max/median (science §1 Eq. 1, 2) of the
    tensors it quantises, over their last dim (``features``: False for attention scores and
    probabilities, whose last dim is the keys)."""

    def __init__(self, cfg: QuantConfig) -> None:
        super().__init__()
        self.bits = cfg.a_bits
        self.format = cfg.a_format  # int or fp8 (``none``: calibrate leaves the quantiser off)
        self.symmetric = cfg.a_symmetric
        self.granularity = cfg.a_granularity
        self.range_method = cfg.a_range
        self.percentile = cfg.a_percentile
        self.mode = "off"
        self.register_buffer("scale", None)
        self.register_buffer("zero", None)
        self.calib_lo: float | None = None
        self.calib_hi: float | None = None
        self._static: tuple[float, float] | None = None  # (scale, zero) once calibrated
        self._samples: list[torch.Tensor] = []
        self._batches = 0
        self.stats: ActStats | None = None
        self.uncalibrated = False  # saw no calibration batch (see finalize)
        self.features = True  # its last dim is a feature dim (Kurt is meaningful)
        self.measure = False
        self.kurt_acc: Any = None  # a stats.StatsAccumulator while ``measure``
        self.weight_signal = self.weight_noise = 0.0  # weights quantised with this site (paper)
        self.has_weight = False

    def reset(self) -> None:
        """Forget the calibration (ranges, samples): ready for another observing pass."""
        self.calib_lo = self.calib_hi = None
        self._static, self._samples, self._batches = None, [], 0
        self.scale = self.zero = None
        self.uncalibrated = False

    def observe(self, x: torch.Tensor) -> None:
        """Widen the running [min, max] (``minmax``), keep a subsample (``percentile``) or move
        the exponential average (``running``: lo ← 0.1 · batch min + 0.9 · lo, the first batch
        as it is; ``running-percentile``: the batch's [P(100-p), P(p)] instead)."""
        xd = x.detach()
        if self.range_method in RUNNING:
            if self.range_method == "running":
                lo, hi = (float(v) for v in torch.aminmax(xd))
            else:
                lo, hi = exact_percentile_range(xd, self.percentile)
            if self.calib_lo is None or self.calib_hi is None:
                self.calib_lo, self.calib_hi = lo, hi
            else:
                m = RUNNING_MOMENTUM
                self.calib_lo = (1 - m) * lo + m * self.calib_lo
                self.calib_hi = (1 - m) * hi + m * self.calib_hi
        elif self.range_method == "percentile":
            flat = xd.reshape(-1).float()
            if flat.numel() > RESERVOIR_PER_BATCH:
                g = torch.Generator().manual_seed(self._batches)
                idx = torch.randperm(flat.numel(), generator=g)[:RESERVOIR_PER_BATCH]
                flat = flat[idx.to(flat.device)]
            self._samples.append(flat.cpu())
        else:
            lo, hi = (float(v) for v in torch.aminmax(xd))  # one pass
            self.calib_lo = lo if self.calib_lo is None else min(self.calib_lo, lo)
            self.calib_hi = hi if self.calib_hi is None else max(self.calib_hi, hi)
        self._batches += 1

    def finalize(self) -> None:
        """Fix the static range from what :meth:`observe` saw."""
        if self.range_method == "percentile" and self._samples:
            lo, hi = percentile_range(torch.cat(self._samples), self.percentile)
            self.calib_lo, self.calib_hi = float(lo), float(hi)
            self._samples = []
        if self.calib_lo is None or self.calib_hi is None:
            # never reached by a calibration batch (a decoder's cross-attention without an
            # encoder, an expert no calibration token was routed to): at evaluation its range
            # comes from its own input (dynamic per tensor), and the report says so
            self.uncalibrated = True
            return
        # float64 for running ranges (theirs are float64 after np.percentile), else float32
        dtype = torch.float64 if self.range_method in RUNNING else torch.float32
        lo = torch.tensor(self.calib_lo, dtype=dtype)
        hi = torch.tensor(self.calib_hi, dtype=dtype)
        if self.format == "fp8":  # s = calibration max|x| / 448
            self.scale, self.zero = fp8_scale(torch.maximum(lo.abs(), hi.abs())), lo.new_zeros(())
            self._static = (float(self.scale), 0.0)
            return
        self.scale, self.zero = scale_zero_point(lo, hi, self.bits, self.symmetric)
        self._static = (float(self.scale), float(self.zero))  # python scalars: cheapest ops

    def _current(self) -> tuple[float, float]:
        """(scale, zero) of the running range so far (calibration of a ``running`` range)."""
        lo = torch.tensor(self.calib_lo, dtype=torch.float64)
        hi = torch.tensor(self.calib_hi, dtype=torch.float64)
        scale, zero = scale_zero_point(lo, hi, self.bits, self.symmetric)
        return float(scale), float(zero)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "off":
            return x
        if self.mode == "observe":
            self.observe(x)
            if self.range_method in RUNNING and self.format == "int":
                return fake_quant(x, *self._current(), self.bits, self.symmetric)
            return x
        if self.measure and self.features:
            if self.kurt_acc is None:
                from outlierlab.stats import StatsAccumulator

                self.kurt_acc = StatsAccumulator(x.shape[-1], device=x.device, extras=False)
            self.kurt_acc.update(x.detach(), mmr_max_tokens=256)
        if self.format == "fp8":
            q = self._fp8(x)
        elif self.granularity == "token":
            q = quantize_dynamic(x, self.bits, self.symmetric, "token")
        elif self._static is None:
            if not self.uncalibrated:
                raise RuntimeError("static activation quantiser used before calibration")
            q = quantize_dynamic(x, self.bits, self.symmetric, "tensor")
        else:
            q = fake_quant(x, *self._static, self.bits, self.symmetric)
        if self.stats is not None:
            self.stats.update(x, q)
        return q

    def _fp8(self, x: torch.Tensor) -> torch.Tensor:
        """E4M3: per token (s = max_j |x_j| / 448 per row) or static per tensor."""
        if self.granularity == "token":
            return quantize_fp8(x, "token")
        if self._static is None:
            if not self.uncalibrated:
                raise RuntimeError("static activation quantiser used before calibration")
            return quantize_fp8(x, "tensor")
        return fake_quant_fp8(x, self._static[0])


class QuantLinear(nn.Module):
    """y = F.linear(A(x / s), Q(W · s), b); weight (out, in), quantised once by
    :meth:`quantize_weight` and cached. Built from ``nn.Linear`` or HF ``Conv1D``."""

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, cfg: QuantConfig, source: str
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.source = source  # "Linear" or "Conv1D"
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bias = (
            None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        )
        self.register_buffer("weight_q", None)
        self.register_buffer("inv_smooth", None)  # 1 / s, shape (in,)
        self.act = ActQuant(cfg) if cfg.quantize_inputs else None
        self.out_act = ActQuant(cfg) if cfg.quantize_outputs else None
        self.weight_signal = 0.0
        self.weight_noise = 0.0
        self.smooth_observe = False
        self.xtx_observe = False  # GPTQ: accumulate XᵀX of the inputs (see take_xtx)
        self._xtx: torch.Tensor | None = None
        self._xmax: torch.Tensor | None = None  # per input channel max|X_j| for SmoothQuant
        self.kurt_acc: Any = None  # a stats.StatsAccumulator while per-layer stats are on
        self.enabled = True  # False: the full-precision function (quant.sensitivity)

    @classmethod
    def from_module(cls, module: nn.Module, cfg: QuantConfig) -> QuantLinear:
        if isinstance(module, nn.Linear):
            q = cls(module.weight, module.bias, cfg, "Linear")
        else:
            q = cls(module.weight.t(), module.bias, cfg, "Conv1D")  # Conv1D stores (in, out)
        online = getattr(module, "online_hadamard", None)  # quant.rotate's x → x·H pre-hook
        if online is not None:
            q.online_hadamard = online
            q.register_forward_pre_hook(online.hook)
        return q

    def take_xtx(self) -> torch.Tensor | None:
        """Σ x xᵀ over every input row seen with ``xtx_observe`` (None if none; then forgotten)."""
        xtx, self._xtx = self._xtx, None
        return xtx

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def observed(self) -> bool:
        """Whether ``smooth_observe`` recorded any input (see :meth:`take_xmax`)."""
        return self._xmax is not None

    def take_xmax(self) -> torch.Tensor:
        """The per-input-channel max|X_j| observed with ``smooth_observe`` (then forgotten)."""
        if self._xmax is None:
            raise RuntimeError("smoothing needs a calibration pass first")
        xmax, self._xmax = self._xmax, None
        return xmax

    def set_smoothing(self, alpha: float, xmax: torch.Tensor | None = None) -> None:
        """SmoothQuant: s_j = max|X_j|^α / max_i |W_ij|^(1-α); then x → x / s, W → W · s.
        ``xmax``: max|X_j| (default: what ``smooth_observe`` recorded).

        Channels never seen active (max|X_j| = 0) or with an all-zero weight column keep s_j = 1.
        """
        xmax = (self.take_xmax() if xmax is None else xmax).float()
        wmax = self.weight.detach().abs().amax(0).float()
        s = xmax.pow(alpha) / wmax.pow(1.0 - alpha)
        ok = (xmax > 0) & (wmax > 0) & torch.isfinite(s)
        s = torch.where(ok, s, torch.ones_like(s)).clamp(1e-5, 1e5)
        self.weight.data.mul_(s.to(self.weight.dtype))
        self.inv_smooth = (1.0 / s).to(self.weight.dtype)

    def quantize_weight(self, hessian: torch.Tensor | None = None) -> None:
        """Q(W) once, cached in ``weight_q``; records the weight's signal and noise power.
        FP8 (E4M3, s = max|w| / 448), integer round to nearest (per tensor, channel or group),
        or GPTQ with ``hessian`` (XᵀX of this layer's calibration inputs, after smoothing)."""
        w = self.weight.detach()
        c = self.cfg
        if c.w_format == "fp8":
            wq = quantize_fp8(w.float(), c.w_granularity)
        elif c.w_method == "gptq":
            if hessian is None:
                raise RuntimeError("GPTQ needs this layer's calibration inputs (XᵀX)")
            wq = gptq_quantize(w.float(), hessian, c.w_bits, c.w_symmetric, c.w_group_size)
        elif c.w_group_size is not None:
            wq = quantize_weight_groups(
                w.float(), c.w_bits, c.w_symmetric, c.w_group_size, c.w_range
            )
        elif c.w_range == "grid":
            wq = grid_quantize_weight(w.float(), c.w_bits)
        else:
            wq = quantize_weight(w.float(), c.w_bits, c.w_symmetric, c.w_granularity, c.w_range)
        self.set_weight_q(wq)

    def set_weight_q(self, wq: torch.Tensor) -> None:
        """Cache Q(W) (out, in) and record the weight's signal and noise power."""
        w = self.weight.detach()
        self.weight_signal = float(w.float().pow(2).sum())
        self.weight_noise = float((w.float() - wq).pow(2).sum())
        self.weight_q = wq.to(w.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.smooth_observe:
            m = x.detach().abs().reshape(-1, x.shape[-1]).amax(0)
            self._xmax = m if self._xmax is None else torch.maximum(self._xmax, m)
        if self.xtx_observe:
            rows = x.detach().reshape(-1, x.shape[-1]).float()
            xtx = rows.T @ rows
            self._xtx = xtx if self._xtx is None else self._xtx.add_(xtx)
        if self.kurt_acc is not None:
            self.kurt_acc.update(x.detach(), mmr_max_tokens=256)
        if self.inv_smooth is not None:
            x = x * self.inv_smooth
        if not self.enabled:  # x / s with W · s: the layer's full-precision function
            return F.linear(x, self.weight, self.bias)
        if self.act is not None:
            x = self.act(x)
        w = self.weight if self.weight_q is None else self.weight_q
        y = F.linear(x, w, self.bias)
        return y if self.out_act is None else self.out_act(y)

    def extra_repr(self) -> str:
        c = self.cfg
        a = f"a{c.a_bits}-{c.a_granularity}" if self.act is not None else "input as it comes"
        return (f"in={self.in_features}, out={self.out_features}, source={self.source}, "
                f"w{c.w_bits}-{c.w_granularity}, {a}"
                + (", output quantised" if self.out_act is not None else ""))


def is_experts(module: nn.Module) -> bool:
    """A mixture-of-experts layer storing its experts' weights as 3-D parameters (E, out, in)
    (or (E, in, out) with ``is_transposed``), as transformers 5 does (``gate_up_proj``,
    ``down_proj``), instead of one ``nn.Linear`` per expert."""
    if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) or is_conv1d(module):
        return False
    named = [(n, p) for n, p in module.named_parameters(recurse=False) if p.dim() == 3]
    return bool(named) and (bool(re.search("Expert|Moe|MoE", type(module).__name__))
                            or any(n.endswith("_proj") for n, _ in named))  # fmt: skip


def _rtn(w: torch.Tensor, c: QuantConfig) -> torch.Tensor:
    """Round-to-nearest Q(W) of one (out, in) matrix: FP8, group-wise or per tensor/channel
    (experts under a GPTQ scheme get this too: no per-expert Hessians are collected)."""
    if c.w_format == "fp8":
        return quantize_fp8(w, c.w_granularity)
    if c.w_group_size is not None:
        return quantize_weight_groups(w, c.w_bits, c.w_symmetric, c.w_group_size, c.w_range)
    if c.w_range == "grid":
        return grid_quantize_weight(w, c.w_bits)
    return quantize_weight(w, c.w_bits, c.w_symmetric, c.w_granularity, c.w_range)


class QuantExperts(nn.Module):
    """A 3-D-parameter experts layer with every expert's weight fake-quantised per expert (per
    output channel, or per expert matrix for ``tensor``) and its input, the hidden states routed
    to the experts, through an activation quantiser. The activation between an expert's two
    projections is computed inside transformers' expert kernel and stays unquantised (said in
    docs/quant.md). SmoothQuant leaves experts unsmoothed."""

    def __init__(self, experts: nn.Module, cfg: QuantConfig) -> None:
        super().__init__()
        self.experts = experts
        self.kind = "linear" if is_custom_linear(experts) else "experts"
        self.cfg = cfg
        self.act = ActQuant(cfg)
        self.transposed = bool(getattr(experts, "is_transposed", False))
        self.weight_signal = self.weight_noise = 0.0
        self.quantized = False

    def _weights(self) -> list[nn.Parameter]:
        """The 3-D expert weights, or a custom linear's (out, in) weight as one 'expert'."""
        if self.kind == "linear":
            return [self.experts.weight]
        return [p for p in self.experts.parameters(recurse=False) if p.dim() == 3]

    def shape(self) -> list[int]:
        """A custom linear's weight shape; (experts, parameters, largest matrix size) else."""
        ws = self._weights()
        if self.kind == "linear":
            return list(ws[0].shape)
        return [ws[0].shape[0], len(ws), max(w[0].numel() for w in ws)]

    def quantize_weight(self) -> None:
        """Q(W_e) of every expert matrix, in place (the experts belong to a wrapped copy)."""
        if self.quantized:
            return
        c = self.cfg
        signal = noise = 0.0
        for p in self._weights():
            w = p.detach().float()
            w = w[None] if w.dim() == 2 else w
            w = w.transpose(1, 2) if self.transposed else w  # (E, out, in)
            wq = torch.stack([_rtn(we, c) for we in w])
            signal += float(w.square().sum())
            noise += float((w - wq).square().sum())
            wq = wq.transpose(1, 2) if self.transposed else wq
            p.data.copy_(wq.reshape(p.shape).to(p.dtype))
        self.weight_signal, self.weight_noise, self.quantized = signal, noise, True

    def __getattr__(self, name: str) -> Any:
        """The wrapped layer's attributes (``in_features``, ``num_experts``, ...), which model
        code reads through the wrapper, as Ergo's router reads ``self.linear.in_features``."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("_modules", {}).get("experts")
            if inner is None:
                raise
            return getattr(inner, name)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return self.experts(self.act(hidden_states), *args, **kwargs)


def _any_linear(module: nn.Module) -> bool:
    """A linear of either kind: :func:`is_linear` or :func:`is_custom_linear`."""
    return is_linear(module) or is_custom_linear(module)


def router_names(model: nn.Module) -> set[str]:
    """Linears that route tokens to experts (out features = the number of experts, named
    ``gate``/``router``, or held by a module so named, as Ergo's ``gate.linear``): serving
    engines keep them in 16-bit, and so do we."""
    cfg = text_config(getattr(model, "config", None))
    counts = {getattr(cfg, k, None) for k in ("num_experts", "num_local_experts",
                                              "n_routed_experts", "moe_num_experts")}  # fmt: skip
    counts = {c for c in counts if isinstance(c, int) and c > 1}
    out = set()
    for name, m in model.named_modules():
        last = ".".join(name.split(".")[-2:]) if name.endswith(".linear") else name.split(".")[-1]
        if _any_linear(m) and ("gate" in last or "router" in last) and (
                m.weight.shape[0] in counts or "router" in last):  # fmt: skip
            out.add(name)
    return out


def head_names(model: nn.Module) -> set[str]:
    """Names of the module(s) producing logits: HF ``get_output_embeddings()``, a linear (of
    either kind) whose weight is tied to an embedding, or one named ``lm_head``, ``head`` or
    ``unembed``."""
    out_emb = None
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        try:
            out_emb = getter()
        except (NotImplementedError, AttributeError):
            out_emb = None
    emb_ptrs = {m.weight.data_ptr() for m in model.modules() if isinstance(m, nn.Embedding)}
    heads = set()
    for name, m in model.named_modules():
        if not _any_linear(m):
            continue
        if m is out_emb or name.rsplit(".", 1)[-1] in HEAD_NAMES or m.weight.data_ptr() in emb_ptrs:
            heads.add(name)
    return heads


def linear_names(model: nn.Module, include_head: bool = False) -> list[str]:
    """Names of every linear layer to quantise, in model order (the head only if asked)."""
    keep = router_names(model) | (set() if include_head else head_names(model))
    return [n for n, m in model.named_modules() if is_linear(m) and n and n not in keep]


def experts_names(model: nn.Module) -> list[str]:
    """Names of every 3-D-parameter experts layer (:func:`is_experts`) and custom-forward
    linear (:func:`is_custom_linear`), in model order; routers and the head excluded."""
    keep = router_names(model) | head_names(model)
    return [n for n, m in model.named_modules()
            if n and n not in keep and (is_experts(m) or is_custom_linear(m))]  # fmt: skip


class PaperSites:
    """Bondarenko et al.'s extra sites (``cfg.paper_sites``): quant/paper.py builds them from this
    module's :class:`ActQuant` and :class:`QuantLinear` and registers itself here when imported
    (``outlierlab.quant`` imports it), so this module never imports it back."""

    check_model: Callable[[nn.Module], None] | None = None
    linears: Callable[[nn.Module, list[str]], list[str]] | None = None
    attach: Callable[[nn.Module, QuantConfig], None] | None = None


def wrap(model: nn.Module, cfg: QuantConfig) -> nn.Module:
    """A deep copy of ``model`` in eval mode with every selected linear replaced by a
    :class:`QuantLinear` (quantisers off until calibrated). The original is untouched."""
    names = linear_names(model, cfg.quantize_head)
    if cfg.paper_sites:
        assert PaperSites.check_model and PaperSites.linears, "outlierlab.quant.paper not imported"
        PaperSites.check_model(model)
        names = PaperSites.linears(model, names)
    experts = experts_names(model)
    if not names and not experts:
        raise ModelLoadError(
            f"{type(model).__name__} has no linear layers to quantise "
            "(nn.Linear or HF Conv1D, LM head excluded unless quantize_head)"
        )
    qmodel = copy.deepcopy(model).eval()
    for p in qmodel.parameters():
        p.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = qmodel.get_submodule(parent_name) if parent_name else qmodel
        setattr(parent, child, QuantLinear.from_module(getattr(parent, child), cfg))
    for name in experts:
        parent_name, _, child = name.rpartition(".")
        parent = qmodel.get_submodule(parent_name) if parent_name else qmodel
        setattr(parent, child, QuantExperts(getattr(parent, child), cfg))
    if cfg.quantize_residual:
        _attach_output_quant(residual_modules(qmodel), cfg, "residual")
    if cfg.quantize_norms:
        norms = [Point(n, m) for n, m in norm_modules(qmodel).items()]
        _attach_output_quant(norms, cfg, "norm")
    if cfg.paper_sites and PaperSites.attach:
        PaperSites.attach(qmodel, cfg)
    return qmodel


def norm_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every normalisation layer (``nn.LayerNorm``, ``nn.RMSNorm`` or a class whose name ends
    in ``Norm``/``RMSNorm``, such as HF's ``LlamaRMSNorm``) by module name, in model order;
    q/k norms inside attention included."""
    return {
        n: m
        for n, m in model.named_modules()
        if n and (isinstance(m, (nn.LayerNorm, nn.RMSNorm)) or type(m).__name__.endswith("Norm"))
    }


def residual_modules(model: nn.Module) -> list[Point]:
    """The residual-stream points (``embed.resid_post``, ``blocks.{i}.resid_post``) that
    :func:`outlierlab.structure.discover` finds, in model order."""
    from outlierlab.structure import StructureError, discover

    try:
        return discover(model).points()
    except StructureError as exc:
        raise ConfigError(f"residual-stream quantisation needs the model's blocks: {exc}") from None


def _replace_first(value: Any, quant: ActQuant) -> Any:
    """``value`` with its hidden states (the tensor, or the first element of a tuple, list,
    named tuple or HF ``ModelOutput``) quantised."""
    if isinstance(value, torch.Tensor):
        return quant(value)
    if isinstance(value, dict) and value:  # HF ModelOutput: its first field
        key = next(iter(value))
        if isinstance(value[key], torch.Tensor):
            out = copy.copy(value)
            out[key] = quant(value[key])
            return out
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        items = [quant(value[0]), *value[1:]]
        if isinstance(value, list) or type(value) is tuple:
            return items if isinstance(value, list) else tuple(items)
        return type(value)(*items)  # a named tuple
    raise TypeError(f"cannot quantise a {type(value).__name__}")


def _output_hook(module: nn.Module, args: Any, out: Any) -> Any:
    return _replace_first(out, module.outlierlab_output_quant)


def _input_hook(module: nn.Module, args: tuple, kwargs: dict) -> Any:
    quant = module.outlierlab_input_quant
    if args:
        return (_replace_first(args[0], quant), *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": _replace_first(kwargs["hidden_states"], quant)}


def _attach_output_quant(points: list[Point], cfg: QuantConfig, kind: str) -> None:
    """An :class:`ActQuant` on each point's output (or first input, ``kind="input"`` points),
    registered as a child of the hooked module."""
    for p in points:
        aq = ActQuant(cfg)
        aq.point_name, aq.kind = p.name, kind
        if p.kind == "input":
            p.module.outlierlab_input_quant = aq
            p.module.register_forward_pre_hook(_input_hook, with_kwargs=True)
        else:
            p.module.outlierlab_output_quant = aq
            p.module.register_forward_hook(_output_hook)


def quant_experts(qmodel: nn.Module) -> dict[str, QuantExperts]:
    """Every :class:`QuantExperts` of a wrapped model, by module name, in model order."""
    return {n: m for n, m in qmodel.named_modules() if isinstance(m, QuantExperts)}


def quant_linears(qmodel: nn.Module) -> dict[str, QuantLinear]:
    """Every :class:`QuantLinear` of a wrapped model, by module name, in model order."""
    return {n: m for n, m in qmodel.named_modules() if isinstance(m, QuantLinear)}


def residual_quantizers(qmodel: nn.Module) -> dict[str, ActQuant]:
    """Output quantisers hooked on modules by point name: the residual stream
    (``quantize_residual``) and norm outputs (``quantize_norms``); ``aq.kind`` says which."""
    return {
        m.point_name: m
        for m in qmodel.modules()
        if isinstance(m, ActQuant) and hasattr(m, "point_name")
    }


def act_quantizers(qmodel: nn.Module) -> Iterator[ActQuant]:
    yield from (m for m in qmodel.modules() if isinstance(m, ActQuant))


def set_act_mode(qmodel: nn.Module, mode: str) -> None:
    """Set every activation quantiser to ``off``, ``observe`` or ``quant``."""
    for aq in act_quantizers(qmodel):
        aq.mode = mode
