"""Do slim models run as fast as their MACs say (issue 10)? CPU latency of cut models, side by side.

For ResNet-50, MobileNetV2 and VGG-16-BN (torchvision, random weights, eval mode, one 1x3x224x224
image, one CPU thread) at 30% and 50% of every gate's groups cut:

- ours: the default recipe, a seeded random fraction of every gate's groups set to zero, `dg.shrink`;
- ours, round_to N: the same dead groups, shrunk with `round_to=N` (every cut layer's width a
  multiple of N; the strongest dead groups are kept, so a little less is cut);
- Torch-Pruning: `MagnitudePruner` at the same `pruning_ratio` (classifier ignored), without and
  with its own `round_to=N` (install torch-pruning, the `bench` extra).

Each row: MACs before/after (``dg.macs``), latency before/after (median of interleaved rounds:
every round runs every model of the row's model family once, the order rotating; CPU time of the
one thread, see ``speed.clock``), the speed-up, and the speed-up divided by the MAC reduction
(1.0: as fast as the MACs say). Latency spread: min-max of before/after ratio over rounds.

    python benchmarks/slim_speed.py                         # N = 8 and 16
    python benchmarks/slim_speed.py --models resnet50 --round-to 16 --rounds 9
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch
import torchvision

import dgating_surgery as dg

try:
    from speed import clock
except ImportError:  # run from elsewhere
    clock = time.thread_time

MODELS = {"resnet50": ("ResNet-50", lambda m: m.fc), "mobilenet_v2": ("MobileNetV2", lambda m: m.classifier[-1]),
          "vgg16_bn": ("VGG-16-BN", lambda m: m.classifier[-1])}


def ours(base, x, fraction, round_to=1, seed=0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gated = dg.gate_model(copy.deepcopy(base), "default", x)
    dg.kill_random_groups(gated, fraction, seed=seed)
    return dg.shrink(gated, example_inputs=x, round_to=round_to).eval()


def pruned_by_tp(base, x, fraction, classifier, round_to=None):
    import torch_pruning as tp

    model = copy.deepcopy(base)
    pruner = tp.pruner.MagnitudePruner(model, x, importance=tp.importance.MagnitudeImportance(p=2),
                                       pruning_ratio=fraction, ignored_layers=[classifier(model)], round_to=round_to)
    pruner.step()
    return model.eval()


def widths_ok(model, n) -> str:
    """How many conv layers have an output width that is a multiple of n."""
    convs = [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    return f"{sum(c % n == 0 for c in convs)}/{len(convs)}"


def time_models(models: dict, x, rounds: int, warmup: int = 2) -> dict:
    times = {k: [] for k in models}
    names = list(models)
    with torch.inference_mode():
        for _ in range(warmup):
            for m in models.values():
                m(x)
        for r in range(rounds):
            order = names[r % len(names):] + names[: r % len(names)]
            for k in order:
                t0 = clock()
                models[k](x)
                times[k].append(clock() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--fractions", nargs="*", type=float, default=[0.3, 0.5])
    parser.add_argument("--round-to", nargs="*", type=int, default=[8, 16])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    try:
        import torch_pruning  # noqa: F401
        have_tp = True
    except ImportError:
        have_tp = False
    x = torch.randn(1, 3, 224, 224)
    print(f"one 1x3x224x224 image, eval, one thread, torch {torch.__version__}; latency: median of "
          f"{args.rounds} interleaved rounds\n")
    print("| model | cut | method | MACs before -> after (G) | latency before -> after (ms) | speed-up (min-max) "
          "| MAC reduction | speed-up / MAC reduction | conv widths multiple of 8 / 16 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for key in args.models:
        label, classifier = MODELS[key]
        torch.manual_seed(0)
        base = getattr(torchvision.models, key)().eval()
        base_macs = dg.macs(base, x)
        for fraction in args.fractions:
            variants = {"ours": ours(base, x, fraction)}
            for n in args.round_to:
                variants[f"ours, round_to {n}"] = ours(base, x, fraction, n)
            if have_tp:
                variants["Torch-Pruning"] = pruned_by_tp(base, x, fraction, classifier)
                for n in args.round_to:
                    variants[f"Torch-Pruning, round_to {n}"] = pruned_by_tp(base, x, fraction, classifier, n)
            times = time_models({"dense": base, **variants}, x, args.rounds)
            dense = times["dense"]
            for name, model in variants.items():
                m = dg.macs(model, x)
                ratios = [d / t for d, t in zip(dense, times[name])]
                speedup = statistics.median(ratios)
                reduction = base_macs / m
                print(f"| {label} | {fraction:.0%} | {name} | {base_macs / 1e9:.2f} -> {m / 1e9:.2f} | "
                      f"{1000 * statistics.median(dense):.1f} -> {1000 * statistics.median(times[name]):.1f} | "
                      f"{speedup:.2f} ({min(ratios):.2f}-{max(ratios):.2f}) | {reduction:.2f} | "
                      f"**{speedup / reduction:.2f}** | {widths_ok(model, 8)} / {widths_ok(model, 16)} |", flush=True)
    if not have_tp:
        print("\n(install torch-pruning, the `bench` extra, for its rows)")


if __name__ == "__main__":
    main()
