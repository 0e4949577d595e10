"""Optimiser config, registry (name → builder) and learning-rate schedules (SPEC §3).

No hand-written optimiser maths: ``adamw``, ``adafactor``, ``sgd`` and ``muon`` come from
``torch.optim``; ``soap`` and ``shampoo`` from ``pytorch_optimizer``. ``muon`` follows its
authors: Muon on the 2-D hidden matrices, AdamW on embeddings, the output head, norms and gains,
wrapped in :class:`MultiOptimizer` so a training loop sees one optimiser.

Each optimiser declares the hyperparameters it uses, with their defaults, where it is registered
(:func:`register`): that registry is the one list of optimiser-specific hyperparameters
(:func:`hyperparameters`); :class:`OptimConfig` fills and validates them from it. Defaults are
SPEC §3's where it names them (AdamW: the authors' recipe; SOAP: nikhilvyas/SOAP) and the
library's own otherwise. Schedules are a pure function of the step (:func:`lr_factor`), so
resuming needs no scheduler state.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from outlierlab.errors import ConfigError
from outlierlab.fields import bad, choice, number

if TYPE_CHECKING:  # torch is imported by the builders, so the config and registry need none
    import torch
    from torch import nn

SCHEDULES = ("cosine", "linear", "wsd", "constant")


@dataclass
class OptimConfig:
    """Optimiser, its hyperparameters and the lr schedule (SPEC §3).

    The fields that default to ``None`` are optimiser-specific: left ``None`` they take the chosen
    optimiser's defaults (:data:`REGISTRY`); those it does not use are set to ``None`` so the
    resolved config shows exactly what ran.
    """

    name: str = "adamw"
    """adamw, adafactor, soap, shampoo, muon, sgd."""
    lr: float | None = None
    """Peak learning rate (muon: of the Muon part; see ``aux_lr``)."""
    betas: tuple[float, float] | None = None
    """Adam-style (β1, β2): adamw, soap, muon's AdamW part."""
    eps: float | None = None
    """ε: adamw/soap/muon-AdamW denominator, adafactor ε1, shampoo matrix ε."""
    weight_decay: float | None = None
    """Decoupled weight decay on the ≥2-D matmul weights (never norms, gains, β, embeddings)."""
    momentum: float | None = None
    """sgd, shampoo, muon momentum."""
    precondition_frequency: int | None = None
    """soap / shampoo: recompute the preconditioner every this many steps."""
    beta2_decay: float | None = None
    """adafactor's second-moment decay exponent."""
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
    "beta2_decay": {},
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
    """One registered optimiser: its builder and the defaults of the hyperparameters it uses."""

    build: Callable[[nn.Module, Groups, dict[str, Any]], Any]
    defaults: dict[str, Any]


REGISTRY: dict[str, OptimSpec] = {}


def register(name: str, **defaults: Any):
    """Decorator: ``@register("adamw", lr=1e-3, ...)`` on ``build(model, groups, hp)``; the
    keywords are the hyperparameters it uses (each an :class:`OptimConfig` field defaulting to
    ``None``) with their defaults."""
    fields = {f.name for f in dataclasses.fields(OptimConfig) if f.default is None}
    if set(defaults) - fields:
        raise TypeError(f"optimiser {name!r}: {sorted(set(defaults) - fields)} are not "
                        f"OptimConfig hyperparameter fields ({sorted(fields)})")

    def deco(fn):
        REGISTRY[name] = OptimSpec(fn, dict(defaults))
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


# --------------------------------------------------------------------------- builders


