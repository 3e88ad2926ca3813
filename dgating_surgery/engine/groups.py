"""Stage 2: group discovery. Walk the captured graph with the op-rule table, tie every
(tensor, position) that must be removed together, and decide for each resulting group whether a
gate can make it exactly removable.

A group ("component") is a set of element ids tied by the union-find: e.g. output channel 7 of
``layer1.0.conv3``, entry 7 of every BatchNorm on the residual stream, input column 7 of every
conv reading that stream. Groups made by the same layer(s) form a ``GroupSet``, which becomes one
``DGate`` when gated. Resolution runs as named steps over the walk's records: blocked groups
(taints, non-rectangular cuts), the roles present per group, the zero checks at the ops that mix
entries, the gating policy (``kinds.POLICIES``), and the sets.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.fx

from . import experts as experts_mod
from .kinds import KINDS, POLICY, Role, set_kind
from .labels import NONE, Labels
from .rules import GRAPH_PASSES, PREPASSES, Attachment, ParamRef, RuleContext, output, rule_for
from .rules.names import ALIASING_OPS, mutated_argument, op_name
from .rules.shapes import size_use
from .tensors import along
from .tracing import Capture, TensorInfo


@dataclass
class GroupSet:
    """Groups produced by the same layer(s): the unit a ``DGate`` gates."""

    kind: str
    modules: list[str]
    module_types: list[str]
    roots: np.ndarray  # one root id per group, in channel order
    reasons: list  # per group: None when exactly removable, else why not
    policies: list  # per group: the name of the policy (``kinds.POLICY``) its gate uses, or None
    positions: list | None = None  # kinds that record their input: each group's positions along dim 1
    width: int | None = None  # kinds that record their input: the input's size along dim 1
    per_group: int = 1  # entries of its first layer per group: the query heads of a grouped-query kv group
    branches: list | None = None  # kind blocks: per group, what removing it replaces (``branches.Branch`` or None)
    # kind query_heads: per group, the index of the key/value group a query head reads (-1: the group is a
    # key/value group; -2: its key/value head is in no group and stays, as in multi-query attention)
    kv_of: list | None = None
    # why removing its groups is only approximate (a LayerNorm's statistics, opt-in); None: exact
    approximate: str | None = None
    # kind neurons of a stack of expert matrices (``experts.split_experts``): each group is E groups, one per
    # expert (the gate's groups expert-major: group e * len(roots) + j is neuron j of expert e)
    experts: int | None = None

    @property
    def name(self) -> str:
        more = f" (+{len(self.modules) - 1} coupled)" if len(self.modules) > 1 else ""
        return f"{self.modules[0]}{more}"

    @property
    def removable(self) -> np.ndarray:
        return np.array([r is None for r in self.reasons], dtype=bool)


@dataclass
class Plan:
    """The result of group discovery: every group set, and every parameter slice tied to groups."""

    sets: list[GroupSet]
    attachments: list[Attachment]
    root_of: np.ndarray  # element id -> its group's root id
    frontend: str

    def roots(self, ids: torch.Tensor) -> np.ndarray:
        """Group roots of an id tensor, same shape (NONE stays NONE)."""
        return _roots(self.root_of, ids)


def profile(index: np.ndarray, att: Attachment, dim: int | None = None) -> tuple[int, torch.Tensor]:
    """The dim a per-entry map over an attached tensor varies along (unless ``dim`` is given), and
    its 1-D profile there (resolution guarantees the map is constant along every other dim)."""
    if dim is None:
        varying = _varying(index)
        dim = varying[0] if len(varying) == 1 else (att.dim if att.dim is not None else 0)
    if index.ndim == 0:
        return dim, torch.from_numpy(index.reshape(1))
    for d in range(index.ndim):
        if d != dim:
            index = index.take([0], axis=d)
    return dim, torch.from_numpy(np.ascontiguousarray(index.reshape(-1)))


# -- the walk ---------------------------------------------------------------------------------------
def discover(capture: Capture, split_policy: dict | None = None, query_heads: bool = False,
             approximate_layernorm: bool = False) -> Plan:
    """Group discovery over a captured model. ``split_policy``: node name -> a key of
    ``rules.SPLIT_POLICIES`` (or an output dim) for reshapes whose carrier dim the pre-passes
    (``rules.PREPASSES``, e.g. the attention heads) should not decide. ``query_heads``: split
    grouped-query attention into query heads and key/value groups (kind ``query_heads``) instead of
    whole key/value groups (kind ``heads``); one partition or the other, so a recipe chooses.
    ``approximate_layernorm``: a LayerNorm's statistics do not block the stream it normalizes; its
    channels form ``hidden`` sets labelled approximate (``GroupSet.approximate``)."""
    directed = {}
    for prepass in PREPASSES:
        directed.update(prepass(capture.gm, capture.values))
    ctx = RuleContext(capture, {**directed, **(split_policy or {})}, query_heads, approximate_layernorm)
    for node in capture.gm.graph.nodes:
        ctx.env[node] = _apply(ctx, node)
    for graph_pass in GRAPH_PASSES:  # groups no op rule makes: residual branches
        graph_pass(ctx)
    _tie_reused_parameters(ctx)
    return resolve(ctx)


def _apply(ctx: RuleContext, node):
    if node.op == "placeholder":
        return _input(ctx, node)
    if node.op == "get_attr":
        name = ctx.tensor_name(node.target)
        return ParamRef(name) if name is not None else None
    if node.op == "output":
        return output(ctx, node)
    refs = ctx.size_refs((node.args, node.kwargs))
    if refs:
        size = size_use(ctx, node, refs)
        if size is not None:
            return size
    try:
        result = rule_for(ctx, node)(ctx, node)
    except Exception as exc:  # a rule that cannot read this call: be conservative, say why
        ctx.taint_inputs(node, f"flows into {ctx.where(node)}, whose arguments the rule could not read "
                               f"({type(exc).__name__}: {exc})")
        return None
    if isinstance(result, Labels) and not ctx.is_tensor(node):  # never drop groups silently
        ctx.taint_inputs(node, f"flows into {ctx.where(node)}, whose result the tool cannot follow")
        return None
    _follow_mutation(ctx, node, result)
    return _canonical(ctx, result)


def _canonical(ctx: RuleContext, result):
    """Labels with every id replaced by its group's current root, so that entries tied by this op
    (a concat, a stack) read as one group downstream (a sum over the stacked dim consumes one)."""
    if isinstance(result, (list, tuple)):
        return [_canonical(ctx, r) for r in result]
    if not isinstance(result, Labels):
        return result
    ids = torch.from_numpy(ctx.uf.find(result.ids.numpy()))
    return Labels(ids, result.zaff, result.zall).compressed()


def _follow_mutation(ctx: RuleContext, node, result) -> None:
    """An in-place op changes the tensor it was given: later reads of that tensor see its result.
    A mutation through a view would change the viewed tensor too, which the walk does not follow."""
    target = mutated_argument(node, ctx.module(node) if node.op == "call_module" else None)
    if target is None or not isinstance(result, Labels) or result is ctx.labels(target):
        return  # no change a reader could see: a zero-keeping op (relu_, dropout) keeps labels and flags
    ctx.env[target] = result
    if isinstance(target, torch.fx.Node) and target.op != "placeholder" and op_name(target) in ALIASING_OPS:
        ctx.taint(result.ids, f"{ctx.where(node)} changes a view of another tensor in place, which the tool "
                              "does not follow")


def _input(ctx: RuleContext, node):
    """A floating-point model input of at least 2 dims: its dim 1 entries are features."""
    info = ctx.values.get(node)
    if not isinstance(info, TensorInfo) or not info.dtype.is_floating_point or len(info.shape) < 2:
        return None
    ids = ctx.new_space(info.shape[1], "features", node.target, node, module_type="input")
    return Labels.fresh(along(ids, 1, len(info.shape)), zaff=False, zall=False)


SLICE_ROLES = (Role.PRODUCER, Role.AFFINE, Role.STAT, Role.CONSUMER, Role.CUT_ONLY)  # a tensor's positions, one by one


def _tie_reused_parameters(ctx: RuleContext) -> None:
    """A layer called twice produces (or reads) the same parameter slices twice: the slices must be
    one cut, so their groups are tied. So must two uses of one tensor in different roles along the
    same dim (a tied weight: an embedding's columns are the stream it writes, the output layer's the
    features it reads). A position that one call reads with no group (an input that carries none
    there, padding) is needed whole: the groups other calls tie to it are blocked."""
    calls: dict[tuple, list[Attachment]] = {}
    for att in ctx.attachments:
        calls.setdefault((att.fqn, att.role, att.dim), []).append(att)
    roles_along: dict[tuple, list[Attachment]] = {}  # one use per role along a dim suffices: the others are tied above
    for (fqn, role, dim), atts in calls.items():
        if dim is not None and role in SLICE_ROLES:
            roles_along.setdefault((fqn, dim), []).append(atts[0])
    for key, atts in roles_along.items():
        if len(atts) > 1:
            calls[(*key, "roles")] = atts
    for (fqn, *_), atts in calls.items():
        if len(atts) < 2:
            continue
        try:
            ids = torch.broadcast_tensors(*(att.ids for att in atts))
        except RuntimeError:  # uses that do not line up position by position: none of their groups can go
            for att in atts:
                ctx.taint(att.ids, f"'{fqn}' is used in ways whose entries do not line up, so it cannot lose any")
            continue
        for other in ids[1:]:
            ctx.union(ids[0].numpy(), other.numpy())
        needed = torch.stack([i < 0 for i in ids]).any(0)
        if needed.any():
            ctx.taint(torch.stack(ids)[:, needed], f"'{fqn}' is used more than once, once on inputs that belong to "
                                                   "no group, so it cannot lose those entries")


# -- resolution ------------------------------------------------------------------------------------
@dataclass
class _Facts:
    """What resolution knows per group root (arrays indexed by root id)."""

    reason: dict  # root -> why it is not exactly removable (first reason found wins)
    approximate: dict  # root -> why its removal is approximate (opt-in; ``RuleContext.approximate``)
    has_role: dict  # Role -> bool array: some slice of that role is attached
    zero: dict  # Labels flag name -> bool array: exactly zero at every mixing op when that policy gates it
    # flag name (None: no entry zero) -> {root: the first mixing op without a parameter slice (which a
    # consumer-scaling gate would scale) that the group reaches while not zero under that flag}
    unscaled_at: dict
    not_zero_at: dict  # root -> the first mixing op it reaches non-zero

    def block(self, roots, why: str) -> None:
        for r in np.unique(roots):
            self.reason.setdefault(int(r), why)


def resolve(ctx: RuleContext) -> Plan:
    """Turn the walk's records into group sets with a reason or a gating policy per group."""
    root_of = ctx.uf.roots()
    facts = _Facts({}, {}, {role: np.zeros(root_of.size, bool) for role in Role},
                   {"zaff": np.ones(root_of.size, bool), "zall": np.ones(root_of.size, bool)},
                   {flag: {} for flag in ("zaff", "zall", None)}, {})
    _blocked_by_taints(ctx, root_of, facts)
    for ids, why in ctx.approximations:
        for r in np.unique(root_of[ids]).tolist():
            facts.approximate.setdefault(r, why)
    _roles_present(ctx, root_of, facts)
    _zero_at_mixing_ops(ctx, root_of, facts)
    spaces_of, first_elem = _spaces_of_groups(ctx, root_of)
    policy = {r: _choose_policy(ctx, r, s_list, facts) for r, s_list in spaces_of.items() if r not in facts.reason}
    return Plan(_sets(ctx, spaces_of, first_elem, facts, policy), ctx.attachments, root_of, ctx.frontend)


