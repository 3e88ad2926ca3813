"""Element-wise rules: an op applied entry by entry keeps every entry's group; what it changes is
whether a gated (zero) entry stays exactly zero.

Operands of an element-wise op meet entry by entry, so their groups are tied where they meet. An
operand that is broadcast along a grouped dim of another (a scalar parameter, a (B, 1, H, W) map
over channels) is shared by every group there: it is not tied to them and it is never scaled by
their gates. An operand that carries no group but has the full size along a grouped dim (the
output of an op without a rule) cannot shrink with it, so those groups are blocked.
"""
from __future__ import annotations

import math
import operator

import torch

from ..kinds import Role
from ..labels import NONE, Labels
from .context import RuleContext, unknown
from .structural import arg


def unary(ctx: RuleContext, node, keeps_zero: bool):
    """f(x) entry-wise: labels pass unchanged; the zero flags survive iff f(0) == 0."""
    lab = ctx.labels(node.args[0])
    if lab is None or keeps_zero:
        return lab
    return lab.not_zero()


def elementwise(ctx: RuleContext, node, operands: list, zero) -> Labels | None:
    """Tie the groups of ``operands`` (nodes or Python numbers) where they meet; ``zero(flags,
    values)`` gives an entry's zero flag from the operands' flags (False for an operand that is not
    a tensor with groups) and their Python values (None for tensors)."""
    nd = len(ctx.shape(node))
    labs = [_aligned(ctx, v, nd) if ctx.is_tensor(v) else None for v in operands]
    varying = {d for lab in labs if lab is not None for d in lab.varying_dims()}
    if ctx.frontend == "export":
        size_literals(ctx, node, operands, labs, nd)
    if not varying and all(lab is None for lab in labs):
        return None
    met, tied = [], []  # every operand's labels for the zero flags; those whose groups meet here
    for v, lab in zip(operands, labs):
        if not ctx.is_tensor(v):
            met.append(Labels.unlabeled((1,) * nd))
            continue
        size = (1,) * (nd - len(ctx.shape(v))) + tuple(ctx.shape(v))
        shared = [d for d in varying if size[d] == 1]
        if lab is None:
            if any(size[d] > 1 for d in varying):
                for other in labs:
                    if other is not None:
                        ctx.taint(other.ids, f"meets '{v}' at {ctx.where(node)}, which belongs to no group but has "
                                             "the full size along the grouped dim, so it cannot shrink with it")
            met.append(Labels.unlabeled((1,) * nd))
        elif shared and lab.varying_dims():  # its entries meet the others' groups along another dim
            reason = f"meets groups along another dim at {ctx.where(node)} (each entry there belongs to two groups)"
            if ctx.only_parameters(lab.ids):  # a table of constants (RoPE's inverse frequencies): kept whole
                ctx.taint(lab.ids, reason)
            else:
                for other in labs:
                    if other is not None:
                        ctx.taint(other.ids, reason)
            met.append(Labels.unlabeled((1,) * nd))
        elif shared:  # broadcast over groups: tied to none of them, scaled by none of their gates
            met.append(Labels.unlabeled((1,) * nd))
        else:
            met.append(lab)
            tied.append(lab.ids)
    shape = torch.broadcast_shapes(*[m.ids.shape for m in met])
    out = torch.full(shape, NONE, dtype=torch.int64)
    for i, ids in enumerate(tied):
        ids = ids.expand(shape)
        if i:
            ctx.tie(tied[0].expand(shape).numpy(), ids.numpy(), node)
        out = torch.where(out >= 0, out, ids)
    values = [None if ctx.is_tensor(v) else v for v in operands]
    flags = []
    for name in ("zaff", "zall"):
        flag = zero([getattr(m, name) for m in met], values)
        flags.append(torch.as_tensor(flag).expand(out.shape))
    return Labels(out, *flags).compressed()


