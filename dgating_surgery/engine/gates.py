"""Stage 3: gates. ``gate_model`` inserts one ``DGate`` per selected group set and reparametrizes
every parameter slice the gate must scale (``torch.nn.utils.parametrize``), so the model stays the
user's object and class, and the gate costs a scaling of parameters, not a pass over activations.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from . import gate_modes
from .gate_modes import GateScale
from . import groups as groups_mod
from . import extensions
from . import tracing
from .centering import center_layernorms
from ..errors import CheckpointError, GatingError, NotGatedError
from .execution import as_tuple, describe_mismatch, detached, output_diff, run, tolerance
from .kinds import KINDS, POLICY, Role
from .precision import LOW_PRECISION, balanced_split
from .recipe import Recipe, load_recipe
from .rules import has_module_rule
from .rules.normalization import LAYERNORM_OPT_INS
from .tensors import along, get_tensor, owner, tied_holders
from .wrappers import PEFT_ORDER, accepts_wrapped, check_gateable, warn_user

GATES_ATTR = "dgates"


@dataclass
class Cut:
    """One parameter/buffer slice a gate is tied to: ``index[i]`` is the group (or -1) of position
    i along ``dim``; ``scale[i]`` the same where the gate scales that slice (else -1). Both are 1-D
    (length 1 when one group owns the whole dim). A per-expert cut (``lead``, the dim of a stack of
    expert matrices, before ``dim``) has 2-D ones: ``index[e, i]``, position i of expert e's matrix."""

    fqn: str
    role: Role
    dim: int
    index: torch.Tensor
    scale: torch.Tensor
    lead: int | None = None

    def plane(self, shape, of: torch.Tensor | None = None) -> torch.Tensor:
        """``index`` (or ``of``, shaped like it) expanded to the tensor's ``shape`` along the cut's
        dims: (size,), or (experts, size) for a per-expert cut."""
        t = self.index if of is None else of
        return t.expand(shape[self.dim]) if self.lead is None else t.expand(shape[self.lead], shape[self.dim])

    def placed(self, values: torch.Tensor, ndim: int) -> torch.Tensor:
        """``values`` over the cut's dims (shaped as ``plane``'s) viewed to broadcast over the tensor."""
        return placed(values, self.dim, ndim, self.lead)

    def entries_per_position(self, shape) -> int:
        """Tensor entries per position of the plane (the entries a group's position owns)."""
        return torch.Size(shape).numel() // (shape[self.dim] * (1 if self.lead is None else shape[self.lead]))


def placed(values: torch.Tensor, dim: int, ndim: int, lead: int | None = None) -> torch.Tensor:
    """A 1-D vector along ``dim`` (or a 2-D one along ``lead`` and ``dim``) viewed in ``ndim`` dims."""
    if lead is None:
        return along(values, dim, ndim)
    shape = [1] * ndim
    shape[lead], shape[dim] = values.shape
    return values.reshape(shape)


