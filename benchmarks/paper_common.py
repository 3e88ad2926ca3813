"""Shared pieces of the paper benchmarks: bundled scikit-learn data, a small SGD loop, D-Gating and
the baselines (direct group penalty, proximal group lasso, magnitude pruning), and markdown tables.

Every method ends the same way: the groups it zeroed (or that fell under the threshold) are cut
by ``dg.shrink`` and accuracy is measured on the slim model. Baselines reuse the engine by gating
with ``init: ones`` and freezing the gates, so theta is the plain weight and the cut code is shared.
"""
from __future__ import annotations

import math
import statistics
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import dgating_surgery as dg
from dgating_surgery import demo
from dgating_surgery.demo import accuracy
from dgating_surgery.training.regularizer import gated_parameters

THRESHOLD = 1e-4  # absolute collapsed-group L2 norm under which a group is cut, for every method
REST_WD = 5e-4  # plain L2 on the parameters no method regularizes by group, equal for all methods


def smallest_masks(norms: dict, n_held) -> dict[str, torch.Tensor]:
    """Per gate (``norms``: gate key -> norm per group), a mask holding its ``n_held(key, n)`` groups
    of smallest norm: the magnitude baselines' choice within a layer, whatever sets the count."""
    masks = {}
    for key, norm in norms.items():
        mask = torch.zeros(norm.shape, dtype=torch.bool)
        mask[norm.detach().argsort()[:n_held(key, norm.numel())]] = True
        masks[key] = mask
    return masks


def setup() -> None:
    torch.set_num_threads(1)  # the machine is shared; timings are single-thread
    # the baselines' gates are frozen at 1 on purpose (``frozen_ones``): shrink's warning is for users
    warnings.filterwarnings("ignore", message=r"dg\.shrink: the factors of .* are frozen")


def digits(images=False):
    """sklearn's 8x8 digits (1797 images), pixel values scaled to [0, 1], a fixed 70/30 split."""
    Xtr, ytr, Xte, yte = demo.digits(test=0.3)
    if images:
        Xtr, Xte = Xtr.view(-1, 1, 8, 8), Xte.view(-1, 1, 8, 8)
    return Xtr, ytr, Xte, yte


def wine():
    """sklearn's Wine data (178 samples, 13 features, 3 classes), standardized, a fixed 70/30 split."""
    from sklearn.datasets import load_wine
    d = load_wine()
    return demo.split(d.data, d.target, test=0.3, standardize=True)


class MLP(nn.Module):
    """LeNet-300-100 style: n_in -> 300 -> 100 -> n_out with ReLU."""

    def __init__(self, n_in=64, hidden=(300, 100), n_out=10):
        super().__init__()
        sizes = (n_in, *hidden)
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.out = nn.Linear(sizes[-1], n_out)

    def forward(self, x):
        for layer in self.hidden:
            x = F.relu(layer(x))
        return self.out(x)


def fit(model, params, X, y, epochs, lr, seed, batch=64, momentum=0.9, loss_fn=None, extra_loss=None,
        after_step=None, monitor=None):
    """Minibatch SGD (coupled L2 through the param groups' weight_decay): the paper's optimizer."""
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum)
    gen = torch.Generator().manual_seed(seed)
    loss_fn = loss_fn or F.cross_entropy
    steps = epochs * math.ceil(len(X) / batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 if s < 0.75 * steps else 0.1)
    for epoch in range(epochs):
        model.train()
        for idx in torch.randperm(len(X), generator=gen).split(batch):
            loss = loss_fn(model(X[idx]), y[idx])
            if extra_loss is not None:
                loss = loss + extra_loss()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if after_step is not None:
                after_step(opt.param_groups[0]["lr"])
        if monitor is not None:
            monitor.step(epoch)
    return model


def gated(net, recipe, X):
    return dg.gate_model(net, recipe, X[:2])


def frozen_ones(net, groups, X):
    """Gate with all gates fixed at 1: theta is the plain weight, and dg.shrink can cut it."""
    model = gated(net, {"D": 2, "init": "ones", "threshold": THRESHOLD, "groups": groups}, X)
    for g in dg.gates(model):
        g.factors.requires_grad_(False)
    return model


