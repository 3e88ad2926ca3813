"""What a cut buys, measured on the model itself: MACs of one forward pass and its latency.

MACs are counted by ``torch.utils.flop_counter.FlopCounterMode`` (matmul, conv, bmm, attention:
FLOPs / 2), so they cover every layer type and the functional calls inside ``forward``; the
element-wise gate scaling of a gated model is not a matmul, so a gated model counts as its dense
original. This is the one MAC count of the package: the CLI, the lambda search and the benchmarks
use it. Latency is the median of timed runs after warm-up, on the CPU threads torch uses;
``compare_latency`` times two models (before and after a cut) interleaved, so that a machine
whose load changes during the measurement slows both alike, and says when the difference is
within the noise.
"""
from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass

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
    return macs(shrink(copy.deepcopy(gated), threshold, verify=False), example_inputs, example_kwargs)


def collapsed(gated: nn.Module) -> nn.Module:
    """A copy of a gated model with its gates multiplied into the weights and nothing cut
    (threshold 0): the gated model's function at the cost of its dense original. A gated model
    itself pays for its parametrizations on every call (even cached), which for a small model can
    look like a 2x "speed-up" of a cut that removed nothing; time the cut against this instead."""
    return shrink(copy.deepcopy(gated), 0.0, verify=False)


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


NOISE = 0.03  # a median speed ratio within 3% of 1 is not a difference


@dataclass
class LatencyComparison:
    """Two models timed in interleaved rounds on the same inputs. ``before_ms``/``after_ms``: the
    median wall time of each; ``*_iqr``: its interquartile range (the spread); ``speedup``: the
    median over rounds of before/after (> 1: faster after); ``within_noise``: the middle half of
    the rounds' ratios includes 1, or the median ratio is within 3% of 1."""

    before_ms: float
    after_ms: float
    before_iqr: tuple[float, float]
    after_iqr: tuple[float, float]
    speedup: float
    speedup_iqr: tuple[float, float]
    rounds: int
    within_noise: bool

    def to_dict(self) -> dict:
        return {"before_ms": self.before_ms, "after_ms": self.after_ms, "before_iqr_ms": list(self.before_iqr),
                "after_iqr_ms": list(self.after_iqr), "speedup": self.speedup, "speedup_iqr": list(self.speedup_iqr),
                "rounds": self.rounds, "within_noise": self.within_noise}


def compare_latency(before: nn.Module, after: nn.Module, example_inputs, example_kwargs: dict | None = None,
                    budget_s: float = 1.0, min_rounds: int = 7, max_rounds: int = 200, warmup: int = 3,
                    timer=time.perf_counter) -> LatencyComparison:
    """Time ``before`` and ``after`` (e.g. ``collapsed(gated)`` and the slim model) in interleaved rounds,
    alternating which runs first, after ``warmup`` runs of each: as many rounds as fit in
    ``budget_s`` (at least ``min_rounds``, at most ``max_rounds``). Each model is fed the inputs it
    takes (``select_features``); a gated model runs with its gated weights cached."""
    times: dict[int, list[float]] = {0: [], 1: []}
    models = (before, after)
    with parametrize.cached():
        for _ in range(warmup):
            for model in models:
                forward(model, example_inputs, example_kwargs)
        start = timer()
        rounds = 0
        while rounds < min_rounds or (rounds < max_rounds and timer() - start < budget_s):
            for k in ((0, 1) if rounds % 2 == 0 else (1, 0)):
                t0 = timer()
                forward(models[k], example_inputs, example_kwargs)
                times[k].append(timer() - t0)
            rounds += 1
    return summarize_latency(times[0], times[1])


def summarize_latency(before_s: list[float], after_s: list[float]) -> LatencyComparison:
    """The comparison of paired timings (seconds; round i of each model ran back to back)."""
    if len(before_s) != len(after_s) or len(before_s) < 2:
        raise ValueError("summarize_latency needs two equally long lists of at least 2 timings")
    ratios = [b / a if a > 0 else float("inf") for b, a in zip(before_s, after_s)]
    speedup = statistics.median(ratios)
    q_ratio = _quartiles(ratios)
    within = q_ratio[0] <= 1.0 <= q_ratio[1] or abs(speedup - 1.0) <= NOISE
    ms = lambda xs: [1000.0 * x for x in xs]  # noqa: E731
    return LatencyComparison(1000.0 * statistics.median(before_s), 1000.0 * statistics.median(after_s),
                             _quartiles(ms(before_s)), _quartiles(ms(after_s)), speedup, q_ratio, len(before_s),
                             within)


def _quartiles(values: list[float]) -> tuple[float, float]:
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return (q1, q3)
