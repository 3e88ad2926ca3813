"""Stage 4: the inverse pass. Collapse every gate into its weights, find the dead groups, slice
every parameter and buffer tied to them, and re-derive the layers' shape attributes
(``fixers``), giving a gate-free model of the same classes that computes the same function.
"""
from __future__ import annotations

import inspect
import weakref
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils import _pytree as pytree

from . import constraints
from .branches import narrowed, remove_branches
from ..errors import ShrinkError, one_line
from .execution import as_tuple, describe_mismatch, on_device_of, output_diff, run, tolerance
from .fixers import fix_attributes
from .gate_modes import GateScale
from .gates import GATES_ATTR, frozen_gates, gate_set, group_sq_sums, primary, require_gated
from .kinds import ATTRIBUTE_ROLES, Role
from .recipe import check_threshold
from .rules.normalization import rms_norm_of
from .tensors import get_tensor, owner, replace_tensor, tied_holders
from .tracing import check_not_meta
from .wrappers import accepts_wrapped, memory_format, warn_user


@dataclass
class CutPlan:
    """Which groups are dead, and for every tied tensor the positions removed along each dim."""

    dead: dict[str, torch.Tensor]  # gate key -> bool per group
    norms: dict[str, torch.Tensor]  # gate key -> collapsed L2 norm per group
    # tensor (or layer attribute) name -> dim -> bool per position; (experts, positions) for a per-expert cut
    # (``gates.Cut.lead``): row e the positions of expert e's matrix (dim 0), every row removing as many
    removed: dict[str, dict[int, torch.Tensor]]
    kept_inputs: dict[str, list[int]]  # input name -> feature positions (dim 1) kept, where some go
    attributes: dict[str, Role]  # names in ``removed`` that are layer attributes (COUNT, RESCALE), not tensors

    def kept_shape(self, fqn: str, shape) -> tuple[int, ...]:
        drop = self.removed.get(fqn, {})
        return tuple(int(size - drop[d].sum(-1).max()) if d in drop else size for d, size in enumerate(shape))


@accepts_wrapped(gather=True)
def plan_cut(model: nn.Module, threshold: float | None = None, round_to: int | None = None,
             uniform: bool = False) -> CutPlan:
    """Dead groups of a gated model at ``threshold`` (absolute L2 norm of the collapsed group;
    None: the recipe's), and what removing them removes. Every gate keeps at least one group.
    Then the width constraints (``constraints``) keep some dead groups: ``round_to`` (None: the
    recipe's) keeps each cut layer's width a multiple of it; ``uniform`` gives every layer of a
    width set (the layers a Hugging Face config states one width for) the same width."""
    check_threshold(threshold, "threshold")
    dset = require_gated(model, "shrink (and every sparsity figure)")
    check_not_meta(model, "shrink (and every sparsity figure)", error=ShrinkError)
    threshold = dset.recipe.threshold if threshold is None else float(threshold)
    dead, norms, removed, kept_inputs, attributes = {}, {}, {}, {}, {}
    gone_inputs: dict[str, tuple[int, set[int]]] = {}  # input name -> (width, positions some gate removes)
    for key, dgate in dset.items():
        with torch.no_grad():
            norm = group_sq_sums(model, dgate, dtype=torch.float64).sqrt()
        is_dead = norm < threshold
        if is_dead.all():
            is_dead[norm.argmax()] = False
        dead[key], norms[key] = is_dead, norm
    steps = [*constraints.REQUIRED, constraints.round_to(dset.recipe.round_to if round_to is None else round_to)]
    if uniform:
        steps.append(constraints.uniform)
    dead = constraints.apply_constraints(constraints.WidthContext(model, dict(dset.items()), norms), dead, steps)
    for key, dgate in dset.items():
        is_dead = dead[key]
        gone = {p for owned, d in zip(dgate.positions or [], is_dead.tolist()) if d for p in owned}
        if gone:  # one input may have several feature gates (a tie splits its features in sets): all of them cut it
            width, before = gone_inputs.get(dgate.modules[0], (dgate.width, set()))
            gone_inputs[dgate.modules[0]] = (width, before | gone)
        for cut in dgate.cuts:
            if cut.role in ATTRIBUTE_ROLES:
                attributes[cut.fqn] = cut.role
                along = cut.index
            else:
                along = cut.plane(get_tensor(model, cut.fqn).shape)
            gone = (along >= 0) & is_dead[along.clamp(min=0)]
            per_dim = removed.setdefault(cut.fqn, {})
            per_dim[cut.dim] = per_dim.get(cut.dim, torch.zeros_like(gone)) | gone
    for name, (width, gone) in gone_inputs.items():
        kept_inputs[name] = [p for p in range(width) if p not in gone]
    return CutPlan(dead, norms, removed, kept_inputs, attributes)


