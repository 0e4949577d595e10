"""Optimiser config, registry (name → builder) and the entry point (science §3, §7).

The paper's contrast is diagonal vs rotated preconditioning, in pairs that share every
hyperparameter (science §7): ``adamw`` ↔ ``soap`` (Adam in Shampoo's eigenbasis) and ``adafactor``
(factored second moment, with momentum) ↔ ``shampoo`` (power 1/2, EMA statistics: AdaFactor in
Shampoo's eigenbasis, "rotated AdaFactor"). ``adamw``, ``sgd`` come from ``torch.optim``, ``soap``
from ``pytorch_optimizer``; ``adafactor`` and ``shampoo`` are :class:`factored.AdaFactor` (no
library implements them exactly); ``muon`` is :mod:`muon` (torch's Muon, fp32 Newton–Schulz on
the CPU, plus AdamW on embeddings, head, norms and gains); ``orthoadam`` is :mod:`orthoadam`
(Adam in a fixed random orthogonal basis per parameter, Kaul et al. 2025; docs/mitigations.md).

Each optimiser declares, where it is registered (:func:`register`), its *family* and the
hyperparameters it uses with their defaults: that registry is the one list of
optimiser-specific hyperparameters (:func:`hyperparameters`); :class:`OptimConfig` fills and
validates them from it. The four optimisers of the ``adam`` family have the same defaults (the
authors' AdamW recipe, science §3) and switching between them keeps the values already set
(:func:`kept_on_switch`), so a pair differs in ``optim.name`` only. Schedules:
:mod:`schedule` (torch is imported only when building an optimiser).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from outlierlab.errors import ConfigError
from outlierlab.fields import bad, choice, number
from outlierlab.optim.schedule import SCHEDULES, lr_factor, set_lr

if TYPE_CHECKING:  # torch is imported by the builders, so the config and registry need none
    from torch import nn

__all__ = [
    "SCHEDULES",
    "OptimConfig",
    "build_optimizer",
    "defaults",
    "hyperparameters",
    "kept_on_switch",
    "lr_factor",
    "names",
    "param_groups",
    "register",
    "set_lr",
]


@dataclass
class OptimConfig:
    """Optimiser, its hyperparameters and the lr schedule (science §3).

    The fields that default to ``None`` are optimiser-specific: left ``None`` they take the chosen
    optimiser's defaults (:data:`REGISTRY`); those it does not use are set to ``None`` so the
    resolved config shows exactly what ran.
    """

    name: str = "adamw"
    """adamw, soap, adafactor, shampoo, orthoadam, muon, sgd."""
    lr: float | None = None
    """Peak learning rate (muon: of the Muon part; see ``aux_lr``)."""
    betas: tuple[float, float] | None = None
    """(β1, β2): momentum and second-moment EMAs (adamw, soap, adafactor, shampoo, muon's AdamW);
    soap and shampoo also average their Kronecker factors with β2."""
    eps: float | None = None
    """Adam's ε, added to √v̂ (adamw, soap, adafactor, shampoo, muon's AdamW part)."""
    weight_decay: float | None = None
    """Decoupled weight decay on the ≥2-D matmul weights (never norms, gains, β, embeddings)."""
    momentum: float | None = None
    """sgd, muon momentum."""
    precondition_frequency: int | None = None
    """soap / shampoo: recompute the eigenbasis every this many steps."""
    max_precond_dim: int | None = None
    """soap / shampoo / orthoadam: a side longer than this (a vocabulary) is not rotated
    (identity basis)."""
    aux_lr: float | None = None
    """muon: lr of the AdamW that trains embeddings, head, norms and gains."""
    schedule: str = "cosine"
    """cosine | linear | wsd | constant, after a linear warm-up."""
    warmup: float = 0.05
    """Warm-up length: a fraction of ``train.steps`` when < 1, else a number of steps."""
    min_lr_ratio: float = 0.0
    """Final lr as a fraction of the peak (cosine, linear, wsd)."""
    decay_frac: float = 0.2
    """wsd: fraction of the steps spent in the final linear decay."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""

    def __post_init__(self) -> None:
        used = defaults(self.name)  # validates the name, listing allowed ones
        for k in hyperparameters():
            if k not in used:
                setattr(self, k, None)
            elif getattr(self, k) is None:
                setattr(self, k, used[k])
            else:
                setattr(self, k, _check_hyper(k, getattr(self, k)))
        choice("optim.schedule", self.schedule, SCHEDULES)
        self.warmup = number("optim.warmup", self.warmup, lo=0)
        self.grad_clip = number("optim.grad_clip", self.grad_clip, lo=0)
        self.min_lr_ratio = number("optim.min_lr_ratio", self.min_lr_ratio, lo=0, hi=1)
        self.decay_frac = number("optim.decay_frac", self.decay_frac, lo=0, hi=1)

    def warmup_steps(self, steps: int) -> int:
        return round(self.warmup * steps) if self.warmup < 1 else int(self.warmup)


