"""The contract between the graph walk and the op rules: what a rule may read and record.

A rule is a function ``rule(ctx: RuleContext, node) -> Labels | list | None``. It reads the node's
inputs through ``ctx`` (their labels, recorded shapes, the parameters they name) and returns the
labels of the node's output (a list for a tuple output, None for an output that carries no group).
It records what it learns only through these methods:

- ``new_space``: a producer allocates fresh element ids (a conv's output channels);
- ``attach``: a parameter or buffer slice belongs to these ids, in a role (``kinds.Role``);
- ``union``: these ids must be removed together;
- ``taint``: these ids cannot be removed exactly, and why (the reason the user reads);
- ``visit``: an op that mixes entries (a conv's input, a sum) reads these ids; when gated they
  must reach it as exact zeros, which resolution checks with the labels' zero flags;
- ``approximate``: these ids are removable only approximately (a LayerNorm's statistics, opt-in:
  ``approximate_layernorm``), and why: their set is labelled so, and shrink measures its change.

A rule that raises is not fatal: the walk taints every group reaching the node with the error, so
a rule can be written for the common spelling of an op and stay safe on the rare one.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.fx
from torch.fx.node import map_arg

from ..fixers import kept_sizes, part_boundaries
from ..kinds import PARAM_SPACE, Role
from ..labels import NONE, Labels, UnionFind
from ..tensors import along
from ..tracing import Capture, TensorInfo, describe_node
from .names import op_name


@dataclass(frozen=True)
class ParamRef:
    """A parameter or buffer read by the graph (``get_attr``) that has not been used element-wise
    yet, or a view of one that a hand-written linear multiplies by (``W.T``, ``W.t().expand(B, -1,
    -1)``): ``transposed``, its last two dims swapped; ``lead``, leading dims added in front of it
    (a batch it is broadcast over); ``gathered``, its dim 0 indexed by a tensor (``W[expert_ids]``:
    each row's expert matrix), so that an entry's position along it is data; ``by``, the index
    node that chose them (the same node for two products: the same expert per row)."""

    fqn: str
    transposed: bool = False
    lead: int = 0
    gathered: bool = False
    by: object = None


@dataclass(frozen=True)
class SizeRef:
    """A Python size read from a grouped dim (``x.size(1)``, ``x.shape[1]``, ``x.numel()``).
    ``ids``: the groups it counts; ``exact``: it is that dim's size itself (not computed from it),
    ``ids`` then being the entries along the dim in order. A view may use it as a size (and is
    then tied to those entries); anything that uses it as data blocks its groups."""

    ids: torch.Tensor
    exact: bool


@dataclass
class Space:
    """A block of fresh element ids: a layer's output channels/neurons, an input's features, or
    the entries of a parameter used element-wise (kind ``PARAM_SPACE``)."""

    start: int
    size: int
    kind: str
    owner: str  # parameter name (or input name for features)
    module: str  # the layer (or input) users know it by
    module_type: str
    # a space whose entries come from different layers (the residual branches of ``rules.branches``): per
    # entry (name users know it by, layer type, what removing it replaces: a ``branches.Branch`` or None)
    entries: list | None = None
    # a ``query_heads`` space (``rules.attention``): per entry, the entry of the key/value group a query
    # head reads (-1: a key/value head that is no entry of the space), or the entry itself for a kv group
    kv_of: list | None = None


@dataclass
class ExpertProduct:
    """A product of activations with a stack of expert matrices (``(E, out, in)``): the rows of its
    output (its first ``rows`` dims) each belong to one expert, chosen by ``key``: the node of the
    ends of each expert's rows (grouped matmul's ``offs``), the index node of ``W[expert_ids]``, or
    ``"batch"`` (a batched matmul whose batch index is the expert). Two products with one key give
    a row the same expert (``groups._per_expert``)."""

    node: torch.fx.Node
    x: torch.fx.Node
    weight: str
    key: object
    experts: int
    rows: int


@dataclass
class Attachment:
    """A parameter or buffer slice tied to groups; ``ids`` broadcasts to the tensor's shape."""

    fqn: str
    role: Role
    ids: torch.Tensor
    dim: int | None = None  # the tensor dim the slice runs along (None: decided by the groups)