class DGate(nn.Module):
    """D-Gating factors of one group set: ``factors`` has shape (D-1, num_groups) and the gate of
    group j is ``factors[:, j].prod()``. Also records which parameter slices belong to each group,
    so that ``shrink`` can cut the model without tracing it again. Only ``factors`` is state: the
    rest follows from the architecture (gating is deterministic), so a gated model's state_dict
    holds only tensors, as Hugging Face, safetensors and ONNX tools expect."""

    def __init__(self, name: str, kind: str, modules: list[str], module_types: list[str], num_groups: int,
                 D: int, cuts: list[Cut], positions: list[list[int]] | None = None, width: int | None = None,
                 per_group: int = 1, branches: list | None = None, kv_of: list | None = None,
                 approximate: str | None = None, experts: int | None = None):
        super().__init__()
        self.factors = nn.Parameter(torch.ones(D - 1, num_groups))
        self.name, self.kind = name, kind
        self.modules, self.module_types = list(modules), list(module_types)
        self.cuts = cuts
        self.positions = positions  # kinds that record their input: the input features each group owns
        self.width = width  # kinds that record their input: how many features the input has
        self.per_group = per_group  # entries of the first layer per group (query heads per kv group)
        self.branches = branches  # kind blocks: per group, the layers removing it replaces (``branches.Branch``)
        self.kv_of = kv_of  # kind query_heads: per group, its kv group's index (-1: a kv group; ``GroupSet.kv_of``)
        # why cutting its groups changes the function (a LayerNorm's statistics, opt-in): shrink measures it
        self.approximate = approximate
        # per-expert neurons: E experts, group e * (num_groups // E) + j is neuron j of expert e (``GroupSet.experts``)
        self.experts = experts

    @property
    def D(self) -> int:
        return self.factors.shape[0] + 1

    @property
    def num_groups(self) -> int:
        return self.factors.shape[1]

    def gate(self) -> torch.Tensor:
        """The gate value of every group: the product of its D-1 factors, written as products of
        rows (every exporter folds them; the legacy ONNX exporter mis-folds a ReduceProd here, and
        ``prod``'s backward checks for zeros on every training step)."""
        factors = self.factors
        if factors.shape[0] == 1:
            return factors.view(-1)
        rows = factors.unbind(0)
        gate = rows[0]
        for row in rows[1:]:
            gate = gate * row
        return gate

    def extra_repr(self) -> str:
        approximate = ", approximate" if self.approximate else ""
        return f"{self.name!r}, kind={self.kind}{approximate}, groups={self.num_groups}, D={self.D}"


class DGateSet(nn.ModuleDict):
    """The gates of a model, registered as ``model.dgates`` so that they train, save and load
    with it. Keeps the recipe they were made from and the example inputs ``gate_model`` was given
    (``examples``: (args, kwargs), detached, or None; not state, so not saved), on which ``shrink``
    verifies a cut when it is given none."""

    def __init__(self, gates: dict[str, DGate], recipe: Recipe):
        super().__init__(gates)
        self.recipe = recipe
        self.examples = None

    def forward(self, x):
        """Identity: a gated ``nn.Sequential`` calls its children in turn, this one included."""
        return x


def gate_set(model: nn.Module) -> DGateSet | None:
    found = getattr(model, GATES_ATTR, None)
    return found if isinstance(found, DGateSet) else None


def require_gated(model: nn.Module, what: str, hint: str = "") -> DGateSet:
    """The gates of ``model``, or a ``NotGatedError`` saying that ``what`` needs a gated model."""
    found = gate_set(model)
    if found is None:
        raise NotGatedError(f"{type(model).__name__} is not gated: {what} needs a model from dg.gate_model(model, "
                            f"recipe, example_inputs){f' ({hint})' if hint else ''}")
    return found


@accepts_wrapped()
def gates(model: nn.Module) -> list[DGate]:
    """The ``DGate`` modules of a gated model (each knows its name, kind, layers and group count)."""
    found = gate_set(model)
    return list(found.values()) if found is not None else []


def analyze(model: nn.Module, example_inputs=None, example_kwargs=None, recipe=None) -> groups_mod.Plan:
    """Trace ``model`` and discover its group sets (what ``dgate inspect`` shows). ``recipe``: the
    one the plan is for, when it changes discovery (kind ``query_heads`` splits grouped-query
    attention into query heads and key/value groups: ``groups.discover``)."""
    extensions.load()  # rules for the layers of optional libraries the user's code imported
    specs = load_recipe(recipe).groups if recipe is not None else ()
    query_heads = any(g.kind == "query_heads" for g in specs)
    approximate = any(g.layernorm == "approximate" for g in specs)  # LayerNorm streams cut approximately (opt-in)
    return groups_mod.discover(tracing.capture(model, example_inputs, example_kwargs, is_leaf=has_module_rule),
                               query_heads=query_heads, approximate_layernorm=approximate)


