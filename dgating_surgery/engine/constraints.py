"""Width constraints: the one place where a cut keeps dead groups to meet a constraint on the widths
it leaves (a multiple of 8, the same width in every layer a config states once).

``plan_cut`` first decides which groups are dead (collapsed norm under the threshold), then applies
its constraints in order. A kept dead group is exactly zero (or below the threshold), so keeping it
never changes the function: the cut stays exact, it only removes less.

The contract of a constraint: ``constraint(ctx, dead) -> dead``, where
- ``ctx`` is a ``WidthContext``: the model, its gates (key -> ``DGate``) and every group's collapsed
  norm (key -> float64 tensor), with helpers to read the widths a cut leaves;
- ``dead`` maps every gate key to a bool tensor over its groups (True: the cut removes it); a
  constraint sees all gates at once, since a constraint may span layers;
- it returns the same keys with some dead groups revived (True -> False), the strongest first
  (largest collapsed norm: ``revive``), and never kills an alive group. ``apply_constraints``
  checks that, and that every gate keeps at least one group.
Constraints compose: each one starts from the masks the previous one returned. ``plan_cut`` applies
the constraints every cut needs (``REQUIRED``, e.g. equal query heads per key/value group or equal
widths across a layer's experts, where a kind makes them; ``register_constraint``), then ``round_to``,
then ``uniform`` when asked (uniform widths that are multiples of N where the layers allow it).

Widths are counted along a *slot*: one (tensor, dim) that the cut narrows, e.g. a linear's output
rows. A gate's own layer slot is the first producer it cuts (for input features, the first
consumer). A ``WidthSet`` is a set of slots that must keep one width; a finder registered per model
class says which sets a model has (``register_width_sets``): the transformers plugin takes them from
the config fields that state a width once for all layers, any other model gets the layers at the
same place in repeated blocks.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..errors import ShrinkError
from .kinds import ATTRIBUTE_ROLES, Role
from .recipe import check_round_to


@dataclass(frozen=True)
class Slot:
    """A (tensor, dim) whose size is a width; ``unit``: positions per unit of it (a head's rows, so
    that a width counts heads), and the size must be a whole number of units."""

    fqn: str
    dim: int
    unit: int = 1


@dataclass
class WidthSet:
    """Slots that must keep one width (in units). ``label``: what states it (a config field, or a
    layer pattern). A slot no gate cuts keeps its full size, and so, under the constraint, does
    every slot of its set. ``pinned``: the label can state no width but the present one (a config
    field that also sizes a tensor out of proportion, a fused projection's rows or a head width it
    derives): every slot keeps its full size, whatever its units."""

    label: str
    slots: list[Slot]
    pinned: bool = False


@dataclass
class WidthSets:
    """What a finder returns: the sets, and ``accepts(targets)``, whether a choice of widths
    (label -> units) can be stated (e.g. a config class that refuses a hidden size that is not a
    multiple of the head count); None: any choice can."""

    sets: list[WidthSet] = field(default_factory=list)
    accepts: Callable[[dict[str, int]], bool] | None = None


Finder = Callable[[nn.Module, "WidthContext"], WidthSets]
WIDTH_SET_FINDERS: dict[type, Finder] = {}


def register_width_sets(cls: type, finder: Finder) -> None:
    """``finder(model, ctx) -> WidthSets``: the sets of layers that keep one width under
    ``uniform`` for root models of class ``cls`` (the most derived registered class wins)."""
    WIDTH_SET_FINDERS[cls] = finder


class WidthContext:
    """The model, its gates and their norms, as a constraint sees them."""

    def __init__(self, model: nn.Module, gates: dict, norms: dict[str, torch.Tensor]):
        self.model, self.gates, self.norms = model, gates, norms
        self._sizes: dict[tuple[str, int], int] = {}
        self._on: dict[tuple[str, int], list[tuple[str, torch.Tensor]]] | None = None

    def size(self, fqn: str, dim: int) -> int:
        """The slot's full size (the stored tensor's: no gated product is computed)."""
        if (fqn, dim) not in self._sizes:
            from .gates import primary
            self._sizes[fqn, dim] = int(primary(self.model, fqn).shape[dim])
        return self._sizes[fqn, dim]

    def cuts_on(self, fqn: str, dim: int) -> list[tuple[str, torch.Tensor]]:
        """(gate key, positions each of its groups has along the slot) of every gate cutting it; for
        a per-expert cut (``gates.Cut.lead``) one row per expert matrix (a plain cut: one row)."""
        if self._on is None:
            self._on = {}
            for key, dgate in self.gates.items():
                for cut in dgate.cuts:
                    if cut.role not in ATTRIBUTE_ROLES:
                        plane = cut.plane(_primary(self, cut.fqn).shape)
                        per_group = torch.stack([torch.bincount(row[row >= 0], minlength=dgate.num_groups)
                                                 for row in plane.reshape(-1, plane.shape[-1])])
                        self._on.setdefault((cut.fqn, cut.dim), []).append((key, per_group))
        return self._on.get((fqn, dim), [])

    def layer_slot(self, key: str) -> tuple[str, int] | None:
        """The slot a gate's layer width is read on: its first producer, else its first consumer,
        else its first tensor cut; None when it cuts no tensor."""
        cuts = [c for c in self.gates[key].cuts if c.role not in ATTRIBUTE_ROLES]
        if not cuts:
            return None
        ref = next((c for c in cuts if c.role == Role.PRODUCER), None) or next(
            (c for c in cuts if c.role == Role.CONSUMER), cuts[0])
        return ref.fqn, ref.dim

    def own_width(self, key: str, slot: tuple[str, int], dead: torch.Tensor) -> int:
        """The slot's width as this gate alone leaves it: positions of its kept groups plus the
        positions no group of this gate owns."""
        per_group = next(n for k, n in self.cuts_on(*slot) if k == key)
        return self.size(*slot) - int(per_group[:, dead].sum(-1).min())

    def width(self, fqn: str, dim: int, dead: dict[str, torch.Tensor]) -> int:
        """The slot's width after a cut with these dead masks (every gate cutting it counted); of
        per-expert matrices, the widest expert's (``experts`` gives them all that width)."""
        removed = sum((n[:, dead[key]].sum(-1) for key, n in self.cuts_on(fqn, dim)), torch.zeros(1, dtype=torch.long))
        return self.size(fqn, dim) - int(removed.min())


