"""Input-feature selection on sklearn's Wine at the feature count asked (issue 17's fair protocol):
D-Gating with a size target on the 13 input features against magnitude selection (the L2 norm of
each feature's first-layer column after dense training) and proximal group lasso, every method
at exactly k features with its own knob, equal steps, equal tuning.

Protocol (every method, every seed):
- data: the 178 samples, a stratified 70/30 split drawn per seed (seed 0's is the fixed split of
  paper_wine_features.py: its 54 test samples), so that the seeds sample which samples are tested
  on as well as the training's noise; the 124 training samples split again 80/20 (99 to fit, 25 to
  validate), standardized with the fit part's statistics; the test split is used once, for the
  chosen trial;
- model: a 13-32-3 MLP (paper_common.MLP), the 13 input features gated (``kind: features``);
- training: STEPS minibatch SGD steps (batch 16, momentum 0.9, lr x0.1 for the last quarter:
  paper_target.train), L2 5e-4 on the weights no method regularizes by group;
- tuning: every method gets the same 3 trials, lr in LRS, chosen per (method, k, seed) on
  validation accuracy (ties: validation loss); the table shows the chosen trial's test accuracy;
- the cut: ``dg.shrink`` at a threshold of 1e-12 (only exactly zero features go), so every method
  ends with exactly k features, and accuracy is that of the slim model fed the kept features.

Methods ("recovery": the sparsifying phase ends when the size is reached, at 5/8 of the run at the
latest; the k features kept are fixed there, the others are held at exactly zero and the rest of
the steps train what is left; "no recovery": the same with the last step as the latest, so that
only a run that reaches its size early gets steps after it):
- D-Gating target: D = 3, ``LambdaScheduler.for_run(opt, gated, target=1 - k/13, metric="groups")``
  from lambda 1e-2 (dense for the first quarter; no recovery: ``penalty_end=1.0``);
- magnitude: dense training, then the 13 - k features with the smallest first-layer column norm
  held at zero at 5/8 of the run and the rest fine-tuned (no recovery: pruned after the last step);
- proximal group lasso: after each SGD step from the first quarter on, block soft-thresholding of
  every feature's column (w <- max(0, 1 - lr*lam/||w||) w); its knob, lambda, starts at 0.1 and
  grows 1.2x every 10 steps until no more than k features are non-zero (or 5/8 of the run), when
  the 13 - k weakest are held at zero (a feature zeroed beyond them trains again);
- scratch: a k-32-3 MLP on the k features D-Gating kept (its chosen trial), trained
  from a fresh init for all the steps;
- dense: the 13-32-3 MLP, all the steps.

    python benchmarks/paper_target_wine.py --plot docs/img/wine_target.png    # 10 seeds (~10 min idle)
    python benchmarks/paper_target_wine.py --seeds 0,1,2,3,4 --rows a.json &    # or in two processes,
    python benchmarks/paper_target_wine.py --seeds 5,6,7,8,9 --rows b.json; wait   # then the tables:
    python benchmarks/paper_target_wine.py --merge a.json b.json --plot docs/img/wine_target.png
    python benchmarks/paper_target_wine.py --seeds 0 --steps 5 --kept 4 --no-gap   # a smoke run
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import dgating_surgery as dg
from dgating_surgery.engine.deadness import Hold
from dgating_surgery.engine.measure import forward
from dgating_surgery.training.schedule import DENSE_FRACTION, PENALTY_END_FRACTION, LambdaScheduler

import paper_target
from paper_common import MLP, REST_WD, frozen_ones, group_scale_, plain_groups, run_prox, setup, smallest_masks

N_FEATURES = 13
STEPS, BATCH = 600, 16
LRS = (0.02, 0.05, 0.1)
KEPT = (8, 5, 3, 2)
SEEDS = 10
GROUPS = [{"kind": "features"}]
LAM0 = 1e-2  # D-Gating's starting lambda; the controller moves it
D = 3
PENALTY_END = PENALTY_END_FRACTION  # D-Gating with recovery: held by this fraction of the run at the latest
PROX_LAM0, PROX_GROWTH, PROX_EVERY = 0.1, 1.2, 10
CUT = 1e-12  # shrink threshold: only the exactly zero (held) features are cut
GAP_LAMBDAS = (3.0, 3.2, 3.4, 3.6, 3.8, 4.0)  # paper_wine_features.py's proximal sweep had none between 3 and 4


@dataclass(frozen=True)
class Split:
    Xfit: torch.Tensor
    yfit: torch.Tensor
    Xval: torch.Tensor
    yval: torch.Tensor
    Xte: torch.Tensor
    yte: torch.Tensor


def wine_splits(seed: int = 0) -> Split:
    """Fit / validation / test drawn with ``seed`` (stratified), standardized with the fit part's
    statistics."""
    from sklearn.datasets import load_wine
    from sklearn.model_selection import train_test_split
    X, y = load_wine(return_X_y=True)
    rest, test = train_test_split(np.arange(len(y)), test_size=0.3, random_state=seed, stratify=y)
    fit, val = train_test_split(rest, test_size=0.2, random_state=seed, stratify=y[rest])
    mu, sd = X[fit].mean(0), X[fit].std(0) + 1e-8
    parts = [(torch.tensor((X[i] - mu) / sd, dtype=torch.float32), torch.tensor(y[i])) for i in (fit, val, test)]
    return Split(*(t for part in parts for t in part))


def net(n_in=N_FEATURES):
    return MLP(n_in, (32,), 3)


def train(model, opt, X, y, seed, after=None):
    paper_target.train(model, opt, X, y, STEPS, seed, after, batch=BATCH)


def weakest(model, k) -> dict[str, torch.Tensor]:
    """The features gate's mask of all but the k features whose first-layer columns (collapsed
    weights) have the largest L2 norm."""
    return smallest_masks(dg.group_norms(model), lambda key, n: n - k)


def dgating(d, k, lr, seed, recovery):
    model = dg.gate_model(net(), {"D": D, "groups": GROUPS}, d.Xfit[:2])
    opt = torch.optim.SGD(dg.param_groups(model, LAM0, weight_decay=REST_WD), lr=lr, momentum=0.9)
    sched = LambdaScheduler.for_run(opt, model, 1 - k / N_FEATURES, STEPS, "groups",
                                    penalty_end=PENALTY_END if recovery else 1.0)
    train(model, opt, d.Xfit, d.yfit, seed, lambda step: sched.step())
    return model


def magnitude(d, k, lr, seed, recovery):
    model = frozen_ones(net(), GROUPS, d.Xfit)
    opt = torch.optim.SGD(plain_groups(model, REST_WD), lr=lr, momentum=0.9)
    prune_at = int(PENALTY_END_FRACTION * STEPS) if recovery else STEPS

    def after(step):
        if step == prune_at:
            Hold(model, weakest(model, k), opt)

    train(model, opt, d.Xfit, d.yfit, seed, after)
    return model


def prox(d, k, lr, seed, recovery):
    model = frozen_ones(net(), GROUPS, d.Xfit)
    opt = torch.optim.SGD(plain_groups(model, 0.0), lr=lr, momentum=0.9)
    start, end = int(DENSE_FRACTION * STEPS), int(PENALTY_END_FRACTION * STEPS) if recovery else STEPS
    state = {"lam": PROX_LAM0, "held": False}

    def after(step):
        if state["held"] or step < start:
            return
        step_lr = opt.param_groups[0]["lr"]
        with torch.no_grad():
            norms = dg.group_norms(model)
            group_scale_(model, {key: (1 - step_lr * state["lam"] / n.clamp(min=1e-12)).clamp(min=0)
                                 for key, n in norms.items()})
            alive = sum(int((n > 0).sum()) for n in dg.group_norms(model).values())
        if alive <= k or step >= end:
            Hold(model, weakest(model, k), opt)
            state["held"] = True
        elif (step - start) % PROX_EVERY == PROX_EVERY - 1:
            state["lam"] *= PROX_GROWTH

    train(model, opt, d.Xfit, d.yfit, seed, after)
    return model


def scratch(d, features, lr, seed):
    torch.manual_seed(seed + 100)
    model = net(len(features))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=REST_WD)
    train(model, opt, d.Xfit[:, features], d.yfit, seed)
    model.kept_input_features = {"x": torch.tensor(features)}  # forward() feeds it the kept columns
    return model


def dense(d, lr, seed):
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=REST_WD)
    train(model, opt, d.Xfit, d.yfit, seed)
    return model


def scores(model, d) -> dict:
    """Cut (a gated model) and measure: validation and test accuracy and loss, features kept."""
    if hasattr(model, "dgates"):
        model = dg.shrink(model, CUT, example_inputs=d.Xfit[:8])
    out = {}
    for split, X, y in (("val", d.Xval, d.yval), ("test", d.Xte, d.yte)):
        with torch.no_grad():
            logits = forward(model, (X,))
        out[f"{split}_acc"] = float((logits.argmax(1) == y).float().mean())
        out[f"{split}_loss"] = float(F.cross_entropy(logits, y))
    kept = getattr(model, "kept_input_features", {}).get("x")
    out["features"] = list(range(N_FEATURES)) if kept is None else kept.tolist()
    return out


def tuned(run, d, seed) -> dict:
    """``run(lr, seed)`` for every lr in LRS from the same seed; the trial with the best validation
    accuracy (ties: lower validation loss), with the lr it used."""
    trials = []
    for lr in LRS:
        torch.manual_seed(seed)
        trials.append({**scores(run(lr, seed), d), "lr": lr})
    return max(trials, key=lambda t: (t["val_acc"], -t["val_loss"]))


METHODS = {  # name -> (run(d, k, lr, seed, recovery), recovery): the sized methods, in the table's order
    "D-Gating target": (dgating, True),
    "magnitude": (magnitude, True),
    "proximal": (prox, True),
    "D-Gating, no recovery": (dgating, False),
    "magnitude, no recovery": (magnitude, False),
    "proximal, no recovery": (prox, False),
}
BASELINES = ("magnitude", "proximal", "scratch")  # what the paired differences compare D-Gating with


def measure(kept, seeds, save=None, methods=tuple(METHODS)) -> list[dict]:
    rows, started = [], time.time()
    for seed in seeds:
        d = wine_splits(seed)
        best = tuned(lambda lr, s: dense(d, lr, s), d, seed)
        rows.append({"method": "dense", "k": N_FEATURES, "seed": seed, **best})
        for k in kept:
            for method in methods:
                run, recovery = METHODS[method]
                best = tuned(lambda lr, s: run(d, k, lr, s, recovery), d, seed)
                rows.append({"method": method, "k": k, "seed": seed, **best})
            chosen = next((r for r in rows if r["method"] == "D-Gating target" and r["k"] == k and r["seed"] == seed),
                          None)
            if chosen is None:
                continue
            best = tuned(lambda lr, s: scratch(d, chosen["features"], lr, s), d, seed)
            rows.append({"method": "scratch", "k": k, "seed": seed, **best})
        if save:
            Path(save).write_text(json.dumps(rows))  # what is done so far survives an interrupted run
        print(f"<!-- seed {seed} done, {time.time() - started:.0f} s -->", flush=True)
    return rows


def mean_std(values) -> str:
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values) if len(values) > 1 else 0:.1f}"


def paired(rows, k, method, baseline, split="test") -> str:
    """D-Gating's accuracy minus the baseline's on ``split``, seed by seed: mean ± std, wins (+ties)."""
    a = {r["seed"]: r[f"{split}_acc"] for r in rows if r["method"] == method and r["k"] == k}
    b = {r["seed"]: r[f"{split}_acc"] for r in rows if r["method"] == baseline and r["k"] == k}
    diffs = [100 * (a[s] - b[s]) for s in sorted(a)]
    wins, ties = sum(x > 1e-9 for x in diffs), sum(abs(x) <= 1e-9 for x in diffs)
    return f"{statistics.mean(diffs):+.1f} ± {statistics.stdev(diffs) if len(diffs) > 1 else 0:.1f}, {wins} (+{ties}) / {len(diffs)}"


def tables(rows, kept) -> str:
    seeds = sorted({r["seed"] for r in rows})
    methods = [m for m in [*METHODS, "scratch"] if any(r["method"] == m for r in rows)]
    baselines = [b for b in BASELINES if b in methods]
    dense_acc = mean_std([100 * r["test_acc"] for r in rows if r["method"] == "dense"])
    out = [f"Test accuracy (%) of the slim model, mean ± std over {len(seeds)} seeds (54 test samples: one = "
           f"1.85 points); dense (13 features): {dense_acc}\n",
           "| features kept | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for k in kept:
        out.append(f"| {k} | " + " | ".join(mean_std([100 * r["test_acc"] for r in rows
                                                       if r["method"] == m and r["k"] == k]) for m in methods) + " |")
    out += ["\nPaired per seed, D-Gating target (with recovery) minus each: mean ± std of the difference in test "
            "points, seeds where D-Gating is higher (+ ties) / seeds\n",
            "| features kept | " + " | ".join(f"− {b}" for b in baselines) + " |", "|---|" + "---|" * len(baselines)]
    for k in kept:
        out.append(f"| {k} | " + " | ".join(paired(rows, k, "D-Gating target", b) for b in baselines) + " |")
    if {"D-Gating, no recovery", "magnitude, no recovery"} <= set(methods):
        out.append("\nNo recovery, D-Gating − magnitude: " + "; ".join(
            f"{k} features {paired(rows, k, 'D-Gating, no recovery', 'magnitude, no recovery')}" for k in kept))
    out.append("\nD-Gating target − magnitude on the validation split, for the chosen trials (25 samples: one = 4 "
               "points; the best of 3 trials, so biased upward for every method): " +
               "; ".join(f"{k} features {paired(rows, k, 'D-Gating target', 'magnitude', 'val')}" for k in kept))
    off = [f"{r['method']} (k {r['k']}, seed {r['seed']}: {len(r['features'])})" for r in rows
           if r["method"] != "dense" and len(r["features"]) != r["k"]]
    out.append(f"\nRuns that did not end at exactly k features: {', '.join(off) or 'none'}")
    lrs = {m: [r["lr"] for r in rows if r["method"] == m] for m in ["dense", *methods]}
    out.append("\nlr chosen on validation (count of 0.02 / 0.05 / 0.1): " + "; ".join(
        f"{m} {'/'.join(str(v.count(lr)) for lr in LRS)}" for m, v in lrs.items()))
    return "\n".join(out)


def feature_choice(rows, kept) -> str:
    """Which features each selector keeps, over the seeds."""
    from sklearn.datasets import load_wine
    names = load_wine().feature_names
    lines = []
    for k in kept:
        for method in ("D-Gating target", "magnitude", "proximal"):
            runs = [r["features"] for r in rows if r["method"] == method and r["k"] == k]
            counts = sorted(((sum(i in f for f in runs), names[i]) for i in range(N_FEATURES)), reverse=True)
            lines.append(f"- {k} features, {method}: " + ", ".join(f"{n} {c}/{len(runs)}" for c, n in counts if c))
    return "\n".join(lines)


def prox_gap(d, seeds) -> str:
    """paper_wine_features.py's proximal sweep (150 epochs on the fit part, constant lambda) with the
    lambdas between 3 and 4 it lacked: features kept and test accuracy."""
    data = (d.Xfit, d.yfit, d.Xte, d.yte)
    lines = ["| proximal lambda | features kept (of 13) | test accuracy (%) |", "|---|---|---|"]
    for lam in GAP_LAMBDAS:
        runs = [run_prox(net, data, GROUPS, lam, 150, 0.05, seed) for seed in seeds]
        lines.append(f"| {lam:g} | {mean_std([N_FEATURES - r['dead']['features'] for r in runs])} | "
                     f"{mean_std([100 * r['acc'] for r in runs])} |")
    return "\n".join(lines)


def main(argv=None):
    global STEPS, D, LAM0, PENALTY_END
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default=",".join(map(str, range(SEEDS))), help="comma-separated seeds")
    parser.add_argument("--steps", type=int, default=STEPS, help="optimizer steps per run, every method")
    parser.add_argument("--kept", type=int, nargs="+", default=list(KEPT), help="feature counts")
    parser.add_argument("--rows", help="save the measured rows (JSON), e.g. one file per process")
    parser.add_argument("--merge", nargs="+", help="print the tables (and plot) from saved rows, measuring nothing")
    parser.add_argument("--plot", help="write a PNG of test accuracy against features kept")
    parser.add_argument("--json", help="write the plot's rows as JSON (python benchmarks/plots.py plots them)")
    parser.add_argument("--no-gap", action="store_true", help="skip the proximal sweep across lambda 3-4")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                        help="the sized methods to run (scratch follows D-Gating target)")
    parser.add_argument("--D", type=int, default=D, help="D-Gating's depth")
    parser.add_argument("--lam", type=float, default=LAM0, help="D-Gating's starting lambda")
    parser.add_argument("--penalty-end", type=float, default=PENALTY_END,
                        help="D-Gating's latest hold, a fraction of the run")
    args = parser.parse_args(argv)
    STEPS, D, LAM0, PENALTY_END = args.steps, args.D, args.lam, args.penalty_end
    setup()
    seeds = [int(s) for s in args.seeds.split(",")]
    started = time.time()
    if args.merge:
        rows = [r for path in args.merge for r in json.loads(Path(path).read_text())]
        seeds, kept = sorted({r["seed"] for r in rows}), sorted({r["k"] for r in rows} - {N_FEATURES}, reverse=True)
    else:
        print(f"Wine, 13-32-3 MLP, {STEPS} SGD steps per run, {len(LRS)} lr trials per method chosen on validation, "
              f"seeds {args.seeds}\n", flush=True)
        rows, kept = measure(args.kept, seeds, args.rows, args.methods), args.kept
    if args.rows:
        Path(args.rows).write_text(json.dumps(rows))
    print(tables(rows, kept))
    print("\nFeatures kept, how often over the seeds:\n")
    print(feature_choice(rows, kept))
    if not args.no_gap:
        print("\nProximal group lasso across the lambda gap of paper_wine_features.py (constant lambda, 150 epochs, "
              "no size target):\n")
        print(prox_gap(wine_splits(0), seeds))
    print(f"\n(total time {time.time() - started:.0f} s)")
    plot_rows = [{"method": r["method"], "x": r["k"], "y": 100 * r["test_acc"], "seed": r["seed"]} for r in rows]
    labels = dict(xlabel="input features kept (of 13)", ylabel="test accuracy of the slim model (%)",
                  title=f"Wine: features kept, {len(seeds)} seeds (mean ± std)", hline="dense")
    import plots
    if args.json:
        plots.write_json(plot_rows, args.json, **labels)
    if args.plot:
        plots.plot(plot_rows, args.plot, **labels)


if __name__ == "__main__":
    sys.exit(main())
