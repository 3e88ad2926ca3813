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

import torch
from torch import nn

from .errors import GatingError
from .execution import as_tuple, output_diff, run, tolerance
from .rules.names import op_name
from .rules.table import SHAPE_ONLY_FN
from .tensors import tied_holders
from .tracing import capture, describe_node

SWAPPED_ATTR = "centered_layernorms"  # on the root: the names of the LayerNorms swapped for CenteredLayerNorm


class CenteredLayerNorm(nn.LayerNorm):
    """A LayerNorm whose input is centred, computed as the RMS norm it then equals:
    w * x / sqrt(mean(x^2) + eps) + b (in float32, like LayerNorm under autocast). Its tensors and
    attributes are the LayerNorm's, so a state_dict loads into either class."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight is not None:
            h = h * self.weight.float()
        if self.bias is not None:
            h = h + self.bias.float()
        return h.to(x.dtype)


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


def find_stream(cap) -> tuple[list[str], dict[str, nn.Module], list[str]]:
    """(the LayerNorms reading the residual stream, the writers to centre by name, the tensors added
    to it directly), or a GatingError naming the reader or writer that prevents centring."""
    model, gm = cap.model, cap.gm
    norms = {node: name for node in gm.graph.nodes if (name := _layer_norm_of(model, node)) is not None}
    if not norms:
        raise GatingError(f"{type(model).__name__} has no LayerNorm over its last dim: no stream to centre")
    stream, todo, writers, params = set(), [n.args[0] for n in norms], {}, []
    while todo:
        node = todo.pop()
        if node in stream:
            continue
        stream.add(node)
        writer = _writer_of(model, node)
        name = op_name(node) if node.op in ("call_function", "call_method") else None
        if _layer_norm_of(model, node) is not None:
            raise GatingError(f"the residual stream is the output of the LayerNorm {describe_node(gm, node)}: a "
                              "post-LayerNorm model (each block normalizes after its residual add, as BERT does) has no "
                              "centred stream; only pre-LayerNorm streams (GPT-2, ViT) convert")
        if node.op == "get_attr":
            params.append(node.target)
        elif writer is not None and (node.op == "call_module" or name not in PASS):
            writers[writer[0]] = writer[1]
        elif name in ADDS and not all(isinstance(a, torch.fx.Node) for a in node.args[:2]):
            raise GatingError(f"the residual stream gets a constant added at {describe_node(gm, node)}, which cannot be "
                              "centred")
        elif name in PASS or _scalar_scale(node):
            if name in ("cat", "concat") and _cat_dim(node) % len(cap.values[node].shape) == len(cap.values[node].shape) - 1:
                raise GatingError(f"the residual stream is concatenated along the hidden dim at {describe_node(gm, node)}")
            todo.extend(_tensor_args(node.args if name in ADDS | {"cat", "concat"} else node.args[:1]))
        else:
            raise GatingError(f"the residual stream is written by {describe_node(gm, node)}, which cannot be centred "
                              "(embeddings, linear and conv layers and tensors added to the stream can)")
    for node in stream:
        for user in node.users:
            if user not in stream and user not in norms and op_name(user) not in SHAPE_READERS:
                raise GatingError(f"the residual stream is read by {describe_node(gm, user)}, not a LayerNorm: "
                                  "centring the stream would change what it reads")
    return sorted(set(norms.values())), writers, params


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


def center_layernorms(model: nn.Module, example_inputs, example_kwargs=None) -> list[str]:
    """Centre every writer of the residual stream and swap its LayerNorms for ``CenteredLayerNorm``
    (in place; the function is unchanged, checked on the example inputs). Returns the swapped
    LayerNorms' names. A model whose stream is read by anything but a LayerNorm (a post-LN model
    such as BERT, whose residual sum is normalized after the add and also read by the next block),
    or written by something that cannot be centred, or whose writer shares its weight with another
    layer (a tied output layer), is refused with the reason, and left as it was."""
    args, kwargs = as_tuple(example_inputs), dict(example_kwargs or {})
    cap = capture(model, args, kwargs)
    names, writers, params = find_stream(cap)
    width = model.get_submodule(names[0]).normalized_shape[0]
    tensors = [row for name, m in writers.items() for row in _output_tensors(name, m)]
    tensors += [(name, _get(model, name), -1) for name in params]
    tied = tied_holders(model)
    for name, tensor, dim in tensors:
        if getattr(writers.get(name.rpartition(".")[0]), "groups", 1) != 1:
            raise GatingError(f"'{name}' is a grouped conv writing into the residual stream: its outputs cannot be centred")
        if tensor.shape[dim] != width:
            raise GatingError(f"'{name}' writes {tensor.shape[dim]} channels into a residual stream of {width}")
        if len(tied.get(id(tensor), ())) > 1:
            raise GatingError(f"'{name}' writes into the residual stream and is also used elsewhere (a tied weight): "
                              "centring it would change that use; untie it first")
    reference = run(model, args, kwargs)
    saved = [(tensor, tensor.detach().clone()) for _, tensor, _ in tensors]
    with torch.no_grad():
        for _, tensor, dim in tensors:
            tensor.sub_(tensor.mean(dim, keepdim=True))
    replay(model, names)
    diff = output_diff(reference, run(model, args, kwargs))
    if not diff <= tolerance(reference):
        with torch.no_grad():
            for tensor, value in saved:
                tensor.copy_(value)
        for name in names:
            model.get_submodule(name).__class__ = nn.LayerNorm
        setattr(model, SWAPPED_ATTR, [n for n in getattr(model, SWAPPED_ATTR) if n not in names])
        raise GatingError(f"centring the residual stream of {type(model).__name__} changed its output by {diff:.3g} of its "
                          "largest value: something besides its LayerNorms reads the stream. The model was left as it was")
    return names


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
