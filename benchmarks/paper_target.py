"""The size the user asks for, in one run (issue 17), on the paper's LeNet-300-100 and sklearn's
digits: D-Gating with ``LambdaScheduler.for_run`` (dense, penalty, recovery with the chosen
neurons held at zero) against magnitude pruning + fine-tune at equal optimizer steps.

Protocol (every method, every seed): 64-300-100-10 MLP (or, ``--task cnn``, paper_cnn_digits.py's
CNN with its 80 conv channels as the groups and MACs as the size), SGD momentum 0.9, lr 0.05 (x0.1 for the
last quarter of the steps), batch 64, L2 5e-4 on the weights no method regularizes by group,
STEPS optimizer steps in total; the hidden neurons are the groups; sizes are fractions of the
network's parameters KEPT (50/25/10/5%); every method reaches its size within 3 points with its
own knob; no method is tuned (one trial each: the defaults); test accuracy of the physically
slimmed model on the fixed 30% test split.

- D-Gating target: ``LambdaScheduler.for_run(opt, model, target=1 - kept, total_steps=STEPS)``
  from lam 1e-3 (the controller sets lambda), D = 3.
- magnitude uniform: dense until the step D-Gating holds (5/8 of the run), then the same fraction
  of neurons (filters) in each layer with the smallest L2 norm of their incoming weights (the
  filter) is held at zero (the fraction bisected to the size), and the rest of the steps fine-tune.
- magnitude, D-Gating's layers: the same, with the per-layer neuron counts the D-Gating run of
  that seed kept.
- scratch: the slim architecture D-Gating found, trained from a fresh init for all STEPS.

- dense: the unpruned network trained for all STEPS (the plot's horizontal line).

    python benchmarks/paper_target.py --plot docs/img/mlp_target.png            # 5 seeds, ~6 min on one core
    python benchmarks/paper_target.py --task cnn --plot docs/img/cnn_target.png # the digits CNN, MACs kept
    python benchmarks/paper_target.py --task cnn --kept 0.5 0.25 --rows a.json &     # size rows in parallel,
    python benchmarks/paper_target.py --task cnn --kept 0.1 0.05 --rows b.json; wait  # then the table and plot:
    python benchmarks/paper_target.py --task cnn --merge a.json b.json --plot docs/img/cnn_target.png
    python benchmarks/paper_target.py --splits       # the measurement behind the default split
    python benchmarks/paper_target.py --steps 8 --seeds 0 --kept 0.25              # a smoke run
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import dgating_surgery as dg
from dgating_surgery.engine.deadness import Hold, zeroed
from dgating_surgery.engine.tensors import get_tensor
from dgating_surgery.demo import accuracy
from dgating_surgery.training.regularizer import gated_parameters
from dgating_surgery.training.schedule import LambdaScheduler

from paper_common import MLP, REST_WD, digits, setup, smallest_masks

LR, BATCH = 0.05, 64
KEPT = (0.5, 0.25, 0.1, 0.05)
SEEDS = (0, 1, 2, 3, 4)


class CNN(nn.Module):
    """paper_cnn_digits.py's CNN with settable widths: conv-BN-ReLU x2, maxpool, conv-BN-ReLU, mean, linear."""

    def __init__(self, widths=(16, 32, 32)):
        super().__init__()
        a, b, c = widths
        block = lambda cin, cout: nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False),  # noqa: E731
                                                nn.BatchNorm2d(cout), nn.ReLU())
        self.features = nn.Sequential(block(1, a), block(a, b), nn.MaxPool2d(2), block(b, c))
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


@dataclass(frozen=True)
class Task:
    """What differs between the benchmarks: the network (from per-layer widths), its groups, the
    size measure, the steps, and how to read the per-layer widths off a slim network."""

    key: str
    name: str
    make: Callable
    groups: list
    metric: str
    steps: int
    images: bool

    def widths(self, net) -> list[int]:
        layers = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))][:-1]  # the classifier stays
        return [getattr(m, "out_channels", None) or m.out_features for m in layers]


TASKS = {
    "mlp": Task("mlp", "LeNet-300-100", lambda widths=(300, 100): MLP(hidden=tuple(widths)),
                [{"kind": "neurons", "names": ["hidden.*"]}], "params", 1500, False),
    "cnn": Task("cnn", "digits CNN", CNN, [{"kind": "channels"}], "macs", 600, True),
}
TASK = TASKS["mlp"]


