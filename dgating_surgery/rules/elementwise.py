"""Element-wise rules: an op applied entry by entry keeps every entry's group; what it changes is
whether a gated (zero) entry stays exactly zero."""
from __future__ import annotations

import torch

from ..labels import Labels
from .context import RuleContext


def unary(ctx: RuleContext, node, keeps_zero: bool):
    """f(x) entry-wise: labels pass unchanged; the zero flags survive iff f(0) == 0."""
    lab = ctx.labels(node.args[0])
    if lab is None or keeps_zero:
        return lab
    return lab.not_zero()


def binary(ctx: RuleContext, node, kind: str):
    """Element-wise arithmetic of two operands: entries that meet are tied into one group.
    add/sub is zero when both sides are; mul when either is; div when the numerator is."""
    x, y = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
    lx, ly = ctx.labels(x), ctx.labels(y)
    if lx is None and ly is None:
        return None
    lx = lx if lx is not None else _constant(ctx, x)
    ly = ly if ly is not None else _constant(ctx, y)
    ix, iy = torch.broadcast_tensors(lx.ids, ly.ids)
    ctx.union(ix.numpy(), iy.numpy())
    ids = torch.where(ix >= 0, ix, iy)
    if kind == "add":
        zaff, zall = lx.zaff & ly.zaff, lx.zall & ly.zall
    elif kind == "mul":
        zaff, zall = lx.zaff | ly.zaff, lx.zall | ly.zall
    else:  # div: x / y
        zaff, zall = lx.zaff & torch.ones_like(ly.zaff), lx.zall & torch.ones_like(ly.zall)
    zaff, zall = torch.broadcast_tensors(zaff, zall)
    return Labels(ids, zaff.expand(ids.shape), zall.expand(ids.shape)).compressed()


def _constant(ctx: RuleContext, value) -> Labels:
    """An operand that carries no group: a Python number (zero if it is 0) or an unlabelled tensor."""
    shape = (1,) * len(ctx.shape(value)) if ctx.is_tensor(value) else ()
    is_zero = isinstance(value, (int, float)) and value == 0
    lab = Labels.unlabeled(shape)
    return Labels(lab.ids, lab.zaff | is_zero, lab.zall | is_zero)
