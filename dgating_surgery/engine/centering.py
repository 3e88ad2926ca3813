"""Centred residual streams: the exact route to a ``hidden`` cut under pre-LayerNorm (opt-in).

A LayerNorm subtracts its input's mean, which a removed channel changes, so the residual stream of
a LayerNorm transformer is not exactly removable as it is. When every reader of the stream is a
LayerNorm, centring every writer (the embeddings, every output projection: the mean over the
hidden dim subtracted from their weights and biases) leaves each LayerNorm's output unchanged,
since it subtracts the mean anyway; the stream is then centred, and on a centred input a LayerNorm
is an RMS norm with its bias, w * x / sqrt(mean(x^2) + eps) + b. ``center_layernorms`` does both
(the function is unchanged; checked on the example inputs) and swaps each such LayerNorm for a
``CenteredLayerNorm`` (that RMS norm, with the LayerNorm's tensors), which the RMS norm rules cut
exactly. The model keeps computing with RMS norms from then on (training moves the writers off
the centre): the swap is recorded in ``model.centered_layernorms`` and replayed by every loader
(``replay``): ``load_slim`` from the manifest, ``from_pretrained`` from the config.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import GatingError
from .execution import as_tuple, output_diff, run, tolerance
from .rules import register_module_rule, register_rms_norm
from .rules.names import op_name
from .rules.normalization import rms_norm_module
from .rules.table import SHAPE_ONLY_FN
from .tensors import tied_holders
from .tracing import capture, describe_node

SWAPPED_ATTR = "centered_layernorms"  # on the root: the names of the LayerNorms swapped for CenteredLayerNorm


class CenteredLayerNorm(nn.LayerNorm):
    """A LayerNorm whose input is centred, computed as the RMS norm it then equals:
    w * x / sqrt(mean(x^2) + eps) + b (half precisions computed in float32, as LayerNorm does). Its tensors and
    attributes are the LayerNorm's, so a state_dict loads into either class."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x if x.dtype in (torch.float32, torch.float64) else x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight is not None:
            h = h * self.weight.to(h.dtype)
        if self.bias is not None:
            h = h + self.bias.to(h.dtype)
        return h.to(x.dtype)


register_rms_norm(CenteredLayerNorm, "eps")  # the formula w * x / sqrt(mean(x^2) + eps), then its bias
register_module_rule(CenteredLayerNorm, rms_norm_module)  # symbolic tracing keeps it whole


# a writer of the stream -> the dim of its weight that indexes its outputs (the hidden channels);
# its bias, if any, is indexed by them too. Plugins add their libraries' layers (GPT-2's Conv1D).
WRITERS: dict[type, int] = {nn.Linear: 0, nn.Embedding: 1, nn.modules.conv._ConvNd: 0}


def register_writer(cls: type, output_dim: int) -> None:
    WRITERS[cls] = output_dim


# ops a stream passes through unchanged up to a linear map that keeps the mean over the hidden dim
# zero (a zero-mean input gives a zero-mean output): the walk from the LayerNorms back to the writers
# crosses them
PASS = {"add", "add_", "iadd", "dropout", "native_dropout", "clone", "contiguous", "alias", "to", "_to_copy", "type_as",
        "float", "view", "reshape", "_unsafe_view", "flatten", "transpose", "permute", "unsqueeze", "squeeze", "expand",
        "cat", "concat", "getitem", "detach"}
ADDS = {"add", "add_", "iadd"}
SHAPE_READERS = {*SHAPE_ONLY_FN, "size", "sym_size", "numel", "sym_numel"}  # users that read no value
LAYER_NORMS = {"layer_norm", "native_layer_norm"}


def _owner(model: nn.Module, node) -> tuple[str, nn.Module | None]:
    """The innermost module whose forward ``node`` belongs to (as the rules' ``owner_module``)."""
    paths = [node.target] if node.op == "call_module" else \
        [path for path, _ in reversed(list((node.meta.get("nn_module_stack") or {}).values()))]
    for path in paths:
        try:
            return path, model.get_submodule(path)
        except AttributeError:
            continue
    return "", None


def _layer_norm_of(model: nn.Module, node) -> str | None:
    """The name of the nn.LayerNorm over the last dim that ``node`` is the call of, else None."""
    path, module = _owner(model, node)
    is_call = node.op == "call_module" or op_name(node) in LAYER_NORMS
    if is_call and type(module) is nn.LayerNorm and len(module.normalized_shape) == 1:
        return path
    return None


