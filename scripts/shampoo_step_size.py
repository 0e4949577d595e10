"""Update size of AdaFactor and Shampoo (rotated AdaFactor) at their first steps (issue 23).

For each optimiser, trains the quick/cpu presets' model (4 layers × 128, Pre-LN, ReLU) from the
same initialisation on the same batches of the embedded stdlib corpus and prints, at steps
1..k, the RMS of each matrix's update divided by lr (weight decay off, so the update is the
optimiser's step alone): the median and the largest over the model's matrices. Before grafting,
Shampoo's ratio at step 1 was 12–130 against AdaFactor's 1–3; grafted (and with SOAP's
skipped first step, where it moves nothing) the two should be comparable.

    .venv/bin/python scripts/shampoo_step_size.py [--steps 5] [--lr 1e-2] [--eps 1e-12]
"""

from __future__ import annotations

import argparse
import dataclasses

import torch


def update_ratios(name: str, steps: int, lr: float, eps: float) -> list[tuple[float, float]]:
    from outlierlab import config
    from outlierlab.data import BatchSampler, prepare
    from outlierlab.model import GPT
    from outlierlab.optim import build_optimizer

    cfg = config.load("default", overrides=[
        "model.n_layer=4", "model.d_model=128", "model.n_head=4", f"optim.name={name}",
        f"optim.lr={lr}", f"optim.eps={eps}", "optim.betas=[0.9, 0.95]",
        "optim.weight_decay=0.0"])  # fmt: skip
    data = prepare(cfg.data, progress=False)
    torch.manual_seed(0)
    model = GPT(dataclasses.replace(cfg.model, vocab_size=data.tokenizer.vocab_size))
    opt = build_optimizer(model, cfg.optim)
    sampler = BatchSampler(data.train, cfg.model.seq_len, cfg.train.batch_size, seed=0)
    mats = [p for p in model.parameters() if p.ndim >= 2]
    out = []
    for _ in range(steps):
        x, y = sampler.next()
        opt.zero_grad(set_to_none=True)
        model(x, y)[1].backward()
        before = [p.detach().clone() for p in mats]
        opt.step()
        r = torch.tensor([((p.detach() - b).square().mean().sqrt() / lr).item()
                          for p, b in zip(mats, before)])  # fmt: skip
        out.append((r.median().item(), r.max().item()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--eps", type=float, default=1e-12)
    a = ap.parse_args()
    torch.set_num_threads(1)
    rows = {n: update_ratios(n, a.steps, a.lr, a.eps) for n in ("adafactor", "shampoo")}
    print(f"update RMS / lr per matrix (median, max), lr {a.lr:g}, eps {a.eps:g}")
    print("step  adafactor          shampoo")
    for t in range(a.steps):
        (am, ax), (sm, sx) = rows["adafactor"][t], rows["shampoo"][t]
        print(f"{t + 1:>4}  {am:6.2f} {ax:8.2f}    {sm:6.2f} {sx:8.2f}")


if __name__ == "__main__":
    main()