def size_literals(ctx: RuleContext, node, operands: list, labs: list, nd: int) -> None:
    """torch.export writes a size read as data (``h * h.size(1)``, ``h / h.numel()``,
    ``h.sum(1) / h.shape[1]``) as a number, which would not follow the cut. A number here equal to
    the size of a grouped dim of an operand (or its count of entries, or the size of a grouped dim the
    operand was summed over), or to its reciprocal, is taken for one: those groups are kept."""
    numbers = [abs(v) for v in operands if isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) not in (0, 1)]
    if not numbers:
        return
    for v, lab in zip(operands, labs):
        if not ctx.is_tensor(v):
            continue
        candidates = []
        if lab is not None and lab.varying_dims():
            shape = (1,) * (nd - len(ctx.shape(v))) + tuple(ctx.shape(v))
            sizes = [shape[d] for d in lab.varying_dims()]
            candidates.append(([*sizes, math.prod(shape)], lab.ids))
        if v in ctx.summed_over:
            candidates.append(ctx.summed_over[v])
        for sizes, ids in candidates:
            hit = next((n for n in numbers for size in sizes if math.isclose(n, size) or math.isclose(n * size, 1.0)),
                       None)
            if hit is not None:
                ctx.taint(ids, f"{ctx.where(node)} uses the number {hit:g}, the size of a grouped dim under "
                               "torch.export (a size read as data would not follow the cut)")


def _aligned(ctx: RuleContext, v, nd: int) -> Labels | None:
    """The labels of tensor ``v`` with leading dims of size 1 up to ``nd`` dims."""
    lab = ctx.labels(v)
    if lab is None or lab.ids.ndim == nd:
        return lab
    return lab.map(lambda t: t.reshape((1,) * (nd - t.ndim) + tuple(t.shape)))


def _is_zero(value) -> bool:
    return isinstance(value, (int, float, bool)) and value == 0


def _operands(node, names=("input", "other")):
    return [arg(node, i, name) for i, name in enumerate(names)]


def add(ctx: RuleContext, node):
    """a + b, a - b: zero where both are."""
    return elementwise(ctx, node, _operands(node),
                       lambda z, v: (z[0] | _is_zero(v[0])) & (z[1] | _is_zero(v[1])))


def mul(ctx: RuleContext, node):
    """a * b: zero where either is."""
    return elementwise(ctx, node, _operands(node), lambda z, v: z[0] | z[1] | _is_zero(v[0]) | _is_zero(v[1]))


def div(ctx: RuleContext, node):
    """a / b: zero where the numerator is."""
    return elementwise(ctx, node, _operands(node), lambda z, v: z[0] | _is_zero(v[0]))


COMPARISONS = {"gt": operator.gt, "lt": operator.lt, "ge": operator.ge, "le": operator.le, "eq": operator.eq,
               "ne": operator.ne}


def compare(ctx: RuleContext, node):
    """a > b and friends: a mask over the operands' entries. Zero where every tensor operand is and
    the comparison of zero with the numbers involved is False."""
    cmp = COMPARISONS[ctx.op_name(node).strip("_")]

    def zero(z, v):
        value = cmp(*(0 if x is None else x for x in v))
        return (z[0] if v[0] is None else True) & (z[1] if v[1] is None else True) & (not value)
    return elementwise(ctx, node, _operands(node), zero)


def where(ctx: RuleContext, node):
    """torch.where(cond, a, b): zero where both branches are."""
    operands = _operands(node, ("condition", "input", "other"))
    return elementwise(ctx, node, operands, lambda z, v: (z[1] | _is_zero(v[1])) & (z[2] | _is_zero(v[2])))


def masked_fill(ctx: RuleContext, node):
    """x.masked_fill(mask, value): zero where x is and either the mask is (False) or value is 0."""
    operands = _operands(node, ("input", "mask"))
    value = arg(node, 2, "value")
    if ctx.is_tensor(value):
        operands.append(value)
    return elementwise(ctx, node, operands, lambda z, v: z[0] & (z[1] | _is_zero(value)))