@register("adamw", lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
def _adamw(model, groups, hp):
    import torch

    return torch.optim.AdamW(groups, lr=hp["lr"], betas=hp["betas"], eps=hp["eps"])


# torch's Adafactor scales each update by max(1e-3, RMS(param)) (≈ 0.02 at init), so its lr is
# relative: 0.05 gives steps of ≈ 1e-3, like AdamW's.
@register("adafactor", lr=0.05, beta2_decay=-0.8, eps=None, weight_decay=0.0)
def _adafactor(model, groups, hp):
    import torch

    return torch.optim.Adafactor(
        groups, lr=hp["lr"], beta2_decay=hp["beta2_decay"], eps=(hp["eps"], 1e-3)
    )


@register(
    "soap", lr=3e-3, betas=(0.95, 0.95), eps=1e-8, weight_decay=0.01, precondition_frequency=10
)
def _soap(model, groups, hp):
    from pytorch_optimizer import SOAP

    return SOAP(
        groups,
        lr=hp["lr"],
        betas=hp["betas"],
        eps=hp["eps"],
        precondition_frequency=hp["precondition_frequency"],
    )


# pytorch_optimizer's Shampoo sums its statistics (AdaGrad-like, steps shrink as 1/√t): it
# needs a large lr; its own default 1e-3 barely moves a small GPT.
@register(
    "shampoo", lr=0.1, momentum=0.0, eps=1e-6, weight_decay=0.0, precondition_frequency=1
)
def _shampoo(model, groups, hp):
    from pytorch_optimizer import Shampoo

    return Shampoo(
        groups,
        lr=hp["lr"],
        momentum=hp["momentum"],
        matrix_eps=hp["eps"],
        preconditioning_compute_steps=hp["precondition_frequency"],
    )


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
        opts.append(torch.optim.Muon(muon_groups, lr=hp["lr"], momentum=hp["momentum"]))
    if aux_groups:
        opts.append(
            torch.optim.AdamW(aux_groups, lr=hp["aux_lr"], betas=hp["betas"], eps=hp["eps"])
        )
    return MultiOptimizer(opts)


def muon_params(model: nn.Module) -> set[int]:
    """ids of the 2-D hidden matrices: every 2-D parameter except embedding tables and the
    output head (a ``Linear`` whose output size is the vocabulary, or one named ``*head*``)."""
    from torch import nn

    excluded: set[int] = set()
    vocab = {m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)}
    for name, m in model.named_modules():
        head = isinstance(m, nn.Linear) and (m.out_features in vocab or "head" in name)
        if isinstance(m, nn.Embedding) or head:
            excluded.add(id(m.weight))
    return {id(p) for p in model.parameters() if p.ndim == 2 and id(p) not in excluded}


class MultiOptimizer:
    """Several optimisers over disjoint parameters, seen by the loop as one
    (``step``, ``zero_grad``, ``param_groups``, ``state_dict``, ``load_state_dict``)."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> Groups:
        return [g for o in self.optimizers for g in o.param_groups]

    @property
    def state(self) -> dict:
        return {k: v for o in self.optimizers for k, v in o.state.items()}

    def step(self, closure=None):
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {str(i): o.state_dict() for i, o in enumerate(self.optimizers)}

    def load_state_dict(self, sd: dict) -> None:
        if len(sd) != len(self.optimizers):
            raise ValueError(f"state for {len(sd)} optimisers, have {len(self.optimizers)}")
        for i, o in enumerate(self.optimizers):
            o.load_state_dict(sd[str(i)])


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


# --------------------------------------------------------------------------- schedules


def lr_factor(
    step: int,
    total: int,
    schedule: str = "cosine",
    warmup: int = 0,
    min_ratio: float = 0.0,
    decay_steps: int = 0,
) -> float:
    """Multiplier of the peak lr for optimiser step ``step`` (0-based) of ``total``.

    Linear warm-up over ``warmup`` steps ((s+1)/warmup), then: ``cosine`` to ``min_ratio``,
    ``linear`` to ``min_ratio``, ``wsd`` (warm-up, stable, then linear decay over the last
    ``decay_steps``), or ``constant``.
    """
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "wsd":
        start = total - decay_steps
        if step < start or decay_steps <= 0:
            return 1.0
        p = (step - start) / decay_steps
        return 1.0 - (1.0 - min_ratio) * min(p, 1.0)
    span = max(total - warmup, 1)
    p = min((step - warmup) / span, 1.0)
    if schedule == "linear":
        return 1.0 - (1.0 - min_ratio) * p
    if schedule == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))
    raise bad("optim.schedule", schedule, ", ".join(SCHEDULES))


def set_lr(optimizer: Any, factor: float) -> float:
    """Set every group's lr to ``initial_lr × factor``; returns the first group's lr."""
    groups: Iterable[dict] = optimizer.param_groups
    lr = None
    for g in groups:
        g["lr"] = g["initial_lr"] * factor
        lr = g["lr"] if lr is None else lr
    return float(lr or 0.0)
