"""The ``blocks`` kind: one group per residual branch ``x + f(x)``, found on the whole graph after the walk.

A residual add is an add whose one operand is the block's input x (through no-op casts at most)
and whose other operand y is computed from x. The branch is every node computed from x that y
needs, plus the nodes only they read (its parameters, a mask made for it from a shared one). Its
removal is exact when nothing but the add reads a node of the branch and no node of it changes
a tensor outside it in place; its gate scales the branch's last layer (the weight and bias of a
linear, conv or affine norm, a layer scale), after which only homogeneous ops (views, dropout,
tuple items, a product with a tensor from outside) reach the add, so gate 0 adds exact zeros.

Shrink removes a dead branch by replacing layers (``dgating_surgery.engine.branches``), so a branch is
gated only where that is possible, which is decided on the graph and with one run on the example
inputs (what each layer returns, and that it keeps its input's shape):

- its *block*, the layer whose forward holds the add, may be made of residual branches only (its
  input is the first branch's x, each next branch reads the previous sum, it returns the last sum,
  or the ReLU of it when x is non-negative, as torchvision's ResNet blocks do): with all of its
  branches dead, it is bypassed whole;
- or the branch ends in a layer of its own (an attention, an MLP) that is replaced by zeros of its
  input's shape, the layers before it in the branch (a pre-norm) being bypassed: every one of them
  keeps its input's shape and is called once.
A branch whose block holds others and which has no layer of its own is refused, with the reason.
"""
from __future__ import annotations

import torch
import torch.fx
from torch import nn

from ..branches import Branch
from ..execution import fresh
from ..kinds import Role
from ..tracing import TensorInfo
from .context import RuleContext
from .names import mutated_argument, op_name

ADDS = ("add", "add_", "iadd")
# ops that only change how the shortcut is stored (same shape and dtype): x passes through them
NO_OPS = ("to", "_to_copy", "alias", "contiguous", "clone", "type_as", "float", "detach_copy")
# ops between the branch's last layer and the add whose output scales with their (one) branch input
HOMOGENEOUS = ("getitem", "view", "reshape", "_unsafe_view", "permute", "transpose", "flatten", "unflatten", "squeeze",
               "unsqueeze", "contiguous", "clone", "to", "_to_copy", "alias", "type_as", "float", "dropout",
               "dropout_", "native_dropout", "feature_dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout",
               "stochastic_depth", "drop_path", "mul", "mul_", "imul", "truediv", "div", "div_", "neg")
HOMOGENEOUS_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
# the last layer: where its scaled weights are, (op name -> positions of weight and bias among the arguments)
LAST_LAYER_CALLS = {"linear": (1, 2), "conv1d": (1, 2), "conv2d": (1, 2), "conv3d": (1, 2), "convolution": (1, 2),
                    "addmm": (2, 0), "baddbmm": (2, 0), "layer_norm": (2, 3), "group_norm": (2, 3), "rms_norm": (2, None),
                    "batch_norm": (1, 2), "_native_batch_norm_legit_no_training": (1, 2), "F.batch_norm": (3, 4)}
LAST_LAYER_MODULES = (nn.Linear, nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm,
                      nn.RMSNorm)
RELUS = ("relu", "relu_")
KEEP_SIGN = ("max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d",
             "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool2d", "max_pool2d_with_indices", "getitem",
             "flatten", "view", "reshape", "permute", "contiguous", "dropout", "to", "clone")


