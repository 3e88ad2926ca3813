"""``dgate demo``: the whole journey on data that ships with scikit-learn, in seconds on a laptop
CPU. A 64-256-128-10 MLP on the 8x8 digits is gated (hidden neurons, D=3), trained with SGD and
the D-Gating weight decay, reported, shrunk (verified against the gated model), saved as a slim
checkpoint, loaded back and checked to give identical outputs and accuracy.

    from dgating_surgery.demo import run_demo
    result = run_demo()          # or: dgate demo [--out DIR]
"""
from __future__ import annotations

import contextlib
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from . import display
from .checkpoints.checkpoint import kept_groups, load_slim, save_slim
from .errors import CheckpointError
from .engine.gates import gate_model
from .engine.execution import output_diff
from .engine.measure import LatencyComparison, collapsed, compare_latency, forward, macs
from .checkpoints.inputs import InputSpec
from .checkpoints.models import ModelRef, Origin
from .engine.report import model_params, sparsity
from .engine.shrink import shrink
from .training.regularizer import param_groups
from .training.schedule import LambdaScheduler

# lambda and epochs chosen so that most hidden neurons die while test accuracy stays at the dense
# level (seed 0: 98.0%); 2*lam/D decay on the gated weights, 5e-4 on the rest (see param_groups)
RECIPE = {"name": "demo", "D": 3, "lam": 7e-3, "threshold": 1e-4, "groups": [{"kind": "neurons"}]}
EPOCHS, LR, BATCH, WEIGHT_DECAY = 100, 0.05, 64, 5e-4


class DigitsMLP(nn.Module):
    """The demo's model (importable, so that its slim checkpoint can name it)."""

    def __init__(self, n_in: int = 64, hidden: tuple[int, int] = (256, 128), n_out: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(n_in, hidden[0])
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.fc3 = nn.Linear(hidden[1], n_out)

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


@dataclass
class DemoResult:
    """The demo's figures; ``before`` is the trained gated model, ``after`` the reloaded slim one."""

    params_before: int
    params_after: int
    accuracy_before: float
    accuracy_after: float
    macs_before: int
    macs_after: int
    latency_before_ms: float
    latency_after_ms: float
    neurons_before: int
    neurons_after: int
    checkpoint: Path
    seconds: float
    latency: LatencyComparison | None = None  # the interleaved timing behind latency_*_ms


def split(X, y, test: float, seed: int = 0, standardize: bool = False):
    """A fixed stratified train/test split of numpy data as tensors (Xtr, ytr, Xte, yte), features
    optionally standardized with the training statistics (the paper benchmarks use it too)."""
    from sklearn.model_selection import train_test_split
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=test, random_state=seed, stratify=y)
    if standardize:
        mu, sd = Xtr.mean(0), Xtr.std(0) + 1e-8
        Xtr, Xte = (Xtr - mu) / sd, (Xte - mu) / sd
    f = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
    return f(Xtr), torch.as_tensor(np.asarray(ytr), dtype=torch.long), f(Xte), torch.as_tensor(np.asarray(yte),
                                                                                               dtype=torch.long)


def digits(seed: int = 0, test: float = 0.25):
    """sklearn's 8x8 digits scaled to [0, 1], a fixed stratified split."""
    from sklearn.datasets import load_digits
    X, y = load_digits(return_X_y=True)
    return split(X / 16.0, y, test, seed)