Constraint = Callable[[WidthContext, dict], dict]
REQUIRED: list[Constraint] = []  # applied to every cut, before round_to and uniform


def register_constraint(constraint: Constraint) -> None:
    """Make ``constraint`` part of every cut (a structure that is only valid at some widths)."""
    if constraint not in REQUIRED:
        REQUIRED.append(constraint)


def revive(norm: torch.Tensor, dead: torch.Tensor, done: Callable[[torch.Tensor], bool],
           monotone: bool = False) -> torch.Tensor | None:
    """``dead`` with the fewest of its strongest dead groups revived (largest norm first) for which
    ``done(mask)``; None if no number does. ``monotone``: once true, ``done`` stays true as more groups
    are revived (a width reaching a target), so the number is found by bisection."""
    order = sorted(dead.nonzero().reshape(-1).tolist(), key=lambda j: -float(norm[j]))

    def revived(k: int) -> torch.Tensor:
        out = dead.clone()
        out[order[:k]] = False
        return out
    if not monotone:
        return next((mask for mask in map(revived, range(len(order) + 1)) if done(mask)), None)
    low, high = 0, len(order)
    if not done(revived(high)):
        return None
    while low < high:
        mid = (low + high) // 2
        low, high = (low, mid) if done(revived(mid)) else (mid + 1, high)
    return revived(low)


def apply_constraints(ctx: WidthContext, dead: dict[str, torch.Tensor], constraints) -> dict[str, torch.Tensor]:
    """The dead masks after every constraint in turn, each checked against the contract, and again
    until none keeps another group (a later one may undo an earlier one: ``round_to`` keeping one
    query head breaks equal query heads per kv group); each only keeps groups, so this ends, and
    the masks then meet every constraint at once."""
    while True:
        start = {key: mask.clone() for key, mask in dead.items()}
        for constraint in constraints:
            new = constraint(ctx, dict(dead))
            for key, mask in dead.items():
                if set(new) != set(dead) or new[key].shape != mask.shape or bool((new[key] & ~mask).any()):
                    raise AssertionError(f"width constraint {getattr(constraint, '__name__', constraint)} killed an "
                                         f"alive group of gate '{key}' (a constraint may only keep dead groups)")
            dead = new
        if all(torch.equal(dead[key], mask) for key, mask in start.items()):
            return dead


