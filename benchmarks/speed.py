"""What gating costs a training step (issue 10), as ratios measured in one run.

For every model: one training step (forward, backward, SGD with momentum) of the gated model against
the same step of the original, both in the same process, in interleaved rounds (the order alternates
every round, so a machine whose load changes slows all of them alike). Each round times `reps` steps
of every variant; the table shows the median over rounds of gated/original and its min-max. The
gated model runs with each choice of where its gates act (``dgating_surgery.engine.gate_modes``): ``auto``
(the default: weight or output per layer and call, whichever has fewer elements), ``weight`` (every
gate scales weight slices) and ``output`` (every gate that can act on a layer's output does). For the
MLPs, ``by hand`` is the floor: the same D-Gating arithmetic written out in plain PyTorch, without the
engine (each hidden Linear's output times the product of its two factor rows). "fastest" is the
ratio of the two variants' fastest rounds, the least disturbed by other jobs on the machine. The
memory column is what the step keeps for its backward pass (bytes saved by autograd, parameters not
counted), relative to the original's. Then the same with ``torch.compile`` (inductor) on the
original and the gated (auto) model. One CPU thread.

    python benchmarks/speed.py                 # every row, eager and compiled
    python benchmarks/speed.py --no-compile    # eager only
    python benchmarks/speed.py --only mlp      # rows whose name contains "mlp"
    python benchmarks/speed.py --surgery       # also: gate_model and shrink on ResNet-50 vs Torch-Pruning
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch
from torch import nn

import dgating_surgery as dg
from dgating_surgery.engine.gate_modes import set_gate_side

SIDES = ("auto", "weight", "output")
NEURONS = {"D": 3, "groups": [{"kind": "neurons"}]}
TRANSFORMER = {"D": 3, "groups": [{"kind": "heads"}, {"kind": "neurons"}]}


def mlp(sizes) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


class HandGatedMLP(nn.Module):
    """The gated MLP's arithmetic written by hand (D = 3, output side): what eager PyTorch costs for
    D-Gating itself, with none of the engine's machinery."""

    def __init__(self, model: nn.Sequential):
        super().__init__()
        self.linears = nn.ModuleList(m for m in model if isinstance(m, nn.Linear))
        self.factors = nn.ParameterList(nn.Parameter(torch.ones(2, m.out_features)) for m in self.linears[:-1])

    def forward(self, x):
        for linear, factors in zip(self.linears, self.factors):
            x = torch.relu(linear(x) * (factors[0] * factors[1]))
        return self.linears[-1](x)


class Case:
    """A model, its gating recipe and inputs, the loss of one training step and, for the MLPs, the
    same gating written by hand."""

    def __init__(self, name, build, recipe, args=(), kwargs=None, target=None, by_hand=None):
        self.name, self.build, self.recipe = name, build, recipe
        self.args, self.kwargs, self.target = tuple(args), dict(kwargs or {}), target
        self.by_hand = by_hand

    def loss(self, model):
        out = model(*self.args, **self.kwargs)
        if isinstance(out, torch.Tensor):
            return nn.functional.cross_entropy(out, self.target)
        return out.loss  # a transformers model given labels

    def gate(self, model):
        args = tuple(a[:1] for a in self.args)
        kwargs = {k: (v[:1] if isinstance(v, torch.Tensor) else v) for k, v in self.kwargs.items() if k != "labels"}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "neurons matched nothing in MobileNetV2"
            return dg.gate_model(model, self.recipe, args or None, kwargs or None)


