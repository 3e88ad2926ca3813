"""Normalization rules: per-channel affines (BatchNorm, InstanceNorm), which a gate can scale, and
normalizations whose statistics run over a grouped dim (LayerNorm, GroupNorm, RMSNorm, softmax),
where removing one entry changes the others."""
from __future__ import annotations

from torch import nn

from ..kinds import Role
from ..labels import Labels
from .context import RuleContext
from .structural import arg


def channel_affine(ctx: RuleContext, node, x, weight, bias, stats, zero_keeping):
    """BatchNorm/InstanceNorm: per-channel along dim 1. Its affine is scaled by the gate, so the
    output is zero when the gate is; without an affine only InstanceNorm keeps zeros."""
    lab = ctx.per_dim(x, 1, node)
    if lab is None:
        return None
    for fqn in (weight, bias):
        if fqn is not None:
            ctx.attach(fqn, Role.AFFINE, lab.ids.reshape(-1), 0)
    for fqn in stats:
        if fqn is not None:
            ctx.attach(fqn, Role.STAT, lab.ids.reshape(-1), 0)
    if weight is not None:
        return Labels.fresh(lab.ids, zaff=True, zall=True)
    return lab if zero_keeping else lab.not_zero()


def batch_norm_module(ctx: RuleContext, node):
    m = ctx.module(node)
    stats = (ctx.fqn_of(node, "running_mean"), ctx.fqn_of(node, "running_var"))
    return channel_affine(ctx, node, node.args[0], ctx.fqn_of(node, "weight"), ctx.fqn_of(node, "bias"), stats,
                          zero_keeping=isinstance(m, nn.modules.instancenorm._InstanceNorm))


def batch_norm_call(ctx: RuleContext, node, w=1, b=2, rm=3, rv=4):
    """aten.batch_norm and friends: (x, weight, bias, running_mean, running_var, ...)."""
    def get(i, name):
        return ctx.fqn(arg(node, i, name))
    return channel_affine(ctx, node, node.args[0], get(w, "weight"), get(b, "bias"),
                          (get(rm, "running_mean"), get(rv, "running_var")), zero_keeping=False)


def batch_norm_functional(ctx: RuleContext, node):  # F.batch_norm(input, running_mean, running_var, weight, bias, ...)
    return batch_norm_call(ctx, node, w=3, b=4, rm=1, rv=2)


def normalization(ctx: RuleContext, node, x, dims, what):
    """A normalization whose statistics run over ``dims``: removing an entry there changes every
    other entry's value, so groups along those dims are only approximately removable."""
    lab = ctx.labels(x)
    if lab is None:
        return None
    nd = lab.ids.ndim
    if any(d % nd in lab.varying_dims() for d in dims):
        ctx.taint(lab.ids, f"normalized by {what} at {ctx.where(node)}: removing a channel there changes the "
                           "statistics of the others (approximate; not gated)")
    return lab.not_zero()


def layer_norm_module(ctx: RuleContext, node):
    m = ctx.module(node)
    return normalization(ctx, node, node.args[0], list(range(-len(m.normalized_shape), 0)), type(m).__name__)


def layer_norm_call(ctx: RuleContext, node):
    shape = arg(node, 1, "normalized_shape")
    return normalization(ctx, node, node.args[0], list(range(-len(shape), 0)), ctx.op_name(node))


def group_norm(ctx: RuleContext, node):
    return normalization(ctx, node, node.args[0], [1], "GroupNorm")


def softmax(ctx: RuleContext, node):
    dim = arg(node, 1, "dim")
    return normalization(ctx, node, node.args[0], [dim if dim is not None else -1], "softmax")


def softmax_module(ctx: RuleContext, node):
    return normalization(ctx, node, node.args[0], [ctx.module(node).dim], "Softmax")
