"""The paper's tabular case: input-feature selection on sklearn's Wine data (13 features).

A 13-32-3 MLP whose 13 input features are gated; D-Gating (D = 2, 3) against the group penalty on
each feature's first-layer column optimized directly by subgradient SGD, and proximal group lasso.
SGD momentum 0.9, lr 0.05 (x0.1 for the last quarter), batch 16, 150 epochs, L2 5e-4 on the rest;
a feature is dropped when its collapsed column norm is below 1e-4, and accuracy is measured on the
slim model fed only the kept features. Standardized features, a fixed 70/30 split, seeds 0-4.

    python benchmarks/paper_wine_features.py        # about 2 minutes on one core
"""
from __future__ import annotations

from functools import partial

from paper_common import (MLP, frontier_table, plot, run_dgating, run_direct, run_prox, setup, sweep_table, timer,
                          wine)

SEEDS = (0, 1, 2, 3, 4)
EPOCHS, LR = 150, 0.05
GROUPS = [{"kind": "features"}]
GRIDS = {
    "D-Gating D=2": [0.05, 0.1, 0.2, 0.3, 0.5],
    "D-Gating D=3": [0.03, 0.05, 0.07, 0.1, 0.14, 0.2],
    "direct group lasso (subgradient)": [0.1, 0.3, 1.0, 3.0],
    "proximal group lasso": [0.3, 1.0, 2.0, 2.5, 3.0, 4.0],
}
LEVELS = [0.3, 0.5, 0.7, 0.85]


def main():
    setup()
    data = wine()
    net = partial(MLP, 13, (32,), 3)
    elapsed = timer()
    rows, kept = [], {}
    for seed in SEEDS:
        for method, grid in GRIDS.items():
            for lam in grid:
                if method.startswith("D-Gating"):
                    r = run_dgating(net, data, GROUPS, int(method[-1]), lam, EPOCHS, LR, seed)
                elif method.startswith("direct"):
                    r = run_direct(net, data, GROUPS, lam, EPOCHS, LR, seed)
                else:
                    r = run_prox(net, data, GROUPS, lam, EPOCHS, LR, seed)
                r["features_kept"] = 13 - r["dead"]["features"]
                rows.append({"method": method, "setting": lam, "seed": seed, "removed": r["removed"], "acc": r["acc"],
                             "features": r["features_kept"]})
                if method == "D-Gating D=3":
                    kept_x = getattr(r["slim"], "kept_input_features", {}).get("x")  # absent: none cut
                    kept.setdefault(lam, []).append(list(range(13)) if kept_x is None else kept_x.tolist())
        print(f"seed {seed} done ({elapsed():.0f} s)", flush=True)
    print(f"\n### Wine: input-feature selection (mean ± std over seeds {', '.join(map(str, SEEDS))})\n")
    print(sweep_table(rows, "lambda", extra=[("features kept (of 13)", "features", "{:.1f}", 1.0)]))
    print("\n### Accuracy at equal sparsity: best slim accuracy (%) among runs removing at least the level\n")
    print(frontier_table(rows, LEVELS))
    from sklearn.datasets import load_wine
    names = load_wine().feature_names
    print("\n### Features D-Gating D=3 keeps, how often over the seeds\n")
    for lam, runs in kept.items():
        counts = {i: sum(i in run for run in runs) for i in range(13)}
        top = ", ".join(f"{names[i]} {c}/{len(runs)}" for i, c in sorted(counts.items(), key=lambda t: -t[1]) if c)
        print(f"- lambda {lam:g}: {top}")
    print(f"\n(total time {elapsed():.0f} s)")
    plot(rows, "benchmarks/out/wine_features.png", "input features removed (%)", title="Wine: feature selection")


if __name__ == "__main__":
    main()
