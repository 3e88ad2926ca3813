"""Pooling and reductions: ops that combine entries along some dims. Over dims that carry no
group they keep the labels; over a grouped dim only a sum is exact (zeros add nothing)."""
from __future__ import annotations

import math

from .context import RuleContext
from .normalization import rms_scope, rms_statistics
from .structural import arg


def spatial(ctx: RuleContext, node):
    """Pooling and resizing over dims 2..: channels pass, entries of a channel stay zero."""
    lab = ctx.labels(node.args[0])
    if lab is None:
        return None
    if any(d >= 2 for d in lab.varying_dims()):
        ctx.taint(lab.ids, f"{ctx.where(node)} pools over a grouped dim")
        return None
    lab = lab.reduced(range(2, lab.ids.ndim)).compressed()  # a window of zeros and non-zeros is not zero
    return lab if ctx.is_tensor(node) else [lab, None]  # max_pool2d_with_indices: (values, indices)


def reduction(ctx: RuleContext, node, kind: str, dim_pos: int = 1):
    """sum/mean/max/norm over dims. A sum (or a p-norm) over a grouped dim consumes it: exact zeros
    add nothing, so the group only has to reach it as zeros. A mean divides by the count and a max
    compares entries, so a group there is not exactly removable. Over other dims labels pass."""
    x = node.args[0]
    lab = ctx.labels(x)
    if lab is None:
        return None
    nd = lab.ids.ndim
    dims = arg(node, dim_pos, "dim")
    dims = range(nd) if dims is None else sorted(d % nd for d in ([dims] if isinstance(dims, int) else dims))
    keep = bool(arg(node, dim_pos + 1, "keepdim", False))
    varying = lab.varying_dims()
    if any(d in varying for d in dims) and any(d not in dims for d in varying):
        ctx.taint(lab.ids, f"{ctx.where(node)} sums over one grouped dim of a tensor grouped along another too (an "
                           "entry there belongs to two groups)")
        return None
    if any(d in varying for d in dims):
        scope = rms_scope(ctx, node) if kind == "mean" and len(dims) == 1 else None
        if isinstance(scope, tuple):  # the mean of squares inside an RMS norm
            rms_statistics(ctx, node, x, dims[0], scope)
            return None
        if kind not in ("sum", "norm"):
            why = f" (not an RMS norm a cut can rescale: {scope})" if isinstance(scope, str) else ""
            ctx.taint(lab.ids, f"{ctx.where(node)} takes the {kind} over a grouped dim{why}")
            return None
        ctx.visit(lab, node)
        shape = ctx.shape(x)
        grouped = [shape[d] for d in dims if d in varying]
        ctx.summed_over[node] = ([*grouped, math.prod(grouped)], lab.ids)
        return None
    out = lab.reduced(dims)
    if not keep:
        out = out.map(lambda t: t.reshape([s for d, s in enumerate(t.shape) if d not in dims]))
    return out


def top_k(ctx: RuleContext, node):
    """``topk``: which entries win depends on all of them (a router choosing a token's experts):
    removing one changes what the others are picked for, so nothing reaching it is removable; its
    values and indices carry no group."""
    ctx.taint_inputs(node, f"is ranked at {ctx.where(node)} (top-k selection, e.g. a router choosing experts): "
                           "removing one entry changes which others are picked, so none is exactly removable")
    return [None, None]


def output(ctx: RuleContext, node):
    """The model's outputs: a group that reaches them is part of what the model computes."""
    for lab in ctx.all_labels(node.args):
        ctx.taint(lab.ids, "reaches the model output (never cut)")
    return None