def clamp(ctx: RuleContext, node):
    """clamp/clip/hardtanh keep zero only when their bounds include it; tensor bounds meet x
    entry-wise."""
    name = ctx.op_name(node)
    if node.op == "call_module":
        m = ctx.module(node)
        low, high = m.min_val, m.max_val
    elif name.startswith("hardtanh"):
        low, high = arg(node, 1, "min_val", -1.0), arg(node, 2, "max_val", 1.0)
    else:
        low, high = arg(node, 1, "min"), arg(node, 2, "max")
    bounds = [b for b in (low, high) if ctx.is_tensor(b)]
    if bounds:
        return elementwise(ctx, node, [node.args[0], *bounds], lambda z, v: _all(z))
    keeps = (low is None or low <= 0) and (high is None or high >= 0)
    return unary(ctx, node, keeps_zero=keeps)


def clamp_min_max(ctx: RuleContext, node, bound: str):
    """clamp_min(x, m) / clamp_max(x, m)."""
    value = arg(node, 1, "min" if bound == "min" else "max")
    if ctx.is_tensor(value):
        return elementwise(ctx, node, [node.args[0], value], lambda z, v: _all(z))
    return unary(ctx, node, keeps_zero=value <= 0 if bound == "min" else value >= 0)


def power(ctx: RuleContext, node):
    """x ** p keeps zero for a positive exponent; a tensor exponent or base meets x entry-wise."""
    base, exponent = _operands(node, ("input", "exponent"))
    if ctx.is_tensor(base) and not ctx.is_tensor(exponent):
        return unary(ctx, node, keeps_zero=isinstance(exponent, (int, float)) and exponent > 0)
    return elementwise(ctx, node, [base, exponent], lambda z, v: torch.tensor(False))


def like(ctx: RuleContext, node, value=None, value_pos=None):
    """zeros_like(x), ones_like(x), full_like(x, v): a tensor of x's shape, so of x's groups; zero
    where the fill ``value`` (or the argument at ``value_pos``) is."""
    lab = ctx.labels(node.args[0])
    if lab is None:
        return None
    if value_pos is not None:
        value = arg(node, value_pos, "fill_value")
    return lab if _is_zero(value) else lab.not_zero()


def _all(flags):
    out = flags[0]
    for f in flags[1:]:
        out = out & f
    return out


__all__ = ["unary", "elementwise", "add", "mul", "div", "compare", "where", "masked_fill", "clamp", "clamp_min_max",
           "power", "like", "prelu", "glu"]


def prelu(ctx: RuleContext, node):
    """PReLU: zero-keeping; with one slope per channel (dim 1) the slopes are cut with the channel."""
    x = node.args[0]
    weight = ctx.fqn_of(node, "weight") if node.op == "call_module" else ctx.fqn(arg(node, 1, "weight"))
    lab = ctx.labels(x)
    if lab is None:
        return None
    if weight is None:  # slopes computed in the forward: they would not shrink with the channels
        return unknown(ctx, node)
    if ctx.param_shape(weight) in ((), (1,)):
        return lab
    per_channel = ctx.per_dim(x, 1, node)
    if per_channel is not None:
        ctx.attach(weight, Role.CUT_ONLY, per_channel.ids.reshape(-1), 0)
    return lab


def glu(ctx: RuleContext, node):
    """GLU: a * sigmoid(b) with a, b the two halves of ``dim``. The halves meet entry by entry, so a
    group along ``dim`` takes its entry in both; the result is zero where a is."""
    x = node.args[0]
    lab = ctx.labels(x)
    if lab is None:
        return None
    dim = (ctx.module(node).dim if node.op == "call_module" else arg(node, 1, "dim", -1)) % lab.ids.ndim
    size = ctx.shape(x)[dim]
    full = lab.map(lambda t: t.expand(*[size if d == dim else t.shape[d] for d in range(t.ndim)]))
    a, b = (full.map(lambda t, k=k: t.narrow(dim, k * (size // 2), size // 2)) for k in (0, 1))
    ctx.tie(a.ids.numpy(), b.ids.numpy(), node)
    return a.compressed()