def accuracy(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    """Test accuracy of a classifier on full-width inputs (a slim model gets its kept features)."""
    return float((forward(model, (X,)).argmax(1) == y).float().mean())


def run_demo(out: str | Path | None = None, epochs: int = EPOCHS, lam: float = RECIPE["lam"], seed: int = 0,
             console: Console | None = None, target: float | None = None, metric: str = "params") -> DemoResult:
    """Run the journey; the slim checkpoint goes to ``out`` (a directory; default: a temporary
    one, removed afterwards). ``target``: the fraction of ``metric`` ("params", "macs" or "groups")
    the cut should remove, reached within the run by ``LambdaScheduler.for_run`` (``lam`` is then
    only its starting value). Raises ``CheckpointError`` if the reloaded model differs."""
    console = console or display.console()
    if out is not None and not Path(out).is_dir():
        raise CheckpointError(f"--out directory '{out}' does not exist (create it first)")
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # batches of 64 x 256: threads cost more than they give, on any machine
    try:
        return _journey(out, epochs, lam, seed, console, start, target, metric)
    finally:
        torch.set_num_threads(threads)


def _journey(out, epochs, lam, seed, console, start, target, metric) -> DemoResult:
    torch.manual_seed(seed)
    Xtr, ytr, Xte, yte = digits()
    console.print(f"[bold]dgate demo[/]: a 64-256-128-10 MLP on scikit-learn digits ({len(Xtr)} train, {len(Xte)} "
                  f"test), D-Gating of the hidden neurons (D={RECIPE['D']}, lambda={lam:g}"
                  + (f", size target: remove {target:.0%} of the {metric})" if target is not None else ")"))
    gated = gate_model(DigitsMLP(), {**RECIPE, "lam": lam}, Xtr[:1])
    gated.dgate_origin = Origin(ModelRef("factory", "dgating_surgery.demo:DigitsMLP"), InputSpec.of(Xtr[:1]), RECIPE)
    _train(gated, Xtr, ytr, Xte, yte, epochs, lam, seed, console, target, metric)

    report = sparsity(gated)
    console.print(display.sparsity_table(report, "after training: groups per gate"))
    before = _measure(gated, Xte, yte)
    kept = kept_groups(gated)
    uncut = collapsed(gated)  # the trained function at the dense cost, timed against the slim model
    slim = shrink(gated, example_inputs=Xte)  # raises if the slim model differs from the gated one
    with tempfile.TemporaryDirectory() if out is None else contextlib.nullcontext(out) as where:
        path = Path(where) / "digits_slim.safetensors"
        save_slim(slim, path, kept=kept)
        loaded = load_slim(path)
        if output_diff(forward(slim, (Xte,)), forward(loaded, (Xte,))) != 0.0:
            raise CheckpointError(f"{path}: the reloaded slim model's outputs differ from the saved model's")
        after = _measure(loaded, Xte, yte)
        timing = compare_latency(uncut, loaded, (Xte,))
        console.print(f"slim checkpoint written to {path if out is not None else path.name + ' (temporary)'} "
                      f"({path.stat().st_size:,} bytes), reloaded with dg.load_slim: outputs identical")
    hidden = lambda m: m.fc1.out_features + m.fc2.out_features  # noqa: E731
    result = DemoResult(before["params"], after["params"], before["acc"], after["acc"], before["macs"], after["macs"],
                        timing.before_ms, timing.after_ms, hidden(DigitsMLP()), hidden(loaded), path,
                        time.perf_counter() - start, timing)
    console.print(display.before_after_table([
        ("hidden neurons", display.n(result.neurons_before), display.n(result.neurons_after),
         display.ratio(result.neurons_before, result.neurons_after)),
        ("parameters", display.n(result.params_before), display.n(result.params_after),
         display.ratio(result.params_before, result.params_after)),
        ("MACs / sample", display.n(result.macs_before), display.n(result.macs_after),
         display.ratio(result.macs_before, result.macs_after)),
        (f"latency, batch {len(Xte)} (ms, median and IQR)", display.ms_spread(timing.before_ms, timing.before_iqr),
         display.ms_spread(timing.after_ms, timing.after_iqr), display.latency_change(timing)),
        ("test accuracy", f"{result.accuracy_before:.2%}", f"{result.accuracy_after:.2%}",
         "same" if result.accuracy_before == result.accuracy_after else
         f"{100 * (result.accuracy_after - result.accuracy_before):+.2f} pts"),
    ], f"trained model vs. reloaded slim checkpoint (demo took {result.seconds:.1f} s)"))
    return result


def _train(model, Xtr, ytr, Xte, yte, epochs, lam, seed, console, target=None, metric="params") -> None:
    """Plain SGD with momentum; the D-Gating penalty is weight decay via ``param_groups``; with a
    size target, ``LambdaScheduler.for_run`` steers lambda and holds the chosen groups at zero."""
    opt = torch.optim.SGD(param_groups(model, lam, weight_decay=WEIGHT_DECAY), lr=LR, momentum=0.9)
    steps = epochs * -(-len(Xtr) // BATCH)
    lam_schedule = LambdaScheduler.for_run(opt, model, target, steps, metric=metric) if target is not None else None
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [int(0.75 * epochs)], 0.1)
    gen = torch.Generator().manual_seed(seed)
    columns = [TextColumn("training"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
               TimeElapsedColumn()]
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("train", total=epochs, status="")
        for epoch in range(epochs):
            model.train()
            perm = torch.randperm(len(Xtr), generator=gen)
            for i in range(0, len(Xtr), BATCH):
                idx = perm[i:i + BATCH]
                loss = F.cross_entropy(model(Xtr[idx]), ytr[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                if lam_schedule is not None:
                    lam_schedule.step()
            sched.step()
            if epoch % 5 == 4 or epoch == epochs - 1:
                rep = sparsity(model)
                status = (f"loss {loss.detach().item():.3f}  test acc {accuracy(model, Xte, yte):.1%}  dead neurons "
                          f"{rep.dead}/{rep.groups}")
                progress.update(task, status=status)
            progress.advance(task)


def _measure(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> dict:
    return {"params": model_params(model), "acc": accuracy(model, X, y), "macs": macs(model, (X[:1],))}