@dataclass
class Visit:
    """An op that mixes entries reads these labels; ``has_param``: through a parameter slice that a
    gate could scale (a conv's input columns), not a parameter-free op (a sum)."""

    labels: Labels
    node: torch.fx.Node
    has_param: bool


SPLIT_POLICIES = {
    # which of the free output dims of a reshape that splits a grouped dim carries the groups;
    # the others are tied across (each of their slices keeps the same entries)
    "innermost": lambda free: free[-1],  # (B, C*k) -> (B, C, k) with k free too: the last one
    "outermost": lambda free: free[0],  # (B, T, H*Dh) -> (B, T, H, Dh): the head index H
}


class RuleContext:
    """What the walk knows about the graph so far, and what the rules have recorded."""

    def __init__(self, capture: Capture, split_policy: dict[str, str] | None = None, query_heads: bool = False,
                 approximate_layernorm: bool = False):
        self.capture = capture
        self.gm = capture.gm
        self.frontend = capture.frontend  # "fx" or "export": export graphs have no literal view sizes
        self.values = capture.values  # node -> TensorInfo (shape, dtype) or a small Python value
        self.uf = UnionFind()
        self.spaces: list[Space] = []
        self.attachments: list[Attachment] = []
        self.visits: list[Visit] = []
        self.taints: list[tuple[np.ndarray, str]] = []
        self.expert_products: dict[int, ExpertProduct] = {}  # space index -> the expert product making it
        self.expert_weights: dict[str, set] = {}  # weight name -> the keys of the expert products reading it
        # node -> (sizes of the grouped dims it summed over, their ids): a later number equal to such a
        # size may be that size read as data (``pooling.reduction``, ``elementwise.size_literals``)
        self.summed_over: dict[torch.fx.Node, tuple[list[int], torch.Tensor]] = {}
        self.env: dict[torch.fx.Node, object] = {}  # node -> its Labels, list of Labels, ParamRef or None
        self.split_policy = dict(split_policy or {})  # node name -> SPLIT_POLICIES key, or a directed output dim
        self.query_heads = query_heads  # grouped-query attention split into query heads and kv groups (opt-in)
        # a LayerNorm's statistics do not block the channels it normalizes (opt-in, ``rules.normalization``)
        self.approximate_layernorm = approximate_layernorm
        self.approximations: list[tuple[np.ndarray, str]] = []  # (ids, why their removal is approximate)
        self._params = dict(capture.model.named_parameters())
        self._tensors = {**dict(capture.model.named_buffers()), **self._params}
        # tied weights (GPT-2's lm_head and wte) are one tensor under several names: its first name
        first = {id(t): name for name, t in self._tensors.items()}
        model = capture.model
        self._name = {name: first[id(t)] for name, t in [*model.named_parameters(remove_duplicate=False),
                                                          *model.named_buffers(remove_duplicate=False)]}
        self._param_labels: dict[str, Labels] = {}

    # -- reading the graph --------------------------------------------------------------------
    def module(self, node) -> torch.nn.Module:
        return self.capture.module(node)

    def where(self, node) -> str:
        """The node as a user would name it, for reasons and errors."""
        return describe_node(self.gm, node)

    def op_name(self, node) -> str:
        """The op's name in the rule table (see ``names.op_name``)."""
        return op_name(node)

    def is_tensor(self, arg) -> bool:
        return isinstance(arg, torch.fx.Node) and isinstance(self.values.get(arg), TensorInfo)

    def shape(self, arg) -> tuple:
        return self.values[arg].shape

    def param_shape(self, fqn: str) -> tuple:
        return tuple(self._tensors[fqn].shape)

    def flat_nodes(self, structure) -> list:
        found = []
        map_arg(structure, found.append)
        return found

    def tensor_args(self, node) -> list:
        return [n for n in self.flat_nodes((node.args, node.kwargs)) if self.is_tensor(n)]

    def is_parameter(self, name: str) -> bool:
        return self._name.get(name) in self._params

    def tensor_name(self, name: str) -> str | None:
        """The name of a parameter or buffer (the first name of a tied one), or None."""
        return self._name.get(name)

    def fqn(self, arg) -> str | None:
        """The parameter/buffer name a ``get_attr`` argument reads, or None."""
        if isinstance(arg, torch.fx.Node) and arg.op == "get_attr":
            return self._name.get(arg.target)
        return None

    def fqn_of(self, node, attr: str) -> str | None:
        """``module.attr``'s full name for a ``call_module`` node, or None if it has no such tensor."""
        return self._name.get(f"{node.target}.{attr}")

    def labels(self, arg) -> Labels | None:
        """The labels of a tensor argument (a parameter used element-wise gets its own ids), or None."""
        state = self.env.get(arg) if isinstance(arg, torch.fx.Node) else None
        if isinstance(state, ParamRef):
            lab = self._param_labels_of(state.fqn)
            if state.gathered:  # which matrix a row reads is data: its entries are one with every matrix's
                for k in range(1, lab.ids.shape[0]):
                    self.union(lab.ids[0].numpy(), lab.ids[k].numpy())
                lab = lab.map(lambda t: t[:1])
            if state.transposed:
                lab = lab.map(lambda t: t.transpose(-1, -2))
            return lab.map(lambda t: t.reshape((1,) * state.lead + tuple(t.shape)))
        return state if isinstance(state, Labels) else None

    def weight(self, arg) -> ParamRef | None:
        """The parameter or buffer (or a view of one, see ``ParamRef``) an argument is, or None."""
        state = self.env.get(arg) if isinstance(arg, torch.fx.Node) else None
        return state if isinstance(state, ParamRef) else None

    def all_labels(self, structure) -> list[Labels]:
        """Every label set among the nodes of an argument structure (tuple outputs included)."""
        return self._states(structure, Labels)

    def literal_sizes(self, node, sizes, ndim: int) -> list[bool]:
        """Which output dims of a view the forward code fixes (see ``fixed_by_code``)."""
        if len(sizes) != ndim:
            return [False] * ndim
        return [self.fixed_by_code(node, s) for s in sizes]

    def fixed_by_code(self, node, value) -> bool:
        """Whether a size or count argument of ``node`` cannot follow a cut. A size read from a
        grouped dim in the forward is a ``SizeRef`` (free); -1 is free. An int is a literal of the
        code, a size computed from dims that carry no group, or (torch.export writes every size as
        an int) one computed from a grouped dim: it is taken as free only when it is an int
        attribute of the layer the node comes from that a fixer keeps up to date (GPT-2's Conv1D
        views its output with ``self.nf``, timm's Attention reshapes with ``self.num_heads``;
        ``fixers.kept_sizes``: not a head size no fixer changes)."""
        if not isinstance(value, int) or isinstance(value, bool) or value == -1:
            return False
        path, module = self.owner_module(node)
        return not (module is not None and value in kept_sizes(module))

    def follows_parts(self, node, positions) -> bool:
        """Whether every position (an int) where ``node`` slices or splits a grouped dim is where two
        parts of a fused projection meet in the layer the node comes from, as that layer's fixer
        keeps it after a cut (``fixers.part_boundaries``: Phi-3's query | key | value offsets)."""
        positions = list(positions)
        if not positions or not all(type(p) is int for p in positions):
            return False
        _, module = self.owner_module(node)
        return module is not None and set(positions) <= part_boundaries(module)

    def owner_module(self, node) -> tuple[str, torch.nn.Module | None]:
        """The innermost module whose forward ``node`` belongs to (``nn_module_stack``: symbolic
        tracing and torch.export record it), as (path, module); ("", None) when unknown."""
        if node.op == "call_module":
            return node.target, self.module(node)
        stack = node.meta.get("nn_module_stack") or {}
        for path, _ in reversed(list(stack.values())):
            try:
                return path, self.capture.model.get_submodule(path)
            except AttributeError:
                continue
        return "", None

    def split_carrier(self, node, free: list[int]) -> int | None:
        """The output dim that carries the groups when a reshape splits a grouped dim into the
        ``free`` dims: by a named policy (``SPLIT_POLICIES``), or the dim a rule directed for this
        node (the attention rules direct the head dim); None when the directed dim is not free."""
        policy = self.split_policy.get(node.name, "innermost")
        if isinstance(policy, int):
            return policy if policy in free else None
        return SPLIT_POLICIES[policy](free)

    # -- recording ---------------------------------------------------------------------------
    def new_space(self, n: int, kind: str, owner: str, node, module_type: str | None = None) -> torch.Tensor:
        """``n`` fresh ids of ``kind`` made by the tensor (or input) ``owner``."""
        ids = self.uf.alloc(n)
        parent = owner.rpartition(".")[0]
        module = parent or owner  # a parameter of the root module is known by its own name
        if module_type is None:
            module_type = type(self.capture.model.get_submodule(parent)).__name__
        self.spaces.append(Space(int(ids[0]) if n else self.uf.size, n, kind, owner, module, module_type))
        return torch.from_numpy(ids)

    def attach(self, fqn: str, role: Role, ids, dim: int | None = None) -> None:
        self.attachments.append(Attachment(fqn, role, torch.as_tensor(ids), dim))

    def union(self, a, b) -> None:
        self.uf.union(np.asarray(a), np.asarray(b))

    def tie(self, a, b, node) -> None:
        """Entries that meet position by position are removed together. A group meeting an entry of
        no group (padding, a part that carries none) cannot be: that entry does not shrink."""
        a, b = np.broadcast_arrays(np.asarray(a), np.asarray(b))
        self.union(a, b)
        lone = (a >= 0) != (b >= 0)
        if lone.any():
            self.taint(np.where(a >= 0, a, b)[lone], f"meets entries of no group at {self.where(node)} (padding, or "
                                                     "a part that carries no group), which do not shrink with it")

    def taint(self, ids, reason: str) -> None:
        flat = np.asarray(torch.as_tensor(ids).reshape(-1))
        flat = flat[flat >= 0]
        if flat.size:
            self.taints.append((flat, reason))

    def approximate(self, ids, reason: str) -> None:
        """These ids are removable, but not exactly (``reason`` says why); their set is labelled."""
        flat = np.asarray(torch.as_tensor(ids).reshape(-1))
        flat = flat[flat >= 0]
        if flat.size:
            self.approximations.append((flat, reason))

    def taint_inputs(self, node, reason: str) -> None:
        """Taint every group reaching ``node`` through any argument."""
        for lab in self.all_labels((node.args, node.kwargs)):
            self.taint(lab.ids, reason)

    def count(self, module: str, attr: str, ids) -> None:
        """Layer attribute ``module.attr`` is the number of these entries (1-D), and no tensor of the
        layer shows it (an InstanceNorm without affine or statistics): shrink sets it to the kept count."""
        self.attach(f"{module}.{attr}", Role.COUNT, torch.as_tensor(ids).reshape(-1), 0)

    def visit(self, lab: Labels, node, has_param: bool = False) -> None:
        self.visits.append(Visit(lab, node, has_param))

    def consume(self, fqn: str, wdim: int, wndim: int, lab: Labels | None, node) -> None:
        """A conv/linear reads these groups through its input slice ``fqn[..., i, ...]`` (dim wdim).
        An input with no groups is recorded too: a layer called again on grouped inputs must not
        lose the columns this call reads."""
        if lab is None:
            self.attach(fqn, Role.CONSUMER, torch.full((1,) * wndim, NONE), wdim)
            return
        self.attach(fqn, Role.CONSUMER, along(lab.ids.reshape(-1), wdim, wndim), wdim)
        self.visit(lab, node, has_param=True)

    # -- helpers shared by rules ---------------------------------------------------------------
    def per_dim(self, x, dim: int, node) -> Labels | None:
        """Labels of ``x`` that vary along ``dim`` only, as one entry per position along it (a
        group's zero flags: all of its entries); groups varying along any other dim are marked not
        removable (an op that slides over them)."""
        lab = self.labels(x)
        if lab is None or not lab.any:
            return None
        nd = lab.ids.ndim
        dim %= nd
        others = [d for d in lab.varying_dims() if d != dim]
        if others:
            self.taint(lab.ids, f"{self.where(node)} reads a tensor grouped along dim {others[0]}, which it "
                                "slides over or mixes")
            return None
        size = self.shape(x)[dim]
        rest = [d for d in range(nd) if d != dim]

        def line(t, reduce):
            t = t.expand(*[size if d == dim else t.shape[d] for d in range(nd)])
            for d in rest:
                t = reduce(t, d)
            return t
        return Labels(line(lab.ids, lambda t, d: t.narrow(d, 0, 1)),
                      *(line(f, lambda t, d: t.all(d, keepdim=True)) for f in (lab.zaff, lab.zall)))

    def rerun(self, node, call=None):
        """Run the node's own op (or ``call``, given the same arguments) on full label tensors in
        place of its tensor arguments: ids shifted by one so that NONE is 0, which is also what
        padding writes, then each zero flag. Returns Labels (a list of them for a tuple result)."""
        fields = []
        for field_name in ("ids", "zaff", "zall"):
            def substitute(n, field_name=field_name):
                if not self.is_tensor(n):
                    return self.values.get(n)
                lab, shape = self.labels(n), self.shape(n)
                if lab is None:
                    return torch.zeros(shape, dtype=torch.int64)
                t = getattr(lab, field_name).expand(shape).contiguous()
                return t + 1 if field_name == "ids" else t.to(torch.int64)
            args, kwargs = map_arg(node.args, substitute), map_arg(node.kwargs, substitute)
            if call is not None:
                result = call(*args, **kwargs)
            elif node.op == "call_method":
                result = getattr(args[0], node.target)(*args[1:], **kwargs)
            elif node.op == "call_module":
                result = self.module(node)(*args, **kwargs)
            else:
                result = node.target(*args, **kwargs)
            fields.append(result)
        ids, zaff, zall = fields
        if isinstance(ids, (list, tuple)):
            return [Labels(i - 1, za.bool(), zl.bool()) for i, za, zl in zip(ids, zaff, zall)]
        return Labels(ids - 1, zaff.bool(), zall.bool())

    def only_parameters(self, ids) -> bool:
        """Whether these ids are entries of parameters or buffers used element-wise, not yet tied to
        any group of a kind (a constant table such as RoPE's inverse frequencies)."""
        ids = np.unique(self.uf.find(np.asarray(torch.as_tensor(ids)).reshape(-1)))
        ids = ids[ids >= 0]
        starts = np.array([s.start for s in self.spaces])
        order = np.argsort(starts)
        owner = order[np.searchsorted(starts[order], ids, side="right") - 1]
        return all(self.spaces[i].kind == PARAM_SPACE for i in owner)

    def size_refs(self, structure) -> list[SizeRef]:
        """The sizes of grouped dims among the nodes of an argument structure."""
        return self._states(structure, SizeRef)

    def _states(self, structure, cls: type) -> list:
        """The walk's states of class ``cls`` among the nodes of an argument structure (a node's
        state may be a list, for tuple outputs)."""
        out = []
        for n in self.flat_nodes(structure):
            state = self.env.get(n)
            out.extend(s for s in (state if isinstance(state, (list, tuple)) else [state]) if isinstance(s, cls))
        return out

    def _param_labels_of(self, fqn: str) -> Labels:
        """A parameter or buffer used element-wise (a layer scale, a bias added by hand, a mask):
        each entry gets an id of its own, so it is cut with whatever it meets. A parameter is
        attached as an affine, which a gate scales; a buffer is only cut, never scaled."""
        if fqn not in self._param_labels:
            shape = self.param_shape(fqn)
            ids = torch.from_numpy(self.uf.alloc(int(np.prod(shape)) if shape else 1)).reshape(shape)
            self.spaces.append(Space(int(ids.reshape(-1)[0]), ids.numel(), PARAM_SPACE, fqn, fqn, "parameter"))
            scaled = self.is_parameter(fqn)
            self.attach(fqn, Role.AFFINE if scaled else Role.CUT_ONLY, ids)
            self._param_labels[fqn] = Labels.fresh(ids, zaff=scaled, zall=scaled)
        return self._param_labels[fqn]


def unknown(ctx: RuleContext, node):
    """The rule of an op the table does not know: every group reaching it keeps all its entries."""
    ctx.taint_inputs(node, f"flows into {ctx.where(node)}, which has no rule: the tool cannot tell how it uses "
                           "the channels")
    return None


__all__ = ["unknown", "RuleContext", "ParamRef", "SizeRef", "Space", "Attachment", "Visit", "SPLIT_POLICIES"]