def select(plan: groups_mod.Plan, recipe: Recipe, model_name: str = "the model") -> list[groups_mod.GroupSet]:
    """The group sets the recipe asks for that have at least one exactly removable group.

    An entry with selectors (modules/names) that matches nothing is an error (a typo is the usual
    cause), and so is a recipe that matches nothing at all; a bare ``kind`` whose groups the model
    has but cannot remove (neurons in a CNN whose only linear layer is the classifier) is a warning
    that says why, and one the model has none of (heads in a CNN) goes without a word.
    """
    chosen, unmatched = [], []
    for i, spec in enumerate(recipe.groups):
        hits = [s for s in plan.sets if spec.matches(s.kind, s.modules, s.module_types) and _offered(spec, s)]
        if not hits:
            unmatched.append((i, spec))
        chosen.extend(s for s in hits if not any(s is c for c in chosen))
    for i, spec in unmatched:
        of_kind = [s for s in plan.sets if s.kind == spec.kind]
        available = [s.name for s in of_kind if _offered(spec, s)]
        why = next(((s.name, r) for s in of_kind for r in s.reasons if r is not None), None)
        if why is None and spec.kind == "hidden" and not spec.layernorm and not spec.center_layernorm:
            why = ("its residual stream", "a hidden set is made by the RMS norms reading the stream; under LayerNorm "
                                          f"a recipe may opt in with {LAYERNORM_OPT_INS}")
        if why is None and spec.kind == "query_heads" and any(s.kind == "heads" for s in plan.sets):
            why = ("its attention layers", "no key/value head is read by several query heads in a form the query-heads "
                                           "rule reads (`enable_gqa`, one key/value head broadcast to all, repeat_kv's "
                                           "expand and merge, a fused projection sliced where its parts meet), or the "
                                           "query heads of a group are tied before the attention (Falcon's new decoder "
                                           "architecture views each group's query heads, key and value together): "
                                           "kind heads gates whole key/value groups")
        hint = (f"exactly removable {spec.kind} sets here: {', '.join(available[:8])}"
                f"{' ...' if len(available) > 8 else ''}" if available else
                f"{model_name} has no exactly removable {spec.kind}"
                f"{f' (e.g. {why[0]}: {why[1]})' if why else ''}")
        message = (f"recipe {recipe.source}: groups[{i}] {spec.describe()} matched nothing in {model_name}; "
                   f"{hint}")
        if spec.modules or spec.names or not chosen:
            raise GatingError(f"{message}. Change the selectors or remove the entry (`dgate inspect` lists "
                              "every set).")
        if of_kind:
            warn_user(message)
    order = {id(s): i for i, s in enumerate(plan.sets)}  # by identity: == on sets compares their arrays
    chosen.sort(key=lambda s: order[id(s)])
    return chosen


def gate_model(model: nn.Module, recipe, example_inputs=None, example_kwargs=None) -> nn.Module:
    """Insert D-Gating factors on the groups ``recipe`` selects; returns the same model object.

    The network function is unchanged: with ``init: ones`` every gate is 1; with ``init: balanced``
    each group's factors and primary weights are rescaled to equal norms, ||theta_j|| = |gamma_j,d|
    = ||w_j||^(1/D), whose product is the original weight. The example inputs are kept (not copied)
    so that ``shrink`` can verify its cut on them.
    """
    recipe = load_recipe(recipe)
    _refuse_gated(model)
    check_gateable(model)  # wrappers, PEFT adapters, existing parametrizations: refused with the order to use
    centring = None
    if any(g.center_layernorm for g in recipe.groups):  # opt-in: a pre-LayerNorm stream made RMS-normed, exactly
        centring = center_layernorms(model, example_inputs, example_kwargs)
    try:
        plan = analyze(model, example_inputs, example_kwargs, recipe)
        examples = (as_tuple(example_inputs), dict(example_kwargs or {}))
        _apply(model, plan, recipe, _Unchanged(model, *examples))
    except BaseException:
        if centring is not None:
            centring.undo()  # a refusal leaves the model as it was
        raise
    gate_set(model).examples = detached(examples)
    return model


def _refuse_gated(model: nn.Module) -> None:
    if gate_set(model) is not None:
        raise GatingError(f"{type(model).__name__} is already gated (it has model.{GATES_ATTR}); shrink it, "
                          "or gate a fresh copy")