def _blocked_by_taints(ctx: RuleContext, root_of: np.ndarray, facts: _Facts) -> None:
    for ids, why in ctx.taints:
        facts.block(root_of[ids], why)


def _roles_present(ctx: RuleContext, root_of: np.ndarray, facts: _Facts) -> None:
    """Which roles each group has slices in; a slice that varies along two dims of one tensor
    cannot be cut as a rectangle, so its groups are blocked."""
    for att in ctx.attachments:
        roots = _roots(root_of, att.ids)
        labelled = roots[roots >= 0]
        facts.has_role[att.role][labelled] = True
        if att.role != Role.STAT and len(_varying(roots)) > 1:
            facts.block(labelled, f"parameter '{att.fqn}' would need a non-rectangular cut")


def _zero_at_mixing_ops(ctx: RuleContext, root_of: np.ndarray, facts: _Facts) -> None:
    """At every op that mixes entries, which groups arrive as exact zeros under each policy, and
    whether that op has a parameter slice a gate could scale instead."""
    for visit in ctx.visits:
        lab = visit.labels
        ids = lab.ids.reshape(-1).numpy()
        keep = ids >= 0
        roots = root_of[ids[keep]]
        for flag in facts.zero:
            zero = getattr(lab, flag).expand(lab.ids.shape).reshape(-1).numpy()[keep]
            facts.zero[flag][roots[~zero]] = False
        zall = lab.zall.expand(lab.ids.shape).reshape(-1).numpy()[keep]
        if not visit.has_param:
            for flag, unscaled in facts.unscaled_at.items():
                zero = getattr(lab, flag).expand(lab.ids.shape).reshape(-1).numpy()[keep] if flag else False
                for r in np.unique(roots[~zero]):
                    unscaled.setdefault(int(r), ctx.where(visit.node))
        for r in np.unique(roots[~zall]):
            facts.not_zero_at.setdefault(int(r), ctx.where(visit.node))