def _writer_of(model: nn.Module, node) -> tuple[str, nn.Module] | None:
    path, module = _owner(model, node)
    if module is not None and any(isinstance(module, cls) for cls in WRITERS):
        return path, module
    return None


def _scalar_scale(node) -> bool:
    """A product or quotient by a Python number (an embedding scaled by sqrt(d)): linear, keeps the mean zero."""
    return op_name(node) in ("mul", "truediv", "div") and len(node.args) == 2 and isinstance(node.args[1], (int, float))


@dataclass
class Stream:
    """One residual stream: the LayerNorms reading it, its nodes, the writers to centre (by name),
    the tensors added to it directly, and why it cannot be centred (None: it can)."""

    norms: set[str] = field(default_factory=set)
    nodes: set = field(default_factory=set)
    writers: dict[str, nn.Module] = field(default_factory=dict)
    params: set[str] = field(default_factory=set)
    problem: str | None = None

    def merge(self, other: "Stream") -> "Stream":
        return Stream(self.norms | other.norms, self.nodes | other.nodes, {**self.writers, **other.writers},
                      self.params | other.params, self.problem or other.problem)


def find_streams(cap) -> list[Stream]:
    """The residual streams the LayerNorms of a captured model read (streams that share a node are one)."""
    model, gm = cap.model, cap.gm
    norms = {node: name for node in gm.graph.nodes if (name := _layer_norm_of(model, node)) is not None}
    streams: list[Stream] = []
    for node, name in norms.items():
        stream = Stream({name})
        stream.problem = _walk(cap, node.args[0], stream)
        for other in [o for o in streams if o.nodes & stream.nodes]:
            streams.remove(other)
            stream = stream.merge(other)
        streams.append(stream)
    for stream in streams:
        readers = {user for node in stream.nodes for user in node.users
                   if user not in stream.nodes and user not in norms and op_name(user) not in SHAPE_READERS}
        if readers and stream.problem is None:
            stream.problem = (f"the residual stream is read by {describe_node(gm, min(readers, key=str))}, not a "
                              "LayerNorm: centring the stream would change what it reads")
    return streams


def _walk(cap, start, stream: Stream) -> str | None:
    """Collect the stream from a LayerNorm's input back to its writers; why it cannot be centred, or None."""
    model, gm = cap.model, cap.gm
    todo = [start]
    while todo:
        node = todo.pop()
        if node in stream.nodes:
            continue
        stream.nodes.add(node)
        writer = _writer_of(model, node)
        name = op_name(node) if node.op in ("call_function", "call_method") else None
        if _layer_norm_of(model, node) is not None:
            return (f"the residual stream is the output of the LayerNorm {describe_node(gm, node)}: a post-LayerNorm "
                    "model (each block normalizes after its residual add, as BERT does) has no centred stream; only "
                    "pre-LayerNorm streams (GPT-2, ViT) convert")
        if node.op == "get_attr":
            stream.params.add(node.target)
        elif writer is not None and (node.op == "call_module" or name not in PASS):
            stream.writers[writer[0]] = writer[1]
        elif name in ADDS and not all(isinstance(a, torch.fx.Node) for a in node.args[:2]):
            return f"the residual stream gets a constant added at {describe_node(gm, node)}, which cannot be centred"
        elif name in PASS or _scalar_scale(node):
            if name in ("cat", "concat") and _cat_dim(node) % len(cap.values[node].shape) == len(cap.values[node].shape) - 1:
                return f"the residual stream is concatenated along the hidden dim at {describe_node(gm, node)}"
            todo.extend(_tensor_args(node.args if name in ADDS | {"cat", "concat"} else node.args[:1]))
        else:
            return (f"the residual stream is written by {describe_node(gm, node)}, which cannot be centred (embeddings, "
                    "linear and conv layers and tensors added to the stream can)")
    return None


def _cat_dim(node) -> int:
    return node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)


def _tensor_args(args) -> list:
    found = []
    for a in args:
        if isinstance(a, torch.fx.Node):
            found.append(a)
        elif isinstance(a, (list, tuple)):
            found.extend(_tensor_args(a))
    return found


@dataclass
class Centring:
    """What ``center_layernorms`` changed, so that it can be undone (a gate_model that fails after it
    leaves the model as it was): the swapped LayerNorms and each centred tensor's old value."""

    model: nn.Module
    names: list[str]
    saved: list[tuple[torch.Tensor, torch.Tensor]]

    def undo(self) -> None:
        with torch.no_grad():
            for tensor, value in self.saved:
                tensor.copy_(value)
        for name in self.names:
            self.model.get_submodule(name).__class__ = nn.LayerNorm
        left = [n for n in getattr(self.model, SWAPPED_ATTR) if n not in self.names]
        if left:
            setattr(self.model, SWAPPED_ATTR, left)
        else:
            delattr(self.model, SWAPPED_ATTR)


