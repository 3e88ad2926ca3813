"""Teacher-student: data from a 10-32-1 ReLU network of which only k hidden neurons are active
(the others have zero output weight). A 10-32-1 student with gated hidden neurons is trained on it:
does D-Gating leave exactly k neurons alive, and is the slim student still accurate?

2000 samples (x ~ N(0, I), y = teacher(x) + 0.05 noise), 70/30 split, MSE, SGD momentum 0.9,
lr 0.05 (x0.1 for the last quarter), batch 64, 60 epochs, L2 5e-4 on the output layer; neurons
whose collapsed norm is below 1e-4 are cut. Baseline: proximal group lasso (exact zeros too).
Teacher and student initialisation both follow the seed (0-2).

    python benchmarks/paper_teacher_student.py      # about 2 minutes on one core
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from paper_common import MLP, ms, run_dgating, run_prox, setup, timer

SEEDS = (0, 1, 2)
N_HIDDEN, KS = 32, (4, 8)
EPOCHS, LR = 60, 0.05
GROUPS = [{"kind": "neurons", "names": ["hidden.*"]}]
GRIDS = {
    "D-Gating D=2": [0.01, 0.02, 0.03, 0.05],
    "D-Gating D=3": [0.01, 0.02, 0.03, 0.05],
    "D-Gating D=4": [0.01, 0.02, 0.03, 0.05],
    "proximal group lasso": [0.03, 0.1, 0.3],
}


def teacher_data(k, seed, n=2000, noise=0.05):
    gen = torch.Generator().manual_seed(1000 + seed)
    W = torch.randn(N_HIDDEN, 10, generator=gen) / 10 ** 0.5
    b = 0.1 * torch.randn(N_HIDDEN, generator=gen)
    a = torch.zeros(N_HIDDEN)
    a[:k] = torch.where(torch.rand(k, generator=gen) < 0.5, -1.0, 1.0)
    X = torch.randn(n, 10, generator=gen)
    y = F.relu(X @ W.T + b) @ a + noise * torch.randn(n, generator=gen)
    cut = int(0.7 * n)
    return X[:cut], y[:cut], X[cut:], y[cut:]


def mse(out, y):
    return F.mse_loss(out.squeeze(-1), y)


def main():
    setup()
    net = partial(MLP, 10, (N_HIDDEN,), 1)
    elapsed = timer()
    rows = []
    for k in KS:
        for seed in SEEDS:
            data = teacher_data(k, seed)
            for method, grid in GRIDS.items():
                for lam in grid:
                    if method.startswith("D-Gating"):
                        r = run_dgating(net, data, GROUPS, int(method[-1]), lam, EPOCHS, LR, seed, loss_fn=mse)
                    else:
                        r = run_prox(net, data, GROUPS, lam, EPOCHS, LR, seed, loss_fn=mse)
                    with torch.no_grad():
                        test = float(mse(r["slim"](data[2]), data[3]))
                    rows.append({"k": k, "method": method, "lam": lam, "seed": seed,
                                 "alive": N_HIDDEN - r["dead"]["neurons"], "r2": 1 - test / float(data[3].var())})
            print(f"k={k} seed {seed} done ({elapsed():.0f} s)", flush=True)
    print(f"\n### Teacher-student: {N_HIDDEN} hidden neurons, k active in the teacher (seeds "
          f"{', '.join(map(str, SEEDS))})\n")
    print("| k | method | lambda | neurons alive | runs with exactly k alive | test R² of the slim student |")
    print("|---|---|---|---|---|---|")
    for k in KS:
        for method, grid in GRIDS.items():
            for lam in grid:
                sel = [r for r in rows if r["k"] == k and r["method"] == method and r["lam"] == lam]
                exact = sum(r["alive"] == k for r in sel)
                print(f"| {k} | {method} | {lam:g} | {ms([r['alive'] for r in sel])} | {exact}/{len(sel)} | "
                      f"{ms([r['r2'] for r in sel], '{:.4f}')} |")
    print(f"\n(total time {elapsed():.0f} s; R² = 1 - test MSE / variance of y)")


if __name__ == "__main__":
    main()