def _spaces_of_groups(ctx: RuleContext, root_of: np.ndarray) -> tuple[dict, dict]:
    """Per group root: the spaces (producers) its elements come from, and its first element."""
    spaces_of: dict[int, list[int]] = {}
    first_elem: dict[int, int] = {}
    for s_idx, space in enumerate(ctx.spaces):
        if space.kind not in KINDS or space.size == 0:
            continue
        elems = np.arange(space.start, space.start + space.size)
        for e, r in zip(elems.tolist(), root_of[elems].tolist()):
            found = spaces_of.setdefault(r, [])
            if not found or found[-1] != s_idx:
                found.append(s_idx)
            first_elem.setdefault(r, e)
    return spaces_of, first_elem


def _choose_policy(ctx: RuleContext, r: int, s_list: list[int], facts: _Facts) -> str | None:
    """The first policy of the group's kind (``kinds.KINDS``) that makes group ``r`` exactly zero,
    or a reason."""
    kind = set_kind({ctx.spaces[s].kind for s in s_list})
    unscaled = None
    for pol in (POLICY[name] for name in KINDS[kind].policies):
        if not any(facts.has_role[role][r] for role in pol.needs):
            continue
        if pol.by_consumers:
            unscaled = facts.unscaled_at[pol.zero_flag].get(r)
            if unscaled is None:
                return pol.name
        elif facts.zero[pol.zero_flag][r]:
            return pol.name
    if unscaled is not None:
        facts.reason[r] = (f"reaches {unscaled} not zero when its gate is zero, and no parameter there can be "
                           "scaled instead")
    elif r in facts.not_zero_at:
        facts.reason[r] = (f"is not exactly zero where it reaches {facts.not_zero_at[r]} when its gate is zero "
                           "(it passes an op that maps 0 to a non-zero value)")
    else:
        facts.reason[r] = "no parameter can gate it"
    return None


