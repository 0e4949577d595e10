"""Each optimiser's step against a float64 reference computed here, independently: moments as
closed-form sums over the gradient history (not the optimisers' recursions), on a tiny
parameter set (matrices rotated on one side, on both sides, and a vector), in float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from outlierlab import optim
from outlierlab.optim import OptimConfig

SHAPES = [(3, 5), (4, 4), (6, 3), (4,)]  # max_precond_dim=4: rotate rows / both / cols / none
LR, BETAS, EPS, WD, STEPS = 0.01, (0.9, 0.99), 1e-8, 0.1, 5
HP = dict(lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, max_precond_dim=4)
ADAM_HP = {k: v for k, v in HP.items() if k != "max_precond_dim"}  # AdamW, AdaFactor


class Params(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.ps = nn.ParameterList(
            nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64)) for s in SHAPES)


def gradients():
    g = torch.Generator().manual_seed(1)
    return [[torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES]
            for _ in range(STEPS)]  # fmt: skip


def run(name: str, **hp) -> list[torch.Tensor]:
    model = Params()
    opt = optim.build_optimizer(model, OptimConfig(name=name, **hp))
    for grads in gradients():
        for p, g in zip(model.ps, grads):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in model.ps]


def histories() -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
    """Each parameter's initial value and its gradient history, in float64."""
    hist = gradients()
    return [(p.detach().clone(), [h[i] for h in hist]) for i, p in enumerate(Params().ps)]


def decayed(p, u, lr=LR):
    """One step ``-lr·u`` after decoupled weight decay (matrices only)."""
    return p * (1 - lr * (WD if p.ndim == 2 else 0)) - lr * u


def ema(xs, beta):
    """Σ_s (1-β) β^(t-s) x_s: an EMA started at zero, as a sum over the history."""
    t = len(xs)
    return sum((1 - beta) * beta ** (t - 1 - i) * x for i, x in enumerate(xs))


def eigvecs(a):
    return torch.linalg.eigh(a)[1].flip(1)  # largest eigenvalue first


def rotate(x, ql, qr, back=False):
    """Q_Lᵀ x Q_R (back: Q_L x Q_Rᵀ); ``None`` is the identity."""
    if ql is not None:
        x = (ql if back else ql.T) @ x
    if qr is not None:
        x = x @ (qr.T if back else qr)
    return x


def adam(gs, b1, b2):
    """Adam's update after the gradients ``gs``: m̂ / (√v̂ + ε), both moments EMAs from zero."""
    s = len(gs)
    return ema(gs, b1) / (1 - b1**s) / ((ema([x.square() for x in gs], b2) / (1 - b2**s)).sqrt()
                                        + EPS)  # fmt: skip


def factored(m, gs_rot, b1, b2, s):
    """AdaFactor's update from momentum m and the gradient history (each gradient in the basis
    of its own step): m̂ / (√v̂ + ε), v̂ = r cᵀ / mean(r) with r, c the EMAs of the row / column
    means of g²."""
    rot = [x.square() for x in gs_rot]
    r = ema([x.mean(1) for x in rot], b2)
    c = ema([x.mean(0) for x in rot], b2)
    v = torch.outer(r, c) / r.mean() / (1 - b2**s)
    return m / (1 - b1**s) / (v.sqrt() + EPS)


def reference(kind: str, k: int = 10) -> list[torch.Tensor]:
    """``adam`` or ``adafactor``; decoupled wd on matrices only."""
    b1, b2 = BETAS
    out = []
    for p, gs in histories():
        for t in range(1, STEPS + 1):
            if kind == "adam" or p.ndim == 1:
                u = adam(gs[:t], b1, b2)
            else:
                u = factored(ema(gs[:t], b1), gs[:t], b1, b2, t)
            p = decayed(p, u)
        out.append(p)
    return out


