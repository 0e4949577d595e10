"""Optimiser registry (name → builder) and learning-rate schedules (SPEC §3).

No hand-written optimiser maths: ``adamw``, ``adafactor``, ``sgd`` and ``muon`` come from
``torch.optim``; ``soap`` and ``shampoo`` from ``pytorch_optimizer``. ``muon`` follows its
authors: Muon on the 2-D hidden matrices, AdamW on embeddings, the output head, norms and gains,
wrapped in :class:`MultiOptimizer` so a training loop sees one optimiser.

Defaults (:data:`DEFAULTS`) are SPEC §3's where it names them (AdamW: the authors' recipe;
SOAP: nikhilvyas/SOAP) and the library's own otherwise. Schedules are a pure function of the
step (:func:`lr_factor`), so resuming needs no scheduler state.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from outlierlab.errors import ConfigError

if TYPE_CHECKING:
    from outlierlab.config import OptimConfig

Groups = list[dict[str, Any]]


@dataclass(frozen=True)
class OptimSpec:
    """One registered optimiser: its builder and the defaults of the hyperparameters it uses."""

    build: Callable[[nn.Module, Groups, dict[str, Any]], Any]
    defaults: dict[str, Any]


REGISTRY: dict[str, OptimSpec] = {}


def register(name: str, **defaults: Any):
    """Decorator: ``@register("adamw", lr=1e-3, ...)`` on ``build(model, groups, hp)``."""

    def deco(fn):
        REGISTRY[name] = OptimSpec(fn, dict(defaults))
        return fn

    return deco


def names() -> list[str]:
    return sorted(REGISTRY)


def defaults(name: str) -> dict[str, Any]:
    """The hyperparameters optimiser ``name`` uses, with their defaults."""
    if name not in REGISTRY:
        raise ConfigError(f"optim.name={name!r} is not an optimiser; allowed: {', '.join(names())}")
    return dict(REGISTRY[name].defaults)


# --------------------------------------------------------------------------- builders


@register("adamw", lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
def _adamw(model, groups, hp):
    return torch.optim.AdamW(groups, lr=hp["lr"], betas=hp["betas"], eps=hp["eps"])


# torch's Adafactor scales each update by max(1e-3, RMS(param)) (≈ 0.02 at init), so its lr is
# relative: 0.05 gives steps of ≈ 1e-3, like AdamW's.
@register("adafactor", lr=0.05, beta2_decay=-0.8, eps=None, weight_decay=0.0)
def _adafactor(model, groups, hp):
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
    return torch.optim.SGD(groups, lr=hp["lr"], momentum=hp["momentum"])


# Muon's authors: lr 0.02, momentum 0.95 (Nesterov) on hidden matrices; embeddings and head
# want a larger AdamW lr than their 3e-4 at small scale.
@register(
    "muon", lr=0.02, momentum=0.95, weight_decay=0.01, aux_lr=3e-3, betas=(0.9, 0.95), eps=1e-8
)
def _muon(model, groups, hp):
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

SCHEDULES = ("cosine", "linear", "wsd", "constant")


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
    raise ConfigError(f"optim.schedule={schedule!r}; allowed: {', '.join(SCHEDULES)}")


def set_lr(optimizer: Any, factor: float) -> float:
    """Set every group's lr to ``initial_lr × factor``; returns the first group's lr."""
    groups: Iterable[dict] = optimizer.param_groups
    lr = None
    for g in groups:
        g["lr"] = g["initial_lr"] * factor
        lr = g["lr"] if lr is None else lr
    return float(lr or 0.0)