@accepts_wrapped(in_place="shrink")
def shrink(model: nn.Module, threshold: float | None = None, example_inputs=None, example_kwargs=None,
           rtol: float | None = None, round_to: int | None = None, verify: bool = True,
           uniform: bool = False) -> nn.Module:
    """Collapse the gates into the weights and physically remove the dead groups (in place, like
    PEFT's ``merge_and_unload``); returns the same model object, now without gates.

    Unless ``verify`` is false, the slim model is run against the gated one (eval mode) on
    ``example_inputs`` or, without them, on the inputs ``dg.gate_model`` was given (if any). If the
    slim model does not run, or an output differs by more than ``rtol`` times the largest output
    (default: 1e-4, or a few units in the last place of a low-precision output dtype), the cut is
    undone, the model is left gated as it was, and a ``ShrinkError`` says why. ``round_to`` (None:
    the recipe's): keep each cut layer's width a multiple of it by keeping the strongest dead groups.
    ``uniform``: every layer of a width set keeps one width, the largest any keeps (the strongest
    dead groups fill the others), so that a Hugging Face model's config states its widths and
    ``save_pretrained`` writes an ordinary checkpoint of its class (``constraints.uniform``).
    """
    if (message := frozen_gates(model)) is not None:
        warn_user(f"dg.shrink: {message}")
    plan = plan_cut(model, threshold, round_to, uniform)
    check_threshold(rtol, "rtol")
    check = _verification(model, example_inputs, example_kwargs) if verify else None
    approximate = approximate_norms(model, plan)  # LayerNorms a cut narrows (opt-in): the cut changes the function
    fresh = _fresh_check(model, check) if approximate and check is not None else None
    sets = [d.name for key, d in gate_set(model).items() if d.approximate and bool(plan.dead[key].any())]
    cut_by = sets_by_layer(model)
    before = _Snapshot(model)
    try:
        _cut(model, plan)
        change = {}
        if check is not None:
            args, kwargs, reference = check
            with full_width(model, approximate):  # their statistics as before the cut: every set is verified exactly
                _verify(reference, _run_slim(model, args, kwargs, cut_by), rtol)
            if approximate:  # then the approximate part, measured
                change["example_inputs"] = output_diff(reference, _run_slim(model, args, kwargs, cut_by))
                change["fresh_inputs"] = None if fresh is None else output_diff(fresh[2], _run_slim(model, *fresh[:2],
                                                                                                     cut_by))
    except BaseException:
        before.restore()  # a failed cut or verification leaves the gated model as it was
        raise
    if approximate:
        _label_approximate(model, sets, approximate, change)
        fix_attributes(model)  # again: a model-level fixer records the label too (a Hugging Face config)
    retire_replaced(before.parameters, model)  # an optimizer built before the cut now refuses to step
    return model


# -- the approximate LayerNorm cut (opt-in: {kind: hidden, layernorm: approximate}) ---------------------
APPROXIMATE_ATTR = "approximate_cut"  # on a slim model: what was cut approximately and the output change measured


def approximate_norms(model: nn.Module, plan: CutPlan) -> dict[str, tuple[int, int]]:
    """The LayerNorms (name -> (width, kept)) whose channels this cut removes: their statistics then
    run over fewer channels, so the slim model differs from the gated one (``rules.normalization.
    approximate_layer_norm``). Empty: the cut is exact."""
    found = {}
    for fqn, role in plan.attributes.items():
        module, _ = owner(model, fqn)
        gone = plan.removed[fqn][0]
        cls = type(module).__bases__[0] if parametrize.is_parametrized(module) else type(module)  # a gated layer's own
        if role == Role.RESCALE and cls is nn.LayerNorm and bool(gone.any()):
            found[fqn.rpartition(".")[0]] = (gone.numel(), int((~gone).sum()))
    return found


@contextmanager
def full_width(model: nn.Module, norms: dict[str, tuple[int, int]]):
    """While inside, each of these cut LayerNorms computes its statistics over its width before the
    cut (the removed channels counted as the zeros they were) with its weight and epsilon as before
    the rescale: what the gated model computed, so that the verification of a cut with approximate
    sets stays exact (a wrong channel removed anywhere, in these sets too, still shows)."""
    for name, (width, kept) in norms.items():
        module = model.get_submodule(name)
        module.forward = _full_width_forward(module, width, kept)
    try:
        yield
    finally:
        for name in norms:
            vars(model.get_submodule(name)).pop("forward", None)


