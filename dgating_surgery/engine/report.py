"""Sparsity of a gated model: dead and alive groups per gate and kind, and what a cut would remove."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from .deadness import RELATIVE
from .gates import gate_set
from .shrink import plan_cut
from .tensors import get_tensor
from .wrappers import accepts_wrapped


@dataclass
class GateRow:
    key: str
    name: str
    kind: str
    groups: int
    dead: int
    params_removable: int  # entries of this gate's own slices that a cut removes
    all_dead: bool = False  # every group is below the threshold: the strongest is kept (zero), so the layer keeps a width
    collapsed: int = 0  # groups below deadness.RELATIVE of the gate's largest norm (dead or not: Adam leaves them ~1e-3)
    per_group: int = 1  # entries of the first layer per group (query heads per kv group: ``display.groups``)
    approximate: str | None = None  # why cutting its groups changes the function (opt-in; ``DGate.approximate``)

    @property
    def label(self) -> str:
        """The gate's name, noting when all its groups died and the strongest is kept, and when its cut
        is approximate."""
        label = f"{self.name} (all dead: strongest kept)" if self.all_dead else self.name
        return f"{label} (approximate)" if self.approximate else label

    @property
    def alive(self) -> int:
        return self.groups - self.dead


@dataclass
class SparsityReport:
    """What ``dg.sparsity`` returns: one row per gate plus exact totals for the whole model."""

    rows: list[GateRow] = field(default_factory=list)
    params_total: int = 0
    params_removable: int = 0  # exact: every tied parameter counted once
    threshold: float = 0.0
    params_uniform_padding: int | None = None  # of a uniform cut: parameters kept only to make widths uniform

    def by_kind(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for row in self.rows:
            acc = out.setdefault(row.kind, {"groups": 0, "dead": 0, "alive": 0, "collapsed": 0})
            acc["groups"] += row.groups
            acc["dead"] += row.dead
            acc["alive"] += row.alive
            acc["collapsed"] += row.collapsed
        return out

    @property
    def groups(self) -> int:
        return sum(r.groups for r in self.rows)

    @property
    def dead(self) -> int:
        return sum(r.dead for r in self.rows)

    @property
    def collapsed(self) -> int:
        """Groups collapsed by the relative criterion (``deadness``): under SGD the dead ones; under
        Adam also the ones left bouncing near zero, which ``dg.hold`` turns into exact zeros."""
        return sum(r.collapsed for r in self.rows)

    def __str__(self) -> str:
        lines = [f"{'gate':40s} {'kind':9s} {'groups':>7s} {'dead':>6s} {'params cut':>11s}"]
        for r in self.rows:
            lines.append(f"{r.label[:60]:40s} {r.kind:9s} {r.groups:7d} {r.dead:6d} {r.params_removable:11d}")
        lines.append(f"total: {self.dead}/{self.groups} groups dead, {self.params_removable}/{self.params_total} "
                     f"parameters removable at threshold {self.threshold:g}")
        if self.collapsed > self.dead:
            lines.append(f"{self.collapsed} groups have collapsed (norm below {RELATIVE:g} of their gate's largest) but "
                         "are not below the threshold (usual under Adam): dg.hold(model, optimizer=opt) holds them at "
                         "exactly zero, so that shrink cuts them")
        if self.params_uniform_padding is not None:
            lines.append(f"uniform widths keep {self.params_uniform_padding} parameters the per-layer cut removes")
        return "\n".join(lines)


def model_params(model: nn.Module) -> int:
    """Parameters of the network itself: gate factors are not counted, gated weights count once."""
    dset = gate_set(model)
    skip = {id(p) for p in dset.parameters()} if dset is not None else set()
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


@accepts_wrapped(gather=True)
def sparsity(model: nn.Module, threshold: float | None = None, uniform: bool = False) -> SparsityReport:
    """Dead/alive groups per gate and kind, and the parameters a ``shrink`` at ``threshold`` removes;
    ``uniform``: of a uniform cut (``shrink(uniform=True)``), with what uniformity costs
    (``params_uniform_padding``: parameters the per-layer cut removes that the uniform one keeps)."""
    plan = plan_cut(model, threshold, uniform=uniform)
    dset = gate_set(model)
    params = _parameter_names(model)
    report = SparsityReport(params_total=model_params(model),
                            threshold=dset.recipe.threshold if threshold is None else float(threshold))
    report.params_removable = removable_params(model, plan, params)
    if uniform:
        report.params_uniform_padding = removable_params(model, plan_cut(model, threshold), params) - report.params_removable
    for key, dgate in dset.items():
        dead = plan.dead[key]
        own = int(group_params(model, dgate, params)[dead].sum())
        norms = plan.norms[key]
        all_dead = bool((norms < report.threshold).all())
        collapsed = int((norms < RELATIVE * norms.max()).sum()) if norms.max() > 0 else 0
        report.rows.append(GateRow(key, dgate.name, dgate.kind, dgate.num_groups, int(dead.sum()), own, all_dead,
                                   collapsed, dgate.per_group, getattr(dgate, "approximate", None)))
    return report


def removable_params(model: nn.Module, plan, params: set[str] | None = None) -> int:
    """Parameters a cut by ``plan`` removes (every tied parameter counted once)."""
    params = _parameter_names(model) if params is None else params
    total = 0
    for fqn in plan.removed:
        if fqn in params:
            shape = get_tensor(model, fqn).shape
            total += int(torch.Size(shape).numel()) - int(torch.Size(plan.kept_shape(fqn, shape)).numel())
    return total


def group_params(model: nn.Module, dgate, params: set[str] | None = None) -> torch.Tensor:
    """Per group of ``dgate``: the entries of the gate's own parameter slices (a neuron's row and
    the next layer's column). Counted on full shapes, so it does not depend on which other groups
    are dead; summed over dead groups it is ``GateRow.params_removable``."""
    params = _parameter_names(model) if params is None else params
    own = torch.zeros(dgate.num_groups, dtype=torch.long)
    for cut in dgate.cuts:
        if cut.fqn in params:
            shape = get_tensor(model, cut.fqn).shape
            idx = cut.plane(shape).reshape(-1)
            own += torch.bincount(idx[idx >= 0].cpu(), minlength=dgate.num_groups) * cut.entries_per_position(shape)
    return own


def _parameter_names(model: nn.Module) -> set[str]:
    """Parameter names as cuts write them: ``conv.weight`` also when it is stored as
    ``conv.parametrizations.weight.original``."""
    return {re.sub(r"(^|\.)parametrizations\.([^.]+)\.original$", r"\1\2", name)
            for name, _ in model.named_parameters()}


@dataclass
class UniformCost:
    """What a uniform cut (``shrink(uniform=True)``) keeps beyond the per-layer cut: dead groups kept
    to pad layers to their set's width (per gate name, and in all) and the parameters they hold."""

    groups: int
    params: int
    per_gate: dict[str, int]

    def __str__(self) -> str:
        if not self.groups:
            return "uniform widths cost nothing: every layer of a width set keeps the same width already"
        worst = ", ".join(f"{name} +{n}" for name, n in sorted(self.per_gate.items(), key=lambda kv: -kv[1])[:3])
        return f"uniform widths keep {self.groups} dead groups ({self.params} parameters) to pad: {worst}"


@accepts_wrapped(gather=True)
def uniform_cost(model: nn.Module, threshold: float | None = None) -> UniformCost:
    """The padding a uniform cut at ``threshold`` would need now: cheap (no copy, no forward), so a
    training loop or callback can log it every few steps and steer toward uniform widths."""
    plain, padded = plan_cut(model, threshold), plan_cut(model, threshold, uniform=True)
    params = _parameter_names(model)
    per_gate = {dgate.name: int((plain.dead[key] & ~padded.dead[key]).sum()) for key, dgate in gate_set(model).items()}
    return UniformCost(sum(per_gate.values()), removable_params(model, plain, params) -
                       removable_params(model, padded, params), {k: v for k, v in per_gate.items() if v})
