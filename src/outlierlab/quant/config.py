"""Quantisation config: one validated dataclass and the named schemes (science §4)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from outlierlab.errors import ConfigError

MIN_BITS, MAX_BITS = 2, 16
W_GRANULARITIES = ("tensor", "channel")
A_GRANULARITIES = ("tensor", "token")
W_RANGES = ("minmax", "mse", "grid")
A_RANGES = ("minmax", "percentile", "running", "running-percentile")
W_FORMATS = ("int", "fp8")
A_FORMATS = ("int", "fp8", "none")
W_METHODS = ("rtn", "gptq")
ROTATIONS = ("quarot",)
SERVED = ("w_format", "a_format", "w_group_size", "w_method", "rotation", "smooth_search",
          "paper_sites")
"""Fields only the serving schemes (and w8a8-paper) set: with other bits their name keeps the
scheme's own."""
SMOOTH_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
"""α tried by ``smooth_search`` (SmoothQuant's paper finds 0.4–0.6 for most models, 0.75–0.85
for GLM-130B-like outliers; this grid spans both at SmoothQuant's own step of 0.1)."""


@dataclass
class QuantConfig:
    """Simulated post-training quantisation of every linear layer (round to nearest)."""

    w_bits: int = 8
    """Weight bits, 2..16."""
    a_bits: int = 8
    """Bits of each linear layer's input activations, 2..16."""
    w_symmetric: bool = True
    """Symmetric weight grid (restricted range ±(2^(b-1)-1)); False: asymmetric 0..2^b-1."""
    w_granularity: str = "tensor"
    """``tensor``: one scale per weight matrix; ``channel``: one per output channel."""
    w_range: str = "mse"
    """``minmax``, ``mse`` (search over clipping ratios minimising the weight's squared error) or
    ``grid`` (Bondarenko et al.'s MSE grid: 100 absolute ranges up to max|w| + 0.5, their signed
    [-128, 127] or, for w ≥ 0, unsigned grid; :func:`.quantizers.grid_weight_range`)."""
    a_symmetric: bool = False
    """Symmetric activation grid; False: asymmetric with a zero point."""
    a_granularity: str = "tensor"
    """``tensor``: one static range per layer from calibration; ``token``: dynamic per token."""
    a_range: str = "minmax"
    """Static ranges: ``minmax`` (min and max over all calibration batches), ``percentile``,
    ``running`` (Bondarenko et al.'s running min-max: an exponential average, momentum 0.9, of
    each batch's min and max, each quantiser quantising with its range so far during calibration)
    or ``running-percentile`` (the same average of each batch's [P(100-p), P(p)], their OPT
    command's ``--ranges_acts running_minmax --percentile 99.999``)."""
    a_percentile: float = 99.999
    """Percentile for ``a_range=percentile``: range = [P(100-p), P(p)]."""
    quantize_head: bool = False
    """Quantise the LM head too (left in full precision by default, as the paper's setting)."""
    quantize_residual: bool = False
    """Also quantise the residual stream: the embedding output and every block output."""
    quantize_outputs: bool = False
    """Also quantise every quantised linear's output (Bondarenko et al.'s setting)."""
    quantize_norms: bool = False
    """Also quantise every normalisation layer's output (LayerNorm / RMSNorm modules)."""
    quantize_inputs: bool = True
    """Quantise every quantised linear's input (False: inputs arrive already quantised by the
    previous site, as in Bondarenko et al.'s setting)."""
    paper_sites: bool = False
    """Bondarenko et al.'s sites inside outlierlab's GPT (:mod:`outlierlab.quant.paper`): weights
    of embeddings and norms, the embedding sum, q, k, v, QKᵀ, softmax, P·V, the MLP activation
    output, both residual sums; with ``quantize_norms`` every norm output."""
    smooth_alpha: float | None = None
    """SmoothQuant migration strength α in [0, 1]; None: no smoothing."""
    smooth_search: bool = False
    """Pick α from ``SMOOTH_GRID`` by the lowest cross-entropy on the calibration batches."""
    w_format: str = "int"
    """``int`` (the bits' integer grid) or ``fp8`` (E4M3, s = max|w| / 448; bits ignored)."""
    a_format: str = "int"
    """``int``, ``fp8`` (E4M3, s = max|x| / 448) or ``none`` (weight-only: inputs stay 16-bit)."""
    w_group_size: int | None = None
    """Per-channel weights with one range per this many input columns (None: whole rows)."""
    w_method: str = "rtn"
    """``rtn`` (round to nearest) or ``gptq`` (Frantar et al. 2022, Hessians from calibration)."""
    rotation: str | None = None
    """``quarot``: quantise a rotated copy (residual stream and online Hadamard on down_proj)."""
    name: str = field(default="custom", compare=False)
    """Scheme name, for reports."""

    def __post_init__(self) -> None:
        for key in ("w_bits", "a_bits"):
            bits = getattr(self, key)
            if isinstance(bits, bool) or not isinstance(bits, int):
                raise ConfigError(
                    f"{key} must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits!r}"
                )
            if not MIN_BITS <= bits <= MAX_BITS:
                raise ConfigError(f"{key} must be in {MIN_BITS}..{MAX_BITS}, got {bits}")
        _choice("w_granularity", self.w_granularity, W_GRANULARITIES)
        _choice("a_granularity", self.a_granularity, A_GRANULARITIES)
        _choice("w_range", self.w_range, W_RANGES)
        _choice("a_range", self.a_range, A_RANGES)
        if not 50.0 < float(self.a_percentile) <= 100.0:
            raise ConfigError(f"a_percentile must be in (50, 100], got {self.a_percentile}")
        if self.smooth_alpha is not None and not 0.0 <= float(self.smooth_alpha) <= 1.0:
            raise ConfigError(f"smooth alpha must be in [0, 1], got {self.smooth_alpha}")
        _choice("w_format", self.w_format, W_FORMATS)
        _choice("a_format", self.a_format, A_FORMATS)
        _choice("w_method", self.w_method, W_METHODS)
        if self.rotation is not None:
            _choice("rotation", self.rotation, ROTATIONS)
        g = self.w_group_size
        if g is not None and (isinstance(g, bool) or not isinstance(g, int) or g < 1):
            raise ConfigError(f"w_group_size must be a positive integer or None, got {g!r}")
        if g is not None and self.w_granularity != "channel":
            raise ConfigError("w_group_size needs w_granularity channel (groups split each row)")
        if self.w_format == "fp8" and (self.w_range != "minmax" or self.w_method != "rtn"
                                       or g is not None):  # fmt: skip
            raise ConfigError("fp8 weights take s = max|w| / 448: w_range minmax, w_method rtn, "
                              "no w_group_size")  # fmt: skip
        if self.w_method == "gptq" and self.w_range != "minmax":
            raise ConfigError("w_method gptq takes min-max ranges (w_range minmax)")
        if self.w_range == "grid" and (self.w_granularity != "tensor" or not self.w_symmetric
                                       or self.w_method != "rtn" or self.w_format != "int"):
            raise ConfigError("w_range grid is Bondarenko et al.'s per-tensor symmetric integer "
                              "weight range: w_granularity tensor, w_symmetric, w_method rtn")
        if self.smooth_search and self.smooth_alpha is not None:
            raise ConfigError("give smooth_alpha or smooth_search, not both")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> QuantConfig:
        """A copy with some fields changed (validated); unknown field → ConfigError."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"unknown quantisation option(s) {sorted(unknown)}")
        return dataclasses.replace(self, **changes)


SCHEMES: dict[str, dict[str, Any]] = {
    # science §4, the paper's likely setting (Bondarenko et al.): per-tensor symmetric weights with
    # MSE range search, asymmetric per-tensor activations with static min-max calibration.
    "w8a8-tensor": dict(w_bits=8, a_bits=8),
    # SmoothQuant / torchao: per-output-channel weights, symmetric per-token dynamic activations.
    "w8a8-dynamic": dict(
        w_bits=8,
        a_bits=8,
        w_granularity="channel",
        w_range="minmax",
        a_symmetric=True,
        a_granularity="token",
    ),
    # Weight-only-ish low bit: 4-bit per-channel MSE weights, 8-bit per-token activations.
    "w4a8": dict(
        w_bits=4,
        a_bits=8,
        w_granularity="channel",
        w_range="mse",
        a_symmetric=True,
        a_granularity="token",
    ),
    # Low-bit activations: 8-bit per-channel weights, 4-bit per-token dynamic activations.
    "w8a4": dict(
        w_bits=8,
        a_bits=4,
        w_granularity="channel",
        w_range="minmax",
        a_symmetric=True,
        a_granularity="token",
    ),
    # w8a8-tensor with 6-bit activations: where int8 moves nothing at CPU scale (Kurt ≤ 10,
    # width 128), the report ranks runs by the damage at this narrower width instead.
    "w8a6-tensor": dict(w_bits=8, a_bits=6),
    # w8a8-tensor at 6 bits on both sides: the middle column of the mitigations leaderboard
    # (docs/mitigations.md) between W8A8 and W4A4.
    "w6a6-tensor": dict(w_bits=6, a_bits=6),
    # Before issue 23 this was "w8a8-paper": static per-tensor min-max ranges on every linear's
    # input and output, the residual stream (embedding output and block outputs) and every norm
    # output; weights as w8a8-tensor; the head in full precision. Works on any model.
    "w8a8-outputs": dict(
        w_bits=8, a_bits=8, quantize_residual=True, quantize_outputs=True, quantize_norms=True
    ),
    # Bondarenko et al. (2023) as their code runs it (outlier-free-transformers, validate_clm.py
    # with the README's OPT INT8 command; docs/quant.md "w8a8-paper"): per-tensor symmetric
    # weights with their MSE grid, asymmetric static activations with a running (momentum 0.9)
    # 99.999-percentile range, quantised at their sites (quant/paper.py); head in full precision.
    # outlierlab GPTs only (the sites are inside its attention).
    "w8a8-paper": dict(
        w_bits=8, a_bits=8, w_range="grid", a_range="running-percentile", a_percentile=99.999,
        quantize_inputs=False, quantize_norms=True, paper_sites=True,
    ),
    # FP8 E4M3 (vLLM / TensorRT-LLM / SGLang "fp8"): per-output-channel weights, s = max|w|/448;
    # activations static per tensor (s = calibration max|x| / 448) or dynamic per token.
    "fp8-tensor": dict(w_format="fp8", a_format="fp8", w_granularity="channel",
                       w_range="minmax", a_symmetric=True),
    "fp8-dynamic": dict(w_format="fp8", a_format="fp8", w_granularity="channel",
                        w_range="minmax", a_symmetric=True, a_granularity="token"),
    # Weight-only 4-bit, groups of 128 input columns, asymmetric min-max (AWQ/GPTQ layout in
    # vLLM's Marlin, llama.cpp Q4-like); activations stay 16-bit.
    "w4a16-rtn": dict(w_bits=4, w_symmetric=False, w_granularity="channel", w_range="minmax",
                      w_group_size=128, a_format="none"),
    "w4a16-gptq": dict(w_bits=4, w_symmetric=False, w_granularity="channel", w_range="minmax",
                       w_group_size=128, a_format="none", w_method="gptq"),
    # QuaRot (Ashkboos et al. 2024): rotated residual stream + online Hadamard on down_proj's
    # input, 4-bit per-channel symmetric GPTQ weights, 4-bit symmetric per-token activations.
    "w4a4-quarot": dict(w_bits=4, a_bits=4, w_granularity="channel", w_range="minmax",
                        w_method="gptq", a_symmetric=True, a_granularity="token",
                        rotation="quarot"),
    # The same rotation with round-to-nearest weights (OSP's W4A4 headline is RTN): 4-bit
    # per-channel symmetric min-max weights, 4-bit per-token activations; the leaderboard's W4A4.
    "w4a4-online": dict(w_bits=4, a_bits=4, w_granularity="channel", w_range="minmax",
                        a_symmetric=True, a_granularity="token", rotation="quarot"),
    # SmoothQuant (Xiao et al. 2023) on w8a8-tensor with α searched per model on calibration CE.
    "smoothquant-search": dict(w_bits=8, a_bits=8, smooth_search=True),
}


def scheme(name: str, **overrides: Any) -> QuantConfig:
    """The named scheme (one of ``SCHEMES``: ``w8a8-tensor``, ``w8a8-dynamic``, ``w8a8-outputs``,
    ``w8a8-paper``,
    ``w4a8``, ``w8a4``, ``w8a6-tensor``, ``w6a6-tensor``, ``fp8-tensor``, ``fp8-dynamic``,
    ``w4a16-rtn``, ``w4a16-gptq``, ``w4a4-quarot``, ``w4a4-online``, ``smoothquant-search``)
    with overrides; other widths by overriding bits
    (``scheme("w8a8-tensor", w_bits=16, a_bits=16)``)."""
    if name not in SCHEMES:
        raise ConfigError(f"unknown scheme {name!r}; allowed: {', '.join(SCHEMES)}")
    fields = {**SCHEMES[name], **overrides}
    base_fields = {**dataclasses.asdict(QuantConfig()), **SCHEMES[name]}
    bits = ("w_bits", "a_bits")
    bits_changed = any(fields.get(k, base_fields[k]) != base_fields[k] for k in bits)
    base = QuantConfig(name=name)
    cfg = base.replace(**fields)
    if bits_changed and set(SCHEMES[name]) & set(SERVED):  # fp8, w4a16, quarot, search
        return cfg.replace(name=f"{name}-w{cfg.w_bits}a{cfg.a_bits}")
    if bits_changed:  # the name then says the real widths and the activation family
        family = "tensor" if cfg.a_granularity == "tensor" else "dynamic"
        cfg = cfg.replace(name=f"w{cfg.w_bits}a{cfg.a_bits}-{family}")
    return cfg


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {', '.join(allowed)}, got {value!r}")
