"""What an op is called in the rule table: one name for every spelling of it (``operator.add``,
``torch.add``, ``Tensor.add``, ``aten.add.Tensor``)."""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F

FUNCTION_ALIASES = {operator.add: "add", operator.iadd: "iadd", operator.sub: "sub", operator.isub: "isub",
                    operator.mul: "mul", operator.imul: "imul", operator.truediv: "truediv",
                    operator.itruediv: "itruediv", operator.getitem: "getitem", F.dropout: "dropout",
                    getattr: "getattr", F.batch_norm: "F.batch_norm", F.instance_norm: "F.batch_norm",
                    operator.matmul: "matmul"}


def op_name(node) -> str:
    """The table name of a ``call_function``/``call_method`` node's op."""
    if node.op == "call_method":
        return node.target
    target = node.target
    if target in FUNCTION_ALIASES:
        return FUNCTION_ALIASES[target]
    if isinstance(target, torch._ops.OpOverload):
        return target.overloadpacket.__name__
    return getattr(target, "__name__", str(target))


# ops whose result shares memory with their first argument: an in-place op on the result changes it
ALIASING_OPS = {"view", "reshape", "_unsafe_view", "getitem", "slice", "select", "narrow", "transpose", "permute", "t",
                "expand", "broadcast_to", "expand_as", "unsqueeze", "squeeze", "flatten", "unflatten", "view_as",
                "reshape_as", "chunk", "split", "split_with_sizes", "unbind", "movedim", "moveaxis", "swapaxes",
                "swapdims", "as_strided", "alias", "detach", "contiguous", "diagonal"}
_INPLACE_OPERATORS = {"iadd", "isub", "imul", "itruediv"}


def mutated_argument(node, module=None):
    """The argument an in-place call changes (``h.add_(1)``, ``h += 1``, ``F.relu(h, inplace=True)``,
    ``nn.ReLU(inplace=True)``), or None."""
    if node.op not in ("call_function", "call_method", "call_module") or not node.args:
        return None
    if node.op == "call_module":
        return node.args[0] if getattr(module, "inplace", False) is True else None
    name = op_name(node)
    in_place = (name in _INPLACE_OPERATORS or node.kwargs.get("inplace") is True
                or (name.endswith("_") and not name.startswith("_")))
    return node.args[0] if in_place else None
