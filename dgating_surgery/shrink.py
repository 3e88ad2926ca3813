"""Stage 4: the inverse pass. Collapse every gate into its weights, find the dead groups, slice
every parameter and buffer tied to them, and update the layers' shape attributes, giving a
gate-free model of the same classes that computes the same function.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from .errors import ShrinkError
from .gates import GATES_ATTR, DGate, GateScale, _tensor, gate_set, group_sq_sums
from .tracing import _as_tuple, _mode


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


def plan_cut(model: nn.Module, threshold: float | None = None) -> CutPlan:
    """Dead groups of a gated model at ``threshold`` (absolute L2 norm of the collapsed group;
    None: the recipe's), and what removing them removes. Every gate keeps at least one group."""
    dset = gate_set(model)
    if dset is None:
        raise ShrinkError(f"{type(model).__name__} is not gated: there is nothing to shrink (gate it with "
                          "dg.gate_model first)")
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
            along = cut.index.expand(_tensor(model, cut.fqn).shape[cut.dim])
            gone = (along >= 0) & is_dead[along.clamp(min=0)]
            per_dim = removed.setdefault(cut.fqn, {})
            per_dim[cut.dim] = per_dim.get(cut.dim, torch.zeros_like(gone)) | gone
    return CutPlan(dead, norms, removed, kept_inputs)


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
        reference = _run(model, example_inputs, kwargs)
    _collapse(model)
    for fqn, drop in plan.removed.items():
        _slice(model, fqn, drop)
    for module in model.modules():
        fix_attributes(module)
    if plan.kept_inputs:
        model.kept_input_features = {name: torch.tensor(kept) for name, kept in plan.kept_inputs.items()}
    if check:
        try:
            slim = _run(model, *_select_features(model, example_inputs, kwargs))
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
                if isinstance(original, nn.Parameter):
                    module._parameters[name] = nn.Parameter(value, requires_grad=original.requires_grad)
                else:
                    module._buffers[name] = value
        else:
            for name in ours:
                with torch.no_grad():
                    parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    delattr(model, GATES_ATTR)


def _slice(model: nn.Module, fqn: str, drop: dict[int, torch.Tensor]) -> None:
    module_name, _, attr = fqn.rpartition(".")
    module = model.get_submodule(module_name)
    old = getattr(module, attr)
    new = old.detach()
    for dim, gone in sorted(drop.items()):
        new = new.index_select(dim, (~gone).nonzero().reshape(-1))
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(new.clone(), requires_grad=old.requires_grad)
    else:
        module._buffers[attr] = new.clone()


def _fix_conv(m: nn.modules.conv._ConvNd) -> None:
    transposed = isinstance(m, nn.modules.conv._ConvTransposeNd)
    out_now = m.weight.shape[1] * m.groups if transposed else m.weight.shape[0]
    if m.groups > 1:
        m.groups = m.groups * out_now // m.out_channels
    m.out_channels = m.weight.shape[1] * m.groups if transposed else m.weight.shape[0]
    m.in_channels = m.weight.shape[0] if transposed else m.weight.shape[1] * m.groups


def _fix_norm(m) -> None:
    ref = m.weight if m.weight is not None else m.running_mean
    if ref is not None:
        m.num_features = ref.shape[0]


def _fix_linear(m: nn.Linear) -> None:
    m.out_features, m.in_features = m.weight.shape


def _fix_layer_norm(m: nn.LayerNorm) -> None:
    if m.weight is not None:
        m.normalized_shape = tuple(m.weight.shape)


def _fix_group_norm(m: nn.GroupNorm) -> None:
    if m.weight is not None:
        m.num_channels = m.weight.shape[0]


def _fix_conv1d_hf(m) -> None:  # Hugging Face GPT-2 Conv1D: weight (nx, nf)
    m.nx, m.nf = m.weight.shape


# shape attributes each layer type keeps beside its tensors, and how to re-derive them; a class is
# named by its type, or by "module.QualName" for libraries that are optional here
ATTRIBUTE_FIXERS = [
    (nn.modules.conv._ConvNd, _fix_conv),
    (nn.Linear, _fix_linear),
    (nn.modules.batchnorm._NormBase, _fix_norm),
    (nn.LayerNorm, _fix_layer_norm),
    (nn.GroupNorm, _fix_group_norm),
    ("transformers.pytorch_utils.Conv1D", _fix_conv1d_hf),
]


def fix_attributes(module: nn.Module) -> None:
    """Re-derive a layer's shape attributes (in/out channels, groups, features) from its tensors."""
    names = {f"{c.__module__}.{c.__qualname__}" for c in type(module).__mro__}
    for cls, fix in ATTRIBUTE_FIXERS:
        if (cls in names) if isinstance(cls, str) else isinstance(module, cls):
            fix(module)
            return


def _input_names(model: nn.Module) -> list[str]:
    return list(inspect.signature(model.forward).parameters)


def select_features(model: nn.Module, example_inputs, kwargs=None):
    """The inputs a slim model takes: full-width inputs reduced to ``model.kept_input_features``."""
    return _select_features(model, example_inputs, dict(kwargs or {}))


def _select_features(model: nn.Module, example_inputs, kwargs):
    kept = getattr(model, "kept_input_features", {})
    args = list(_as_tuple(example_inputs))
    for i, name in enumerate(_input_names(model)[: len(args)]):
        if name in kept:
            args[i] = args[i].index_select(1, kept[name])
    kwargs = {k: (v.index_select(1, kept[k]) if k in kept else v) for k, v in kwargs.items()}
    return tuple(args), kwargs


def _run(model: nn.Module, example_inputs, kwargs):
    with _mode(model, False), torch.no_grad():
        return model(*_as_tuple(example_inputs), **kwargs)


def _flatten_outputs(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict) or hasattr(out, "values") and callable(out.values):
        return [t for v in out.values() for t in _flatten_outputs(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _flatten_outputs(v)]
    return []


def output_diff(reference, other) -> float:
    """The largest ``max_rel_diff`` over two models' outputs (tensors, tuples, dicts of them)."""
    ref, got = _flatten_outputs(reference), _flatten_outputs(other)
    if len(ref) != len(got):
        raise ShrinkError(f"the slim model returns {len(got)} tensors, the gated one {len(ref)}")
    for i, (r, g) in enumerate(zip(ref, got)):
        if r.shape != g.shape:
            raise ShrinkError(f"output {i} of the slim model has shape {tuple(g.shape)}, the gated one "
                              f"{tuple(r.shape)}")
    return max(max_rel_diff(r, g) for r, g in zip(ref, got))


def _verify(reference, slim, rtol: float) -> None:
    diff = output_diff(reference, slim)
    if diff > rtol:
        raise ShrinkError(f"the slim model's output differs from the gated model's by {diff:.3g} of its largest "
                          f"value (tolerance {rtol:g}): the groups cut were not exactly zero. Lower the threshold, "
                          "or pass a larger rtol if near-zero groups are meant to go; if the gates were exactly "
                          "zero, please report the model.")


def max_rel_diff(reference: torch.Tensor, other: torch.Tensor) -> float:
    """max |a - b| / max |a|: the comparison used for every equivalence check."""
    scale = reference.detach().abs().max().clamp(min=1e-12)
    return float((reference.detach().float() - other.detach().float()).abs().max() / scale)


__all__ = ["shrink", "plan_cut", "CutPlan", "max_rel_diff", "DGate"]
