"""gate_model and shrink at scale (issue 10): a Llama-style model of about one billion parameters
(TinyLlama-1.1B's shape, random weights from a config, float32), on a CPU machine.

Prints the time and the peak resident memory of each phase, and the peak relative to the model's
own size: building the model, `dg.gate_model` (trace with torch.export, discover, gate with the
balanced init), `dg.shrink` of a seeded random 30% of every gate's groups (collapse, cut, fix the
config; verified against the gated model on the example tokens). Peak memory is the process's peak
resident set (VmHWM), reset before each phase (Linux: /proc/self/clear_refs); "extra" is the peak
above what the process held when the phase began, i.e. what the phase itself allocated at its worst.

    python benchmarks/scale.py                  # 1.1B parameters, about 4.4 GB of float32 weights
    python benchmarks/scale.py --layers 4       # a quicker check of the same shapes
"""
from __future__ import annotations

import argparse
import gc
import time
import warnings

import torch

import dgating_surgery as dg


def rss_gb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20  # kB -> GB
    return float("nan")


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Phase:
    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        gc.collect()
        self.can_reset = reset_peak()
        self.start_gb = rss_gb("VmRSS")
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self.peak_gb = rss_gb("VmHWM")
        self.extra_gb = self.peak_gb - self.start_gb
        return False

    def row(self, model_gb: float) -> str:
        peak = f"{self.peak_gb:.2f}" if self.can_reset else f"{self.peak_gb:.2f} (process peak: no reset)"
        return (f"| {self.name} | {self.seconds:.1f} | {self.start_gb:.2f} | {peak} | {self.extra_gb:.2f} | "
                f"{self.extra_gb / model_gb:.2f} |")


def main() -> None:
    import transformers as T

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--fraction", type=float, default=0.3)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = T.LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=args.layers,
                           num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                           max_position_embeddings=2048, use_cache=False, tie_word_embeddings=False)
    recipe = {"D": 3, "groups": [{"kind": "heads"}, {"kind": "neurons"}]}
    ids = torch.randint(0, config.vocab_size, (1, 16))
    rows = []
    with Phase("build (random init)") as build:
        model = T.LlamaForCausalLM(config).eval()
    n_params = sum(p.numel() for p in model.parameters())
    model_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    rows.append(build)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Phase("dg.gate_model") as gate:
            dg.gate_model(model, recipe, example_kwargs={"input_ids": ids, "use_cache": False})
    rows.append(gate)
    groups = sum(g.num_groups for g in dg.gates(model))
    dg.kill_random_groups(model, args.fraction, seed=0)
    with Phase(f"dg.shrink ({args.fraction:.0%} of every gate's groups, verified)") as cut:
        dg.shrink(model, example_kwargs={"input_ids": ids, "use_cache": False})
    rows.append(cut)
    slim_params = sum(p.numel() for p in model.parameters())
    print(f"Llama-style model: {n_params / 1e9:.2f}B parameters ({model_gb:.2f} GB float32), {args.layers} layers, "
          f"hidden 2048, MLP 5632, 32 heads (4 KV heads); recipe gates {' + '.join(g['kind'] for g in recipe['groups'])}"
          f": {groups:,} groups; slim: {slim_params / 1e9:.2f}B parameters. torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads.\n")
    print("| phase | seconds | resident at start (GB) | peak (GB) | extra: peak - start (GB) | extra / model size |")
    print("|---|---|---|---|---|---|")
    for phase in rows:
        print(phase.row(model_gb))


if __name__ == "__main__":
    main()