def cases() -> list[Case]:
    import torchvision
    import transformers as T

    torch.manual_seed(0)
    img = torch.randn(32, 3, 64, 64)
    labels = torch.randint(0, 1000, (32,))
    ids = torch.randint(0, 1000, (8, 128))
    out = [
        Case("ResNet-18, 32x3x64x64", torchvision.models.resnet18, "default", (img,), target=labels),
        Case("MobileNetV2, 32x3x64x64", torchvision.models.mobilenet_v2, "default", (img,), target=labels),
        Case("MLP 64-256-128-10, batch 256", lambda: mlp([64, 256, 128, 10]), NEURONS, (torch.randn(256, 64),),
             target=torch.randint(0, 10, (256,)), by_hand=HandGatedMLP),
        Case("MLP 1024-4096-1024-10, batch 64", lambda: mlp([1024, 4096, 1024, 10]), NEURONS,
             (torch.randn(64, 1024),), target=torch.randint(0, 10, (64,)), by_hand=HandGatedMLP),
    ]
    common = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, vocab_size=1000,
                  max_position_embeddings=128)
    bert = T.BertConfig(intermediate_size=1024, **common)
    llama = T.LlamaConfig(intermediate_size=704, num_key_value_heads=2, use_cache=False, **common)
    out.append(Case("BERT-style (4x256, MLP 1024), 8x128 tokens", lambda: T.BertForSequenceClassification(bert),
                    TRANSFORMER, kwargs={"input_ids": ids, "labels": torch.randint(0, 2, (8,))}))
    out.append(Case("Llama-style (4x256, MLP 704), 8x128 tokens", lambda: T.LlamaForCausalLM(llama),
                    TRANSFORMER, kwargs={"input_ids": ids, "labels": ids, "use_cache": False}))
    return out


class Stepper:
    def __init__(self, model, case: Case, compiled: bool = False):
        self.model, self.case = model, case
        self.run = torch.compile(model) if compiled else model
        self.opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        model.train()

    def step(self):
        self.opt.zero_grad(set_to_none=True)
        self.case.loss(self.run).backward()
        self.opt.step()


def clock() -> float:
    """CPU seconds of this thread: with one torch thread every kernel runs on it, and time the
    machine's other jobs take from it does not count (wall time matches it on an idle machine)."""
    return time.thread_time()


def interleaved(steppers: dict, rounds: int, round_s: float = 0.3, warmup: int = 2) -> tuple[dict, int]:
    """Seconds per step of every stepper, one entry per round; rounds alternate the order."""
    for s in steppers.values():
        for _ in range(warmup):
            s.step()
    first = next(iter(steppers.values()))
    start = clock()
    first.step()
    reps = max(1, round(round_s / max(clock() - start, 1e-6)))
    times = {k: [] for k in steppers}
    names = list(steppers)
    for r in range(rounds):
        for k in (names if r % 2 == 0 else names[::-1]):
            t0 = clock()
            for _ in range(reps):
                steppers[k].step()
            times[k].append((clock() - t0) / reps)
    return times, reps


def ratio_text(times: list[float], base: list[float]) -> str:
    ratios = [t / b for t, b in zip(times, base)]
    return f"{statistics.median(ratios):.3f} ({min(ratios):.2f}-{max(ratios):.2f})"