def apply_plan(model: nn.Module, plan: groups_mod.Plan, recipe) -> nn.Module:
    """Gate ``model`` from a plan ``analyze`` made of it (lets a caller inspect the plan first).
    Unlike ``gate_model`` it has no example inputs, so it does not check that the function is kept."""
    return _apply(model, plan, recipe, None)


def _apply(model: nn.Module, plan: groups_mod.Plan, recipe, unchanged: _Unchanged | None) -> nn.Module:
    recipe = load_recipe(recipe)
    _refuse_gated(model)
    chosen = select(plan, recipe, type(model).__name__)
    built = _build_gates(plan, chosen, recipe.D)
    _register_scales(model, built.values())  # every gate 1 for now: the weights are untouched
    model.add_module(GATES_ATTR, DGateSet(built, recipe))
    if unchanged is not None:
        unchanged.check_every_use_is_gated()
    if recipe.init == "balanced":
        if unchanged is None:
            _balance(model, list(built.values()), recipe.D)
        else:
            unchanged.balance(list(built.values()), recipe.D)
    model.register_load_state_dict_pre_hook(refuse_ungated_state)  # a clear error for an ungated state_dict
    return model


class _Unchanged:
    """The guard of ``gate_model``: the gated model must compute what the model computed on the
    example inputs. Two checks. Before the balanced init (every gate 1, weights untouched), every
    gate is doubled while the weight slices it scales are halved: powers of two, so every gated
    weight ``theta * gate`` is bit for bit what it was, and an output that moves shows a use of a
    weight that bypasses its gate (a tied weight gated in one of its uses); the gates that do so
    are named, and the model is restored exactly. Then the balanced init (``balance``), checked the
    same way. An output that cannot show a difference (all zeros, not finite), or that differs
    between two runs of the same weights (a forward that samples), is not checked."""

    def __init__(self, model: nn.Module, args: tuple, kwargs: dict):
        self.model, self.args, self.kwargs = model, args, kwargs
        self.reference = run(model, args, kwargs)
        self.checkable = describe_mismatch(self.reference, self.reference) is None
        self.rtol = tolerance(self.reference)

    def _diff(self) -> float:
        return output_diff(self.reference, run(self.model, self.args, self.kwargs))

    def _varies(self) -> bool:
        """Whether two runs of the model as it is now differ (a forward that samples): asked only
        after a check failed, since such a model fails every check."""
        first, second = (run(self.model, self.args, self.kwargs) for _ in range(2))
        return output_diff(first, second) > self.rtol

    def _moved(self) -> float | None:
        """How far the output moved, or None when that is within the tolerance or cannot be judged."""
        if not self.checkable:
            return None
        diff = self._diff()
        return None if diff <= self.rtol or self._varies() else diff

    def _culprits(self, dgates: list[DGate], alone) -> list[DGate]:
        """The gates whose change alone moves the output; ``alone(dgate)``: a context with it changed."""
        culprits = []
        for dgate in dgates:
            with alone(dgate):
                if self._diff() > self.rtol:
                    culprits.append(dgate)
        return culprits

    def check_every_use_is_gated(self) -> None:
        dgates = list(gate_set(self.model).values())
        with _doubled(self.model, dgates):
            diff = self._moved()
        if diff is None:
            return
        culprits = self._culprits(dgates, lambda g: _doubled(self.model, [g]))
        _ungate(self.model)
        names, exclude = _named(culprits)
        advice = (f"a weight of the group set(s) {names} is also used where its gate does not reach. The model was "
                  f"left ungated; exclude them in the recipe ({exclude})" if culprits else
                  "a weight is used where its gate does not reach (no one set alone shows it). The model was left "
                  "ungated")
        raise GatingError(f"gating {type(self.model).__name__} would change its output (by {diff:.3g} of its largest "
                          f"value on the example inputs): {advice}; please report the model.")

    def balance(self, dgates: list[DGate], D: int) -> None:
        """The balanced init, checked. Its split (``precision.balanced_split``) rounds every weight it
        scales by a unit in the last place; where the model amplifies that beyond the tolerance (a
        division by a sum that nearly cancels, an output that is itself rounding noise), the sets whose
        rounding alone shows (else all) are balanced with powers of two instead, which keep the
        function bit for bit and the factors balanced within a factor of 2; a warning names them. An
        output that moves even then shows a use of a weight its gate does not reach (a scale-invariant
        use hides from the doubled check): the model is restored bit for bit, left ungated, and the
        sets are named."""
        undo = _balance(self.model, dgates, D, undoable=True)
        rounded = self._moved()
        if rounded is None:
            return
        undo()
        model = type(self.model).__name__
        amplifying = self._culprits(dgates, lambda g: _balanced(self.model, [g], D))
        for exact in [amplifying] * (0 < len(amplifying) < len(dgates)) + [dgates]:
            undo = _balance(self.model, dgates, D, exact, undoable=True)
            diff = self._moved()
            if diff is None:
                which = f"the group set(s) {_named(exact)[0]}" if exact is amplifying else "all its sets"
                warn_user(f"the balanced init moved {model}'s output by {rounded:.3g} of its largest value on the "
                          f"example inputs (tolerance {self.rtol:g}): the model amplifies the rounding of the weights"
                          f"{f' of {_named(amplifying)[0]}' if amplifying else ''}; the gates of {which} were "
                          "balanced with powers of two instead (the output bit for bit the same, the factors balanced "
                          "within a factor of 2)")
                return
            undo()
        culprits = self._culprits(dgates, lambda g: _balanced(self.model, [g], D, [g]))
        _ungate(self.model)
        names, exclude = _named(culprits)
        where = (f"a weight of the group set(s) {names} is also used where its gate does not reach" if culprits else
                 "a weight is used where its gate does not reach (no one set alone shows it)")
        raise GatingError(f"the balanced init changed {model}'s output by {diff:.3g} of its largest value on the "
                          f"example inputs (tolerance {self.rtol:g}) even with powers of two, which round nothing: "
                          f"{where}. The model was left ungated, its weights as they were; use `init: ones` in the "
                          f"recipe{f' or exclude them ({exclude})' if culprits else ''}; please report the model.")


