"""Depth cuts against width cuts of the same parameter count (issue 19 item 6): what latency each buys.

A small Llama (random weights) is cut twice to the same number of parameters: by depth (the blocks
kind: whole decoder layers leave the model) and by width (heads and MLP neurons, the same fraction of
each layer's groups, the fraction found by bisection to remove as many parameters as the depth cut).
Both cuts are checked exact against their gated model. Then the dense model and the two slim ones are
timed in interleaved rounds (the order rotates every round), one thread, thread CPU time: a prefill of
a batch and greedy decoding with the KV cache. Each row gives the median time and, per slim model,
the median of the per-round ratios dense/slim with their quartiles; the last column is width/depth.

    python benchmarks/blocks_latency.py [--layers 8] [--drop 2] [--rounds 15]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import transformers as T

import dgating_surgery as dg


def llama(layers: int) -> T.LlamaForCausalLM:
    config = T.LlamaConfig(vocab_size=512, hidden_size=256, num_hidden_layers=layers, num_attention_heads=8,
                           num_key_value_heads=4, intermediate_size=704, max_position_embeddings=512)
    return dg.expose_weights(T.LlamaForCausalLM(config).eval())


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def depth_cut(dense, example, drop: int):
    """Whole layers (both branches) of the middle of the stack removed."""
    gated = dg.gate_model(copy.deepcopy(dense), {"D": 2, "groups": [{"kind": "blocks"}]}, example, {"use_cache": False})
    (gate,) = dg.gates(gated)
    layers = dense.config.num_hidden_layers
    doomed = [f"model.layers.{i}." for i in range(layers // 2 - drop // 2, layers // 2 - drop // 2 + drop)]
    with torch.no_grad():
        for j, name in enumerate(gate.modules):
            if any(name.startswith(p) for p in doomed):
                gate.factors[0, j] = 0.0
    return _shrunk(gated, example)


def width_cut(dense, example, target: int):
    """The same fraction of every layer's heads and MLP neurons removed (random groups, seeded), the
    fraction chosen so that as many parameters go as ``target``."""
    recipe = {"D": 2, "groups": [{"kind": "heads"}, {"kind": "neurons"}]}
    gated = dg.gate_model(copy.deepcopy(dense), recipe, example, {"use_cache": False})
    gates = [g for g in dg.gates(gated) if "lm_head" not in g.name and "embed" not in g.name]
    orders = [torch.randperm(g.num_groups, generator=torch.Generator().manual_seed(i)) for i, g in enumerate(gates)]

    def kill(fraction: float) -> int:
        with torch.no_grad():
            for g, order in zip(gates, orders):
                g.factors.fill_(1.0)
                g.factors[0, order[: int(round(fraction * g.num_groups))]] = 0.0
        return dg.sparsity(gated).params_removable
    lo, hi = 0.0, 0.95
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if kill(mid) < target else (lo, mid)
    best = min((lo, hi), key=lambda f: abs(kill(f) - target))
    kill(best)
    return _shrunk(gated, example), best


def _shrunk(gated, example):
    with torch.no_grad():
        reference = gated(*example, use_cache=False).logits
    dg.shrink(gated)
    with torch.no_grad():
        diff = float((gated(*example, use_cache=False).logits - reference).abs().max() / reference.abs().max())
    assert diff <= 1e-4, diff
    return gated


def timed(models: dict, work, rounds: int, warmup: int = 2) -> dict[str, list[float]]:
    """Thread CPU seconds of ``work(model)`` per model and round; the order rotates every round."""
    names = list(models)
    for _ in range(warmup):
        for name in names:
            work(models[name])
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            start = time.thread_time()
            work(models[name])
            times[name].append(time.thread_time() - start)
    return times


def _ratio(a: list[float], b: list[float]) -> str:
    ratios = [x / y for x, y in zip(a, b)]
    q1, median, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return f"{statistics.median(ratios):.2f}x [{q1:.2f}, {q3:.2f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--drop", type=int, default=2, help="decoder layers the depth cut removes")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=32, help="tokens decoded with the KV cache")
    opts = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    dense = llama(opts.layers)
    example = (torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0)),)
    depth = depth_cut(dense, example, opts.drop)
    removed = _params(dense) - _params(depth)
    width, fraction = width_cut(dense, example, removed)
    models = {"dense": dense, "depth": depth, "width": width}
    prompt = torch.randint(0, 512, (opts.batch, opts.prompt), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(prompt)

    def prefill(model):
        with torch.no_grad():
            model(prompt, use_cache=False)

    def decode(model):
        with torch.no_grad():
            model.generate(prompt, attention_mask=mask, max_new_tokens=opts.new, min_new_tokens=opts.new,
                           do_sample=False, pad_token_id=0)
    print(f"Llama, hidden 256, {opts.layers} layers, 8 heads (4 kv), MLP 704, vocab 512; one thread, thread CPU "
          f"time, {opts.rounds} interleaved rounds")
    print(f"dense {_params(dense):,} parameters; depth cut: {opts.drop} layers, {removed:,} removed; width cut: "
          f"{fraction:.1%} of every layer's heads and neurons, {_params(dense) - _params(width):,} removed\n")
    print("| work | dense ms | depth ms | width ms | dense/depth | dense/width | width/depth |")
    print("|---|---|---|---|---|---|---|")
    for label, work in ((f"prefill {opts.batch}x{opts.prompt}", prefill),
                        (f"decode {opts.new} tokens, batch {opts.batch}", decode)):
        t = timed(models, work, opts.rounds)
        ms = {k: 1000 * statistics.median(v) for k, v in t.items()}
        print(f"| {label} | {ms['dense']:.1f} | {ms['depth']:.1f} | {ms['width']:.1f} | "
              f"{_ratio(t['dense'], t['depth'])} | {_ratio(t['dense'], t['width'])} | {_ratio(t['width'], t['depth'])} |")


if __name__ == "__main__":
    main()
