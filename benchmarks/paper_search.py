"""dg.search_lambda on the LeNet-300-100 / digits setup: for each target fraction of hidden neurons
(or parameters) to remove, the lambda found, the fraction reached, the trials it took, and the slim
model's accuracy. D = 3, same training as paper_mlp_digits.py (80 epochs), seed 0.

    python benchmarks/paper_search.py               # about 2 minutes on one core
"""
from __future__ import annotations

import torch

import dgating_surgery as dg
from paper_common import MLP, REST_WD, THRESHOLD, accuracy, digits, fit, setup, timer

TARGETS = [("groups", 0.5), ("groups", 0.9), ("params", 0.95)]
D, EPOCHS, LR, SEED = 3, 80, 0.05, 0
GROUPS = [{"kind": "neurons", "names": ["hidden.*"]}]


def main():
    setup()
    Xtr, ytr, Xte, yte = digits()

    def make_model():
        torch.manual_seed(SEED)
        return dg.gate_model(MLP(), {"D": D, "threshold": THRESHOLD, "groups": GROUPS}, Xtr[:2])

    def train(model, lam):
        fit(model, dg.param_groups(model, lam, weight_decay=REST_WD), Xtr, ytr, EPOCHS, LR, SEED)

    elapsed = timer()
    print("| target | lambda found | reached | trials | slim test accuracy (%) |")
    print("|---|---|---|---|---|")
    for metric, target in TARGETS:
        result = dg.search_lambda(make_model, train, target, metric=metric, lam_range=(1e-3, 0.1), tol=0.02)
        slim = dg.shrink(result.model, THRESHOLD, example_inputs=Xtr[:2], rtol=1e-2)
        print(f"| {target:.0%} of {metric} | {result.lam:.4g} | {result.removed:.1%} | {len(result.trials)} | "
              f"{100 * accuracy(slim, Xte, yte):.1f} |", flush=True)
    print(f"\n(tolerance ±2 points, lambda range 1e-3..0.1; total time {elapsed():.0f} s)")


if __name__ == "__main__":
    main()