def _named(dgates: list[DGate]) -> tuple[str, str]:
    """The sets of ``dgates`` as a message names them, and the recipe line that excludes them."""
    names = ", ".join(f"'{g.name}' ({g.kind})" for g in dgates)
    return names, "exclude: [" + ", ".join(f'"{g.modules[0]}"' for g in dgates) + "]"


@contextmanager
def _balanced(model: nn.Module, dgates: list[DGate], D: int, exact: Sequence[DGate] = ()) -> Iterator[None]:
    """The balanced init of ``dgates`` for the block; undone bit for bit after."""
    undo = _balance(model, dgates, D, exact, undoable=True)
    try:
        yield
    finally:
        undo()


@contextmanager
def _doubled(model: nn.Module, dgates) -> Iterator[None]:
    """Every gate of ``dgates`` doubled and the weight slices it scales halved, for the block."""
    with torch.no_grad():
        for dgate in dgates:
            dgate.factors[0].mul_(2)
            scale_groups_(model, dgate, torch.full((dgate.num_groups,), 0.5, dtype=torch.float64))
    try:
        yield
    finally:
        with torch.no_grad():
            for dgate in dgates:
                dgate.factors[0].div_(2)
                scale_groups_(model, dgate, torch.full((dgate.num_groups,), 2.0, dtype=torch.float64))


def _ungate(model: nn.Module) -> None:
    """Remove the gates ``_apply`` registered, leaving the primary weights as the model's weights."""
    for module in list(model.modules()):
        if parametrize.is_parametrized(module):
            for attr in list(module.parametrizations):
                parametrize.remove_parametrizations(module, attr, leave_parametrized=False)
    delattr(model, GATES_ATTR)


