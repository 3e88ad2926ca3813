"""The heads x neurons grid of a byte-level GPT-2 at the sizes asked, per kind (issue 17's fair
protocol): D-Gating with one size target per kind (``LambdaScheduler.for_run``, recovery included)
against magnitude pruning + fine-tune, uniform per layer, at equal Adam steps; validation loss of
the physically slimmed model in nats per byte.

Protocol (every method, every cell, every seed):
- data and model: paper_heads_gpt2.py's (the standard library's .py files as bytes, split by file;
  ``GPT2LMHeadModel`` with vocab 256, 4 layers x 4 heads, width 64, MLP 256, context 64: 16 heads,
  1,024 MLP neurons, 220,544 parameters), with GPT-2's own init (std 0.02) for Adam;
- training: STEPS Adam steps (the paper's optimizer for language models; coupled L2, no other
  weight decay) of 16 windows of 64 bytes, the same windows in the same order for every method of
  a seed; lr 3e-3 with a linear warm-up over the first 50 steps, x0.1 for the last quarter;
- the cell: the fraction of the heads kept (100/50/25%) and of the MLP neurons kept (50/25/10%);
  a kind kept at 100% is not gated;
- no method is tuned (one trial each); the validation loss is the mean next-byte cross-entropy
  over 1,024 fixed windows of the validation files (never trained on).

- D-Gating target: D = 3, recipe ``groups: [{kind: heads}, {kind: neurons}]``, lambda 1e-4 per
  kind to start (``--lam``; chosen for Adam on the tiny Llama's validation split, paper_target_lm.py,
  not on this model), ``LambdaScheduler.for_run(opt, gated, target={"heads": 1 - h, "neurons": 1 - n},
  total_steps=STEPS, metric="params")``: dense for the first quarter, one controller per kind
  until 5/8 of the run at the latest, the chosen groups held at exactly zero and the rest of the
  steps train what is left (recovery); ``dg.shrink`` cuts exactly the held groups.
- magnitude uniform: the same model trained dense (heads and neurons gated with frozen gates at 1,
  so the gates change nothing) until 5/8 of the run; then in every layer the same fraction of heads
  and of neurons, those with the smallest L2 norm of their weights (a head's q/k/v columns and
  c_proj rows, a neuron's c_fc column, bias and c_proj row: ``dg.group_norms``), held at exactly
  zero, and the rest of the steps fine-tune; one dense run per seed serves every cell.
- dense: the same dense run, not pruned, to the last step.

    python benchmarks/paper_target_gpt2.py --plot docs/img/gpt2_target.png     # seeds 0, 1
    python benchmarks/paper_target_gpt2.py --seeds 0 --rows s0.json &          # or one process per seed,
    python benchmarks/paper_target_gpt2.py --seeds 1 --rows s1.json; wait      # then the table from both:
    python benchmarks/paper_target_gpt2.py --merge s0.json s1.json --plot docs/img/gpt2_target.png
    python benchmarks/paper_target_gpt2.py --seeds 0 --steps 8 --heads 0.5 --neurons 0.5   # a smoke run
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers.utils import logging

import dgating_surgery as dg
from dgating_surgery.engine.deadness import Hold
from dgating_surgery.training.schedule import PENALTY_END_FRACTION, LambdaScheduler

from paper_common import setup, smallest_masks
from paper_heads_gpt2 import batches, load_bytes, lm_loss, make_gpt2, val_loss, val_windows

STEPS, WARMUP, LR = 800, 50, 3e-3
INIT_RANGE = 0.02  # GPT-2's own: made for Adam
HEADS_KEPT = (1.0, 0.5, 0.25)
NEURONS_KEPT = (0.5, 0.25, 0.1)
LAM0 = 1e-4  # per kind, to start (the controllers move it): with Adam, chosen on paper_target_lm.py's validation split
D = 3
METHODS = ("D-Gating target", "magnitude uniform", "magnitude, D-Gating's layers")  # the last needs both others
CUT = 1e-12  # shrink threshold: only the exactly zero (held) groups are cut
EXAMPLE_KWARGS = {"use_cache": False}


def lr_at(step: int) -> float:
    return LR * min(1.0, (step + 1) / WARMUP) * (1.0 if step < 0.75 * STEPS else 0.1)


def train(model, opt, data, seed, start, end, after=None):
    """Adam steps ``start`` to ``end`` of a run of STEPS: the seed's windows from the start's."""
    windows = batches(data, seed)
    for _ in range(start):
        next(windows)  # the same windows in the same order for every method of a seed
    model.train()
    for step in range(start, end):
        x, y = next(windows)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = lm_loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if after is not None:
            after(step + 1)


def recipe(kinds, **extra):
    return {"D": D, "groups": [{"kind": k} for k in kinds], **extra}


def gate(kinds, seed, example, **extra):
    torch.manual_seed(seed)
    return dg.gate_model(make_gpt2(INIT_RANGE), recipe(kinds, **extra), example, EXAMPLE_KWARGS)


def result(gated, val, example) -> dict:
    """Cut exactly the zero groups and measure the slim model."""
    slim = dg.shrink(gated, CUT, example_inputs=example, example_kwargs=EXAMPLE_KWARGS)
    d_head = 64 // 4
    blocks = slim.transformer.h
    return {"loss": val_loss(slim, val), "params": dg.model_params(slim),
            "heads": sum(b.attn.c_proj.weight.shape[0] // d_head for b in blocks),
            "neurons": sum(b.mlp.c_fc.weight.shape[1] for b in blocks)}


def targets_of(heads, neurons) -> dict[str, float]:
    """Per kind, the fraction of its parameters to remove (kinds kept whole are not gated)."""
    return {kind: 1 - kept for kind, kept in (("heads", heads), ("neurons", neurons)) if kept < 1}


def dgating(data, val, example, heads, neurons, seed, lam=LAM0, init="balanced") -> dict:
    targets = targets_of(heads, neurons)
    gated = gate(list(targets), seed, example, init=init)
    opt = torch.optim.Adam(dg.param_groups(gated, dict.fromkeys(targets, lam)), lr=LR)
    sched = LambdaScheduler.for_run(opt, gated, targets, STEPS, "params")
    train(gated, opt, data, seed, 0, STEPS, lambda step: sched.step())
    held = {key: int(mask.sum()) for key, mask in sched.held_masks.items()}
    return {**result(gated, val, example), "held": held}


def uniform_masks(gated, kept: dict[str, float]) -> dict[str, torch.Tensor]:
    """Per gate, all but the round(kept * n) groups of largest norm (at least one kept)."""
    return smallest_masks(dg.group_norms(gated), lambda key, n: n - max(round(kept[gated.dgates[key].kind] * n), 1))


def magnitude(data, val, example, cells, seed, allocations=None) -> dict:
    """One dense run to 5/8 of the steps; per cell a copy pruned uniformly and fine-tuned to the
    end; per cell of ``allocations`` (cell -> groups D-Gating held per gate) a copy pruned with those
    counts per layer; and the dense run continued unpruned. Returns {(method, cell): result}."""
    gated = gate(["heads", "neurons"], seed, example, init="ones")
    for g in dg.gates(gated):
        g.factors.requires_grad_(False)
    opt = torch.optim.Adam([p for p in gated.parameters() if p.requires_grad], lr=LR)
    prune_at = int(PENALTY_END_FRACTION * STEPS)
    train(gated, opt, data, seed, 0, prune_at)
    runs = [("magnitude uniform", cell, lambda m, c=cell: uniform_masks(m, {"heads": c[0], "neurons": c[1]}))
            for cell in cells]
    runs += [("magnitude, D-Gating's layers", cell,
              lambda m, h=held: smallest_masks(dg.group_norms(m), lambda key, n: h.get(key, 0)))
             for cell, held in (allocations or {}).items()]
    out = {}
    for method, cell, masks in [*runs, ("dense", None, None)]:
        model = copy.deepcopy(gated)
        params = [p for p in model.parameters() if p.requires_grad]
        opt_cell = torch.optim.Adam(params, lr=LR)
        # Adam's moments carry over to the copy (same parameter order); copied, since load_state_dict
        # keeps the very tensors, which each cell's steps would otherwise update for the next cells
        opt_cell.load_state_dict(copy.deepcopy(opt.state_dict()))
        if masks is not None:
            Hold(model, masks(model), opt_cell)
        train(model, opt_cell, data, seed, prune_at, STEPS)
        out[method, cell] = result(model, val, example)
    return out


def fmt(values, sign="") -> str:
    return f"{statistics.mean(values):{sign}.3f} ± {statistics.stdev(values) if len(values) > 1 else 0:.3f}"


def table(rows, cells, dense_params) -> str:
    seeds = sorted({r["seed"] for r in rows})
    dense = [r["loss"] for r in rows if r["method"] == "dense"]
    lines = [f"Validation loss (nats/byte) of the slim model, mean ± std over seeds {', '.join(map(str, seeds))}; "
             f"dense: {fmt(dense)}\n",
             "| heads kept | neurons kept | D-Gating target | magnitude uniform | D-Gating − magnitude (paired) | "
             "D-Gating lower / seeds | heads, neurons kept (D-Gating; magnitude) | params kept (D-Gating; magnitude) | "
             "magnitude, D-Gating's layers (D-Gating − it) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for cell in cells:
        dgr = {r["seed"]: r for r in rows if r["method"] == "D-Gating target" and r["cell"] == cell}
        mag = {r["seed"]: r for r in rows if r["method"] == "magnitude uniform" and r["cell"] == cell}
        if not dgr or not mag:  # a run of one method: the table is a --merge with the other's rows
            continue
        diffs = [dgr[s]["loss"] - mag[s]["loss"] for s in seeds]
        lay = {r["seed"]: r for r in rows if r["method"] == "magnitude, D-Gating's layers" and r["cell"] == cell}
        layers = (f"{fmt([r['loss'] for r in lay.values()])} ({fmt([dgr[s]['loss'] - lay[s]['loss'] for s in seeds], '+')})"
                  if lay else "—")
        size = lambda rs, key: statistics.mean(r[key] for r in rs.values())  # noqa: E731
        lines.append(
            f"| {cell[0]:.0%} | {cell[1]:.0%} | {fmt([r['loss'] for r in dgr.values()])} | "
            f"{fmt([r['loss'] for r in mag.values()])} | {fmt(diffs, '+')} | {sum(x < 0 for x in diffs)} / {len(diffs)} | "
            f"{size(dgr, 'heads'):.0f}, {size(dgr, 'neurons'):.0f}; {size(mag, 'heads'):.0f}, {size(mag, 'neurons'):.0f} | "
            f"{100 * size(dgr, 'params') / dense_params:.1f}%; {100 * size(mag, 'params') / dense_params:.1f}% | "
            f"{layers} |")
    return "\n".join(lines)


def main(argv=None):
    global STEPS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--heads", type=float, nargs="+", default=list(HEADS_KEPT), help="fractions of heads kept")
    parser.add_argument("--neurons", type=float, nargs="+", default=list(NEURONS_KEPT),
                        help="fractions of MLP neurons kept")
    parser.add_argument("--val-windows", type=int, default=1024)
    parser.add_argument("--lam", type=float, default=LAM0, help="D-Gating's starting lambda per kind")
    parser.add_argument("--init", choices=("balanced", "ones"), default="balanced", help="D-Gating's gate initialization")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                        help="what to run (magnitude uniform brings the dense row)")
    parser.add_argument("--rows", help="save the measured rows (JSON), e.g. one file per seed run in parallel")
    parser.add_argument("--merge", nargs="+", help="print the table (and plot) from saved rows, measuring nothing")
    parser.add_argument("--plot", help="write a PNG of validation loss against parameters kept")
    args = parser.parse_args(argv)
    STEPS = args.steps
    setup()
    logging.set_verbosity_error()
    cells = [(h, n) for h in args.heads for n in args.neurons]
    dense_params = dg.model_params(make_gpt2(INIT_RANGE))
    started = time.time()
    if args.merge:
        rows = [{**r, "cell": tuple(r["cell"]) if r["cell"] else None} for path in args.merge
                for r in json.loads(Path(path).read_text())]
        cells = list(dict.fromkeys(r["cell"] for r in rows if r["cell"]))
    else:
        rows = measure(cells, [int(s) for s in args.seeds.split(",")], args.val_windows, dense_params, args.rows,
                       args.lam, args.init, args.methods)
    if args.rows:
        Path(args.rows).write_text(json.dumps(rows))
    print(table(rows, cells, dense_params))
    print(f"\n(total time {time.time() - started:.0f} s)")
    if args.plot:
        import plots
        plots.plot([{"method": "dense" if r["method"] == "dense" else f"{r['method']}, heads {r['cell'][0]:.0%}",
                     "x": round(100 * r["params"] / dense_params, 1), "y": r["loss"], "seed": r["seed"]} for r in rows
                    if r["method"] != "magnitude, D-Gating's layers"],
                   args.plot, xlabel="parameters kept (%)", ylabel="validation loss of the slim model (nats/byte)",
                   title=f"byte-level GPT-2, heads x neurons kept, {len({r['seed'] for r in rows})} seeds",
                   hline="dense")


def measure(cells, seeds, n_val, dense_params, save=None, lam=LAM0, init="balanced", methods=METHODS) -> list[dict]:
    train_bytes, val_bytes, info = load_bytes()
    val = val_windows(val_bytes, n_val)
    example = val[:2, :-1]
    print(f"GPT-2 4x4 heads, width 64, MLP 256 ({dense_params:,} parameters) on {info['train_bytes']:,} bytes of "
          f"{info['root']}; {STEPS} Adam steps per method; D-Gating from lambda {lam:g}, gates {init}; "
          f"{len(cells)} cells; seeds {seeds}\n", flush=True)
    rows, started = [], time.time()
    for seed in seeds:
        allocations = {}
        for cell in cells if "D-Gating target" in methods else []:
            r = dgating(train_bytes, val, example, *cell, seed, lam, init)
            allocations[cell] = r["held"]
            rows.append({"method": "D-Gating target", "cell": cell, "seed": seed, **r})
            print(f"<!-- seed {seed} D-Gating {cell}: {r}, {time.time() - started:.0f} s -->", flush=True)
        if "magnitude, D-Gating's layers" not in methods:
            allocations = {}
        magnitude_rows = (magnitude(train_bytes, val, example, cells, seed, allocations)
                          if "magnitude uniform" in methods else {})
        for (method, cell), r in magnitude_rows.items():
            rows.append({"method": method, "cell": cell, "seed": seed, **r})
            print(f"<!-- seed {seed} {method} {cell}: {r}, {time.time() - started:.0f} s -->", flush=True)
        if save:
            Path(save).write_text(json.dumps(rows))  # what is done so far survives an interrupted run
    return rows


if __name__ == "__main__":
    sys.exit(main())
