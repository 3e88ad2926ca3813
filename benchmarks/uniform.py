"""What uniform widths cost (issue 20): a tiny Llama trained a few hundred steps with D-Gating on text
from the Python standard library's source files (bytes as tokens), then cut twice from the same gated
model: per-layer widths (dg.shrink) and uniform widths (dg.shrink(uniform=True), an ordinary checkpoint of
its class). Prints parameters, MACs and latency (interleaved rounds: median ratio and its spread).

    python benchmarks/uniform.py [--steps 300] [--lam 3e-3] [--threshold 1e-3]
"""
from __future__ import annotations

import argparse
import copy
import os
import sysconfig
from pathlib import Path

import torch
import transformers as T

import dgating_surgery as dg
from dgating_surgery.engine.measure import compare_latency


def stdlib_bytes(limit: int = 2_000_000) -> torch.Tensor:
    """Bytes of the standard library's .py files, in a fixed order."""
    root, out = Path(sysconfig.get_paths()["stdlib"]), bytearray()
    for path in sorted(root.glob("*.py")):
        out += path.read_bytes()
        if len(out) >= limit:
            break
    return torch.tensor(list(out[:limit]), dtype=torch.long)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lam", type=float, default=3e-3)
    parser.add_argument("--threshold", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    opts = parser.parse_args()
    torch.manual_seed(opts.seed)
    config = T.LlamaConfig(vocab_size=256, hidden_size=128, num_hidden_layers=4, num_attention_heads=8,
                           num_key_value_heads=4, intermediate_size=384, max_position_embeddings=256)
    data, seq, batch = stdlib_bytes(), 64, 16
    example = (data[:seq].unsqueeze(0),)
    gated = dg.gate_model(T.LlamaForCausalLM(config).eval(), "llama", example, {"use_cache": False})
    optimizer = torch.optim.Adam(dg.param_groups(gated, opts.lam), lr=3e-3)
    gated.train()
    for step in range(opts.steps):
        starts = torch.randint(0, data.numel() - seq - 1, (batch,))
        ids = torch.stack([data[s:s + seq] for s in starts])
        loss = gated(ids, labels=ids, use_cache=False).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    gated.eval()
    cost = dg.uniform_cost(gated, opts.threshold)
    inputs = (data[:seq].unsqueeze(0).repeat(8, 1),)
    kwargs = {"use_cache": False}
    with torch.no_grad():
        reference = gated(*inputs, **kwargs).logits
    dense = dg.model_params(gated)
    cuts = {}
    for name, uniform in (("per-layer", False), ("uniform", True)):
        slim = dg.shrink(copy.deepcopy(gated), opts.threshold, uniform=uniform, verify=False)
        with torch.no_grad():
            change = dg.max_rel_diff(reference, slim(*inputs, **kwargs).logits)
        cuts[name] = (slim, dg.model_params(slim), dg.macs(slim, inputs, kwargs), change)
    timing = compare_latency(cuts["per-layer"][0], cuts["uniform"][0], inputs, kwargs)
    print(f"tiny Llama (hidden 128, 4 layers, 8 heads / 4 kv heads, MLP 384), {opts.steps} steps on stdlib source, "
          f"lam {opts.lam:g}, threshold {opts.threshold:g}, final loss {loss.item():.3f}, "
          f"{torch.get_num_threads()} threads (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')})")
    print(f"{'cut':10s} {'params':>9s} {'of dense':>9s} {'MACs':>11s} {'output change':>14s}  widths (heads, MLP per layer; hidden)")
    for name, (slim, params, macs, change) in cuts.items():
        layers = slim.model.layers
        widths = (f"{[l.self_attn.q_proj.out_features // slim.config.head_dim for l in layers]}, "
                  f"{[l.mlp.gate_proj.out_features for l in layers]}; {slim.model.embed_tokens.embedding_dim}")
        print(f"{name:10s} {params:9d} {params / dense:9.1%} {macs:11d} {change:14.2e}  {widths}")
    print(f"uniform keeps {cost.groups} dead groups: +{cuts['uniform'][1] - cuts['per-layer'][1]} parameters "
          f"(dg.uniform_cost: {cost.params}), +{cuts['uniform'][2] - cuts['per-layer'][2]} MACs")
    print(f"latency per-layer {timing.before_ms:.3f} ms, uniform {timing.after_ms:.3f} ms; per-layer/uniform time ratio "
          f"{timing.speedup:.3f} (IQR {timing.speedup_iqr[0]:.3f}-{timing.speedup_iqr[1]:.3f}, {timing.rounds} "
          "interleaved rounds)")
    print("uniform checkpoint config:", {k: getattr(cuts["uniform"][0].config, k) for k in
                                         ("hidden_size", "num_attention_heads", "num_key_value_heads",
                                          "intermediate_size", "head_dim")},
          "dgating_surgery key:", "dgating_surgery" in cuts["uniform"][0].config.to_dict())


if __name__ == "__main__":
    main()