def _build_gates(plan, chosen, D) -> dict[str, DGate]:
    """One DGate per chosen set, holding for every tied tensor which group owns each position
    (``index``) and where the gate scales it (``scale``, by the group's policy)."""
    n = plan.root_of.size
    gate_of = np.full(n, -1, dtype=np.int64)
    group_of = np.full(n, -1, dtype=np.int64)
    scaled = {role: np.zeros(n, dtype=bool) for role in Role}
    for k, gset in enumerate(chosen):
        roots = gset.roots[gset.removable]
        gate_of[roots] = k
        group_of[roots] = np.arange(roots.size)
        for r, pol in zip(roots.tolist(), [p for p, ok in zip(gset.policies, gset.removable) if ok]):
            for role in POLICY[pol].scales:
                scaled[role][r] = True
    cuts: list[list[Cut]] = [[] for _ in chosen]
    experts = [gset.experts for gset in chosen]
    gset_sizes = [int(gset.removable.sum()) for gset in chosen]
    for att in plan.attachments:
        roots = plan.roots(att.ids)
        valid = roots >= 0
        safe = np.where(valid, roots, 0)
        for k in np.unique(gate_of[roots[valid]]):
            if k < 0:
                continue
            mine = valid & (gate_of[safe] == k)
            index = np.where(mine, group_of[safe], -1)
            dim, index_along = groups_mod.profile(index, att)
            _, scale_along = groups_mod.profile(np.where(mine & scaled[att.role][safe], index, -1), att, dim)
            if experts[k] is not None:  # group j of every expert: e * J + j along the experts' dim 0
                _add_cut(cuts[k], Cut(att.fqn, att.role, dim, *(_per_expert(t, experts[k], int(gset_sizes[k]))
                                                               for t in (index_along, scale_along)), lead=0))
                continue
            _add_cut(cuts[k], Cut(att.fqn, att.role, dim, index_along, scale_along))
    built, used = {}, set()
    for k, gset in enumerate(chosen):
        key = gset.modules[0].replace(".", "_") or "input"
        while key in used:
            key += "_"
        used.add(key)
        records = KINDS[gset.kind].records_input
        positions = [p for p, ok in zip(gset.positions, gset.removable) if ok] if records else None
        modules, types, branches = gset.modules, gset.module_types, gset.branches
        if branches:  # a set named group by group (residual branches): the gated groups' names
            modules, types, branches = ([v for v, ok in zip(column, gset.removable) if ok]
                                        for column in (modules, types, branches))
        built[key] = DGate(gset.name, gset.kind, modules, types, int(gset.removable.sum()) * (gset.experts or 1), D,
                           cuts[k], positions, gset.width, gset.per_group, branches, gset.kv_of,
                           approximate=gset.approximate, experts=gset.experts)
    return built


def _offered(spec, gset) -> bool:
    """Whether recipe entry ``spec`` may take set ``gset``: it has removable groups, and an approximate
    set (a LayerNorm's statistics) only where the entry opted in."""
    return bool(gset.removable.any()) and (gset.approximate is None or spec.layernorm == "approximate")


def _per_expert(along_dim: torch.Tensor, experts: int, groups: int) -> torch.Tensor:
    """A per-position group index (j or -1) as one row per expert: e * groups + j (or -1)."""
    offsets = torch.arange(experts).unsqueeze(1) * groups
    return torch.where(along_dim >= 0, along_dim.unsqueeze(0) + offsets, -1)


def _add_cut(cuts: list[Cut], new: Cut) -> None:
    """A layer called twice attaches the same slices twice; tied, they are one cut."""
    for i, cut in enumerate(cuts):
        if (cut.fqn, cut.role, cut.dim, cut.lead) == (new.fqn, new.role, new.dim, new.lead):
            index, scale = (torch.where(a >= 0, a, b) for a, b in
                            (torch.broadcast_tensors(cut.index, new.index), torch.broadcast_tensors(cut.scale, new.scale)))
            cuts[i] = Cut(cut.fqn, cut.role, cut.dim, index, scale, cut.lead)
            return
    cuts.append(new)


def primary(model: nn.Module, fqn: str) -> torch.Tensor:
    """The stored primary weight theta of a gated tensor (its value without the gate); the tensor
    itself while it is not parametrized yet."""
    module, attr = owner(model, fqn)
    if parametrize.is_parametrized(module, attr):
        return module.parametrizations[attr].original
    return getattr(module, attr)


