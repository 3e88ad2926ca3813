"""Channel-level D-Gating of a small CNN on sklearn's 8x8 digits: accuracy, removed MACs and the
measured CPU latency of the slim model against the dense one.

CNN: conv3x3(1->16)-BN-ReLU, conv3x3(16->32)-BN-ReLU, maxpool 2, conv3x3(32->32)-BN-ReLU, global
average pool, linear(32->10). The 80 conv channels are gated (on the BatchNorm's affine, where a
channel can be removed exactly). Dense baseline: the same net trained with plain L2 5e-4.
SGD momentum 0.9, lr 0.05 (x0.1 for the last quarter), batch 64, 30 epochs, D = 3, seeds 0-2;
channels whose collapsed norm is below 1e-4 are cut. Speed-up: the dense net's latency over the
slim net's, timed in interleaved rounds (``measure.compare_latency``), one thread, batch 256.

    python benchmarks/paper_cnn_digits.py           # about 3 minutes on one core
"""
from __future__ import annotations

import torch
from torch import nn

import dgating_surgery as dg
from dgating_surgery.engine.measure import compare_latency
from paper_common import REST_WD, accuracy, digits, fit, ms, run_dgating, setup, timer

SEEDS = (0, 1, 2)
EPOCHS, LR, D = 30, 0.05, 3
LAMS = [0.03, 0.05, 0.07]
GROUPS = [{"kind": "channels"}]


def block(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(block(1, 16), block(16, 32), nn.MaxPool2d(2), block(32, 32))
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def main():
    setup()
    data = digits(images=True)
    Xtr, ytr, Xte, yte = data
    batch = Xte[:256]
    elapsed = timer()
    rows = []
    for seed in SEEDS:
        torch.manual_seed(seed)
        dense = CNN()
        fit(dense, [{"params": list(dense.parameters()), "weight_decay": REST_WD}], Xtr, ytr, EPOCHS, LR, seed)
        macs = dg.macs(dense, Xte[:1])
        rows.append({"setting": "dense", "seed": seed, "acc": accuracy(dense, Xte, yte), "channels": 80,
                     "macs": 0.0, "params": dg.model_params(dense), "speedup": 1.0})
        for lam in LAMS:
            r = run_dgating(CNN, data, GROUPS, D, lam, EPOCHS, LR, seed)
            slim = r["slim"]
            rows.append({"setting": f"D-Gating D={D}, lambda {lam:g}", "seed": seed, "acc": r["acc"],
                         "channels": 80 - r["dead"]["channels"], "macs": 1 - dg.macs(slim, Xte[:1]) / macs,
                         "params": dg.model_params(slim),
                         "speedup": compare_latency(dense.eval(), slim.eval(), batch).speedup})
        print(f"seed {seed} done ({elapsed():.0f} s)", flush=True)
    print(f"\n### Small CNN on digits, channel-level (mean ± std over seeds {', '.join(map(str, SEEDS))})\n")
    print("| model | test accuracy (%) | channels kept (of 80) | MACs removed (%) | params | speed-up vs dense, "
          "batch 256 |")
    print("|---|---|---|---|---|---|")
    for setting in dict.fromkeys(r["setting"] for r in rows):
        sel = [r for r in rows if r["setting"] == setting]
        print(f"| {setting} | {ms([r['acc'] for r in sel], scale=100)} | {ms([r['channels'] for r in sel])} | "
              f"{ms([r['macs'] for r in sel], scale=100)} | {ms([r['params'] for r in sel], '{:.0f}')} | "
              f"{ms([r['speedup'] for r in sel], '{:.2f}')}x |")
    print(f"\n(dense: {rows[0]['params']:,} parameters, {macs:,} MACs per image; one CPU thread; total time "
          f"{elapsed():.0f} s)")


if __name__ == "__main__":
    main()
