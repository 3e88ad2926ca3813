"""The core invariant over torchvision's whole classification zoo (issue 2).

For every model of ``torchvision.models.list_models(module=torchvision.models)`` (random weights
that can expose a wrong cut, see ``dg.expose_weights``; eval mode, one 224x224 image): gate with the smallest recipe (channels and neurons, no selectors),
zero a seeded random 30% of every gate's groups, shrink, and check that the slim output matches
the gated one (max abs diff <= 1e-4 of the output's max abs value), that the parameter count falls
by exactly the removed groups' parameters, and that no gate is left. Then the groups that could not
be gated, with the reason.

    python benchmarks/zoo.py                # all 80 models (about 12 minutes on 2 cores, mostly building the models)
    python benchmarks/zoo.py resnet18 vit_b_16
"""
from __future__ import annotations

import sys

import torch
import torchvision

import dgating_surgery as dg


def main(names: list[str]) -> int:
    torch.manual_seed(0)
    names = names or torchvision.models.list_models(module=torchvision.models)
    header = (f"{'model':28s} {'gated':>7s} {'cut':>6s} {'params before':>14s} {'params after':>13s} "
              f"{'gate diff':>10s} {'slim diff':>10s} {'gate s':>7s} {'shrink s':>8s} ok")
    print(header)
    print("-" * len(header))
    reasons: dict[str, dict[str, int]] = {}
    passed, totals = 0, [0, 0, 0, 0]
    worst, seconds = [0.0, 0.0], [0.0, 0.0]  # largest gate/slim diff; gate/shrink seconds summed
    for name in names:
        model = torchvision.models.get_model(name, weights=None)
        size = 299 if name == "inception_v3" else 224  # its documented input size (the aux branch needs it)
        x = torch.randn(1, 3, size, size)
        try:
            c = dg.random_cut_check(dg.expose_weights(model), x, "default", fraction=0.3, seed=0)
        except Exception as exc:  # a failure is a row of the table, not the end of the sweep
            print(f"{name:28s} FAILED: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
            continue
        passed += c.ok
        totals = [totals[0] + c.groups_gated, totals[1] + c.groups_cut, totals[2] + c.params_before,
                  totals[3] + c.params_after]
        worst = [max(worst[0], c.gate_diff), max(worst[1], c.slim_diff)]
        seconds = [seconds[0] + c.seconds_gate, seconds[1] + c.seconds_shrink]
        print(f"{name:28s} {c.groups_gated:7d} {c.groups_cut:6d} {c.params_before:14,d} {c.params_after:13,d} "
              f"{c.gate_diff:10.1e} {c.slim_diff:10.1e} {c.seconds_gate:7.2f} {c.seconds_shrink:8.2f} "
              f"{'yes' if c.ok else 'NO'}", flush=True)
        reasons[name] = c.not_gated
        del model
    print("-" * len(header))
    print(f"exact: {passed}/{len(names)} models; {totals[0]:,d} groups gated, {totals[1]:,d} cut; "
          f"parameters {totals[2]:,d} -> {totals[3]:,d}; max gate diff {worst[0]:.1e}, max slim diff {worst[1]:.1e} "
          f"of the output's largest value; gate {seconds[0]:.1f} s and shrink {seconds[1]:.1f} s summed")
    print("\nGroups not gated, and why (model: groups - reason; the four largest reasons per model):")
    for name, why in reasons.items():
        ranked = sorted(why.items(), key=lambda kv: -kv[1])
        for reason, count in ranked[:4]:
            print(f"  {name}: {count} - {reason}")
        if len(ranked) > 4:
            print(f"  {name}: {sum(c for _, c in ranked[4:])} more in {len(ranked) - 4} other places")
    return 0 if passed == len(names) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