def _sets(ctx: RuleContext, spaces_of: dict, first_elem: dict, facts: _Facts, policy: dict) -> list[GroupSet]:
    """Groups made by the same spaces form one set, ordered as their producers' outputs."""
    by_key: dict[tuple, list[int]] = {}
    for r, s_list in spaces_of.items():
        key = tuple(sorted(set(s_list)))
        nested = tuple(s for s in key if ctx.spaces[s].kv_of is not None)  # an attention's query heads and kv groups
        by_key.setdefault(nested or key, []).append(r)
    sets = []
    by_root = experts_mod.attachments_by_root(ctx, ctx.uf.roots()) if ctx.expert_products else {}
    for key, roots in by_key.items():
        roots.sort(key=lambda r: first_elem[r])
        kind = set_kind({ctx.spaces[s].kind for s in key})
        modules, types = [], []
        for s in sorted(key, key=lambda s: ctx.spaces[s].kind != kind):  # the set kind's own layers first
            if ctx.spaces[s].module not in modules:
                modules.append(ctx.spaces[s].module)
                types.append(ctx.spaces[s].module_type)
        positions = width = None
        if KINDS[kind].records_input:
            positions, width = _input_positions(ctx, key, roots, facts)
        first = next(ctx.spaces[s] for s in key if ctx.spaces[s].kind == kind)
        branches = None
        kv_of = _kv_groups(ctx, key, roots, facts) if first.kv_of is not None else None
        if first.entries is not None:  # entries from different layers (residual branches): named one by one
            entries = [first.entries[first_elem[r] - first.start] for r in roots]
            modules, types, branches = (list(column) for column in zip(*entries))
        approximate = next((facts.approximate[r] for r in roots if r in facts.approximate), None)
        experts = None
        if kind == "neurons" and kv_of is None and first.entries is None and by_root:
            attached = list({id(a): a for r in roots for a in by_root.get(r, [])}.values())
            experts = experts_mod.split_experts(ctx, key, attached)
        sets.append(GroupSet(kind, modules, types, np.array(roots, dtype=np.int64),
                             [facts.reason.get(r) for r in roots], [policy.get(r) for r in roots], positions, width,
                             max(1, first.size // len(roots)), branches, kv_of, approximate=approximate, experts=experts))
    sets.sort(key=lambda s: first_elem[int(s.roots[0])])
    return sets


def _kv_groups(ctx: RuleContext, key: tuple, roots: list[int], facts: _Facts) -> list[int]:
    """A ``query_heads`` set: per group, its key/value group's index in the set (``GroupSet.kv_of``).
    The width constraint that keeps the attention valid (``constraints.equal_query_heads``) reads
    it, so the set is cut only as the structure the attention rule made, and whole: if a later op tied
    two of its groups, or one of them cannot be removed, every group of the set stays."""
    space = ctx.spaces[key[0]]
    entry_roots = ctx.uf.find(np.arange(space.start, space.start + space.size)).tolist()
    index = {r: i for i, r in enumerate(roots)}
    why = None
    if len(key) > 1 or len(set(entry_roots)) != len(entry_roots):
        why = ("is tied to another query head or key/value group of its attention (by a size read off one and "
               "used for the other, or an op that mixes them), so they cannot be cut one by one")
    else:
        blocked = next((facts.reason[r] for r in roots if r in facts.reason), None)
        why = (f"goes with the query heads and key/value groups of its layer, one of which cannot be removed "
               f"({blocked})" if blocked else None)
    for r in roots if why else ():
        facts.reason.setdefault(r, why)
    kv_of = [-2] * len(roots)
    for e, r in enumerate(entry_roots if not why else ()):
        kv = space.kv_of[e]
        kv_of[index[r]] = -1 if kv == e else -2 if kv < 0 else index[entry_roots[kv]]
    return kv_of


def _input_positions(ctx: RuleContext, key: tuple, roots: list[int], facts: _Facts):
    """Every position along the model input that each group owns (several, after the input is
    chunked or shuffled), and the input's width. Groups spanning two inputs are not cut."""
    inputs = [s for s in key if KINDS[ctx.spaces[s].kind].records_input]
    if len(inputs) > 1:
        names = ", ".join(ctx.spaces[s].owner for s in inputs)
        facts.block(np.array(roots), f"ties features of several model inputs ({names}) together")
    space = ctx.spaces[inputs[0]]
    elems = np.arange(space.start, space.start + space.size)
    owner_root = ctx.uf.find(elems)
    positions = [np.nonzero(owner_root == r)[0].tolist() for r in roots]
    return positions, space.size


def _roots(root_of: np.ndarray, ids: torch.Tensor) -> np.ndarray:
    flat = ids.reshape(-1).numpy()
    out = np.full(flat.shape, NONE, dtype=np.int64)
    out[flat >= 0] = root_of[flat[flat >= 0]]
    return out.reshape(tuple(ids.shape))


def _varying(arr: np.ndarray) -> list[int]:
    return [d for d in range(arr.ndim) if arr.shape[d] > 1 and not (arr == arr.take([0], axis=d)).all()]
