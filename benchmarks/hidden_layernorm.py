"""The approximate hidden cut under LayerNorm (opt-in ``{kind: hidden, layernorm: approximate}``, issue 19):
how far the output moves with the fraction of the residual stream cut, on GPT-2 (random weights, width 64,
2 layers, untied lm_head). Per fraction and seed, that fraction of the stream's channels is zeroed in the
gated model and ``dg.shrink`` cuts it; the figure is shrink's own measurement on fresh inputs
(``model.approximate_cut``: the largest change of the logits over their largest value), with the
LayerNorms' weight and epsilon rescaled by sqrt(d/d') and d/d' (what shrink does) and without (the
rescale undone on the slim model). Median over seeds.

    python benchmarks/hidden_layernorm.py [--seeds 3]
"""
from __future__ import annotations

import argparse
import statistics
import warnings

import torch
import transformers as T

import dgating_surgery as dg

RECIPE = {"D": 3, "groups": [{"kind": "hidden", "layernorm": "approximate"}]}


def one(fraction: float, seed: int, width: int = 64) -> tuple[float, float]:
    torch.manual_seed(seed)
    config = T.GPT2Config(vocab_size=100, n_embd=width, n_layer=2, n_head=4, n_positions=32, tie_word_embeddings=False)
    ids = torch.randint(0, 100, (2, 12))
    fresh = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(100 + seed))
    gated = dg.gate_model(T.GPT2LMHeadModel(config).eval(), RECIPE, (ids,), {"use_cache": False})
    (hidden,) = dg.gates(gated)
    dead = torch.randperm(width, generator=torch.Generator().manual_seed(seed))[: max(1, round(fraction * width))]
    with torch.no_grad():
        hidden.factors[:, dead] = 0
    reference = gated(fresh, use_cache=False).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        slim = dg.shrink(gated)
    rescaled = dg.max_rel_diff(reference, slim(fresh, use_cache=False).logits)
    with torch.no_grad():  # the rescale undone: statistics over the kept channels, weight and epsilon as they were
        for name, (full, kept) in slim.approximate_cut["layer_norms"].items():
            norm = slim.get_submodule(name)
            norm.weight /= (full / kept) ** 0.5
            norm.eps /= full / kept
    plain = dg.max_rel_diff(reference, slim(fresh, use_cache=False).logits)
    return rescaled, plain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    print(f"{'channels cut':>14s} {'rescaled':>10s} {'plain':>10s}")
    for fraction in (1 / 64, 2 / 64, 0.1, 0.3, 0.5):
        runs = [one(fraction, seed) for seed in range(args.seeds)]
        print(f"{max(1, round(fraction * 64)):>8d} of 64 {statistics.median(r[0] for r in runs):10.2e} "
              f"{statistics.median(r[1] for r in runs):10.2e}")


if __name__ == "__main__":
    main()