def same_output(case: Case, model: nn.Module, reference: nn.Module) -> None:
    """A variant must compute what the original computes (all gates are 1 at conversion); eval mode,
    so that dropout draws nothing (the steppers put every model back into training mode)."""
    model.eval()
    reference.eval()
    with torch.no_grad():
        got, want = model(*case.args, **case.kwargs), reference(*case.args, **case.kwargs)
    got, want = (t if isinstance(t, torch.Tensor) else t.logits for t in (got, want))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def saved_bytes(stepper: Stepper) -> int:
    """Bytes autograd keeps for the backward pass of one step (distinct storages, parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in stepper.model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params and storage.device.type != "meta":
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    stepper.opt.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = stepper.case.loss(stepper.model)
    loss.backward()
    stepper.opt.zero_grad(set_to_none=True)
    return sum(seen.values())


def eager_rows(case: Case, rounds: int, round_s: float) -> list[str]:
    torch.manual_seed(0)
    base = case.build()
    variants = {"original": base}
    for side in SIDES:
        gated = case.gate(copy.deepcopy(base))
        set_gate_side(gated, side)
        variants[side] = gated
    if case.by_hand is not None:
        variants["by hand"] = case.by_hand(copy.deepcopy(base))
    for model in variants.values():
        same_output(case, model, base)
    steppers = {k: Stepper(m, case) for k, m in variants.items()}
    memory = {k: saved_bytes(s) for k, s in steppers.items()}
    times, reps = interleaved(steppers, rounds, round_s)
    base_ms = 1000 * statistics.median(times["original"])
    cells = [ratio_text(times[k], times["original"]) if k in times else "-" for k in SIDES + ("by hand",)]
    fastest = min(times["auto"]) / min(times["original"])
    mem = [f"{memory[s] / memory['original']:.2f}" for s in SIDES]
    return [f"| {case.name} | {base_ms:.1f} | " + " | ".join(cells) + f" | {fastest:.3f} | " + " / ".join(mem)
            + f" ({memory['original'] / 2**20:.0f} MB) | {rounds}x{reps} |"]


def compiled_row(case: Case, rounds: int, round_s: float) -> str:
    torch.manual_seed(0)
    base = case.build()
    gated = case.gate(copy.deepcopy(base))
    torch._dynamo.reset()
    steppers = {"original": Stepper(base, case, compiled=True), "auto": Stepper(gated, case, compiled=True)}
    start = time.perf_counter()
    for s in steppers.values():
        s.step()  # compiles forward and backward
    compile_s = time.perf_counter() - start
    times, reps = interleaved(steppers, rounds, round_s)
    base_ms = 1000 * statistics.median(times["original"])
    return (f"| {case.name} | {base_ms:.1f} | {ratio_text(times['auto'], times['original'])} | "
            f"{compile_s:.0f} | {rounds}x{reps} |")


def surgery_rows(repeats: int = 5) -> None:
    """gate_model and shrink on ResNet-50, against Torch-Pruning's plan-and-cut (issue 2's figures):
    each timed ``repeats`` times, interleaved, after one untimed run of each (first-call costs)."""
    import torchvision

    try:
        import torch_pruning as tp
    except ImportError:
        tp = None
    x1 = torch.randn(1, 3, 224, 224)

    def ours():
        model = torchvision.models.resnet50().eval()
        start = time.perf_counter()
        dg.gate_model(model, "default", x1)
        t_gate = time.perf_counter() - start
        dg.kill_random_groups(model, 0.3, seed=0)
        start = time.perf_counter()
        dg.shrink(model, verify=False)
        return {"dg.gate_model": t_gate, "dg.shrink (30% of groups dead, no verification)": time.perf_counter() - start}

    def torch_pruning():
        model = torchvision.models.resnet50().eval()
        start = time.perf_counter()
        pruner = tp.pruner.MagnitudePruner(model, x1, importance=tp.importance.MagnitudeImportance(p=2),
                                           pruning_ratio=0.3, ignored_layers=[model.fc])
        pruner.step()
        return {"Torch-Pruning: plan and cut 30% of channels": time.perf_counter() - start}

    runs = [ours] + ([torch_pruning] if tp is not None else [])
    seconds: dict[str, list[float]] = {}
    for r in range(repeats + 1):
        for run in (runs if r % 2 == 0 else runs[::-1]):
            for name, value in run().items():
                seconds.setdefault(name, []).extend([value] if r else [])  # round 0: the untimed warm-up
    print(f"\n| ResNet-50 surgery | seconds, median of {repeats} (min-max) |\n|---|---|")
    for name, values in seconds.items():
        print(f"| {name} | {statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f}) |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--round-seconds", type=float, default=0.3,
                        help="CPU seconds each variant runs per round (more: less noise, longer)")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--only", default="", help="rows whose name contains this (case-insensitive)")
    parser.add_argument("--surgery", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    selected = [c for c in cases() if args.only.lower() in c.name.lower()]
    print("transformer rows gate heads + neurons (D=3); the others: the "
          "default recipe (channels + neurons) for the CNNs, neurons for the MLPs. One thread, torch "
          f"{torch.__version__}.\n")
    print("| training step, eager | original ms | gated/original: auto | weight | output | by hand "
          "| auto, fastest rounds | saved for backward vs original: auto / weight / output | rounds x steps |")
    print("|---|---|---|---|---|---|---|---|---|")
    for case in selected:
        for row in eager_rows(case, args.rounds, args.round_seconds):
            print(row, flush=True)
    if not args.no_compile:
        print("\n| training step, torch.compile | original ms | gated (auto)/original | compile s (both) "
              "| rounds x steps |")
        print("|---|---|---|---|---|")
        for case in selected:
            print(compiled_row(case, args.rounds, args.round_seconds), flush=True)
    print("\n(ratios: median over rounds, min-max in brackets)")
    if args.surgery:
        surgery_rows()


if __name__ == "__main__":
    main()
