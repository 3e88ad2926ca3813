"""Rules for ops that read a tensor's shape, and the check on where such a size goes.

The size of a grouped dim changes when groups are cut. As a view's size it follows the tensor it
was read from (``x.view(b, c // 2, 2, h, w)``); used as data (``h.sum(1) / h.size(1)``) it would
silently change the result, so the groups it counts are blocked.
"""
from __future__ import annotations

import torch

from .context import RuleContext, SizeRef
from .structural import arg

# ops whose size arguments may be sizes read from grouped dims: the tensor they make or view has
# those dims, and shrinks with them
SHAPE_ARGUMENT_OPS = {"view", "reshape", "_unsafe_view", "expand", "repeat", "unflatten", "split", "split_with_sizes",
                      "new_zeros", "new_ones", "new_empty", "new_full", "zeros", "ones", "empty", "full", "randn",
                      "rand"}


def size(ctx: RuleContext, node):
    """``x.size()``, ``x.shape`` (a list: a SizeRef per grouped dim) and ``x.size(d)``."""
    x = node.args[0]
    lab = ctx.labels(x)
    if lab is None:
        return None
    nd = lab.ids.ndim
    per_dim = [_dim_size(lab, d) for d in range(nd)]
    dim = arg(node, 1, "dim")
    if ctx.op_name(node) == "getattr":
        return per_dim if dim == "shape" else None
    return per_dim if dim is None else per_dim[dim % nd]


def _dim_size(lab, d: int) -> SizeRef | None:
    if d not in lab.varying_dims():
        return None
    line = lab.ids
    for other in range(lab.ids.ndim):
        if other != d:
            line = line.narrow(other, 0, 1)
    return SizeRef(line.reshape(-1), exact=True)


def numel(ctx: RuleContext, node):
    """``x.numel()``: counts every grouped entry."""
    lab = ctx.labels(node.args[0])
    if lab is None or not lab.varying_dims():
        return None
    return SizeRef(lab.ids.reshape(-1), exact=False)


def size_use(ctx: RuleContext, node, refs: list[SizeRef]):
    """Where sizes of grouped dims go: arithmetic on them gives a size (returned); a shape argument
    is fine (None: the node's own rule runs); anything else uses them as data and blocks them."""
    if not ctx.is_tensor(node):
        if ctx.op_name(node) == "getitem" and isinstance(ctx.env.get(node.args[0]), (list, tuple)):
            return None  # picking one dim's size out of x.size()
        return SizeRef(torch.cat([r.ids for r in refs]), exact=False)
    if ctx.op_name(node) not in SHAPE_ARGUMENT_OPS:
        for ref in refs:
            ctx.taint(ref.ids, f"the size of a grouped dim is used as data at {ctx.where(node)}, so removing "
                               "groups would change the result")
    return None


def shape_only(ctx: RuleContext, node):
    """Ops that read only a tensor's shape or make a new tensor of its shape: no data flows."""
    return None