# The range of each optimiser-specific hyperparameter (betas: two numbers in [0, 1)).
_RANGES: dict[str, dict[str, Any]] = {
    "lr": {"lo": 0, "lo_open": True},
    "aux_lr": {"lo": 0, "lo_open": True},
    "eps": {"lo": 0},
    "weight_decay": {"lo": 0},
    "momentum": {"lo": 0},
    "precondition_frequency": {"lo": 1, "integer": True},
    "max_precond_dim": {"lo": 0, "integer": True},
}


def _check_hyper(k: str, v: Any) -> Any:
    if k != "betas":
        return number(f"optim.{k}", v, **_RANGES[k])
    try:
        betas = tuple(number("optim.betas", b, lo=0, hi=1, hi_open=True) for b in v)
    except (TypeError, ConfigError):
        betas = ()
    if len(betas) != 2:
        raise bad("optim.betas", v, "two numbers in [0, 1)")
    return betas


Groups = list[dict[str, Any]]


@dataclass(frozen=True)
class OptimSpec:
    """One registered optimiser: its builder, its family and the defaults of the
    hyperparameters it uses."""

    build: Callable[[nn.Module, Groups, dict[str, Any]], Any]
    defaults: dict[str, Any]
    family: str


REGISTRY: dict[str, OptimSpec] = {}


def register(name: str, family: str | None = None, **defaults: Any):
    """Decorator: ``@register("adamw", family="adam", lr=1e-3, ...)`` on
    ``build(model, groups, hp)``; the keywords are the hyperparameters it uses (each an
    :class:`OptimConfig` field defaulting to ``None``) with their defaults. Optimisers of one
    ``family`` (default: their own) read shared hyperparameters with the same meaning."""
    fields = {f.name for f in dataclasses.fields(OptimConfig) if f.default is None}
    if set(defaults) - fields:
        raise TypeError(f"optimiser {name!r}: {sorted(set(defaults) - fields)} are not "
                        f"OptimConfig hyperparameter fields ({sorted(fields)})")

    def deco(fn):
        REGISTRY[name] = OptimSpec(fn, dict(defaults), family or name)
        return fn

    return deco


def names() -> list[str]:
    return sorted(REGISTRY)


def hyperparameters() -> tuple[str, ...]:
    """Every optimiser-specific hyperparameter some registered optimiser uses, in
    :class:`OptimConfig` field order."""
    used = {k for spec in REGISTRY.values() for k in spec.defaults}
    return tuple(f.name for f in dataclasses.fields(OptimConfig) if f.name in used)


def defaults(name: str) -> dict[str, Any]:
    """The hyperparameters optimiser ``name`` uses, with their defaults."""
    if name not in REGISTRY:
        raise bad("optim.name", name, ", ".join(names()))
    return dict(REGISTRY[name].defaults)


def kept_on_switch(old: str, new: str) -> tuple[str, ...]:
    """The hyperparameters a config keeps when ``optim.name`` changes from ``old`` to ``new``:
    those both use when both are of one family (adamw → soap keeps lr, betas, ε, wd), else none
    (the new optimiser starts from its defaults). Unknown names keep nothing."""
    a, b = REGISTRY.get(old), REGISTRY.get(new)
    if a is None or b is None or a.family != b.family:
        return ()
    return tuple(k for k in hyperparameters() if k in a.defaults and k in b.defaults)


# --------------------------------------------------------------------------- builders
# The adam family: one set of defaults (the authors' AdamW recipe, science §3), so each diagonal ↔
# rotated pair (adamw ↔ soap, adafactor ↔ shampoo) differs in the preconditioner only.
ADAM = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
ROTATED = dict(precondition_frequency=10, max_precond_dim=4096)
"""Every 10 steps (SOAP's default); sides up to 4096 rotated: GPT-2-small's MLP width (3072) is,
a BPE vocabulary (8192+) is not."""


