"""The Hugging Face family zoo (issue 19): every structure the engine finds in transformers 5's
families, and whether its cut is exact. Each family is built from its own config class with tiny
sizes (random weights; the class from transformers' auto mappings: causal LM, else seq2seq LM, else
the base model), its weights made able to show a wrong cut (``dg.expose_weights``), and gated with
every kind it has exactly removable groups of (heads, neurons, hidden). A seeded random 30% of every
gate is zeroed and the model shrunk; then, against the gated model (1e-4 of the output scale):

- ``seen``: the example inputs shrink verified on; ``unseen``: other token ids of another length,
  with a padding mask (the first three positions masked);
- ``generate``: greedy generation with the KV cache gives the same tokens (causal LMs);
- ``reload``: ``save_pretrained`` + ``from_pretrained`` (dgating_surgery imported) gives the same outputs.

With ``--uniform`` the cut keeps one width per config field (``dg.shrink(uniform=True)``, issue 20) and
``stock`` is the reload in a process where dgating_surgery cannot be imported (stock transformers, on
the unseen inputs); ``not stock`` where the saved config still needs our key (a width no config field
can state stays per-layer, e.g. a field that also sizes a scale).

A kind no group of which can be removed shows ``-`` and its reason is listed under the table.

    nice python benchmarks/hf_families.py               # every family (OMP_NUM_THREADS=1: ~20 min)
    python benchmarks/hf_families.py llama qwen3 bloom  # some
    nice python benchmarks/hf_families.py --uniform     # uniform widths, reloaded by stock transformers
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
import warnings

import torch
import transformers

import dgating_surgery as dg
from dgating_surgery.engine.execution import output_diff, output_tensors, run

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "tests"))
from test_heads_families import tiny  # noqa: E402  (the tiny configs the tests use)

FAMILIES = [
    # decoder-only LMs
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3_text",
    "phi", "phi3", "gpt2", "gpt_neo", "gpt_neox", "gptj", "gpt_bigcode", "bloom", "falcon", "opt", "olmo", "olmo2",
    "stablelm", "starcoder2", "cohere", "granite", "codegen", "persimmon", "helium", "glm", "smollm3",
    # encoders
    "bert", "roberta", "distilbert", "albert", "electra", "deberta-v2", "vit", "deit",
    # encoder-decoders
    "t5", "bart", "mbart", "pegasus", "marian",
]
KINDS = ("heads", "neurons", "hidden")
TOL = 1e-4


def inputs(role: str, length: int, seed: int, padded: bool) -> tuple[tuple, dict]:
    gen = torch.Generator().manual_seed(seed)
    if role == "vision":
        return (torch.randn(1, 3, 32, 32, generator=gen),), {}
    ids = torch.randint(3, 100, (2, length), generator=gen)
    kwargs = {"use_cache": False} if role != "base" else {}
    if padded:
        mask = torch.ones_like(ids)
        mask[0, :3] = 0
        kwargs["attention_mask"] = mask
    if role == "seq2seq":
        kwargs["decoder_input_ids"] = torch.randint(3, 100, (2, length - 2), generator=gen)
    return (ids,), kwargs


def first_reason(plan, kind: str) -> str:
    return next((r for s in plan.sets if s.kind == kind for r in s.reasons if r), "none found")


def check(family: str, uniform: bool = False) -> dict:
    row = {"family": family}
    model, role = tiny(family)
    dg.expose_weights(model)
    args, kwargs = inputs(role, 12, 0, padded=False)
    plan = dg.analyze(model, args, kwargs)
    for kind in KINDS:
        sets = [s for s in plan.sets if s.kind == kind]
        # per-expert neurons (mixture-of-experts layers): one group per expert and neuron
        removable = sum(int(s.removable.sum()) * (s.experts or 1) for s in sets)
        row[kind] = f"{removable}/{sum(len(s.removable) * (s.experts or 1) for s in sets)}" if sets else "0/0"
        if not removable:
            row[f"{kind} reason"] = first_reason(plan, kind) if sets else "none in the model"
    kinds = [k for k in KINDS if not row[k].startswith("0/")]
    if not kinds:
        return row
    gated = dg.gate_model(model, {"D": 3, "groups": [{"kind": k} for k in kinds]}, args, kwargs)
    row["cut"] = kill(gated, 0.3, seed=0)
    unseen = inputs(role, 9, 1, padded=role != "vision")
    reference = [run(gated, *a) for a in ((args, kwargs), unseen)]
    generated = None
    if role == "causal":
        try:
            generated = _generate(gated)
        except Exception as exc:  # noqa: BLE001 - transformers' own generate, before any cut
            row["generate reason"] = f"generate fails on the model before the cut: {type(exc).__name__}: {exc}"
    params = dg.model_params(gated)
    dg.shrink(gated, example_inputs=args, example_kwargs=kwargs, uniform=uniform)
    row["params"] = f"{params:,}->{dg.model_params(gated):,}"
    row["seen"], row["unseen"] = (output_diff(ref, run(gated, *a)) for ref, a in zip(reference, ((args, kwargs), unseen)))
    if generated is not None:
        row["generate"] = "equal" if torch.equal(generated, _generate(gated)) else "DIFFERS"
    with tempfile.TemporaryDirectory() as folder:
        gated.save_pretrained(folder)
        reloaded = type(gated).from_pretrained(folder).eval()
        if uniform:
            row["stock"] = _stock_reload(folder, type(gated).__name__, unseen, reference[1])
    row["reload"] = output_diff(reference[1], run(reloaded, *unseen))
    return row


STOCK = r"""
import sys, torch, warnings, transformers
class NoDgating:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "dgating_surgery":
            raise ImportError("blocked")