def group_sq_sums(model: nn.Module, dgate: DGate, of: str = "weights", dtype=None) -> torch.Tensor:
    """Sum of squares of each group's gated entries (differentiable): of the weights as the network
    uses them ("weights", gates multiplied in; what the threshold compares) or of the primary
    weights alone ("theta"). ``dtype``: of the sums (default: the factors')."""
    acc = dgate.factors.new_zeros(dgate.num_groups, dtype=dtype)
    for cut in dgate.cuts:
        if not (cut.scale >= 0).any():
            continue
        value = primary(model, cut.fqn) if of == "theta" else get_tensor(model, cut.fqn)
        other = [d for d in range(value.ndim) if d not in (cut.dim, cut.lead)]
        per_pos = value.to(acc.dtype).pow(2)
        per_pos = per_pos.sum(dim=other) if other else per_pos
        scale = cut.plane(value.shape, cut.scale).to(per_pos.device)
        keep = scale >= 0
        acc = acc.index_add(0, scale[keep], per_pos[keep])
    return acc


def scale_groups_(model: nn.Module, dgate: DGate, factor: torch.Tensor) -> None:
    """Multiply the primary weights of each group j (the slices its gate scales) by ``factor[j]``."""
    with torch.no_grad():
        per_group = torch.cat([torch.ones(1, dtype=factor.dtype), factor])  # position 0: entries of no group
        for cut in dgate.cuts:
            if (cut.scale >= 0).any():
                theta = primary(model, cut.fqn)
                theta.mul_(cut.placed(per_group[cut.scale + 1], theta.ndim).to(theta.dtype))


def _balance(model: nn.Module, dgates: list[DGate], D: int, exact: Sequence[DGate] = (), undoable: bool = False):
    """Balanced init: gamma_{j,d} = ||w_j||^(1/D), theta_j = w_j / ||w_j||^((D-1)/D); for the gates of
    ``exact`` and those of bfloat16/float16 weights the nearest powers of two (``precision.balanced_split``).
    ``undoable``: returns the function that undoes it bit for bit (a power-of-two split is divided
    back out; for a rounding one a copy of the weights it scales is kept until then)."""
    splits, copies = [], {}
    with torch.no_grad():
        for dgate in dgates:
            norm = group_sq_sums(model, dgate, dtype=torch.float64).sqrt()
            norm = torch.where(norm > 0, norm, torch.ones_like(norm))
            scaled = [primary(model, c.fqn) for c in dgate.cuts if (c.scale >= 0).any()]
            split_exact = any(dgate is g for g in exact) or any(t.dtype in LOW_PRECISION for t in scaled)
            splits.append((dgate, *balanced_split(norm, D, split_exact), split_exact))
            if undoable and not split_exact:  # copied before any gate scales them
                copies.update((id(t), (t, t.clone())) for t in scaled)
        for dgate, factors, scale, _ in splits:
            dgate.factors.copy_(factors.to(dgate.factors.dtype))
            scale_groups_(model, dgate, scale)

    def undo() -> None:
        with torch.no_grad():
            for dgate, _, scale, split_exact in splits:
                if split_exact:  # powers of two: dividing restores every weight exactly
                    scale_groups_(model, dgate, 1 / scale)
                dgate.factors.fill_(1)
            for tensor, copy in copies.values():
                tensor.copy_(copy)

    return undo if undoable else None


