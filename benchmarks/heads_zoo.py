"""Attention heads (issue 9) on the transformers people use: Hugging Face BERT, ViT, GPT-2, Llama and
Qwen2 (grouped-query attention), T5 (random weights from small configs); timm's ViT, DeiT and Swin;
torchvision's ViT and Swin; a model with nn.MultiheadAttention. Each is gated with
``{D: 3, groups: [heads, neurons]}`` on weights that can expose a wrong cut, a seeded random 30% of
every gate is zeroed, and the slim model is checked against the gated one (1e-4 of the output
scale), its parameter count against the dead groups' parameters, and for no gate left.

    python benchmarks/heads_zoo.py          # about two minutes on one core
"""
from __future__ import annotations

import sys
import warnings

import torch
import transformers

import dgating_surgery as dg

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "tests"))
from test_heads import RECIPE, _hf, _others  # noqa: E402  (the models the tests use)

MODELS = ["bert", "vit", "gpt2", "llama", "qwen2", "t5", "timm/vit_tiny_patch16_224", "timm/deit_tiny_patch16_224",
          "timm/swin_tiny_patch4_window7_224", "torchvision/vit_b_16", "torchvision/swin_t", "nn.MultiheadAttention"]


def main() -> int:
    torch.manual_seed(0)
    warnings.simplefilter("ignore")
    transformers.logging.set_verbosity_error()  # the small test configs' token-id notices
    header = (f"{'model':36s} {'heads':>6s} {'groups':>7s} {'cut':>6s} {'params before':>14s} {'params after':>13s} "
              f"{'gate diff':>10s} {'slim diff':>10s} ok")
    print(header)
    print("-" * len(header))
    passed = 0
    for name in MODELS:
        model, args, kwargs = _hf(name) if "/" not in name and "." not in name else _others(name)
        model = dg.expose_weights(model.eval())
        heads = sum(s.removable.sum() for s in dg.analyze(model, args, kwargs).sets if s.kind == "heads")
        c = dg.random_cut_check(model, args, RECIPE, fraction=0.3, seed=0, example_kwargs=kwargs)
        passed += c.ok
        label = name if "/" in name or "." in name else f"transformers/{name}"
        print(f"{label:36s} {int(heads):6d} {c.groups_gated:7d} {c.groups_cut:6d} {c.params_before:14,d} "
              f"{c.params_after:13,d} {c.gate_diff:10.1e} {c.slim_diff:10.1e} {'yes' if c.ok else 'NO'}", flush=True)
    print("-" * len(header))
    print(f"exact: {passed}/{len(MODELS)} models")
    return 0 if passed == len(MODELS) else 1


if __name__ == "__main__":
    sys.exit(main())