sys.meta_path.insert(0, NoDgating())
warnings.simplefilter("ignore")
folder, cls = sys.argv[1], sys.argv[2]
saved = torch.load(folder + "/inputs.pt")
model = getattr(transformers, cls).from_pretrained(folder).eval()
with torch.no_grad():
    out = model(*saved["args"], **saved["kwargs"])
torch.save([t for t in (out.to_tuple() if hasattr(out, "to_tuple") else (out,)) if isinstance(t, torch.Tensor)][:1],
           folder + "/stock.pt")
"""


def _stock_reload(folder: str, cls: str, unseen, reference) -> float | str:
    """The output difference of the saved directory loaded by stock transformers (dgating_surgery
    unimportable) on ``unseen``, or why it is not a stock checkpoint."""
    if "dgating_surgery" in json.load(open(f"{folder}/config.json")):
        return "not stock"
    torch.save({"args": unseen[0], "kwargs": unseen[1]}, f"{folder}/inputs.pt")
    done = subprocess.run([sys.executable, "-c", STOCK, folder, cls], capture_output=True, text=True)
    if done.returncode:
        return f"fails: {(done.stderr.strip().splitlines() or ['?'])[-1][:120]}"
    (got,) = torch.load(f"{folder}/stock.pt")
    return output_diff(output_tensors(reference)[:1], [got])


def kill(model, fraction: float, seed: int) -> int:
    """Zero a seeded random ``fraction`` of every gate's groups, at least one where a gate has two
    (a layer's two key/value groups would otherwise never be cut)."""
    gen, killed = torch.Generator().manual_seed(seed), 0
    with torch.no_grad():
        for dgate in dg.gates(model):
            k = min(max(1, round(fraction * dgate.num_groups)), dgate.num_groups - 1)
            dgate.factors[0, torch.randperm(dgate.num_groups, generator=gen)[:k]] = 0.0
            killed += k
    return killed


def _generate(model) -> torch.Tensor:
    ids = torch.randint(3, 100, (1, 5), generator=torch.Generator().manual_seed(2))
    return model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)


def ok(row: dict) -> bool:
    stock = row.get("stock", 0.0)
    return "error" not in row and all(row.get(k, 0.0) <= TOL for k in ("seen", "unseen", "reload")) \
        and row.get("generate", "equal") == "equal" and (not isinstance(stock, float) or stock <= TOL)


def main(families: list[str], uniform: bool = False) -> int:
    warnings.simplefilter("ignore")
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    torch.manual_seed(0)
    header = (f"{'family':12s} {'heads':>7s} {'neurons':>9s} {'hidden':>7s} {'cut':>4s} {'parameters':>17s} "
              f"{'seen':>8s} {'unseen':>8s} {'generate':>8s} {'reload':>8s} ok")
    print(header)
    print("-" * len(header))
    rows = []
    for family in families:
        start = time.perf_counter()
        try:
            row = check(family, uniform)
        except Exception as exc:  # noqa: BLE001 - a family's failure is a row of the table
            row = {"family": family, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
        row["seconds"] = time.perf_counter() - start
        rows.append(row)
        num = lambda k: f"{row[k]:8.1e}" if k in row else f"{'-':>8s}"  # noqa: E731
        print(f"{family:12s} {row.get('heads', '?'):>7s} {row.get('neurons', '?'):>9s} {row.get('hidden', '?'):>7s} "
              f"{row.get('cut', '-')!s:>4s} {row.get('params', '-'):>17s} {num('seen')} {num('unseen')} "
              f"{row.get('generate', '-'):>8s} {num('reload')} {'yes' if ok(row) else 'NO'}"
              + (f"  stock {row['stock']:.1e}" if isinstance(row.get("stock"), float) else
                 f"  {row['stock']}" if "stock" in row else ""), flush=True)
    print("-" * len(header))
    print(f"exact: {sum(map(ok, rows))}/{len(rows)} families")
    print("\nrefusals (kind: reason):")
    for row in rows:
        for key in [k for k in row if k.endswith(" reason")] + (["error"] if "error" in row else []):
            print(f"  {row['family']:12s} {key.removesuffix(' reason'):8s} {row[key][:220]}")
    return 0 if all(map(ok, rows)) else 1


if __name__ == "__main__":
    names = [a for a in sys.argv[1:] if not a.startswith("--")]
    sys.exit(main(names or FAMILIES, uniform="--uniform" in sys.argv))
