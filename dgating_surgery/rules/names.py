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