def _full_width_forward(module: nn.LayerNorm, width: int, kept: int):
    ratio = width / kept

    def forward(x: torch.Tensor) -> torch.Tensor:
        h = x.double()
        mean = h.sum(-1, keepdim=True) / width
        var = ((h - mean) ** 2).sum(-1, keepdim=True) / width + (width - kept) / width * mean ** 2
        y = (h - mean) / torch.sqrt(var + module.eps / ratio) * (module.weight.double() / ratio ** 0.5)
        if module.bias is not None:
            y = y + module.bias.double()
        return y.to(x.dtype)
    return forward


def _fresh_check(model: nn.Module, check) -> tuple | None:
    """(args, kwargs, the gated model's output) on fresh random inputs like the example inputs (floats
    with their mean and spread, integers in their range, anything else as it is), to measure an
    approximate cut on inputs it was not verified on; None when the gated model does not run on them."""
    generator = torch.Generator().manual_seed(0)

    def like(t):
        if not isinstance(t, torch.Tensor) or t.dtype == torch.bool or t.numel() == 0:
            return t
        if t.is_floating_point():
            std = float(t.float().std()) if t.numel() > 1 else 1.0
            new = torch.randn(t.shape, generator=generator) * (std or 1.0) + float(t.float().mean())
        elif not t.is_complex():
            new = torch.randint(int(t.min()), int(t.max()) + 1, t.shape, generator=generator)
        else:
            return t
        return new.to(dtype=t.dtype, device=t.device)
    args, kwargs, _ = check
    args, kwargs = pytree.tree_map(like, (args, kwargs))
    try:
        reference = run(model, args, kwargs)
    except Exception:  # noqa: BLE001 - inputs the model does not take (an id out of a range it checks)
        return None
    return (args, kwargs, reference) if describe_mismatch(reference, reference) is None else None


def _label_approximate(model: nn.Module, sets: list[str], norms: dict, change: dict) -> None:
    """Record on the slim model (and in its checkpoints) that its cut was approximate, with the output
    change measured, and say so."""
    model.approximate_cut = {"sets": sets, "layer_norms": {k: list(v) for k, v in norms.items()},
                             "output_change": change or None}
    warn_user(f"dg.shrink: {describe_approximate(model.approximate_cut)}")


def describe_approximate(record: dict) -> str:
    """One line on an approximate cut (``model.approximate_cut``): where, and the output change measured."""
    norms = record["layer_norms"]
    change = record.get("output_change") or {}
    measured = ", ".join(f"{v:.3g} on the {k.replace('_', ' ')}" if v is not None else f"not measured on {k}"
                         for k, v in change.items()) or "not measured (verify=False, or no example inputs)"
    return (f"approximate cut (opt-in layernorm: approximate) of {', '.join(record['sets']) or 'the stream'}: "
            f"{len(norms)} LayerNorms now normalize over fewer channels; the slim model's output differs from the "
            f"gated one's by {measured} (of the largest output); recorded in model.{APPROXIMATE_ATTR}")


def _verification(model: nn.Module, example_inputs, example_kwargs):
    """(args, kwargs, the gated model's output) to verify a cut on: the inputs given, else the ones
    ``gate_model`` kept (on the model's device); None when there are none. Kept inputs on which the
    gated model does not run or gives an output that cannot show a difference are skipped with a
    warning: the user did not ask for this check."""
    if example_inputs is not None or example_kwargs:
        args, kwargs = as_tuple(example_inputs), dict(example_kwargs or {})
        return args, kwargs, run(model, args, kwargs)
    kept = gate_set(model).examples
    if kept is None:
        return None
    args, kwargs = on_device_of(kept, model)
    try:
        reference = run(model, args, kwargs)
        problem = describe_mismatch(reference, reference)
    except Exception as exc:  # noqa: BLE001 - e.g. a model cast to another dtype since gating
        problem = f"the gated model does not run on them now ({one_line(exc)})"
    if problem is None:
        return args, kwargs, reference
    warn_user(f"dg.shrink: the cut is not verified on the example inputs dg.gate_model was given: {problem}. "
              "Pass example_inputs (and example_kwargs) to dg.shrink to verify it.")
    return None