def shampoo_reference(k: int) -> list[torch.Tensor]:
    """Rotated AdaFactor on SOAP's schedule, grafted to AdaFactor: step 1 only sets the basis from
    g₁; step t ≥ 2 (s = t − 1) runs AdaFactor in the basis of L, R = EMA(g gᵀ), EMA(gᵀ g) over
    g₁…g_{t−1} as of their last refresh (s a multiple of k, or step 1), rescaled per parameter to
    the norm of plain AdaFactor's update on g₂…g_t; each gradient's square enters the second
    moment in the basis of its own step (SOAP does not re-rotate its statistics); vectors: Adam
    on g₂…g_t."""
    b1, b2 = BETAS
    out = []
    for p, gs in histories():
        basis_upto, rotated = 1, []  # the basis was computed from g₁…g_basis_upto
        for t in range(2, STEPS + 1):
            s, seen = t - 1, gs[1:t]
            m = ema(seen, b1)
            if p.ndim == 1:
                u = adam(seen, b1, b2)
            else:
                lr_, lc = gs[0].shape
                L = ema([x @ x.T for x in gs[:basis_upto]], b2)
                R = ema([x.T @ x for x in gs[:basis_upto]], b2)
                ql = eigvecs(L) if lr_ <= 4 else None
                qr = eigvecs(R) if lc <= 4 else None
                rotated.append(rotate(gs[t - 1], ql, qr))
                u = rotate(factored(rotate(m, ql, qr), rotated, b1, b2, s), ql, qr, back=True)
                graft = factored(m, seen, b1, b2, s)
                u = u * graft.norm() / u.norm()
                if s % k == 0:
                    basis_upto = t
            p = decayed(p, u)
        out.append(p)
    return out


def close(got, want):
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_adamw_is_adam_with_decoupled_decay():
    close(run("adamw", **ADAM_HP),
          reference("adam"))


def test_adafactor_factors_the_second_moment_with_momentum():
    close(run("adafactor", **ADAM_HP),
          reference("adafactor"))


@pytest.mark.parametrize("k", [1, 2, 10])
def test_shampoo_is_grafted_adafactor_in_the_eigenbasis_on_soaps_schedule(k):
    close(run("shampoo", precondition_frequency=k, **HP), shampoo_reference(k))


def test_rotation_changes_the_step():  # the references are not all the same thing
    a, f, r = reference("adam"), reference("adafactor"), shampoo_reference(2)
    assert not torch.allclose(a[0], f[0]) and not torch.allclose(f[0], r[0])
    torch.testing.assert_close(a[3], f[3])  # a vector: AdaFactor is Adam


def test_shampoo_steps_have_adafactors_size_and_a_different_direction():
    """Grafting: each matrix's update has exactly AdaFactor's norm (from the same gradients, one
    step later because of the skipped first step), not its direction."""
    model = Params()
    opt = optim.build_optimizer(model, OptimConfig(name="shampoo", precondition_frequency=1, **{
        **HP, "weight_decay": 0.0}))  # fmt: skip
    hist = gradients()
    b1, b2 = BETAS
    for t, grads in enumerate(hist, 1):
        before = [p.detach().clone() for p in model.ps]
        for p, g in zip(model.ps, grads):
            p.grad = g.clone()
        opt.step()
        for j, (p, q) in enumerate(zip(model.ps, before)):
            step = (q - p.detach()) / LR
            if t == 1:
                assert torch.equal(step, torch.zeros_like(step))  # SOAP's skipped first step
            elif p.ndim == 2:
                seen = [h[j] for h in hist[1:t]]
                want = factored(ema(seen, b1), seen, b1, b2, t - 1)
                torch.testing.assert_close(step.norm(), want.norm(), rtol=1e-9, atol=0)
                assert (step - want).norm() > 1e-3 * want.norm()


def test_soap_is_adam_in_the_eigenbasis_with_a_first_step_that_only_sets_the_basis():
    """pytorch_optimizer.SOAP (as nikhilvyas/SOAP): step 1 only computes the basis from g₁;
    from step 2 Adam runs in that basis on g₂… with bias corrections of step t-1, ε added to
    √v before the correction, weight decay after the update. k > steps: no basis refresh."""
    b1, b2 = BETAS
    got = run("soap", precondition_frequency=100, **HP)
    for i, (p, gs) in enumerate(histories()):
        g1 = gs[0]
        ql = eigvecs(g1 @ g1.T) if g1.ndim == 2 and g1.shape[0] <= 4 else None
        qr = eigvecs(g1.T @ g1) if g1.ndim == 2 and g1.shape[1] <= 4 else None
        for t in range(2, STEPS + 1):
            s = t - 1
            m = rotate(ema(gs[1:t], b1), ql, qr)
            v = ema([rotate(x, ql, qr).square() for x in gs[1:t]], b2)
            u = rotate(m / (v.sqrt() + EPS), ql, qr, back=True)
            p = p - LR * (1 - b2**s) ** 0.5 / (1 - b1**s) * u
            p = p * (1 - LR * (WD if p.ndim == 2 else 0))
        torch.testing.assert_close(got[i], p, rtol=1e-9, atol=1e-12)