def plain_groups(model, wd_gated, wd_rest=REST_WD):
    thetas, _ = gated_parameters(model)
    ids = {id(p) for p in thetas}
    rest = [p for p in model.parameters() if id(p) not in ids and p.requires_grad]
    return [{"params": thetas, "weight_decay": wd_gated}, {"params": rest, "weight_decay": wd_rest}]


def cut_and_measure(model, data, example=None):
    """Shrink at THRESHOLD and measure the slim model: test accuracy, groups removed per kind."""
    Xtr, ytr, Xte, yte = data
    report = dg.sparsity(model, THRESHOLD)
    by_kind = report.by_kind()
    before = dg.model_params(model)
    macs_dense = dg.macs(model, Xte[:1])
    # groups under the threshold are tiny, not exactly zero: allow their effect (accuracy is
    # measured on the slim model anyway)
    slim = dg.shrink(model, THRESHOLD, example_inputs=Xtr[:2] if example is None else example, rtol=1e-2)
    return {"acc": accuracy(slim, Xte, yte), "removed": report.dead / report.groups,
            "dead": {k: v["dead"] for k, v in by_kind.items()}, "groups": {k: v["groups"] for k, v in by_kind.items()},
            "params_before": before, "params_after": dg.model_params(slim),
            "macs_removed": 1 - dg.macs(slim, Xte[:1]) / macs_dense, "slim": slim}


def run_dgating(make_net, data, groups, D, lam, epochs, lr, seed, loss_fn=None, finetune=0):
    """D-Gating for ``epochs - finetune`` epochs, cut; then ``finetune`` epochs of the slim model
    with plain L2 (removes the shrinkage bias the penalty left on the surviving groups)."""
    torch.manual_seed(seed)
    Xtr, ytr = data[0], data[1]
    model = gated(make_net(), {"D": D, "lam": lam, "init": "balanced", "threshold": THRESHOLD, "groups": groups}, Xtr)
    fit(model, dg.param_groups(model, lam, weight_decay=REST_WD), Xtr, ytr, epochs - finetune, lr, seed,
        loss_fn=loss_fn)
    r = cut_and_measure(model, data)
    if finetune:
        slim = r["slim"]
        fit(slim, [{"params": list(slim.parameters()), "weight_decay": REST_WD}], dg.select_features(slim, Xtr)[0][0], ytr,
            finetune, lr, seed + 1, loss_fn=loss_fn)
        r["acc"] = accuracy(slim, data[2], data[3])
    return r


def run_direct(make_net, data, groups, lam, epochs, lr, seed, loss_fn=None):
    """The group penalty lam * sum_j ||w_j||_2 added to the loss, optimized by (sub)gradient SGD."""
    torch.manual_seed(seed)
    Xtr, ytr = data[0], data[1]
    model = frozen_ones(make_net(), groups, Xtr)
    extra = lambda: lam * sum(n.sum() for n in dg.group_norms(model).values())  # noqa: E731
    fit(model, plain_groups(model, 0.0), Xtr, ytr, epochs, lr, seed, loss_fn=loss_fn, extra_loss=extra)
    return cut_and_measure(model, data)


def group_scale_(model, factor_of: dict) -> None:
    """Multiply every group's primary weights by a per-group factor (gate key -> tensor)."""
    from dgating_surgery.engine.gates import scale_groups_
    for key, dgate in model.dgates.items():
        scale_groups_(model, dgate, factor_of[key].float())


def run_prox(make_net, data, groups, lam, epochs, lr, seed, loss_fn=None):
    """Proximal group lasso: an SGD step on the loss, then block soft-thresholding of every group
    (w_j <- max(0, 1 - step * lam / ||w_j||) w_j), which sets groups exactly to zero."""
    torch.manual_seed(seed)
    Xtr, ytr = data[0], data[1]
    model = frozen_ones(make_net(), groups, Xtr)

    def prox(step_lr):
        with torch.no_grad():
            norms = dg.group_norms(model)
            group_scale_(model, {k: (1 - step_lr * lam / n.clamp(min=1e-12)).clamp(min=0) for k, n in norms.items()})
    fit(model, plain_groups(model, 0.0), Xtr, ytr, epochs, lr, seed, loss_fn=loss_fn, after_step=prox)
    return cut_and_measure(model, data)


