"""Latency before/after a cut (issue 11, item 9): the two models run interleaved after a warm-up,
each median comes with its spread, a slowdown reads as one, and a difference the rounds cannot
tell from noise says so. A fake clock stands for a machine whose load changes while it measures."""
import torch
from torch import nn

import dgating_surgery as dg
from dgating_surgery import display
from dgating_surgery.engine.measure import compare_latency, summarize_latency


class Clock:
    """A busy machine: everything costs ``load`` times more early on, and the load falls over time."""

    def __init__(self):
        self.now, self.calls = 0.0, 0

    def __call__(self):
        return self.now

    def spend(self, cost):
        self.calls += 1
        self.now += cost * (6.0 if self.calls <= 25 else 1.0)


class Costs(nn.Module):
    def __init__(self, clock, cost):
        super().__init__()
        self.clock, self.cost = clock, cost
        self.fc = nn.Linear(2, 2)

    def forward(self, x):
        self.clock.spend(self.cost)
        return self.fc(x)


def sequential_ratio(clock, a, b, runs=20):
    """What measuring one model after the other gives (the old way): the load change looks like a speed-up."""
    def median_time(model):
        times = []
        for _ in range(runs):
            t0 = clock()
            model(torch.ones(1, 2))
            times.append(clock() - t0)
        return sorted(times)[runs // 2]
    return median_time(a) / median_time(b)


def test_interleaving_cancels_a_changing_load():
    clock = Clock()
    a, b = Costs(clock, 1e-3), Costs(clock, 1e-3)  # the same cost: a cut that removed nothing
    assert sequential_ratio(clock, a, b) > 5  # "6.00x faster" after cutting nothing
    clock = Clock()
    a, b = Costs(clock, 1e-3), Costs(clock, 1e-3)
    cmp = compare_latency(a, b, (torch.ones(1, 2),), warmup=1, min_rounds=30, budget_s=0, timer=clock)
    assert cmp.within_noise and cmp.speedup == 1.0 and display.latency_change(cmp) == "within noise"
    assert cmp.rounds == 30 and cmp.before_iqr[0] <= cmp.before_ms <= cmp.before_iqr[1]
    clock = Clock()
    slow, fast = Costs(clock, 2e-3), Costs(clock, 1e-3)
    assert display.latency_change(compare_latency(slow, fast, (torch.ones(1, 2),), min_rounds=30, budget_s=0, timer=clock)) == \
        "2.00x faster"
    clock = Clock()
    slow, fast = Costs(clock, 2e-3), Costs(clock, 1e-3)
    assert display.latency_change(compare_latency(fast, slow, (torch.ones(1, 2),), min_rounds=30, budget_s=0, timer=clock)) == \
        "2.00x slower"  # was "0.50x faster"


def test_summary_of_paired_rounds():
    noisy = summarize_latency([1.0, 1.3, 0.9, 1.1, 1.2, 1.0, 0.95], [1.1, 1.0, 1.2, 0.9, 1.0, 1.25, 1.0])
    assert noisy.within_noise and display.latency_change(noisy) == "within noise"
    slower = summarize_latency([1.0] * 7, [1.3, 1.31, 1.29, 1.3, 1.32, 1.3, 1.28])
    assert not slower.within_noise and display.latency_change(slower) == "1.30x slower"
    close = summarize_latency([1.0] * 7, [0.98] * 7)  # a 2% difference: not worth a claim
    assert close.within_noise
    assert display.ms_spread(noisy.before_ms, noisy.before_iqr) == "1000.0 (975.0-1150.0)"
    assert display.speedup(1.0, 2.0) == "2.00x slower" and display.speedup(2.0, 1.0) == "2.00x faster"


def test_gated_baseline_costs_what_the_dense_model_costs():
    """A gated model pays for its parametrizations on every call; the baseline is the gated
    function with the gates multiplied in, which computes the same outputs."""
    from dgating_surgery.engine.measure import collapsed, forward
    x = torch.randn(4, 10)
    gated = dg.gate_model(nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5)), "mlp", x)
    uncut = collapsed(gated)
    assert not hasattr(uncut, "dgates") and len(dg.gates(gated)) == 1  # the gated model is left as it was
    assert sum(p.numel() for p in uncut.parameters()) == dg.model_params(gated)
    assert dg.output_diff(forward(gated, (x,)), forward(uncut, (x,))) < 1e-6
