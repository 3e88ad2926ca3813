"""What a cut buys, measured on the model itself: MACs of one forward pass and its latency.

MACs are counted by ``torch.utils.flop_counter.FlopCounterMode`` (matmul, conv, bmm, attention:
FLOPs / 2), so they cover every layer type and the functional calls inside ``forward``; the
element-wise gate scaling of a gated model is not a matmul, so a gated model counts as its dense
original. This is the one MAC count of the package: the CLI, the lambda search and the benchmarks
use it. Latency is the median of timed runs after warm-up, on the CPU threads torch uses.
"""
from __future__ import annotations

import copy
import statistics
import time

from torch import nn
from torch.nn.utils import parametrize
from torch.utils.flop_counter import FlopCounterMode

from .execution import as_tuple, evaluating
from .shrink import select_features, shrink


def forward(model: nn.Module, example_inputs, example_kwargs: dict | None = None):
    """One eval-mode pass on full-width example inputs (a slim model that lost input features is
    fed only the features it kept)."""
    args, kwargs = select_features(model, example_inputs, example_kwargs)
    with evaluating(model), parametrize.cached():
        return model(*args, **kwargs)


def macs(model: nn.Module, example_inputs, example_kwargs: dict | None = None) -> int:
    """Multiply-accumulates of one forward pass on these inputs."""
    with FlopCounterMode(display=False) as counter:
        forward(model, as_tuple(example_inputs), example_kwargs)
    return int(counter.get_total_flops()) // 2


def macs_after_cut(gated: nn.Module, example_inputs, example_kwargs: dict | None = None,
                   threshold: float | None = None) -> int:
    """MACs of the slim model a cut at ``threshold`` would give, measured on a cut copy (the gated
    model is left as it is)."""
    return macs(shrink(copy.deepcopy(gated), threshold), example_inputs, example_kwargs)


def latency_ms(model: nn.Module, example_inputs, example_kwargs: dict | None = None, budget_s: float = 0.5,
               max_runs: int = 50) -> float:
    """Median wall time (ms) of forward passes after two warm-up runs: as many runs as fit in
    ``budget_s`` (at least 5, at most ``max_runs``). A gated model runs with its gated weights
    cached, i.e. at the cost of its dense original."""
    times: list[float] = []
    with parametrize.cached():  # gated weights computed once, in the warm-up
        for _ in range(2):
            forward(model, example_inputs, example_kwargs)
        start = time.perf_counter()
        while len(times) < 5 or (len(times) < max_runs and time.perf_counter() - start < budget_s):
            t0 = time.perf_counter()
            forward(model, example_inputs, example_kwargs)
            times.append(time.perf_counter() - t0)
    return 1000.0 * statistics.median(times)