def _register_scales(model: nn.Module, dgates) -> None:
    """One ``GateScale`` per gated parameter and dim, combining every gate that scales part of it
    (a DenseNet BatchNorm reads channels made by many layers; a first linear layer can have its
    input features and its neurons gated at once, one dim each)."""
    # a residual branch's gate scales its last layer's tensors whole: a parametrization of its own, composed
    # with those of the groups inside them (the channels of a ResNet block's last BatchNorm)
    per_param: dict[tuple[str, int, bool], list[tuple[DGate, Cut]]] = {}
    for dgate in dgates:
        for cut in dgate.cuts:
            if (cut.scale >= 0).any():
                per_param.setdefault((cut.fqn, cut.dim, cut.role == Role.BRANCH_OUTPUT), []).append((dgate, cut))
    holders = tied_holders(model)  # taken before any parametrization moves a tensor
    for (fqn, dim, _), entries in per_param.items():
        module, attr = owner(model, fqn)
        shape = getattr(module, attr).shape
        tied = holders.get(id(primary(model, fqn)), [(module, attr)])
        lead = next((cut.lead for _, cut in entries if cut.lead is not None), None)
        index = torch.full((shape[dim],) if lead is None else (shape[lead], shape[dim]), -1, dtype=torch.long)
        sources, offsets = [], {}
        for dgate, cut in entries:
            if id(dgate) not in offsets:
                offsets[id(dgate)] = sum(s.num_groups for s in sources)
                sources.append(dgate)
            scale = cut.scale.expand(index.shape)
            here = scale >= 0
            if (index[here] >= 0).any():
                raise GatingError(f"parameter '{fqn}' is tied to two gated sets ({dgate.name} and another) in ways the "
                                  "engine cannot combine; exclude one of them in the recipe (`dgate inspect` lists "
                                  "the sets)")
            index[here] = scale[here] + offsets[id(dgate)]
        scale = GateScale(sources, placed(index, dim, len(shape), lead))
        for holder, name in tied:  # a tied weight (embedding and output layer) is gated in every use
            parametrize.register_parametrization(holder, name, scale)
            if holder is not module:
                # its state_dict names the shared primary weight twice: Hugging Face's save_pretrained drops
                # the names that a ``_tied_weights_keys`` pattern (of any submodule, prefixed) marks as copies
                holder.parametrizations[name]._tied_weights_keys = {"original": f"{fqn.rpartition('.')[0]}."
                                                                                f"parametrizations.{attr}.original"}
    gate_modes.install(model)  # where a gate may act on a layer's output, it does so when that is cheaper


# -- gated state a user could lose -----------------------------------------------------------------
def frozen_gates(model: nn.Module) -> str | None:
    """A warning when gate factors are frozen (``requires_grad=False``): no group can die, and the
    usual cause, PEFT, also drops a LoRA adapter merged into a gated layer."""
    dset = gate_set(model)
    frozen = [key for key, g in (dset.items() if dset is not None else []) if not g.factors.requires_grad]
    if not frozen:
        return None
    return (f"the factors of {len(frozen)} of {len(dset)} gates are frozen (requires_grad=False, e.g. dgates.{frozen[0]}"
            "): they do not train, so D-Gating is inert there. PEFT's get_peft_model freezes them, and a LoRA adapter "
            f"merged into a gated layer (merge_and_unload) is silently dropped: {PEFT_ORDER}. Otherwise set "
            "requires_grad=True on the factors.")


def refuse_ungated_state(module: nn.Module, state_dict, prefix, *args) -> None:
    """``load_state_dict`` pre-hook of a gated model (``apply_plan`` registers it): a state_dict of
    the ungated model (``fc1.weight`` where the gated model stores ``fc1.parametrizations.weight.original``,
    and no gate factors) would load nothing into the gated layers (strict=False) or fail with a list
    of key names; say what happened and the order to use instead."""
    dset = gate_set(module)
    if dset is None or any(k.startswith(f"{prefix}{GATES_ATTR}.") for k in state_dict):
        return
    gated = sorted({c.fqn for g in dset.values() for c in g.cuts if (c.scale >= 0).any()})
    hits = [fqn for fqn in gated if prefix + fqn in state_dict]
    if not hits:
        return
    owner_name, _, attr = hits[0].rpartition(".")
    stored = f"{owner_name + '.' if owner_name else ''}parametrizations.{attr}.original"
    raise CheckpointError(
        f"load_state_dict: this state_dict is the ungated model's: it holds '{hits[0]}' (and {len(hits) - 1} more "
        f"gated tensors) by their plain names, where the gated model stores '{stored}' and its gate factors "
        f"('{GATES_ATTR}.*'). Load pretrained weights before gating: model.load_state_dict(state); gated = "
        "dg.gate_model(model, recipe, example_inputs) (the balanced init then starts from them). To resume a gated "
        "model, load the state_dict of a gated one (or use dg.save_gated / dg.load_gated).")