def test_muon_orthogonalises_in_fp32_on_the_cpu():
    """Hidden matrices: Nesterov momentum, Newton–Schulz (reference in float64; torch's bf16
    would be off by ~1e-2), lr × √max(1, rows/cols), decoupled wd; the vector: AdamW."""
    mu, lr = 0.95, 0.02
    got = run("muon", lr=lr, momentum=mu, weight_decay=WD, aux_lr=LR, betas=BETAS, eps=EPS)
    a, b, c = 3.4445, -4.7750, 2.0315
    for i, (p, gs) in enumerate(histories()[:3]):
        for t in range(1, STEPS + 1):
            buf = ema(gs[:t], mu)
            x = gs[t - 1] * (1 - mu) + buf * mu  # Nesterov: lerp(g, buf, μ)
            x = x.T if x.shape[0] > x.shape[1] else x
            x = x / x.norm()
            for _ in range(5):
                gram = x @ x.T
                x = a * x + (b * gram + c * gram @ gram) @ x
            x = x.T if p.shape[0] > p.shape[1] else x
            p = decayed(p, max(1, p.shape[0] / p.shape[1]) ** 0.5 * x, lr)
        torch.testing.assert_close(got[i], p, rtol=0, atol=2e-5)
    close(got[3:], run("adamw", **ADAM_HP)[3:])


def test_adam_family_shares_its_hyperparameters():
    """adamw ↔ soap and adafactor ↔ shampoo read the same fields with the same defaults, and
    every optimiser's groups get exactly the configured lr, betas, ε and decay."""
    d = {n: optim.defaults(n) for n in ("adamw", "soap", "adafactor", "shampoo")}
    shared = ("lr", "betas", "eps", "weight_decay")
    assert len({tuple(v[k] for k in shared) for v in d.values()}) == 1
    assert d["soap"] == d["shampoo"] and d["adamw"] == d["adafactor"]
    cfg = dict(lr=3e-3, betas=(0.8, 0.95), eps=1e-12, weight_decay=0.05)
    for name in d:
        opt = optim.build_optimizer(Params(), OptimConfig(name=name, **cfg))
        g = opt.param_groups
        assert {(x["lr"], tuple(x["betas"]), x["eps"]) for x in g} == {(3e-3, (0.8, 0.95), 1e-12)}
        assert sorted(x["weight_decay"] for x in g) == [0.0, 0.05]
    assert optim.kept_on_switch("adamw", "soap") == shared
    assert optim.kept_on_switch("soap", "shampoo") == (*shared, "precondition_frequency",
                                                        "max_precond_dim")
    assert optim.kept_on_switch("adamw", "muon") == () == optim.kept_on_switch("x", "soap")


@pytest.mark.parametrize("name", ["shampoo", "soap"])
def test_a_vocabulary_side_is_never_preconditioned(name):
    """A BPE-sized embedding (8192 × 64): the 64 side is rotated, no 8192 × 8192 matrix."""
    emb = nn.Embedding(8192, 64)
    opt = optim.build_optimizer(emb, OptimConfig(name=name))
    emb.weight.grad = torch.randn_like(emb.weight)
    for _ in range(2):
        opt.step()
    mats = [v for v in opt.state[emb.weight].values() if isinstance(v, torch.Tensor)]
    mats += [m for v in opt.state[emb.weight].values() if isinstance(v, list) for m in v
             if isinstance(m, torch.Tensor)]
    square = sorted({tuple(m.shape) for m in mats if m.ndim == 2 and m.shape[0] == m.shape[1]})
    assert square == [(64, 64)]
    assert max(m.numel() for m in mats) == 8192 * 64  # the moments, nothing larger
