"""The paper's LeNet-300-100 experiment on sklearn's digits: neuron-level sparsity against
accuracy, D-Gating (D = 2, 3, 4) versus the group penalty optimized directly by subgradient SGD,
proximal group lasso, and magnitude pruning with fine-tuning (equal total epochs).

Every run: 64-300-100-10 MLP, SGD momentum 0.9, lr 0.05 (x0.1 for the last quarter), batch 64,
80 epochs, L2 5e-4 on the non-grouped parameters ("D-Gating + fine-tune": 60 epochs of D-Gating,
cut, 20 epochs of plain training of the slim model, so every method trains 80 epochs in total); groups are the 400 hidden neurons; a group is
cut when its collapsed L2 norm is below 1e-4; accuracy is measured on the physically slimmed model.
Seeds 0, 1, 2 (init and batch order; the train/test split is fixed).

    python benchmarks/paper_mlp_digits.py          # about 4 minutes on one core
"""
from __future__ import annotations

from paper_common import (MLP, digits, frontier_table, plot, run_dgating, run_direct, run_magnitude, run_prox, setup,
                          sweep_table, timer)

SEEDS = (0, 1, 2)
EPOCHS, LR = 80, 0.05
GROUPS = [{"kind": "neurons", "names": ["hidden.*"]}]
GRIDS = {
    "D-Gating D=2": [6e-3, 8e-3, 1e-2, 1.4e-2, 2e-2, 2.8e-2],
    "D-Gating D=3": [6e-3, 7e-3, 8e-3, 1e-2, 1.4e-2, 2e-2],
    "D-Gating D=4": [6e-3, 7e-3, 8e-3, 1e-2, 1.4e-2, 2e-2],
    "D-Gating D=3 + fine-tune": [8e-3, 1e-2, 1.4e-2, 2e-2, 2.8e-2],
    "direct group lasso (subgradient)": [1e-3, 3e-3, 1e-2, 3e-2],
    "proximal group lasso": [1e-2, 3e-2, 6e-2, 1e-1, 1.5e-1],
}
FRACTIONS = [0.5, 0.7, 0.8, 0.9, 0.95, 0.97]
LEVELS = [0.5, 0.7, 0.8, 0.9, 0.95]


def main():
    setup()
    data = digits()
    elapsed = timer()
    rows = []

    def add(method, setting, seed, r):
        rows.append({"method": method, "setting": setting, "seed": seed, "removed": r["removed"], "acc": r["acc"],
                     "params": r["params_after"]})

    for seed in SEEDS:
        for method, grid in GRIDS.items():
            for lam in grid:
                if method.startswith("D-Gating"):
                    finetune = EPOCHS // 4 if method.endswith("fine-tune") else 0
                    r = run_dgating(MLP, data, GROUPS, int(method[11]), lam, EPOCHS, LR, seed, finetune=finetune)
                elif method.startswith("direct"):
                    r = run_direct(MLP, data, GROUPS, lam, EPOCHS, LR, seed)
                else:
                    r = run_prox(MLP, data, GROUPS, lam, EPOCHS, LR, seed)
                add(method, lam, seed, r)
        for fraction, r in zip(FRACTIONS, run_magnitude(MLP, data, GROUPS, FRACTIONS, EPOCHS, LR, seed)):
            add("magnitude pruning + fine-tune", fraction, seed, r)
        print(f"seed {seed} done ({elapsed():.0f} s)", flush=True)
    print("\n### LeNet-300-100 on digits: the sweep (mean ± std over seeds 0, 1, 2)\n")
    print(sweep_table(rows, "lambda / fraction", extra=[("params kept", "params", "{:.0f}", 1.0)]))
    print("\n### Accuracy at equal sparsity: best slim accuracy (%) among runs removing at least the level\n")
    print(frontier_table(rows, LEVELS))
    print(f"\n(dense model: 64-300-100-10, 50,890 parameters; total time {elapsed():.0f} s)")
    plot(rows, "benchmarks/out/mlp_digits.png", "hidden neurons removed (%)", title="LeNet-300-100 on digits")


if __name__ == "__main__":
    main()