def _cut(model: nn.Module, plan: CutPlan) -> None:
    dead_branches = narrowed([branch for key, dgate in gate_set(model).items() if dgate.branches
                              for branch, dead in zip(dgate.branches, plan.dead[key].tolist()) if dead],
                             dict(gate_set(model).items()), plan.dead)
    sliced = _collapse(model, plan.removed)  # a gated tensor is collapsed and sliced at once: no full copy
    tied = tied_holders(model)
    for fqn, drop in plan.removed.items():
        if fqn not in plan.attributes and fqn not in sliced:
            _slice(model, fqn, drop, tied)
    values = {}
    for fqn, role in plan.attributes.items():
        gone = plan.removed[fqn][0]
        kept = int((~gone).sum())
        values[fqn] = kept if role == Role.COUNT else _rescale_rms_norm(model, fqn, gone.numel(), kept)
    set_cut_attributes(model, values)
    remove_branches(model, dead_branches)  # their tensors were cut to nothing: the layers go
    fix_attributes(model)  # after the attributes: a model-level fixer records them (a Hugging Face config)
    if plan.kept_inputs:
        model.kept_input_features = {name: torch.tensor(kept) for name, kept in plan.kept_inputs.items()}


class _Snapshot:
    """Enough of every module to undo a cut: its class, its attribute dict and its dicts of
    parameters, buffers and submodules. A cut replaces tensors and attributes and never writes
    into a tensor, so keeping the old objects (no copies) is enough."""

    def __init__(self, model: nn.Module):
        self.saved = [(m, type(m), self._state(m.__dict__)) for m in model.modules()]
        self.parameters = list(model.parameters())

    def restore(self) -> None:
        for module, cls, state in self.saved:
            module.__class__ = cls
            module.__dict__.clear()
            module.__dict__.update(self._state(state))

    @staticmethod
    def _state(attrs: dict) -> dict:
        """A module's attribute dict with its own dicts of tensors and submodules copied (a cut
        replaces their entries)."""
        return {k: (dict(v) if k in ("_parameters", "_buffers", "_modules") else v) for k, v in attrs.items()}


def _run_slim(model: nn.Module, example_inputs, kwargs, cut_by: dict[str, list[str]]):
    args, kwargs = select_features(model, example_inputs, kwargs)
    try:
        return run(model, args, kwargs)
    except Exception as exc:
        where = where_it_fails(model, args, kwargs, cut_by)
        raise ShrinkError(f"the slim model does not run on the example inputs: {where} ({one_line(exc)}). The model "
                          "was left gated; exclude those sets from the recipe (`dgate inspect` lists every "
                          "set).") from exc


def sets_by_layer(model: nn.Module) -> dict[str, list[str]]:
    """Layer name -> the gated sets (name and kind) that cut its tensors, from a gated model."""
    dgates = require_gated(model, "shrink").values()
    name_of = {id(m): name.partition(".parametrizations.")[0] for name, m in model.named_modules()}
    layers_of = {key: [name_of[id(m)] for m, _ in found] for key, found in tied_holders(model).items()}
    found: dict[str, list[str]] = {}
    for dgate in dgates:
        for cut in dgate.cuts:
            layers = [cut.fqn.rpartition(".")[0]]
            if cut.role not in ATTRIBUTE_ROLES:  # a tied weight: every layer using it
                layers = layers_of.get(id(primary(model, cut.fqn)), layers)
            for name in layers:
                names = found.setdefault(name, [])
                if f"'{dgate.name}' ({dgate.kind})" not in names:
                    names.append(f"'{dgate.name}' ({dgate.kind})")
    return found


def where_it_fails(model: nn.Module, args: tuple, kwargs: dict, cut_by: dict[str, list[str]]) -> str:
    """Where a slim model that raises on these inputs fails, as a phrase: the innermost layer running
    then, and the gated sets (``sets_by_layer`` of the gated model) whose cut of it or of the layers
    inside it left a size its forward uses behind."""
    running: list[str] = []

    def finished(module, args, output) -> None:
        running.pop()
    handles = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(lambda m, a, name=name: running.append(name)))
        handles.append(module.register_forward_hook(finished))
    try:
        run(model, args, kwargs)
    except Exception:  # noqa: BLE001 - the failure the caller reports; here only where it happens
        pass
    finally:
        for handle in handles:
            handle.remove()
    layer = running[-1] if running else ""
    where = (f"layer '{layer}' ({type(model.get_submodule(layer)).__name__})" if layer else
             f"the forward of {type(model).__name__} itself")
    sets = [s for name, names in cut_by.items() if not layer or name == layer or name.startswith(f"{layer}.")
            for s in names]
    cut = f"the cut of {', '.join(dict.fromkeys(sets))}" if sets else "the cut"
    return f"{where} fails: a size its forward uses did not follow {cut}"


