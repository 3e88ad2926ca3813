"""Stage 4: the inverse pass. Collapse every gate into its weights, find the dead groups, slice
every parameter and buffer tied to them, and re-derive the layers' shape attributes
(``fixers``), giving a gate-free model of the same classes that computes the same function.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from .errors import ShrinkError
from .execution import as_tuple, describe_mismatch, output_diff, run
from .fixers import fix_attributes
from .gates import GATES_ATTR, GateScale, group_sq_sums, require_gated
from .recipe import check_threshold
from .tensors import get_tensor, owner, replace_tensor
from .wrappers import accepts_wrapped, memory_format


@dataclass
class CutPlan:
    """Which groups are dead, and for every tied tensor the positions removed along each dim."""

    dead: dict[str, torch.Tensor]  # gate key -> bool per group
    norms: dict[str, torch.Tensor]  # gate key -> collapsed L2 norm per group
    removed: dict[str, dict[int, torch.Tensor]]  # tensor name -> dim -> bool per position
    kept_inputs: dict[str, list[int]]  # input name -> feature positions (dim 1) kept, where some go

    def kept_shape(self, fqn: str, shape) -> tuple[int, ...]:
        drop = self.removed.get(fqn, {})
        return tuple(int(size - drop[d].sum()) if d in drop else size for d, size in enumerate(shape))


@accepts_wrapped(gather=True)
def plan_cut(model: nn.Module, threshold: float | None = None) -> CutPlan:
    """Dead groups of a gated model at ``threshold`` (absolute L2 norm of the collapsed group;
    None: the recipe's), and what removing them removes. Every gate keeps at least one group."""
    check_threshold(threshold, "threshold")
    dset = require_gated(model, "shrink (and every sparsity figure)")
    threshold = dset.recipe.threshold if threshold is None else float(threshold)
    dead, norms, removed, kept_inputs = {}, {}, {}, {}
    for key, dgate in dset.items():
        with torch.no_grad():
            norm = group_sq_sums(model, dgate, dtype=torch.float64).sqrt()
        is_dead = norm < threshold
        if is_dead.all():
            is_dead[norm.argmax()] = False
        dead[key], norms[key] = is_dead, norm
        gone = {p for p, d in zip(dgate.positions or [], is_dead.tolist()) if d}
        if gone:
            kept_inputs[dgate.modules[0]] = [p for p in range(dgate.width) if p not in gone]
        for cut in dgate.cuts:
            along = cut.index.expand(get_tensor(model, cut.fqn).shape[cut.dim])
            gone = (along >= 0) & is_dead[along.clamp(min=0)]
            per_dim = removed.setdefault(cut.fqn, {})
            per_dim[cut.dim] = per_dim.get(cut.dim, torch.zeros_like(gone)) | gone
    return CutPlan(dead, norms, removed, kept_inputs)


@accepts_wrapped(in_place="shrink")
def shrink(model: nn.Module, threshold: float | None = None, example_inputs=None, example_kwargs=None,
           rtol: float = 1e-4) -> nn.Module:
    """Collapse the gates into the weights and physically remove the dead groups (in place, like
    PEFT's ``merge_and_unload``); returns the model, now without gates.

    With ``example_inputs`` the slim model is run against the gated one (eval mode) and a
    ``ShrinkError`` is raised if any output differs by more than ``rtol`` times the largest output.
    """
    plan = plan_cut(model, threshold)
    kwargs = dict(example_kwargs or {})
    check = example_inputs is not None or bool(kwargs)
    if check:
        reference = run(model, example_inputs, kwargs)
    _collapse(model)
    for fqn, drop in plan.removed.items():
        _slice(model, fqn, drop)
    fix_attributes(model)
    if plan.kept_inputs:
        model.kept_input_features = {name: torch.tensor(kept) for name, kept in plan.kept_inputs.items()}
    if check:
        try:
            slim = run(model, *select_features(model, example_inputs, kwargs))
        except Exception as exc:
            raise ShrinkError(f"the slim model no longer runs on the example inputs ({type(exc).__name__}: "
                              f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}): a layer keeps a "
                              "size the cut did not update. Please report the model.") from exc
        _verify(reference, slim, rtol)
    return model


def _collapse(model: nn.Module) -> None:
    """Multiply every gate into its weights and drop the gates.

    ``torch.nn.utils.parametrize.remove_parametrizations`` edits the class it made for the module,
    which ``copy.deepcopy`` shares between a model and its copy; shrinking a copy must not break
    the original, so a module whose only parametrizations are gates gets its own class back here.
    """
    for module in list(model.modules()):
        if not parametrize.is_parametrized(module):
            continue
        ours = {name: plist for name, plist in module.parametrizations.items()
                if any(isinstance(p, GateScale) for p in plist)}
        if len(ours) == len(module.parametrizations):
            with torch.no_grad():
                values = {name: (getattr(module, name).detach().clone(), plist.original)
                          for name, plist in ours.items()}
            module.__class__ = type(module).__bases__[0]
            del module._modules["parametrizations"]
            for name, (value, original) in values.items():
                replace_tensor(module, name, value, like=original)
        else:
            for name in ours:
                with torch.no_grad():
                    parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    delattr(model, GATES_ATTR)


def _slice(model: nn.Module, fqn: str, drop: dict[int, torch.Tensor]) -> None:
    module, attr = owner(model, fqn)
    new = old = getattr(module, attr).detach()
    for dim, gone in sorted(drop.items()):
        new = new.index_select(dim, (~gone).nonzero().reshape(-1))
    replace_tensor(module, attr, new.clone(memory_format=memory_format(old)))  # channels_last stays


def select_features(model: nn.Module, example_inputs, example_kwargs=None) -> tuple[tuple, dict]:
    """The inputs a slim model takes, as (args, kwargs): full-width inputs reduced to the features
    in ``model.kept_input_features`` (a model that lost none takes them unchanged)."""
    kept = getattr(model, "kept_input_features", {})
    args, kwargs = list(as_tuple(example_inputs)), dict(example_kwargs or {})
    for i, name in enumerate(list(inspect.signature(model.forward).parameters)[: len(args)]):
        if name in kept:
            args[i] = args[i].index_select(1, kept[name])
    kwargs = {k: (v.index_select(1, kept[k]) if k in kept else v) for k, v in kwargs.items()}
    return tuple(args), kwargs


def _verify(reference, slim, rtol: float) -> None:
    problem = describe_mismatch(reference, slim)
    if problem is not None:
        raise ShrinkError(f"cannot verify the slim model against the gated one: {problem}. Pass example inputs on "
                          "which the gated model gives a finite, non-zero output")
    diff = output_diff(reference, slim)
    if diff > rtol:
        raise ShrinkError(f"the slim model's output differs from the gated model's by {diff:.3g} of its largest "
                          f"value (tolerance {rtol:g}): the groups cut were not exactly zero. Lower the threshold, "
                          "or pass a larger rtol if near-zero groups are meant to go; if the gates were exactly "
                          "zero, please report the model.")