def experts(ctx: WidthContext, dead: dict) -> dict:
    """Fused expert tensors (one matrix per expert: ``(E, out, in)``, more than 2 dims) stay
    rectangular, and their rows whole 16 bytes.

    Per-expert neurons (``DGate.experts``: group e * J + j is neuron j of expert e) die expert by
    expert, but every expert's matrix keeps one width: the expert that keeps the most neurons sets
    it, and every other expert keeps its strongest dead neurons up to it (exactly zero, so the cut
    stays exact). An expert whose neurons all died keeps that many too: no expert is ever removed
    whole, since that changes what the router's softmax and top-k pick (the router is never cut).

    Then grouped matrix multiplication (``torch.nn.functional.grouped_mm``, which transformers'
    experts call) refuses rows that are not whole 16 bytes. A gate that cuts the last dim of such a
    tensor cuts expert matrices (a conv weight's last dim is its kernel, never cut); it keeps its
    strongest dead groups (per expert: every expert's, to one width) until every matrix width it cuts
    is a multiple of 16 bytes (a width whose full size is not one is left alone: the model runs
    without aligned rows there). Neurons shared by every expert (``rules.structural.linear``) keep
    every expert at one width by construction."""
    for key, mask in dead.items():
        if getattr(ctx.gates[key], "experts", None):
            dead[key] = _equal_experts(ctx, key, mask)
    for key, mask in dead.items():
        slots = list(dict.fromkeys((c.fqn, c.dim) for c in ctx.gates[key].cuts if c.role not in ATTRIBUTE_ROLES))
        tensors = {fqn: _primary(ctx, fqn) for fqn, _ in slots}
        if not bool(mask.any()) or not any(tensors[fqn].ndim > 2 and dim == tensors[fqn].ndim - 1 for fqn, dim in slots):
            continue
        fused = [(fqn, dim, 16 // tensors[fqn].element_size()) for fqn, dim in slots
                 if tensors[fqn].ndim > 2 and dim >= tensors[fqn].ndim - 2]
        fused = [(fqn, dim, m) for fqn, dim, m in fused if ctx.size(fqn, dim) % m == 0]
        if getattr(ctx.gates[key], "experts", None):
            full = mask.numel() // ctx.gates[key].experts
            width = next((w for w in range(int((~mask).reshape(ctx.gates[key].experts, -1).sum(-1).max()), full + 1)
                          if all(ctx.width(fqn, dim, {**dead, key: _equal_experts(ctx, key, mask, w)}) % multiple == 0
                                 for fqn, dim, multiple in fused)), None)
            dead[key] = mask if width is None else _equal_experts(ctx, key, mask, width)
            continue
        aligned = revive(ctx.norms[key], mask, lambda m: all(
            ctx.width(fqn, dim, {**dead, key: m}) % multiple == 0 for fqn, dim, multiple in fused))
        dead[key] = mask if aligned is None else aligned
    return dead


def _equal_experts(ctx: WidthContext, key: str, mask: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """A per-expert gate's dead mask with every expert keeping ``width`` neurons (None: as many as the
    expert that keeps the most), each its strongest dead ones first."""
    E = ctx.gates[key].experts
    rows, norms = mask.reshape(E, -1).clone(), ctx.norms[key].reshape(E, -1)
    width = int((~rows).sum(-1).max()) if width is None else width
    for e in range(E):
        rows[e] = revive(norms[e], rows[e], lambda m: int((~m).sum()) >= width, monotone=True)
    return rows.reshape(-1)


def _primary(ctx: WidthContext, fqn: str) -> torch.Tensor:
    from .gates import primary
    return primary(ctx.model, fqn)


register_constraint(experts)


def equal_query_heads(ctx: WidthContext, dead: dict) -> dict:
    """The width constraint of a ``query_heads`` gate (``GroupSet.kv_of``): the attention computes
    query head h with key/value head h // r (r = query heads / kv heads, re-derived after the cut), so
    a key/value group goes only with all of its query heads, and every key/value group kept keeps the
    same number of query heads. A dead kv group that serves a live query head is kept; then every kept
    kv group keeps r query heads, r the most any keeps (at least one), its strongest dead ones first. A
    kv group whose query heads are all dead therefore goes whole when its own gate is dead too, and
    keeps r query heads when not (its value still reaches them)."""
    for key, mask in dead.items():
        kv_of = getattr(ctx.gates[key], "kv_of", None)
        if kv_of is None or not bool(mask.any()):
            continue
        kv_of, mask, norm = torch.tensor(kv_of), mask.clone(), ctx.norms[key]
        kv_groups = (kv_of == -1).nonzero().reshape(-1).tolist()
        for g in kv_groups:
            if mask[g] and not bool(mask[kv_of == g].all()):
                mask[g] = False
        kept = [g for g in kv_groups if not mask[g]] + ([-2] if bool((kv_of == -2).any()) else [])
        r = max([1] + [int((~mask[kv_of == g]).sum()) for g in kept])
        for g in kept:
            mine = kv_of == g
            mask[mine] = revive(norm[mine], mask[mine], lambda m: int((~m).sum()) >= r, monotone=True)
        dead[key] = mask
    return dead


register_constraint(equal_query_heads)


def round_to(multiple: int) -> Constraint:
    """Each gate's layer width a multiple of ``multiple`` (hardware-friendly widths), by keeping its
    strongest dead groups; a layer where no multiple can be reached (it is narrower than the next
    one) keeps nothing back."""
    multiple = check_round_to(multiple)

    def round_widths(ctx: WidthContext, dead: dict) -> dict:
        if multiple == 1:
            return dead
        for key, mask in dead.items():
            slot = ctx.layer_slot(key)
            if slot is None or not bool(mask.any()):
                continue
            rounded = revive(ctx.norms[key], mask, lambda m: ctx.own_width(key, slot, m) % multiple == 0)
            if rounded is not None:
                dead[key] = rounded
        return dead
    return round_widths


def uniform(ctx: WidthContext, dead: dict) -> dict:
    """Every width set keeps one width: the largest any of its slots keeps (a slot no gate cuts keeps
    its full size), reached by keeping each layer's strongest dead groups. When the finder does not
    accept those widths (a config class that wants the hidden size a multiple of the head count),
    one set grows, the one that reaches accepted widths alone at the fewest added entries."""
    found = width_sets(ctx)
    if not found.sets:
        return dead
    targets = _settle(ctx, dead, found.sets, {})
    if found.accepts is None or found.accepts(targets):
        return dead
    best = None
    for wset in [w for w in found.sets if not w.pinned]:  # the fewest units one set must grow by, then settled
        grown = next((u for u in range(targets[wset.label] + 1, _full_units(ctx, wset) + 1)
                      if found.accepts({**targets, wset.label: u})), None)
        if grown is None:
            continue
        trial = dict(dead)
        settled = _settle(ctx, trial, found.sets, {**targets, wset.label: grown})
        if found.accepts(settled) and (best is None or _entries(ctx, trial) < best[0]):
            best = (_entries(ctx, trial), trial)
    if best is None:
        raise ShrinkError(f"uniform widths: the model's configuration accepts none of the widths a cut can keep "
                          f"(from {targets}); shrink without uniform")
    return best[1]


def _full_units(ctx: WidthContext, wset: WidthSet) -> int:
    return min(ctx.size(s.fqn, s.dim) // s.unit for s in wset.slots)


def _entries(ctx: WidthContext, dead: dict) -> int:
    """Tensor entries the cut keeps along every cut slot (a measure of what padding costs)."""
    from .gates import primary
    total = 0
    for dgate in ctx.gates.values():
        for cut in dgate.cuts:
            if cut.role not in ATTRIBUTE_ROLES:
                numel = primary(ctx.model, cut.fqn).numel()
                total += numel // ctx.size(cut.fqn, cut.dim) * ctx.width(cut.fqn, cut.dim, dead)
    return total


def _settle(ctx: WidthContext, dead: dict, sets: list[WidthSet], floor: dict[str, int]) -> dict[str, int]:
    """Revive (in ``dead``) until every set's slots share one width, at least ``floor`` (label ->
    units; a pinned set: every slot its full size). Sets share gates (a head counts in the query and
    the key/value head counts) and a group may be wider than a unit, so repeat until nothing changes.
    Returns each unpinned set's width in units."""
    while True:
        changed, targets = False, {}
        for wset in sets:
            if not wset.pinned:
                targets[wset.label] = max([math.ceil(ctx.width(s.fqn, s.dim, dead) / s.unit) for s in wset.slots]
                                          + [floor.get(wset.label, 0)])
            for slot in wset.slots:
                want = _wanted(ctx, wset, slot, targets)
                for key, _ in ctx.cuts_on(slot.fqn, slot.dim):
                    widened = _widen(ctx, key, dead[key],
                                     lambda m: ctx.width(slot.fqn, slot.dim, {**dead, key: m}) >= want)
                    if widened is None:
                        raise ShrinkError(f"uniform widths: {slot.fqn} (dim {slot.dim}) has {ctx.size(slot.fqn, slot.dim)} "
                                          f"positions and cannot reach {want} ({want // slot.unit} units of "
                                          f"{slot.unit}), the width the other layers of {wset.label} keep; shrink "
                                          "without uniform")
                    if not torch.equal(widened, dead[key]):
                        dead[key], changed = widened, True
        if changed:
            continue
        for wset in sets:
            odd = next((s for s in wset.slots if ctx.width(s.fqn, s.dim, dead) != _wanted(ctx, wset, s, targets)), None)
            if odd is not None:
                raise ShrinkError(
                    f"uniform widths: the layers of {wset.label} cannot keep one width: {odd.fqn} (dim {odd.dim}) "
                    f"keeps {ctx.width(odd.fqn, odd.dim, dead)} positions, not {_wanted(ctx, wset, odd, targets)} "
                    f"(units of {odd.unit}): the groups that cut it are not whole units; shrink without uniform")
        return targets


def _widen(ctx: WidthContext, key: str, dead: torch.Tensor, done: Callable[[torch.Tensor], bool]) -> torch.Tensor | None:
    """``dead`` with the fewest of its strongest dead groups revived for which ``done(mask)`` (a width
    reached; None if none reaches it). A ``query_heads`` gate revives by key/value group
    (``_even_widths``), so that every kept kv group keeps as many query heads as the others."""
    if getattr(ctx.gates[key], "kv_of", None) is None:
        return revive(ctx.norms[key], dead, done, monotone=True)
    return _even_widths(ctx.gates[key].kv_of, ctx.norms[key], dead, done)


def _even_widths(kv_of: list, norm: torch.Tensor, dead: torch.Tensor, done) -> torch.Tensor | None:
    """The widening of a ``query_heads`` gate (see ``equal_query_heads``): its kept kv groups plus the
    strongest k of its dead ones (k = 0, 1, ...), each with r query heads (r from the most any keeps
    now: its alive ones, then its strongest dead ones), the choice reviving the fewest groups for which
    ``done(mask)``; None if none does."""
    kv_of = torch.tensor(kv_of)
    groups = (kv_of == -1).nonzero().reshape(-1).tolist() + ([-2] if bool((kv_of == -2).any()) else [])
    kept = [g for g in groups if g == -2 or not dead[g] or not bool(dead[kv_of == g].all())]
    spare = sorted((g for g in groups if g not in kept), key=lambda g: -float(norm[g]))
    start = max([1] + [int((~dead[kv_of == g]).sum()) for g in kept])
    most = max(int((kv_of == g).sum()) for g in groups)
    best = None
    for extra in range(len(spare) + 1):
        for r in range(start, most + 1):
            mask = dead.clone()
            for g in kept + spare[:extra]:
                if g != -2:
                    mask[g] = False
                mine = kv_of == g
                mask[mine] = revive(norm[mine], mask[mine], lambda m: int((~m).sum()) >= r, monotone=True)
            if done(mask):
                if best is None or int((dead & ~mask).sum()) < int((dead & ~best).sum()):
                    best = mask
                break  # (more query heads per group only revive more)
    return best


def _wanted(ctx: WidthContext, wset: WidthSet, slot: Slot, targets: dict[str, int]) -> int:
    """The width (positions) ``slot`` keeps under its set's target: its full size in a pinned set."""
    return ctx.size(slot.fqn, slot.dim) if wset.pinned else targets[wset.label] * slot.unit


def width_sets(ctx: WidthContext) -> WidthSets:
    """The width sets of the model, from the finder registered for its class (cached per gate set:
    they follow from the architecture)."""
    from .gates import gate_set
    dset = gate_set(ctx.model)
    cached = getattr(dset, "_width_sets", None)
    if cached is None:
        finder = next((WIDTH_SET_FINDERS[c] for c in type(ctx.model).__mro__ if c in WIDTH_SET_FINDERS), repeated_layers)
        cached = finder(ctx.model, ctx)
        if dset is not None:
            dset._width_sets = cached
    return cached


def repeated_layers(model: nn.Module, ctx: WidthContext) -> WidthSets:
    """The default sets: gates of one kind at the same place in repeated blocks (``blocks.3.mlp.fc1``
    and ``blocks.7.mlp.fc1``) whose layers have one full width; widths counted in positions."""
    by_pattern: dict[tuple, list[Slot]] = {}
    for key, dgate in ctx.gates.items():
        slot = ctx.layer_slot(key)
        if slot is None:
            continue
        pattern = re.sub(r"(^|\.)\d+(?=\.|$)", r"\1*", dgate.modules[0])
        by_pattern.setdefault((dgate.kind, pattern, ctx.size(*slot)), []).append(Slot(*slot))
    return WidthSets([WidthSet(f"{kind} of {pattern}", slots)
                      for (kind, pattern, _), slots in by_pattern.items() if len(slots) > 1])