def center_layernorms(model: nn.Module, example_inputs, example_kwargs=None) -> Centring:
    """Centre every writer of the residual streams the model's LayerNorms read, and swap the LayerNorms
    for ``CenteredLayerNorm`` (in place; the function is unchanged, checked on the example inputs).
    When a stream is read by anything but a LayerNorm (a post-LN model such as BERT normalizes after
    the residual add), written by something that cannot be centred, or written by a weight another
    layer shares (a tied output layer), GatingError says which, and the model is left as it was."""
    args, kwargs = as_tuple(example_inputs), dict(example_kwargs or {})
    streams = find_streams(capture(model, args, kwargs))
    if not streams:
        raise GatingError(f"{type(model).__name__} has no LayerNorm over its last dim: no residual stream to centre")
    tied = tied_holders(model)
    for stream in streams:
        if stream.problem is None:
            stream.problem = _unfit_writer(model, stream, tied)
    problem = next((s.problem for s in streams if s.problem is not None), None)
    if problem is not None:  # a stream left under LayerNorm ties its channels to the centred ones: none could go
        raise GatingError(problem)
    tensors = [t for s in streams for t in _tensors(model, s)]
    reference = run(model, args, kwargs)
    done = Centring(model, sorted(n for s in streams for n in s.norms),
                    [(tensor, tensor.detach().clone()) for _, tensor, _ in tensors])
    with torch.no_grad():
        for _, tensor, dim in tensors:
            tensor.sub_(tensor.mean(dim, keepdim=True))
    replay(model, done.names)
    diff = output_diff(reference, run(model, args, kwargs))
    if not diff <= tolerance(reference):
        done.undo()
        raise GatingError(f"centring the residual stream of {type(model).__name__} changed its output by {diff:.3g} of "
                          "its largest value: something besides its LayerNorms reads it. The model was left as it was")
    return done


def _tensors(model: nn.Module, stream: Stream) -> list[tuple[str, torch.Tensor, int]]:
    """Every tensor a stream's writers add to it, as (name, tensor, the dim of the hidden channels)."""
    rows = [row for name, m in stream.writers.items() for row in _output_tensors(name, m)]
    return rows + [(name, _get(model, name), -1) for name in sorted(stream.params)]


def _unfit_writer(model: nn.Module, stream: Stream, tied: dict) -> str | None:
    """Why a stream's writers cannot be centred (a grouped conv, a width that is not the stream's,
    a weight shared with another layer), or None."""
    width = model.get_submodule(min(stream.norms)).normalized_shape[0]
    for name, tensor, dim in _tensors(model, stream):
        if getattr(stream.writers.get(name.rpartition(".")[0]), "groups", 1) != 1:
            return f"'{name}' is a grouped conv writing into the residual stream: its outputs cannot be centred"
        if tensor.ndim == 0 or tensor.shape[dim] != width:
            return f"'{name}' writes {tuple(tensor.shape)} into a residual stream of width {width}"
        if len(tied.get(id(tensor), ())) > 1:
            return (f"'{name}' writes into the residual stream and is also used elsewhere (a tied weight): centring "
                    "it would change that use; untie it first")
    return None


def _output_tensors(name: str, module: nn.Module) -> list[tuple[str, torch.Tensor, int]]:
    """A writer's weight (along its outputs' dim) and bias, as (name, tensor, dim) rows."""
    dim = next(d for cls, d in WRITERS.items() if isinstance(module, cls))
    rows = [(f"{name}.weight", module.weight, dim)]
    if getattr(module, "bias", None) is not None:
        rows.append((f"{name}.bias", module.bias, 0))
    return rows


def _get(model: nn.Module, fqn: str) -> torch.Tensor:
    module, _, attr = fqn.rpartition(".")
    return getattr(model.get_submodule(module), attr)


def replay(model: nn.Module, names) -> None:
    """Swap these LayerNorms of ``model`` for ``CenteredLayerNorm`` and record it on the model (what
    ``center_layernorms`` did; loaders replay it on the model they rebuild)."""
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, nn.LayerNorm):
            raise GatingError(f"'{name}' is a {type(module).__name__}, not the LayerNorm a centred stream swaps")
        module.__class__ = CenteredLayerNorm
    setattr(model, SWAPPED_ATTR, sorted(set(getattr(model, SWAPPED_ATTR, [])) | set(names)))