def set_cut_attributes(model: nn.Module, values: dict) -> None:
    """Set the layer attributes no tensor shows (a count, a rescaled epsilon), in ``shrink`` and in
    ``load_slim`` from the manifest; the model keeps them in ``model.cut_attributes`` for saving."""
    for fqn, value in values.items():
        module, attr = owner(model, fqn)
        setattr(module, attr, value)
    if values:
        model.cut_attributes = {**getattr(model, "cut_attributes", {}), **values}


def _rescale_layer_norm(module: nn.LayerNorm, width: int, kept: int) -> float:
    """A LayerNorm cut approximately (opt-in): with the removed channels zero, the mean of squares over
    the kept ones is width/kept times the one over all, as under an RMS norm, so the RMS rescale
    (weight * sqrt(width/kept), epsilon * width/kept) keeps the output where the stream's mean is zero;
    the mean itself also grows by width/kept, which no rescale of the weight can undo (the change the
    cut measures). Returns the new epsilon."""
    weight = module.weight.detach()
    if kept != width:
        replace_tensor(module, "weight", (weight.double() * (width / kept) ** 0.5).to(weight.dtype))
    return module.eps * width / kept


def _rescale_rms_norm(model: nn.Module, fqn: str, width: int, kept: int) -> float:
    """An RMS norm whose mean of squares now runs over ``kept`` of ``width`` entries (the removed ones
    were exactly zero): its weight and epsilon rescaled by its formula (``rules.normalization.RMS_FORMULAS``;
    w * x / sqrt(S/width + eps) == (w * sqrt(width/kept)) * x / sqrt(S/kept + eps * width/kept)), it
    computes what it did. (A norm without a weight is never cut.) Returns the new epsilon."""
    module, attr = owner(model, fqn)
    if type(module) is nn.LayerNorm:  # an approximate cut (opt-in: rules.normalization.approximate_layer_norm)
        return _rescale_layer_norm(module, width, kept)
    found = rms_norm_of(module)
    if isinstance(found, str):  # the rule found it an RMS norm on the same module: only a changed module gets here
        raise ShrinkError(f"layer '{fqn.rpartition('.')[0]}' is no longer an RMS norm a cut can rescale: {found}")
    formula = found[1]
    weight = module.weight.detach()
    eps = getattr(module, attr)
    if eps is None:  # torch's RMSNorm default: the dtype's machine epsilon
        eps = torch.finfo(weight.dtype).eps
    if kept == width:
        return eps
    replace_tensor(module, "weight", formula.weight(weight.double(), width / kept).to(weight.dtype))
    return formula.eps(eps, width / kept)


def _collapse(model: nn.Module, removed: dict) -> set[str]:
    """Multiply every gate into its weights and drop the gates; a tensor in ``removed`` is sliced as
    it is collapsed (one tensor's full-size product at a time, never a full copy of the model's
    gated weights). Returns the names of the tensors it sliced.

    ``torch.nn.utils.parametrize.remove_parametrizations`` edits the class it made for the module,
    which ``copy.deepcopy`` shares between a model and its copy; shrinking a copy must not break
    the original, so a module whose only parametrizations are gates gets its own class back here.
    """
    sliced: set[str] = set()
    collapsed: dict[int, torch.Tensor] = {}  # a tied weight's primary -> its collapsed value, shared by every holder
    for name, module in list(model.named_modules()):
        if not parametrize.is_parametrized(module):
            continue
        foreign = [attr for attr, plist in module.parametrizations.items()
                   if not all(isinstance(p, GateScale) for p in plist)]
        if foreign:
            raise ShrinkError(f"layer '{name}' has parametrizations besides its gates (on {', '.join(foreign)}): "
                              "remove them (torch.nn.utils.parametrize.remove_parametrizations) before shrinking")
        values = {}
        with torch.no_grad():
            for attr, plist in module.parametrizations.items():
                fqn = f"{name}.{attr}" if name else attr
                drop = removed.get(fqn)
                if id(plist.original) in collapsed:  # a later use of a tied weight: the first holder's value
                    values[attr] = (collapsed[id(plist.original)], None)
                    continue
                value = getattr(module, attr).detach()
                if drop is not None:
                    value = _sliced(value, drop, plist.original)
                    sliced.add(fqn)
                elif value.data_ptr() == plist.original.data_ptr():
                    value = value.clone()  # never share storage with the primary weight the snapshot keeps
                values[attr] = (value, plist.original)
        module.__class__ = type(module).__bases__[0]
        del module._modules["parametrizations"]
        for attr, (value, original) in values.items():
            if original is None:
                module._parameters[attr] = value
            else:
                collapsed[id(original)] = replace_tensor(module, attr, value, like=original)
    delattr(model, GATES_ATTR)
    return sliced


