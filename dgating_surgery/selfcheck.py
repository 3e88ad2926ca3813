"""The core invariant as a callable check: gate, kill a random fraction of every gate's groups,
shrink, and compare. Used by the tests and the zoo benchmark, and handy for a user's own model
("is my architecture cut exactly?")."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from .gates import DGate, analyze, apply_plan, gates
from .report import model_params, sparsity
from .shrink import output_diff, select_features, shrink
from .tracing import _as_tuple


@dataclass
class CutCheck:
    """Figures of one check; ``ok`` when every invariant held."""

    groups_gated: int = 0
    groups_cut: int = 0
    params_before: int = 0
    params_after: int = 0
    params_expected_removed: int = 0
    gate_diff: float = 0.0
    slim_diff: float = 0.0
    seconds_gate: float = 0.0
    seconds_shrink: float = 0.0
    gates_left: int = 0
    not_gated: dict[str, int] = field(default_factory=dict)  # reason -> groups

    @property
    def ok(self) -> bool:
        return (self.gate_diff <= 1e-4 and self.slim_diff <= 1e-4 and self.gates_left == 0
                and self.params_before - self.params_after == self.params_expected_removed)


def kill_random_groups(model: nn.Module, fraction: float, seed: int = 0) -> int:
    """Set a seeded random ``fraction`` of every gate's groups to exactly zero; returns how many."""
    gen = torch.Generator().manual_seed(seed)
    killed = 0
    with torch.no_grad():
        for dgate in gates(model):
            k = int(fraction * dgate.num_groups)
            idx = torch.randperm(dgate.num_groups, generator=gen)[:k]
            dgate.factors[0, idx] = 0.0
            killed += k
    return killed


def not_gated_reasons(plan) -> dict[str, int]:
    """Why groups were left out: reason -> number of groups (only exactly-removable kinds count)."""
    out: dict[str, int] = {}
    for gset in plan.sets:
        if gset.kind == "features":
            continue
        for reason in gset.reasons:
            if reason is not None:
                out[reason] = out.get(reason, 0) + 1
    return out


def random_cut_check(model: nn.Module, example_inputs, recipe="default", fraction: float = 0.3, seed: int = 0,
                     example_kwargs=None) -> CutCheck:
    """Gate ``model`` (in place), zero ``fraction`` of each gate's groups, shrink, and measure."""
    args, kwargs = _as_tuple(example_inputs), dict(example_kwargs or {})
    check = CutCheck(params_before=model_params(model))
    model.eval()
    with torch.no_grad():
        reference = model(*args, **kwargs)
    start = time.perf_counter()
    plan = analyze(model, args, kwargs)
    apply_plan(model, plan, recipe)
    check.seconds_gate = time.perf_counter() - start
    check.not_gated = not_gated_reasons(plan)
    with torch.no_grad():
        check.gate_diff = output_diff(reference, model(*args, **kwargs))
    check.groups_gated = sum(g.num_groups for g in gates(model))
    check.groups_cut = kill_random_groups(model, fraction, seed)
    check.params_expected_removed = sparsity(model).params_removable
    with torch.no_grad():
        gated_out = model(*args, **kwargs)
    start = time.perf_counter()
    shrink(model)  # no verification inside: the check below measures the same difference
    check.seconds_shrink = time.perf_counter() - start
    slim_args, slim_kwargs = select_features(model, args, kwargs)
    with torch.no_grad():
        check.slim_diff = output_diff(gated_out, model(*slim_args, **slim_kwargs))
    check.params_after = model_params(model)
    check.gates_left = sum(isinstance(m, DGate) or parametrize.is_parametrized(m) for m in model.modules())
    return check

