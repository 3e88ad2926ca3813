"""A size target on a tiny language model (issue 17): a Llama (hidden 64, 2 layers, 4 heads,
intermediate 256) trained on bytes of the Python standard library's source with Adam, heads and
neurons gated, per-kind targets reached in one run by ``LambdaScheduler.for_run``; with and
without distillation from the model at the penalty's start (``distill.Distiller``), and magnitude
pruning + fine-tune at equal steps (heads and neurons with the smallest norms held at zero at the
step D-Gating holds, per kind the same fraction). Validation loss in nats per byte of the slim model.

    python benchmarks/paper_target_lm.py [--steps 600] [--seeds 2] [--methods D-Gating magnitude]
"""
from __future__ import annotations

import argparse
import statistics

import torch
import transformers as T

import dgating_surgery as dg
from dgating_surgery.engine.deadness import Hold
from dgating_surgery.training.distill import Distiller
from dgating_surgery.training.schedule import DENSE_FRACTION, PENALTY_END_FRACTION, LambdaScheduler

from uniform import stdlib_bytes

TARGETS = {"heads": 0.5, "neurons": 0.7}
SEQ, BATCH = 64, 16
RECIPE = {"D": 3, "groups": [{"kind": "heads"}, {"kind": "neurons"}]}
METHODS = ("D-Gating", "D-Gating + distill", "magnitude")


def make(seed):
    torch.manual_seed(seed)
    config = T.LlamaConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=4, intermediate_size=256, max_position_embeddings=SEQ, use_cache=False)
    return T.LlamaForCausalLM(config)


def batches(data, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, data.numel() - SEQ - 1, (BATCH,), generator=gen)
        yield torch.stack([data[s:s + SEQ] for s in starts])


def val_loss(model, data):
    model.eval()
    with torch.no_grad():
        ids = data[: (data.numel() // SEQ) * SEQ].view(-1, SEQ)[:64]
        return float(model(input_ids=ids, labels=ids).loss)


def run(method, train, val, steps, seed):
    gated = dg.gate_model(make(seed), RECIPE, example_kwargs={"input_ids": train[:SEQ].unsqueeze(0)})
    if method == "magnitude":
        for g in dg.gates(gated):
            g.factors.requires_grad_(False)
    opt = torch.optim.Adam(dg.param_groups(gated, 0.0 if method == "magnitude" else 1e-3), lr=3e-3)
    sched = None if method == "magnitude" else LambdaScheduler.for_run(opt, gated, TARGETS, steps, "params", every=10)
    distiller = Distiller(gated) if method == "D-Gating + distill" else None
    start, end = int(DENSE_FRACTION * steps), int(PENALTY_END_FRACTION * steps)
    gated.train()
    for step, ids in enumerate(batches(train, steps, seed), 1):
        loss = gated(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        if distiller is not None and step == start:
            distiller.start().attach()
        if method == "magnitude" and step == end:
            Hold(gated, magnitude_masks(gated), opt)
    slim = dg.shrink(gated, verify=False)
    return val_loss(slim, val), dg.model_params(slim) / dg.model_params(make(seed))


def magnitude_masks(gated):
    """Per kind, the same fraction as D-Gating's target: the smallest-norm groups of each gate."""
    out = {}
    for key, norm in dg.group_norms(gated).items():
        kind = gated.dgates[key].kind
        n = round(TARGETS[kind] * norm.numel())
        mask = torch.zeros_like(norm, dtype=torch.bool)
        mask[norm.detach().argsort()[:n]] = True
        out[key] = mask
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    opts = parser.parse_args()
    torch.set_num_threads(1)
    data = stdlib_bytes(600_000)
    train, val = data[:500_000], data[500_000:]
    results = {}
    for seed in range(opts.seeds):
        for method in opts.methods:
            results.setdefault(method, []).append(run(method, train, val, opts.steps, seed))
            print(method, seed, results[method][-1], flush=True)
    print(f"\n| method ({opts.steps} Adam steps, targets {TARGETS}) | val loss nats/byte | params kept |")
    print("|---|---|---|")
    for method, rows in results.items():
        losses = [r[0] for r in rows]
        print(f"| {method} | {statistics.mean(losses):.3f} ± {statistics.pstdev(losses):.3f} | "
              f"{statistics.mean(r[1] for r in rows):.1%} |")


if __name__ == "__main__":
    main()