def run_magnitude(make_net, data, groups, fractions, epochs, lr, seed, loss_fn=None, dense_share=0.5):
    """Magnitude pruning: dense training (plain L2) for ``dense_share`` of the epochs, then in every
    gate the groups with the smallest norms are zeroed (``fraction`` of each gate) and the rest is
    fine-tuned for the remaining epochs (equal total epochs). One dense run serves every fraction."""
    torch.manual_seed(seed)
    Xtr, ytr = data[0], data[1]
    dense_epochs = int(round(epochs * dense_share))
    dense = frozen_ones(make_net(), groups, Xtr)
    fit(dense, plain_groups(dense, REST_WD), Xtr, ytr, dense_epochs, lr, seed, loss_fn=loss_fn)
    state, out = dense.state_dict(), []
    for fraction in fractions:
        model = frozen_ones(make_net(), groups, Xtr)
        model.load_state_dict(state)
        with torch.no_grad():
            for key, norm in dg.group_norms(model).items():
                k = int(round(fraction * norm.numel()))
                model.dgates[key].factors[:, norm.argsort()[:k]] = 0.0
        fit(model, plain_groups(model, REST_WD), Xtr, ytr, epochs - dense_epochs, lr, seed + 1, loss_fn=loss_fn)
        out.append(cut_and_measure(model, data))
    return out


def ms(values, fmt="{:.1f}", scale=1.0) -> str:
    """'mean ± std' over seeds."""
    vals = [v * scale for v in values]
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{fmt.format(statistics.mean(vals))} ± {fmt.format(sd)}"


def frontier(points, level):
    """Best accuracy among runs of one seed that removed at least ``level`` (None if none did)."""
    ok = [acc for removed, acc in points if removed >= level - 1e-9]
    return max(ok) if ok else None


def timer():
    start = time.perf_counter()
    return lambda: time.perf_counter() - start


def sweep_table(rows, setting="lambda", extra=()) -> str:
    """Markdown: one line per (method, setting), mean ± std over seeds of groups removed and
    slim-model accuracy (plus ``extra`` (header, key, fmt, scale) columns)."""
    order = []
    for r in rows:
        if (r["method"], r["setting"]) not in order:
            order.append((r["method"], r["setting"]))
    head = f"| method | {setting} | groups removed (%) | test accuracy (%) |" + "".join(f" {h} |" for h, *_ in extra)
    lines = [head, "|" + "---|" * (4 + len(extra))]
    for method, value in order:
        sel = [r for r in rows if r["method"] == method and r["setting"] == value]
        cells = [ms([r["removed"] for r in sel], scale=100), ms([r["acc"] for r in sel], scale=100)]
        cells += [ms([r[key] for r in sel], fmt, scale) for _, key, fmt, scale in extra]
        lines.append(f"| {method} | {value:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def frontier_table(rows, levels) -> str:
    """Markdown: for each method and sparsity level, the best slim accuracy of a run (any setting)
    that removed at least that fraction, mean ± std over the seeds; n/s = seeds that got there."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    seeds = sorted({r["seed"] for r in rows})
    lines = ["| method | " + " | ".join(f"≥{lv:.0%} removed" for lv in levels) + " |", "|" + "---|" * (1 + len(levels))]
    for method in methods:
        cells = []
        for lv in levels:
            best = [frontier([(r["removed"], r["acc"]) for r in rows if r["method"] == method and r["seed"] == s], lv)
                    for s in seeds]
            got = [b for b in best if b is not None]
            cells.append(f"{ms(got, scale=100)} ({len(got)}/{len(seeds)})" if got else "—")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows, path, xlabel, ylabel="test accuracy of the slim model (%)", title=""):
    """Scatter of (removed, accuracy) means per setting with std error bars; skipped without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot)")
        return
    import os
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = []
        for value in dict.fromkeys(r["setting"] for r in rows if r["method"] == method):
            sel = [r for r in rows if r["method"] == method and r["setting"] == value]
            x = [100 * r["removed"] for r in sel]
            y = [100 * r["acc"] for r in sel]
            pts.append((np.mean(x), np.mean(y), np.std(x), np.std(y)))
        pts.sort()
        xs, ys, sx, sy = zip(*pts)
        ax.errorbar(xs, ys, xerr=sx, yerr=sy, marker="o", ms=4, capsize=2, label=method)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")
