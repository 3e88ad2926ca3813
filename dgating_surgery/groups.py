"""Stage 2: group discovery. Walk the captured graph with the op-rule table, tie every
(tensor, position) that must be removed together, and decide for each resulting group whether a
gate can make it exactly removable.

A group ("component") is a set of element ids tied by the union-find: e.g. output channel 7 of
``layer1.0.conv3``, entry 7 of every BatchNorm on the residual stream, input column 7 of every
conv reading that stream. Groups made by the same layer(s) form a ``GroupSet``, which becomes one
``DGate`` when gated. A group is exactly removable when a gate can scale parameters such that
every consumer that mixes channels (conv, linear, sum) sees exact zeros from it; otherwise the set
records why not.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.fx
from torch.fx.node import map_arg

from . import rules
from .labels import NONE, Labels, UnionFind, along
from .tracing import Capture, TensorInfo, describe_node

PRIMARY_KINDS = ("channels", "neurons", "features")


@dataclass(frozen=True)
class ParamRef:
    """A parameter read by the graph (``get_attr``) that has not been used element-wise yet."""

    fqn: str


@dataclass
class Space:
    """A block of fresh element ids: a layer's output channels/neurons, an input's features, or
    the entries of a parameter used element-wise."""

    start: int
    size: int
    kind: str  # channels | neurons | features | param
    owner: str  # parameter name (or input name for features)
    module: str  # the layer (or input) users know it by
    module_type: str


@dataclass
class Attachment:
    """A parameter or buffer slice tied to groups. ``role``: producer (a conv/linear's output
    slice), affine (a per-channel scale such as BatchNorm's), stat (running statistics), or
    consumer (a conv/linear's input slice). ``ids`` broadcasts to the parameter's shape."""

    fqn: str
    role: str
    ids: torch.Tensor
    dim: int | None = None  # the parameter dim the slice runs along (None: decided by the groups)


@dataclass
class GroupSet:
    """Groups produced by the same layer(s): the unit a ``DGate`` gates."""

    kind: str
    modules: list[str]
    module_types: list[str]
    roots: np.ndarray  # one root id per group, in channel order
    reasons: list  # per group: None when exactly removable, else why not
    policies: list  # per group: which roles its gate scales ("affine", "producer", "consumer")
    positions: list | None = None  # kind "features": each group's position along the input's dim 1
    width: int | None = None  # kind "features": the input's size along dim 1

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

    def roots(self, ids: torch.Tensor) -> torch.Tensor:
        """Group roots of an id tensor (NONE stays NONE)."""
        flat = ids.reshape(-1).numpy()
        out = np.full(flat.shape, NONE, dtype=np.int64)
        valid = flat >= 0
        out[valid] = self.root_of[flat[valid]]
        return torch.from_numpy(out).reshape(ids.shape)


SCALED_ROLES = {"affine": ("affine",), "producer": ("affine", "producer"), "consumer": ("affine", "consumer")}


class Analysis:
    """Walks the graph once, applying ``rules.rule_for(node)``; rules call back into the helpers."""

    def __init__(self, capture: Capture):
        self.capture = capture
        self.gm = capture.gm
        self.frontend = capture.frontend
        self.values = capture.values
        self.uf = UnionFind()
        self.spaces: list[Space] = []
        self.attachments: list[Attachment] = []
        self.visits: list[tuple] = []  # (Labels, node, has_param)
        self.taints: list[tuple[np.ndarray, str]] = []
        self.env: dict[torch.fx.Node, object] = {}
        self._params = dict(capture.model.named_parameters())
        self._tensors = {**dict(capture.model.named_buffers()), **self._params}
        self._param_labels: dict[str, Labels] = {}

    # -- the walk -----------------------------------------------------------------------------
    def run(self) -> Plan:
        for node in self.gm.graph.nodes:
            self.env[node] = self._apply(node)
        self._tie_reused_parameters()
        return _resolve(self)

    def _tie_reused_parameters(self) -> None:
        """A layer called twice produces (or reads) the same parameter slices twice: one group."""
        first: dict[tuple, Attachment] = {}
        for att in self.attachments:
            key = (att.fqn, att.role, att.dim)
            if key in first:
                x, y = torch.broadcast_tensors(first[key].ids, att.ids)
                self.union(x.numpy(), y.numpy())
            else:
                first[key] = att

    def _apply(self, node):
        if node.op == "placeholder":
            return self._input(node)
        if node.op == "get_attr":
            return ParamRef(node.target) if node.target in self._params else None
        if node.op == "output":
            return rules.output(self, node)
        try:
            result = rules.rule_for(self, node)(self, node)
        except Exception as exc:  # a rule that cannot read this call: be conservative, say why
            for lab in self.all_labels((node.args, node.kwargs)):
                self.taint(lab.ids, f"flows into {self.where(node)}, whose arguments the rule could not read "
                                    f"({type(exc).__name__}: {exc})")
            return None
        if isinstance(result, Labels) and not self.is_tensor(node):  # never drop groups silently
            for lab in self.all_labels((node.args, node.kwargs)):
                self.taint(lab.ids, f"flows into {self.where(node)}, whose result the tool cannot follow")
            return None
        return result

    def _input(self, node):
        info = self.values.get(node)
        if not isinstance(info, TensorInfo) or not info.dtype.is_floating_point or len(info.shape) < 2:
            return None
        ids = self.new_space(info.shape[1], "features", node.target, node, module_type="input")
        return Labels.fresh(along(ids, 1, len(info.shape)), zaff=False, zall=False)

    # -- helpers for rules ---------------------------------------------------------------------
    def module(self, node):
        return self.capture.module(node)

    def where(self, node) -> str:
        return describe_node(self.gm, node)

    def op_name(self, node) -> str:
        if node.op == "call_method":
            return node.target
        target = node.target
        if target in rules.FUNCTION_ALIASES:
            return rules.FUNCTION_ALIASES[target]
        if isinstance(target, torch._ops.OpOverload):
            return target.overloadpacket.__name__
        return getattr(target, "__name__", str(target))

    def state(self, arg):
        return self.env.get(arg) if isinstance(arg, torch.fx.Node) else None

    def is_tensor(self, arg) -> bool:
        return isinstance(arg, torch.fx.Node) and isinstance(self.values.get(arg), TensorInfo)

    def shape(self, arg) -> tuple:
        return self.values[arg].shape

    def param_shape(self, fqn: str) -> tuple:
        return tuple(self._tensors[fqn].shape)

    def flat_nodes(self, structure) -> list:
        found = []
        map_arg(structure, lambda n: found.append(n))
        return found

    def tensor_args(self, node) -> list:
        return [n for n in self.flat_nodes((node.args, node.kwargs)) if self.is_tensor(n)]

    def fqn(self, arg):
        """The parameter/buffer name read by ``arg``, or None."""
        if isinstance(arg, torch.fx.Node) and arg.op == "get_attr" and arg.target in self._tensors:
            return arg.target
        return None

    def fqn_of(self, node, attr: str):
        """``module.attr``'s full name for a ``call_module`` node, or None if it has no such tensor."""
        name = f"{node.target}.{attr}"
        return name if name in self._tensors else None

    def labels(self, arg):
        """The labels of a tensor argument (materializing a parameter used element-wise), or None."""
        state = self.state(arg)
        if isinstance(state, ParamRef):
            return self._materialize(state.fqn, arg)
        return state if isinstance(state, Labels) else None


    def all_labels(self, structure):
        out = []
        for n in self.flat_nodes(structure):
            state = self.state(n)
            for s in (state if isinstance(state, (list, tuple)) else [state]):
                if isinstance(s, Labels):
                    out.append(s)
        return out

    def _materialize(self, fqn: str, node) -> Labels:
        if fqn not in self._param_labels:
            shape = self.param_shape(fqn)
            ids = torch.from_numpy(self.uf.alloc(int(np.prod(shape)) if shape else 1)).reshape(shape)
            self.spaces.append(Space(int(ids.reshape(-1)[0]), ids.numel(), "param", fqn, fqn, "parameter"))
            self.attach(fqn, "affine", ids)
            self._param_labels[fqn] = Labels.fresh(ids, zaff=True, zall=True)
        return self._param_labels[fqn]

    def new_space(self, n: int, kind: str, owner: str, node, module_type: str | None = None) -> torch.Tensor:
        ids = self.uf.alloc(n)
        parent = owner.rpartition(".")[0]
        module = parent or owner  # a parameter of the root module is known by its own name
        if module_type is None:
            module_type = type(self.capture.model.get_submodule(parent)).__name__
        self.spaces.append(Space(int(ids[0]) if n else self.uf.size, n, kind, owner, module, module_type))
        return torch.from_numpy(ids)

    def attach(self, fqn: str, role: str, ids, dim: int | None = None) -> None:
        self.attachments.append(Attachment(fqn, role, torch.as_tensor(ids), dim))

    def union(self, a, b) -> None:
        self.uf.union(np.asarray(a), np.asarray(b))

    def taint(self, ids, reason: str) -> None:
        flat = np.asarray(torch.as_tensor(ids).reshape(-1))
        flat = flat[flat >= 0]
        if flat.size:
            self.taints.append((flat, reason))

    def per_dim(self, x, dim: int, node):
        """Labels of ``x`` that vary along ``dim`` only, shaped to lie along it; groups varying
        along any other dim are marked not removable (an op that slides over them)."""
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
        shape = [1] * nd
        shape[dim] = size
        return lab.map(lambda t: t.expand(*[s if d == dim else t.shape[d] for d, s in enumerate(shape)]))

    def consume(self, fqn: str, wdim: int, wndim: int, lab: Labels, node) -> None:
        """A conv/linear reads these groups through its input slice ``fqn[..., i, ...]`` (dim wdim)."""
        self.attach(fqn, "consumer", along(lab.ids.reshape(-1), wdim, wndim), wdim)
        self.visit(lab, node, has_param=True)

    def visit(self, lab: Labels, node, has_param: bool = False) -> None:
        """A consumer that mixes entries: each group must reach it as exact zeros when gated."""
        self.visits.append((lab, node, has_param))

    def literal_sizes(self, sizes, ndim: int) -> list[bool]:
        """Which output dims of a view the forward code fixes with a literal (fx graphs only)."""
        if self.frontend != "fx" or len(sizes) != ndim:
            return [False] * ndim
        return [isinstance(s, int) and s != -1 for s in sizes]

    def rerun(self, node):
        """Run the node's own op on full label tensors (ids shifted by one so NONE is 0, which
        is also what padding writes) in place of its tensor arguments."""
        fields = []
        for field_name, fill in (("ids", -1), ("zaff", 0), ("zall", 0)):
            def substitute(n, field_name=field_name, fill=fill):
                if not self.is_tensor(n):
                    return self.values.get(n)
                lab = self.labels(n)
                shape = self.shape(n)
                if lab is None:
                    return torch.full(shape, 0, dtype=torch.int64)
                t = getattr(lab, field_name).expand(shape).contiguous()
                return t + 1 if field_name == "ids" else t.to(torch.int64)
            args = map_arg(node.args, substitute)
            kwargs = map_arg(node.kwargs, substitute)
            if self.op_name(node) in ("pad", "constant_pad_nd"):
                kwargs.pop("value", None)
                args = tuple(args[:2]) + ((args[2],) if len(args) > 2 and isinstance(args[2], str) else ())
            if node.op == "call_method":
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


def _resolve(a: Analysis) -> Plan:
    """Turn tied element ids into groups: taints, zero checks at consumers, gating policy, sets."""
    root_of = a.uf.roots()
    n = root_of.size
    reason: dict[int, str] = {}

    def mark(roots: np.ndarray, why: str) -> None:
        for r in np.unique(roots):
            reason.setdefault(int(r), why)

    for ids, why in a.taints:
        mark(root_of[ids], why)

    present = {role: np.zeros(n, dtype=bool) for role in ("producer", "affine", "consumer", "stat")}
    for att in a.attachments:
        roots = _roots(root_of, att.ids)
        labelled = roots[roots >= 0]
        present[att.role][labelled] = True
        if att.role != "stat" and len(_varying(roots)) > 1:
            mark(labelled, f"parameter '{att.fqn}' would need a non-rectangular cut")

    bad_aff, bad_all, unscalable = (np.zeros(n, dtype=bool) for _ in range(3))
    not_zero_at: dict[int, str] = {}
    for lab, node, has_param in a.visits:
        ids = lab.ids.reshape(-1).numpy()
        zaff, zall = (t.expand(lab.ids.shape).reshape(-1).numpy() for t in (lab.zaff, lab.zall))
        keep = ids >= 0
        roots, zaff, zall = root_of[ids[keep]], zaff[keep], zall[keep]
        bad_aff[roots[~zaff]] = True
        bad_all[roots[~zall]] = True
        if not has_param:
            unscalable[roots[~zall]] = True
        for r in np.unique(roots[~zall]):
            not_zero_at.setdefault(int(r), a.where(node))

    spaces_of: dict[int, list[int]] = {}
    first_elem: dict[int, int] = {}
    for s_idx, space in enumerate(a.spaces):
        if space.kind not in PRIMARY_KINDS or space.size == 0:
            continue
        elems = np.arange(space.start, space.start + space.size)
        for e, r in zip(elems.tolist(), root_of[elems].tolist()):
            lst = spaces_of.setdefault(r, [])
            if not lst or lst[-1] != s_idx:
                lst.append(s_idx)
            first_elem.setdefault(r, e)

    policy: dict[int, str] = {}
    for r, s_list in spaces_of.items():
        if r in reason:
            continue
        is_feature = all(a.spaces[s].kind == "features" for s in s_list)
        if not bad_aff[r] and present["affine"][r]:
            policy[r] = "affine"
        elif not bad_all[r] and (present["producer"][r] or present["affine"][r]):
            policy[r] = "producer"
        elif is_feature and present["consumer"][r] and not unscalable[r]:
            policy[r] = "consumer"
        elif r in not_zero_at:
            reason[r] = (f"is not exactly zero where it reaches {not_zero_at[r]} when its gate is zero "
                         "(it passes an op that maps 0 to a non-zero value)")
        else:
            reason[r] = "no parameter can gate it"

    by_key: dict[tuple, list[int]] = {}
    for r, s_list in spaces_of.items():
        by_key.setdefault(tuple(sorted(set(s_list))), []).append(r)
    sets = []
    for key, roots in by_key.items():
        roots.sort(key=lambda r: first_elem[r])
        kinds = {a.spaces[s].kind for s in key}
        kind = "channels" if "channels" in kinds else "neurons" if "neurons" in kinds else "features"
        modules, types = [], []
        for s in key:
            if a.spaces[s].module not in modules:
                modules.append(a.spaces[s].module)
                types.append(a.spaces[s].module_type)
        space = a.spaces[key[0]]
        positions = [first_elem[r] - space.start for r in roots] if kind == "features" else None
        sets.append(GroupSet(kind, modules, types, np.array(roots, dtype=np.int64),
                             [reason.get(r) for r in roots], [policy.get(r) for r in roots], positions,
                             space.size if kind == "features" else None))
    sets.sort(key=lambda s: first_elem[int(s.roots[0])])
    return Plan(sets, a.attachments, root_of, a.frontend)


def _roots(root_of: np.ndarray, ids: torch.Tensor) -> np.ndarray:
    flat = ids.reshape(-1).numpy()
    out = np.full(flat.shape, NONE, dtype=np.int64)
    out[flat >= 0] = root_of[flat[flat >= 0]]
    return out.reshape(tuple(ids.shape))


def _varying(arr: np.ndarray) -> list[int]:
    return [d for d in range(arr.ndim) if arr.shape[d] > 1 and not (arr == arr.take([0], axis=d)).all()]


def discover(capture: Capture) -> Plan:
    """Group discovery over a captured model (see module docstring)."""
    return Analysis(capture).run()