@register("adamw", family="adam", **ADAM)
def _adamw(model, groups, hp):
    import torch

    return torch.optim.AdamW(groups, lr=hp["lr"], betas=hp["betas"], eps=hp["eps"])


@register("soap", family="adam", **ADAM, **ROTATED)
def _soap(model, groups, hp):
    from pytorch_optimizer import SOAP

    return SOAP(groups, lr=hp["lr"], betas=hp["betas"], eps=hp["eps"],
                precondition_frequency=hp["precondition_frequency"],
                max_precondition_dim=hp["max_precond_dim"])  # fmt: skip


@register("adafactor", family="adam", **ADAM)
def _adafactor(model, groups, hp):
    from outlierlab.optim.factored import AdaFactor

    return AdaFactor(groups, lr=hp["lr"], betas=hp["betas"], eps=hp["eps"])


@register("shampoo", family="adam", **ADAM, **ROTATED)
def _shampoo(model, groups, hp):
    from outlierlab.optim.factored import AdaFactor

    return AdaFactor(groups, lr=hp["lr"], betas=hp["betas"], eps=hp["eps"],
                     max_precond_dim=hp["max_precond_dim"],
                     precondition_frequency=hp["precondition_frequency"])  # fmt: skip


# OrthoAdam shares the adam family's defaults, so adamw → orthoadam differs in the basis only.
@register("orthoadam", family="adam", **ADAM, max_precond_dim=ROTATED["max_precond_dim"])
def _orthoadam(model, groups, hp):
    from outlierlab.optim.orthoadam import OrthoAdam

    return OrthoAdam(groups, lr=hp["lr"], betas=hp["betas"], eps=hp["eps"],
                     max_precond_dim=hp["max_precond_dim"])  # fmt: skip


@register("sgd", lr=0.1, momentum=0.9, weight_decay=0.0)
def _sgd(model, groups, hp):
    import torch

    return torch.optim.SGD(groups, lr=hp["lr"], momentum=hp["momentum"])


# Muon's authors: lr 0.02, momentum 0.95 (Nesterov) on hidden matrices; embeddings and head
# want a larger AdamW lr than their 3e-4 at small scale.
@register(
    "muon", lr=0.02, momentum=0.95, weight_decay=0.01, aux_lr=3e-3, betas=(0.9, 0.95), eps=1e-8
)
def _muon(model, groups, hp):
    import torch

    from outlierlab.optim.muon import MultiOptimizer, Muon, muon_params

    hidden = muon_params(model)
    muon_groups, aux_groups = [], []
    for g in groups:
        rest = {k: v for k, v in g.items() if k != "params"}
        ps = list(g["params"])
        mg = [p for p in ps if id(p) in hidden]
        ag = [p for p in ps if id(p) not in hidden]
        if mg:
            muon_groups.append({**rest, "params": mg})
        if ag:
            aux_groups.append({**rest, "params": ag, "lr": hp["aux_lr"]})
    opts = []
    if muon_groups:
        opts.append(Muon(muon_groups, lr=hp["lr"], momentum=hp["momentum"]))
    if aux_groups:
        opts.append(
            torch.optim.AdamW(aux_groups, lr=hp["aux_lr"], betas=hp["betas"], eps=hp["eps"])
        )
    return MultiOptimizer(opts)


# --------------------------------------------------------------------------- entry point


def param_groups(model: nn.Module, weight_decay: float) -> Groups:
    """``model.param_groups(wd)`` when the model defines it (no decay on norms, biases, gains,
    β, embeddings), else decay on every ≥2-D parameter."""
    if hasattr(model, "param_groups"):
        return [dict(g) for g in model.param_groups(weight_decay)]
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig):
    """The optimiser ``cfg.name`` over ``model``'s parameters, with ``cfg``'s hyperparameters
    (unset ones take :func:`defaults`). Each param group records its peak lr as ``initial_lr``
    for :func:`set_lr`."""
    hp = defaults(cfg.name)
    for k in hp:
        v = getattr(cfg, k, None)
        if v is not None:
            hp[k] = v
    groups = [g for g in param_groups(model, hp["weight_decay"]) if list(g["params"])]
    opt = REGISTRY[cfg.name].build(model, groups, hp)
    for g in opt.param_groups:
        g["initial_lr"] = g["lr"]
    return opt