def _slice(model: nn.Module, fqn: str, drop: dict[int, torch.Tensor], tied: dict) -> None:
    module, attr = owner(model, fqn)
    old = getattr(module, attr)
    replace_tensor(module, attr, _sliced(old.detach(), drop, old), tied=tied.get(id(old), ()))


def _sliced(tensor: torch.Tensor, drop: dict[int, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """``tensor`` without the positions ``drop`` marks along each dim, in ``like``'s memory format."""
    new = tensor
    for dim, gone in sorted(drop.items()):
        if gone.ndim == 2:  # per expert (dim 0 never cut): each expert's matrix keeps its own positions
            kept = [(~row).nonzero().reshape(-1) for row in gone]
            if len({k.numel() for k in kept}) > 1 or 0 in drop:
                raise ShrinkError(f"a per-expert cut left experts of unequal widths along dim {dim} "
                                  f"({[k.numel() for k in kept]}): the fused tensor cannot stay rectangular")
            new = torch.stack([new[e].index_select(dim - 1, k.to(new.device)) for e, k in enumerate(kept)])
            continue
        new = new.index_select(dim, (~gone).nonzero().reshape(-1))
    # channels_last stays; no second copy when index_select already gave the format (a copy per tensor
    # of a large model fragments the heap: freed blocks of uneven sizes that are never reused)
    fmt = memory_format(like)
    return new if new is not tensor and new.is_contiguous(memory_format=fmt) else new.clone(memory_format=fmt)


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


def _verify(reference, slim, rtol: float | None) -> None:
    problem = describe_mismatch(reference, slim)
    if problem is not None:
        raise ShrinkError(f"cannot verify the slim model against the gated one: {problem}. Pass example inputs on "
                          "which the gated model gives a finite, non-zero output")
    rtol = tolerance(reference) if rtol is None else rtol
    diff = output_diff(reference, slim)
    if diff > rtol:
        raise ShrinkError(f"the slim model's output differs from the gated model's by {diff:.3g} of its largest "
                          f"value (tolerance {rtol:g}), so the cut was undone and the model is still gated: the "
                          "groups below the threshold were not exactly zero. Lower the threshold, or pass a larger "
                          "rtol if near-zero groups are meant to go.")


# -- an optimizer built before shrink --------------------------------------------------------------
# parameters a cut replaced, by id (a WeakSet would compare tensors with ==), each entry gone with its tensor
_REPLACED: dict[int, weakref.ref] = {}
_STEP_HOOK: list = []  # the handle of the optimizer step pre-hook, once registered


def retire_replaced(before: list[nn.Parameter], model: nn.Module) -> None:
    """After ``shrink``: the parameters of ``before`` that ``model`` no longer has (every weight a cut
    sliced or collapsed, every gate) are marked, and a step of any optimizer that still holds one is
    an error (it would update tensors the model no longer uses, silently: the slim model would never
    train). Registers the global optimizer step pre-hook once."""
    kept = {id(p) for p in model.parameters()}
    for p in before:
        if id(p) not in kept:
            _REPLACED[id(p)] = weakref.ref(p, lambda _, key=id(p): _REPLACED.pop(key, None))
    if not _STEP_HOOK:
        _STEP_HOOK.append(register_optimizer_step_pre_hook(_refuse_replaced))


def _refuse_replaced(optimizer, args, kwargs) -> None:
    if not _REPLACED:
        return
    stale = sum(_is_replaced(p) for group in optimizer.param_groups for p in group["params"])
    if stale:
        raise ShrinkError(f"{type(optimizer).__name__}.step(): {stale} of its parameters were replaced by dg.shrink "
                          "(the slim model's weights are new tensors), so this step would not train the slim model; "
                          "build a new optimizer from the slim model after shrinking (e.g. "
                          "torch.optim.AdamW(slim.parameters(), lr=...))")


def _is_replaced(p: torch.Tensor) -> bool:
    ref = _REPLACED.get(id(p))
    return ref is not None and ref() is p
