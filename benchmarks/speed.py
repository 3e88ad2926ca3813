"""Speed of gating (issue 2), as ratios measured in one run.

1. One training step (forward, backward, SGD step) of gated ResNet-18 on 32 images of 64x64
   against the same step of the original model (target: at most 1.05x).
2. gate_model and shrink on ResNet-50 (target: under 2 s each), against Torch-Pruning's
   plan-and-cut of 30% of the channels when the optional `torch-pruning` package is installed.

    python benchmarks/speed.py
"""
from __future__ import annotations

import copy
import statistics
import time

import torch
import torchvision

import dgating_surgery as dg


def step_time(model, x, y, repeats=15, warmup=3) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    model.train()
    times = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved(models: dict, x, y, rounds=3) -> dict:
    """Median step time per model, alternating models so drift hits all of them alike."""
    out = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            out[name].append(step_time(model, x, y, repeats=5, warmup=1))
    return {name: statistics.median(v) for name, v in out.items()}


def main() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(32, 3, 64, 64), torch.randint(0, 1000, (32,))
    base = torchvision.models.resnet18()
    gated = dg.gate_model(copy.deepcopy(base), "default", x[:1])
    t = interleaved({"original": base, "gated": gated}, x, y)
    print("| ResNet-18 training step, batch 32 @ 64x64 | seconds | ratio |")
    print("|---|---|---|")
    print(f"| original | {t['original']:.4f} | 1.00 |")
    print(f"| gated (D-Gating, default recipe) | {t['gated']:.4f} | {t['gated'] / t['original']:.3f} |")

    x1 = torch.randn(1, 3, 224, 224)
    rows = []
    model = torchvision.models.resnet50().eval()
    start = time.perf_counter()
    dg.gate_model(model, "default", x1)
    t_gate = time.perf_counter() - start
    dg.kill_random_groups(model, 0.3, seed=0)
    start = time.perf_counter()
    dg.shrink(model)
    t_shrink = time.perf_counter() - start
    rows.append(("dg.gate_model", t_gate))
    rows.append(("dg.shrink (30% of groups dead, no verification)", t_shrink))
    rows.append(("gate + shrink", t_gate + t_shrink))
    try:
        import torch_pruning as tp
    except ImportError:
        tp = None
    if tp is not None:
        model = torchvision.models.resnet50().eval()
        start = time.perf_counter()
        pruner = tp.pruner.MagnitudePruner(model, x1, importance=tp.importance.MagnitudeImportance(p=2),
                                           pruning_ratio=0.3, ignored_layers=[model.fc])
        pruner.step()
        rows.append(("Torch-Pruning: plan and cut 30% of channels", time.perf_counter() - start))
    print()
    print("| ResNet-50 surgery | seconds |")
    print("|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.3f} |")
    if tp is None:
        print("(install torch-pruning to time Torch-Pruning in the same run)")


if __name__ == "__main__":
    main()