def train(model, opt, X, y, steps, seed, after=None, batch=BATCH):
    """``steps`` minibatch steps of ``batch`` examples with lr x0.1 for the last quarter;
    ``after(step)`` after each."""
    gen = torch.Generator().manual_seed(seed)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 if s < 0.75 * steps else 0.1)
    order = torch.cat([torch.randperm(len(X), generator=gen) for _ in range(steps * batch // len(X) + 1)])
    for step in range(steps):
        idx = order[step * batch:(step + 1) * batch]
        model.train()
        loss = F.cross_entropy(model(X[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lr_sched.step()
        if after is not None:
            after(step + 1)


def size(model, example) -> float:
    """The task's size measure of a network: parameters, or MACs of one forward pass."""
    return dg.model_params(model) if TASK.metric == "params" else dg.macs(model, example[:1])


def slim_result(model, X_eval, y_eval, example):
    """Cut (exact: held groups are zero) and measure: accuracy, size kept, width per layer."""
    before = size(TASK.make(), example)
    slim = dg.shrink(model, example_inputs=example)
    return {"acc": accuracy(slim, X_eval, y_eval), "kept": size(slim, example) / before, "widths": TASK.widths(slim)}


def dgating(data, kept, seed, dense=None, penalty_end=None, lam=1e-3):
    Xtr, ytr, Xev, yev = data
    torch.manual_seed(seed)
    model = dg.gate_model(TASK.make(), {"D": 3, "groups": TASK.groups}, Xtr[:2])
    opt = torch.optim.SGD(dg.param_groups(model, lam, weight_decay=REST_WD), lr=LR, momentum=0.9)
    split = {k: v for k, v in (("dense", dense), ("penalty_end", penalty_end)) if v is not None}
    sched = LambdaScheduler.for_run(opt, model, 1 - kept, TASK.steps, TASK.metric, **split)
    train(model, opt, Xtr, ytr, TASK.steps, seed, lambda step: sched.step())
    return slim_result(model, Xev, yev, Xtr[:8])


def magnitude(data, kept, seed, widths=None):
    """Dense training, then the smallest-norm neurons held at zero at 5/8 of the run (uniform
    fraction per layer, or ``widths`` per layer), fine-tuning after."""
    Xtr, ytr, Xev, yev = data
    torch.manual_seed(seed)
    model = dg.gate_model(TASK.make(), {"D": 2, "init": "ones", "groups": TASK.groups}, Xtr[:2])
    for gate in dg.gates(model):
        gate.factors.requires_grad_(False)
    thetas, _ = gated_parameters(model)
    ids = {id(p) for p in thetas}
    rest = [p for p in model.parameters() if id(p) not in ids and p.requires_grad]
    opt = torch.optim.SGD([{"params": thetas, "weight_decay": REST_WD}, {"params": rest, "weight_decay": REST_WD}],
                          lr=LR, momentum=0.9)
    prune_at = int(0.625 * TASK.steps)
    held = []

    def after(step):
        if step == prune_at:
            held.append(Hold(model, smallest(model, kept, Xtr[:1], widths), opt))

    train(model, opt, Xtr, ytr, TASK.steps, seed, after)
    return slim_result(model, Xev, yev, Xtr[:8])


def filter_norms(model) -> dict[str, torch.Tensor]:
    """Per gate, the L2 norm of each group's slice of its producing layer's weight (a neuron's
    incoming row, a conv filter): the classic magnitude criterion."""
    out = {}
    for key, gate in model.dgates.items():
        cut = next(c for c in gate.cuts if c.fqn.endswith("weight") and isinstance(
            model.get_submodule(c.fqn.rpartition(".")[0]), (nn.Linear, nn.Conv2d)) and c.index.numel() > 1)
        weight = get_tensor(model, cut.fqn).detach()
        per_position = weight.pow(2).sum([d for d in range(weight.ndim) if d != cut.dim])
        index = cut.index.expand(weight.shape[cut.dim])
        out[key] = torch.zeros(gate.num_groups).index_add(0, index[index >= 0], per_position[index >= 0]).sqrt()
    return out


def smallest(model, kept, example, widths=None):
    """Per gate, the groups with the smallest filter norm: ``widths`` kept per layer, or one fraction
    for every layer, bisected so that the size kept comes to ``kept``."""
    norms = filter_norms(model)

    def masks(keep_counts):
        kept = dict(zip(norms, keep_counts))
        return smallest_masks(norms, lambda key, n: n - max(kept[key], 1))

    if widths is not None:
        return masks(widths)
    lo, hi = 0.0, 1.0  # fraction of neurons kept per layer
    for _ in range(30):
        mid = (lo + hi) / 2
        chosen = masks([round(mid * len(n)) for n in norms.values()])
        with zeroed(model, chosen):
            removed = dg.removed_fraction(model, TASK.metric, example_inputs=example)
        lo, hi = (mid, hi) if removed > 1 - kept else (lo, mid)
    return masks([round(hi * len(n)) for n in norms.values()])


def scratch(data, widths, seed):
    Xtr, ytr, Xev, yev = data
    torch.manual_seed(seed + 100)
    model = TASK.make(widths)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=REST_WD)
    train(model, opt, Xtr, ytr, TASK.steps, seed)
    return {"acc": accuracy(model, Xev, yev), "kept": size(model, Xtr[:1]) / size(TASK.make(), Xtr[:1]),
            "widths": list(widths)}


def mean_std(values):
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values) if len(values) > 1 else 0:.2f}"


def splits(seeds=(0, 1, 2)):
    """Validation accuracy (20% of the training split) per (dense, penalty_end) split."""
    Xtr, ytr, _, _ = digits(TASK.images)
    n = int(0.8 * len(Xtr))
    data = (Xtr[:n], ytr[:n], Xtr[n:], ytr[n:])
    print("| kept | dense until | penalty until | val acc % (mean ± std) | params kept % |")
    print("|---|---|---|---|---|")
    for kept in (0.25, 0.1):
        for dense, end in ((0.0, 0.5), (0.0, 0.625), (0.125, 0.625), (0.25, 0.625), (0.25, 0.75), (0.375, 0.75)):
            rows = [dgating(data, kept, s, dense, end) for s in seeds]
            print(f"| {kept:.0%} | {dense:g} | {end:g} | {mean_std([100 * r['acc'] for r in rows])} | "
                  f"{mean_std([100 * r['kept'] for r in rows])} |", flush=True)


METHODS = {"dg": "D-Gating target", "mag": "magnitude uniform", "mag_layers": "magnitude, D-Gating's layers",
           "scratch": "scratch, D-Gating's layers"}


def dense(data, seed):
    """The unpruned network, trained for all the steps (the reference line)."""
    Xtr, ytr, Xev, yev = data
    torch.manual_seed(seed)
    model = TASK.make()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=REST_WD)
    train(model, opt, Xtr, ytr, TASK.steps, seed)
    return {"acc": accuracy(model, Xev, yev), "kept": 1.0, "widths": TASK.widths(model)}


def measure(seeds=SEEDS, kept_rows=KEPT, rows_path=None) -> list[dict]:
    """Every method at every size and seed (and dense per seed): one row each, ``{"task", "method",
    "asked", "seed", "acc", "kept", "widths"}`` (fractions), saved to ``rows_path`` as they come."""
    data = digits(TASK.images)
    started = time.time()
    rows = []

    def add(method, asked, seed, result):
        rows.append({"task": TASK.key, "steps": TASK.steps, "method": method, "asked": asked, "seed": seed, **result})
        if rows_path:
            Path(rows_path).write_text(json.dumps(rows))

    for seed in seeds:
        add("dense", 1.0, seed, dense(data, seed))
    for kept in kept_rows:
        for seed in seeds:
            d = dgating(data, kept, seed)
            add("dg", kept, seed, d)
            add("mag", kept, seed, magnitude(data, kept, seed))
            add("mag_layers", kept, seed, magnitude(data, kept, seed, d["widths"]))
            add("scratch", kept, seed, scratch(data, d["widths"], seed))
            print(f"<!-- {kept:.0%} seed {seed}: " + ", ".join(
                f"{r['method']} {100 * r['acc']:.2f}" for r in rows[-4:]) + f"; {time.time() - started:.0f} s -->",
                flush=True)
    return rows


def tables(rows) -> str:
    """The markdown table of ``rows``: per size asked, each method's accuracy (mean ± std over the
    seeds, size reached in brackets), the paired difference D-Gating - magnitude uniform, wins."""
    seeds = sorted({r["seed"] for r in rows})
    by = {(r["method"], r["asked"], r["seed"]): r for r in rows}
    lines = [f"{TASK.name}, {rows[0].get('steps', TASK.steps)} SGD steps per method, {TASK.metric} kept, test accuracy % (mean ± std over "
             f"{len(seeds)} seeds: {', '.join(map(str, seeds))})", ""]
    dense_accs = [100 * by[("dense", 1.0, s)]["acc"] for s in seeds if ("dense", 1.0, s) in by]
    if dense_accs:
        lines += [f"Dense (no pruning): {mean_std(dense_accs)}", ""]
    lines += [f"| {TASK.metric} kept | " + " | ".join(METHODS.values()) +
              " | D-Gating - magnitude uniform (paired) | wins / seeds |", "|---" * (len(METHODS) + 3) + "|"]
    for kept in sorted({r["asked"] for r in rows} - {1.0}, reverse=True):
        cells = []
        for method in METHODS:
            sel = [by[(method, kept, s)] for s in seeds if (method, kept, s) in by]
            cells.append(f"{mean_std([100 * r['acc'] for r in sel])} ({statistics.mean(100 * r['kept'] for r in sel):.1f}% "
                         "kept)" if sel else "-")
        pairs = [(by[("dg", kept, s)], by[("mag", kept, s)]) for s in seeds if ("dg", kept, s) in by and ("mag", kept, s) in by]
        diffs = [100 * (a["acc"] - b["acc"]) for a, b in pairs]
        wins, ties = sum(x > 0 for x in diffs), sum(x == 0 for x in diffs)
        lines.append(f"| {kept:.0%} | " + " | ".join(cells) + f" | {mean_std(diffs) if diffs else '-'} | "
                     f"{wins} (+{ties} ties) / {len(diffs)} |")
    widths = {kept: [by[("dg", kept, s)]["widths"] for s in seeds if ("dg", kept, s) in by]
              for kept in sorted({r["asked"] for r in rows} - {1.0}, reverse=True)}
    lines += ["", "D-Gating's widths per seed: " + "; ".join(f"{k:.0%} {w}" for k, w in widths.items())]
    return "\n".join(lines)


def plot(rows, path) -> None:
    """Accuracy against the size kept (% of parameters, of MACs for the CNN), one line per method
    (benchmarks/plots.py), dense as a horizontal line."""
    import plots

    plot_rows = [{"method": "dense" if r["method"] == "dense" else METHODS[r["method"]], "x": 100 * r["kept"],
                  "y": 100 * r["acc"], "seed": r["seed"], "setting": 100 * r["asked"]} for r in rows]
    seeds = sorted({r["seed"] for r in rows})
    measure = {"params": "parameters", "macs": "MACs"}[TASK.metric]
    plots.plot(plot_rows, path, xlabel=f"{measure} kept (%, log scale)", ylabel="test accuracy of the slim model (%)",
               title=f"{TASK.name if 'digits' in TASK.name else TASK.name + ' on digits'}, {rows[0].get('steps', TASK.steps)} SGD steps per method, {len(seeds)} seeds (mean ± std)",
               hline="dense", logx=True, spread=0.025)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--splits", action="store_true", help="measure the dense/penalty/recovery split")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default: 0-4, or 0-2 for --splits)")
    parser.add_argument("--task", choices=sorted(TASKS), default="mlp")
    parser.add_argument("--kept", type=float, nargs="+", default=KEPT, help="the size rows (fractions kept)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: the task's)")
    parser.add_argument("--rows", help="save the measured rows (JSON), e.g. one file per process")
    parser.add_argument("--merge", nargs="+", help="print the table (and plot) from saved rows, measuring nothing")
    parser.add_argument("--plot", help="write a PNG of test accuracy against the size kept, per method")
    args = parser.parse_args(argv)
    global TASK
    TASK = TASKS[args.task] if args.steps is None else replace(TASKS[args.task], steps=args.steps)
    setup()
    if args.splits:
        splits(tuple(int(s) for s in (args.seeds or "0,1,2").split(",")))
        return
    if args.merge:
        rows = [r for path in args.merge for r in json.loads(Path(path).read_text())]
    else:
        rows = measure(tuple(int(s) for s in (args.seeds or ",".join(map(str, SEEDS))).split(",")), tuple(args.kept),
                       args.rows)
    print(tables(rows))
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    sys.exit(main())