class _Graph:
    """The captured graph as the pass reads it: topological indices, each node's ancestors (a bit
    set), the layers each node runs in, and which nodes read each parameter."""

    def __init__(self, ctx: RuleContext):
        self.ctx = ctx
        self.nodes = list(ctx.gm.graph.nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self.anc = []
        for n in self.nodes:
            bits = 0
            for p in n.all_input_nodes:
                bits |= self.anc[self.index[p]] | (1 << self.index[p])
            self.anc.append(bits)
        model = ctx.capture.model
        self.layers_of: dict[torch.fx.Node, list[str]] = {}  # outermost first
        self.nodes_of: dict[str, list[torch.fx.Node]] = {}
        for n in self.nodes:
            if n.op in ("placeholder", "get_attr", "output") or (not n.users and n.op != "call_module"):
                continue  # inputs, parameters, and checks nobody reads (torch.export's asserts)
            stack = [path for path, _ in (n.meta.get("nn_module_stack") or {}).values()]
            if n.op == "call_module" and (not stack or stack[-1] != n.target):
                stack.append(n.target)
            stack = [p for p in dict.fromkeys(stack) if p and _exists(model, p)]
            self.layers_of[n] = stack
            for path in stack:
                self.nodes_of.setdefault(path, []).append(n)
        self.readers: dict[str, list[torch.fx.Node]] = {}  # parameter (first name) -> nodes reading it
        for n in self.nodes:
            for fqn in self.params_read(n):
                self.readers.setdefault(fqn, []).append(n)

    def is_anc(self, a, b) -> bool:
        return bool(self.anc[self.index[b]] >> self.index[a] & 1)

    def params_read(self, n) -> list[str]:
        ctx = self.ctx
        if n.op == "get_attr":
            fqn = ctx.tensor_name(n.target)
            return [fqn] if fqn is not None and ctx.is_parameter(fqn) else []
        if n.op == "call_module":
            return [ctx.tensor_name(f"{n.target}.{name}") for name, _ in ctx.module(n).named_parameters()]
        return []

    def uses_params(self, n) -> bool:
        """Whether a node is a layer or reads a parameter (a linear in an exported graph)."""
        return bool(self.params_read(n)) or any(p.op == "get_attr" and self.params_read(p) for p in n.all_input_nodes)

    def carries_data(self, n) -> bool:
        """A tensor (or tuple of them), not a size or other Python value."""
        value = self.ctx.values.get(n)
        return isinstance(value, TensorInfo) or isinstance(value, list) and any(
            isinstance(v, TensorInfo) for v in value) or value is None and n.op != "get_attr"

    def is_tensor(self, n) -> bool:
        return isinstance(self.ctx.values.get(n), TensorInfo)

    def same_tensor(self, a, b) -> bool:
        va, vb = self.ctx.values.get(a), self.ctx.values.get(b)
        return isinstance(va, TensorInfo) and isinstance(vb, TensorInfo) and va == vb


def _is_check(n) -> bool:
    """A check that reads a tensor and returns nothing (torch.export's ``_assert_tensor_metadata``)."""
    return not n.users and op_name(n).startswith("_assert")


def _exists(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


class _Candidate:
    """One residual add and what the pass learns of its branch."""

    def __init__(self, add, x, y, shortcut: list, nodes: set):
        self.add, self.x, self.y, self.shortcut, self.nodes = add, x, y, shortcut, nodes
        self.reason: str | None = None
        self.params: set[str] = set()  # every parameter removing the branch removes
        self.scaled: list[str] = []  # the last layer's parameters its gate scales
        self.zero: str | None = None  # its own last layer, replaced by zeros
        self.bypass: list[str] = []  # layers before it
        self.own_reason: str | None = None  # why it has no layer of its own, if not
        self.block: str | None = None
        self.returns: dict[str, int] = {}
        self.name = ""


def residual_branches(ctx: RuleContext) -> None:
    """Find every residual branch, decide how each is removed (or why not), and give each one group
    of kind ``blocks``: its parameters attached whole (role BRANCH; its last layer's BRANCH_OUTPUT)."""
    try:
        graph = _Graph(ctx)
        found = _analysed(graph)
    except Exception:  # noqa: BLE001 - a graph the pass cannot read has no blocks; the other kinds go on
        return
    if found:
        _record(ctx, graph, found)


def _analysed(graph: _Graph) -> list[_Candidate]:
    """Every residual add's candidate, with its removal plan or the reason it is refused."""
    found = [c for n in graph.nodes if op_name(n) in ADDS and n.op != "call_module"
             for c in [_candidate(graph, n)] if c is not None]
    for cand in found:
        if cand.reason is None:
            _check_branch(graph, cand)
        if cand.reason is None:
            _own_layers(graph, cand)
    _blocks(graph, found)
    _probe(graph, found)
    for cand in found:
        if cand.reason is None and cand.zero is None and cand.block is None:
            cand.reason = cand.own_reason
        if cand.reason is None and cand.zero is None and cand.block is not None and _siblings(found, cand) > 1:
            cand.reason = cand.own_reason
    return found


def _candidate(graph: _Graph, add) -> _Candidate | None:
    """The residual branch of an add, or None when the add is not one (no operand is computed from the
    other, or the branch reads no parameter); a block whose shortcut is itself a layer is a candidate
    that is refused."""
    ctx = graph.ctx
    operands = [a for a in add.args[:2] if isinstance(a, torch.fx.Node)]
    if len(operands) != 2 or not all(graph.is_tensor(a) for a in operands) or add.kwargs.get("alpha", 1) != 1:
        return None
    for y, s in (operands, operands[::-1]):
        x, shortcut = s, []
        while x.op in ("call_function", "call_method") and op_name(x) in NO_OPS and x.args \
                and isinstance(x.args[0], torch.fx.Node) and graph.same_tensor(x, x.args[0]):
            shortcut.append(x)
            x = x.args[0]
        if graph.is_anc(x, y):
            nodes = _branch_nodes(graph, x, y, set(shortcut))
            if not any(graph.uses_params(n) for n in nodes):
                return None
            cand = _Candidate(add, x, y, shortcut, nodes)
            if not graph.same_tensor(add, s):
                cand.reason = f"the residual add at {ctx.where(add)} broadcasts its shortcut"
            return cand
    return _layer_shortcut(graph, add, operands)


def _branch_nodes(graph: _Graph, x, y, shortcut: set) -> set:
    """Nodes computed from x that y needs, and the nodes only they read."""
    lo, hi = graph.index[x], graph.index[y]
    nodes = {n for n in graph.nodes[lo + 1: hi + 1] if n not in shortcut and n.op not in ("placeholder", "output")
             and graph.is_anc(x, n) and (n is y or graph.is_anc(n, y))}
    changed = True
    while changed:
        changed = False
        for n in list(nodes):
            for p in n.all_input_nodes:
                if p not in nodes and p is not x and p not in shortcut and p.op != "placeholder" \
                        and all(u in nodes or _is_check(u) for u in p.users):
                    nodes.add(p)
                    changed = True
    return nodes


def _layer_shortcut(graph: _Graph, add, operands) -> _Candidate | None:
    """An add of two operands computed from one tensor through layers with parameters each (a ResNet
    block that downsamples): a residual block whose shortcut is not the identity."""
    a, b = operands
    common = graph.anc[graph.index[a]] & graph.anc[graph.index[b]]
    sources = [n for n in graph.nodes if n.op != "get_attr" and common >> graph.index[n] & 1 and graph.is_tensor(n)]
    if not sources or not graph.same_tensor(a, add) or not graph.same_tensor(b, add):
        return None
    source = sources[-1]

    def through_layers(end) -> bool:
        return any(graph.uses_params(n) for n in graph.nodes[graph.index[source] + 1: graph.index[end] + 1]
                   if (n is end or graph.is_anc(n, end)) and graph.is_anc(source, n))
    if not (through_layers(a) and through_layers(b)):
        return None
    y, s = (a, b) if graph.index[a] < graph.index[b] else (b, a)
    cand = _Candidate(add, source, y, [], _branch_nodes(graph, source, y, set()))
    block = (graph.layers_of.get(add) or [""])[-1]
    where = f"block '{block}'" if block else f"the residual add at {graph.ctx.where(add)}"
    cand.reason = (f"{where} adds {graph.ctx.where(s)} to its branch, not its input: the shortcut is not the "
                   "identity, so removing the branch would not leave the input")
    return cand


def _check_branch(graph: _Graph, cand: _Candidate) -> None:
    """Refuse a branch whose removal would change what the rest of the model computes, then find
    the parameters its gate scales."""
    ctx = graph.ctx
    for n in sorted(cand.nodes, key=graph.index.get):
        outside = [u for u in n.users if u not in cand.nodes and u is not cand.add and not _is_check(u)]
        if outside and graph.carries_data(n):  # a size read from the branch's input is the input's size
            cand.reason = (f"{ctx.where(n)} in the branch of the residual add at {ctx.where(cand.add)} also feeds "
                           f"{ctx.where(outside[0])}, outside the branch")
            return
        target = mutated_argument(n, ctx.module(n) if n.op == "call_module" else None)
        if isinstance(target, torch.fx.Node) and target not in cand.nodes:
            cand.reason = f"{ctx.where(n)} in the branch changes a tensor the rest of the model reads, in place"
            return
    for n in cand.nodes:
        for fqn in graph.params_read(n):
            others = [u for u in graph.readers.get(fqn, []) if u not in cand.nodes]
            if others:
                cand.reason = f"parameter '{fqn}' of the branch is also read at {ctx.where(others[0])}"
                return
            cand.params.add(fqn)
    cand.scaled, why = _last_layer(graph, cand)
    if why is not None:
        cand.reason = why


def _last_layer(graph: _Graph, cand: _Candidate) -> tuple[list[str], str | None]:
    """The parameters that scale the branch's output: those of its last layer, reached from y
    through homogeneous ops; or why there are none."""
    ctx = graph.ctx
    n = cand.y
    while True:
        if n.op == "call_module":
            module = ctx.module(n)
            if isinstance(module, LAST_LAYER_MODULES):
                params = [ctx.fqn_of(n, name) for name in ("weight", "bias") if ctx.fqn_of(n, name) is not None]
                if ctx.fqn_of(n, "weight") is None:
                    return [], f"the branch ends in {ctx.where(n)}, which has no weight to scale its output"
                return _read_once(graph, cand, params, n)
        name = op_name(n)
        if name in LAST_LAYER_CALLS:
            params = [ctx.fqn(n.args[i]) if i is not None and len(n.args) > i else None for i in LAST_LAYER_CALLS[name]]
            if params[0] is None:
                return [], f"the branch ends in {ctx.where(n)}, whose weight is not a parameter"
            return _read_once(graph, cand, [p for p in params if p is not None], n)
        if name in ("mul", "mul_", "imul"):
            scale = next((ctx.fqn(a) for a in n.args if ctx.fqn(a) is not None and ctx.is_parameter(ctx.fqn(a))), None)
            if scale is not None:  # a layer scale
                return _read_once(graph, cand, [scale], n)
        before = _homogeneous_input(graph, cand, n)
        if before is None:
            return [], f"the branch ends in {ctx.where(n)}, whose output no parameter scales"
        n = before


def _homogeneous_input(graph: _Graph, cand: _Candidate, n):
    """The one input of the branch that ``n``'s output scales with (a view, dropout, a tuple's item,
    a product with a tensor from outside the branch), or None."""
    if n.op == "call_module":
        module = graph.ctx.module(n)
        return n.args[0] if isinstance(module, HOMOGENEOUS_MODULES) and n.args[0] in cand.nodes else None
    name = op_name(n)
    inputs = [a for a in n.all_input_nodes if a in cand.nodes and a.op != "get_attr"]
    if name not in HOMOGENEOUS or len(inputs) != 1:
        return None
    if name in ("truediv", "div", "div_") and n.args[0] is not inputs[0]:
        return None  # divided by the branch: not homogeneous
    return inputs[0]


def _read_once(graph: _Graph, cand: _Candidate, params: list[str], n) -> tuple[list[str], str | None]:
    """The last layer's parameters, when the gate can scale them: the branch's own, read once, not scalars."""
    for fqn in params:
        if fqn not in cand.params:
            return [], f"parameter '{fqn}' of the branch's last layer is also read outside the branch"
        if len(graph.readers.get(fqn, [])) != 1:
            return [], f"parameter '{fqn}' of the branch's last layer is read more than once"
        if len(graph.ctx.param_shape(fqn)) == 0:
            return [], f"parameter '{fqn}' of the branch's last layer is a scalar"
    return params, None


def _inside(graph: _Graph, cand: _Candidate, path: str) -> bool:
    allowed = cand.nodes | set(cand.shortcut)
    return all(n in allowed for n in graph.nodes_of.get(path, [])) and any(
        n in cand.nodes for n in graph.nodes_of.get(path, []))


def _own_layers(graph: _Graph, cand: _Candidate) -> None:
    """The layers that hold the branch and nothing else: the one that ends it (replaced by zeros) and
    those before it (bypassed); ``own_reason`` says why there is no such plan."""
    ctx = graph.ctx
    outer: dict = {}
    for n in cand.nodes:
        outer[n] = next((p for p in graph.layers_of.get(n, []) if _inside(graph, cand, p)), None)
    end = cand.y
    while _homogeneous_input(graph, cand, end) is not None:  # through dropout, a layer scale, a tuple's item
        end = _homogeneous_input(graph, cand, end)
    layer = outer.get(end)
    if layer is None:
        cand.own_reason = (f"the branch of the residual add at {ctx.where(cand.add)} ends in its block's own forward "
                           f"({ctx.where(end)}), not in a layer that shrink could replace by zeros")
        return
    layers = {p for p in outer.values() if p is not None}
    loose = sorted(fqn for fqn in cand.params if not any(fqn.startswith(f"{p}.") for p in layers))
    if loose:
        cand.own_reason = (f"the forward of the block reads parameter '{loose[0]}' itself, outside a layer shrink "
                           "could replace")
        return
    model = ctx.capture.model
    for path in layers:
        for name, _ in model.get_submodule(path).named_parameters():
            fqn = ctx.tensor_name(f"{path}.{name}")
            if fqn not in cand.params:
                cand.own_reason = f"layer '{path}' of the branch has parameter '{fqn}', which the branch does not read"
                return
    cand.zero, cand.bypass = layer, sorted(layers - {layer})


def _blocks(graph: _Graph, found: list[_Candidate]) -> None:
    """For each layer whose forward holds residual adds: whether it is made of residual branches only
    (then it is bypassed whole once all of them are dead)."""
    by_layer: dict[str, list[_Candidate]] = {}
    for cand in found:
        stack = graph.layers_of.get(cand.add, [])
        if stack:
            by_layer.setdefault(stack[-1], []).append(cand)
    model = graph.ctx.capture.model
    for path, cands in by_layer.items():
        cands.sort(key=lambda c: graph.index[c.add])
        if any(c.reason is not None for c in cands):
            continue
        body = set().union(*(c.nodes | set(c.shortcut) | {c.add} for c in cands))
        chained = all(later.x is earlier.add for earlier, later in zip(cands, cands[1:]))
        first_in = cands[0].x not in graph.nodes_of.get(path, [])
        rest = [n for n in graph.nodes_of.get(path, []) if n not in body]
        last = cands[-1].add
        if len(rest) == 1 and _is_relu(graph, rest[0]) and rest[0].args[0] is last and _non_negative(graph, cands[0].x):
            last = rest[0]
            rest = []
        params = {graph.ctx.tensor_name(f"{path}.{name}") for name, _ in model.get_submodule(path).named_parameters()}
        if chained and first_in and not rest and params <= set().union(*(c.params for c in cands)) \
                and all(u not in graph.nodes_of.get(path, []) for u in last.users):
            for cand in cands:
                cand.block = path


def _is_relu(graph: _Graph, n) -> bool:
    if n.op == "call_module":
        return isinstance(graph.ctx.module(n), nn.ReLU)
    return op_name(n) in RELUS


def _non_negative(graph: _Graph, n) -> bool:
    """Whether a tensor is a ReLU's output, through pooling and views (a ResNet block's input)."""
    while True:
        if _is_relu(graph, n):
            return True
        if n.op == "call_module" and isinstance(graph.ctx.module(n), (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
                                                                        nn.Identity, nn.Dropout)) \
                or n.op != "call_module" and op_name(n) in KEEP_SIGN:
            if not n.args or not isinstance(n.args[0], torch.fx.Node):
                return False
            n = n.args[0]
            continue
        return False


def _siblings(found: list[_Candidate], cand: _Candidate) -> int:
    return sum(c.block == cand.block for c in found)


def _probe(graph: _Graph, found: list[_Candidate]) -> None:
    """Run the model once on the example inputs with hooks on every layer a removal would replace:
    what it returns (a tensor, or a tuple whose first entry is the tensor), and whether it keeps
    the shape and dtype of its first tensor input; a layer that does not, or is called more than
    once, cannot be replaced (the plan using it is dropped, with the reason)."""
    capture = graph.ctx.capture
    model = capture.model
    paths = {p for c in found if c.reason is None for p in [c.zero, *c.bypass, c.block] if p is not None}
    if not paths:
        return
    seen: dict[str, list] = {p: [] for p in paths}
    handles = []

    def hook(path):
        def record(module, args, kwargs, output):
            x = next((v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)), None)
            seen[path].append((x, output))
        return record
    for path in paths:
        handles.append(model.get_submodule(path).register_forward_hook(hook(path), with_kwargs=True))
    try:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            args, kwargs = fresh((capture.args, capture.kwargs))  # the forward may write into its inputs
            model(*args, **kwargs)
    except Exception:  # noqa: BLE001 - no probe, no replacement: every plan is refused below
        pass
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    verdict = {p: _returns(p, calls, model.get_submodule(p)) for p, calls in seen.items()}
    for cand in found:
        if cand.reason is not None:
            continue
        if cand.zero is not None:
            problem = next((verdict[p] for p in [cand.zero, *cand.bypass] if isinstance(verdict[p], str)), None)
            if problem is not None:
                cand.zero, cand.bypass, cand.own_reason = None, [], problem
        if cand.block is not None and (isinstance(verdict[cand.block], str) or verdict[cand.block][1] is not None):
            cand.block = None  # a block that changes the shape cannot be bypassed
        for p in [cand.zero, *cand.bypass, cand.block]:
            if p is not None:
                cand.returns[p] = verdict[p]


def _returns(path: str, calls: list, layer: nn.Module) -> tuple[int, int | None] | str:
    """How a replacement of this layer must return: (0 for a tensor or n for an n-tuple, the width of
    its output's last dim where only that differs from its input's, else None); or why it cannot."""
    if len(calls) != 1:
        return f"layer '{path}' runs {len(calls)} times in the forward, so it cannot be replaced"
    x, output = calls[0]
    returns = 0
    if isinstance(output, (tuple, list)) and output and type(output) in (tuple, list):
        returns, output = len(output), output[0]
    if not isinstance(output, torch.Tensor) or x is None:
        return f"layer '{path}' does not return a tensor computed from a tensor input, so it cannot be replaced"
    if output.shape == x.shape and output.dtype == x.dtype:
        return returns, None
    if isinstance(layer, nn.Linear) and output.shape[:-1] == x.shape[:-1] and output.dtype == x.dtype:
        return returns, output.shape[-1]  # a linear that changes the width: zeros of its output's width
    return (f"layer '{path}' changes the shape of its input ({tuple(x.shape)} -> {tuple(output.shape)}) other than in "
            "its last dim (or is no nn.Linear), so zeros computed from its input cannot stand in for it")


def _record(ctx: RuleContext, graph: _Graph, found: list[_Candidate]) -> None:
    """One space of kind ``blocks``, an entry per branch; a refused branch is tainted with its reason."""
    ids = ctx.new_space(len(found), "blocks", "", found[0].add, module_type="residual branch")
    space = ctx.spaces[-1]
    entries = []
    model = ctx.capture.model
    for gid, cand in zip(ids.tolist(), found):
        owner = (graph.layers_of.get(cand.add) or [""])[-1]
        whole = cand.block is not None and _siblings(found, cand) == 1  # the branch is its block
        name = (cand.block if whole else cand.zero or cand.block) or owner or ctx.where(cand.add)
        layer_type = type(model.get_submodule(name)).__name__ if _exists(model, name) else "residual branch"
        branch = None
        if cand.reason is not None:
            ctx.taint(torch.tensor([gid]), cand.reason)
        else:
            params = set(cand.params)
            for path in (cand.zero, *cand.bypass):
                if path is not None:
                    params |= {ctx.tensor_name(f"{path}.{n}") for n, _ in model.get_submodule(path).named_parameters()}
            for fqn in sorted(params):
                shape = ctx.param_shape(fqn)
                role = Role.BRANCH_OUTPUT if fqn in cand.scaled else Role.BRANCH
                ctx.attach(fqn, role, torch.full((shape[0],) + (1,) * (len(shape) - 1), gid), 0)
            block = (cand.block, *cand.returns[cand.block]) if cand.block is not None else None
            zero = (cand.zero, *cand.returns[cand.zero]) if cand.zero is not None else None
            branch = Branch(name, block, _siblings(found, cand) if block else 0, zero,
                            tuple((p, *cand.returns[p]) for p in cand.bypass))
        entries.append((name, layer_type, branch))
    space.module, space.module_type, space.entries = entries[0][0], entries[0][1], entries
