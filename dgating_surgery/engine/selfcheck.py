"""The core invariant as a callable check: gate, kill a random fraction of every gate's groups,
shrink, and compare. Used by the tests and the zoo benchmark, and handy for a user's own model
("is my architecture cut exactly?")."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from .execution import as_tuple, output_diff, run
from .gates import DGate, analyze, apply_plan, gates
from .report import model_params, sparsity
from .shrink import select_features, shrink


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


def expose_weights(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give ``model`` weights under which a wrong cut shows (in place; returns it). Freshly built
    models often hide one: a zero-initialised head makes every output 0, a 1e-6 layer scale hides
    a branch, identity BatchNorm statistics hide an unscaled BN. So: running statistics are drawn
    away from 0 and 1, and every parameter that is constant and tiny or a constant 1-D vector (a
    zero head, a zero bias, a layer scale, an identity affine) is drawn again, of order 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._NormBase) and module.running_mean is not None:
                module.running_mean.copy_(torch.rand(module.running_mean.shape, generator=gen) - 0.5)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=gen) + 0.5)
        for name, p in model.named_parameters():
            if not p.is_floating_point() or p.numel() == 0:
                continue
            constant = bool((p == p.reshape(-1)[0]).all())
            if p.ndim >= 2 and (p.abs().max() < 1e-3 or constant and p.numel() > 1):
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in ** 0.5)
            elif p.ndim <= 1 and (constant or p.abs().max() < 1e-3):
                bias = name.rpartition(".")[2].startswith("bias")
                offset = -0.5 if bias else 0.5  # biases around 0, scales around 1
                p.copy_(torch.rand(p.shape, generator=gen) + offset)
    return model


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
    args, kwargs = as_tuple(example_inputs), dict(example_kwargs or {})
    check = CutCheck(params_before=model_params(model))
    model.eval()
    reference = run(model, args, kwargs)
    start = time.perf_counter()
    plan = analyze(model, args, kwargs, recipe)
    apply_plan(model, plan, recipe)
    check.seconds_gate = time.perf_counter() - start
    check.not_gated = not_gated_reasons(plan)
    check.gate_diff = output_diff(reference, run(model, args, kwargs))
    check.groups_gated = sum(g.num_groups for g in gates(model))
    check.groups_cut = kill_random_groups(model, fraction, seed)
    check.params_expected_removed = sparsity(model).params_removable
    gated_out = run(model, args, kwargs)
    start = time.perf_counter()
    shrink(model, verify=False)  # the check below measures the same difference
    check.seconds_shrink = time.perf_counter() - start
    check.slim_diff = output_diff(gated_out, run(model, *select_features(model, args, kwargs)))
    check.params_after = model_params(model)
    check.gates_left = sum(isinstance(m, DGate) or parametrize.is_parametrized(m) for m in model.modules())
    return check

