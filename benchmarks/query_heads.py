"""Query heads inside key/value groups (issue 19, item 2): grouped-query (8 query heads, 2 kv heads)
and multi-query (1 kv head) decoders of five Hugging Face families, and two with one fused
query/key/value projection (Phi-3, grouped; GPT-BigCode and Falcon, multi-query), random weights that expose a
wrong cut. Per seed, ``{kind: query_heads}`` gates each layer's query heads and kv groups, a random
2 to 7 of the 8 query heads (uneven per kv group) and, at random, a kv group's own gate are zeroed, and
the cut is checked: widths and removed parameters against the rule (every kept kv group keeps as
many query heads as the one keeping the most; a kv group goes only with its query heads and its own
gate dead), outputs on padded inputs the cut never saw (relative to the output scale), and the
tokens of ``generate`` with the cache.

    python benchmarks/query_heads.py [seeds]     # default 5 seeds; a few minutes on one core
    python benchmarks/query_heads.py 2 falcon    # some families (every case of each)
"""
from __future__ import annotations

import sys
import warnings

import torch
import transformers

import dgating_surgery as dg

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "tests"))
from test_query_heads import (FAMILIES, HEADS, QH, _batch, _expected, _fused_lm, _fused_widths,  # noqa: E402
                              _lm)  # (the tests' models)

FUSED = {"phi3": 2, "gpt_bigcode": 1, "falcon": 1}  # family -> its kv heads
CASES = [(family, 2) for family in FAMILIES] + [("llama", 1), ("qwen2", 1)] + list(FUSED.items())


def run_case(family: str, kv: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    example, unseen = _batch(2, 12, seed), _batch(3, 9, seed + 100)
    gated = dg.gate_model(_fused_lm(family) if family in FUSED else _lm(family, kv), QH, (), example)
    dead = []
    with torch.no_grad():
        for gate in dg.gates(gated):
            zeroed = int(torch.randint(2, HEADS, (1,), generator=gen))
            queries = set(torch.randperm(HEADS, generator=gen)[:zeroed].tolist())
            kv_groups = {g for g in range(kv if kv > 1 else 0) if torch.rand(1, generator=gen) < 0.5}
            gate.factors[0, sorted(queries)] = 0
            gate.factors[0, [HEADS + g for g in kv_groups]] = 0
            dead.append((queries, kv_groups))
    reference = gated(**unseen).logits
    prompt = {"input_ids": example["input_ids"], "attention_mask": example["attention_mask"]}
    tokens = gated.generate(**prompt, max_new_tokens=6, do_sample=False, use_cache=True)
    before = sum(p.numel() for p in gated.parameters()) - sum(g.factors.numel() for g in dg.gates(gated))
    slim = dg.shrink(gated, example_kwargs=example)
    expected = [_expected(kv, q, g, family in ("qwen2", "gpt_bigcode")) for q, g in dead]  # (biased query rows)
    widths = _fused_widths(slim, family) if family in FUSED else [
        (layer.self_attn.q_proj.out_features // 8, layer.self_attn.k_proj.out_features // 8) for layer in slim.model.layers]
    return {"zeroed": sum(len(q) for q, _ in dead), "cut": sum(HEADS - n for n, _ in widths),
            "kv cut": sum(kv - n for _, n in widths), "widths ok": widths == [e[:2] for e in expected],
            "params ok": before - sum(p.numel() for p in slim.parameters()) == sum(e[2] for e in expected),
            "diff": dg.max_rel_diff(reference, slim(**unseen).logits),
            "generate ok": torch.equal(slim.generate(**prompt, max_new_tokens=6, do_sample=False, use_cache=True),
                                       tokens)}


def main() -> int:
    numbers = [a for a in sys.argv[1:] if a.isdigit()]
    seeds = int(numbers[0]) if numbers else 5
    names = [a for a in sys.argv[1:] if not a.isdigit()]
    cases = [(family, kv) for family, kv in CASES if not names or family in names]
    warnings.simplefilter("ignore")
    transformers.logging.set_verbosity_error()
    header = (f"{'family':11s} {'kv':>3s} {'seeds':>5s} {'q zeroed':>9s} {'q cut':>6s} {'kept by rule':>12s} "
              f"{'kv cut':>7s} {'widths':>7s} {'params':>7s} {'max diff':>9s} {'generate':>9s}")
    print(header)
    print("-" * len(header))
    failed = 0
    for family, kv in cases:
        rows = [run_case(family, kv, seed) for seed in range(seeds)]
        zeroed, cut = sum(r["zeroed"] for r in rows), sum(r["cut"] for r in rows)
        ok = {k: all(r[k] for r in rows) for k in ("widths ok", "params ok", "generate ok")}
        diff = max(r["diff"] for r in rows)
        failed += not (all(ok.values()) and diff < 1e-5)
        print(f"{family:11s} {kv:3d} {seeds:5d} {zeroed:9d} {cut:6d} {zeroed - cut:12d} "
              f"{sum(r['kv cut'] for r in rows):7d} {'ok' if ok['widths ok'] else 'WRONG':>7s} "
              f"{'exact' if ok['params ok'] else 'WRONG':>7s} {diff:9.1e} {'same' if ok['generate ok'] else 'DIFF':>9s}")
    print(f"\n{len(cases) - failed}/{len(cases)} cases exact ('kept by rule': zeroed query heads the cut kept to "
          "leave every kept kv group as many query heads as the others)")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
