"""Normalization rules: per-channel affines (BatchNorm, InstanceNorm), which a gate can scale, and
normalizations whose statistics run over a grouped dim (LayerNorm, GroupNorm, RMSNorm, softmax),
where removing one entry changes the others."""
from __future__ import annotations

from torch import nn

from ..kinds import Role
from ..labels import Labels
from .context import RuleContext
from .structural import arg


def channel_affine(ctx: RuleContext, node, x, weight, bias, stats, zero_keeping, counted=("num_features",)):
    """BatchNorm/InstanceNorm (and GroupNorm with a channel per group): per-channel along dim 1.
    Its affine is scaled by the gate, so the output is zero when the gate is; without an affine
    only a norm over each instance's own statistics keeps zeros ((0 - 0) / sqrt(eps))."""
    lab = ctx.per_dim(x, 1, node)
    if lab is None:
        return None
    if weight is None and not any(stats):  # no tensor shows its width (the layer's own, or under export its op's)
        path, module = ctx.owner_module(node)
        for attr in counted:
            if isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm)) and hasattr(module, attr):
                ctx.count(path, attr, lab.ids.reshape(-1))
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
    instance_stats = isinstance(m, nn.modules.instancenorm._InstanceNorm) and not m.track_running_stats
    return channel_affine(ctx, node, node.args[0], ctx.fqn_of(node, "weight"), ctx.fqn_of(node, "bias"), stats,
                          zero_keeping=instance_stats)


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
    """F.layer_norm / F.rms_norm, and aten.native_layer_norm, which also returns its statistics."""
    shape = arg(node, 1, "normalized_shape")
    out = normalization(ctx, node, node.args[0], list(range(-len(shape), 0)), ctx.op_name(node))
    return [out, None, None] if ctx.op_name(node) == "native_layer_norm" else out


def group_norm_module(ctx: RuleContext, node):
    m = ctx.module(node)
    if m.num_groups == m.num_channels:  # one channel per group: per-channel statistics
        return channel_affine(ctx, node, node.args[0], ctx.fqn_of(node, "weight"), ctx.fqn_of(node, "bias"), (),
                              zero_keeping=True, counted=("num_channels", "num_groups"))
    return normalization(ctx, node, node.args[0], [1], "GroupNorm")


def group_norm_call(ctx: RuleContext, node):
    """F.group_norm(x, num_groups, weight, bias) and aten.native_group_norm(x, weight, bias, N, C,
    HxW, group, eps)."""
    x = node.args[0]
    if ctx.op_name(node) == "native_group_norm":
        groups, weight, bias = node.args[6], node.args[1], node.args[2]
    else:
        groups, weight, bias = arg(node, 1, "num_groups"), arg(node, 2, "weight"), arg(node, 3, "bias")
    if groups == ctx.shape(x)[1] and not ctx.fixed_by_code(node, groups):
        out = channel_affine(ctx, node, x, ctx.fqn(weight), ctx.fqn(bias), (), zero_keeping=True,
                             counted=("num_channels", "num_groups"))
        return [out, None, None] if ctx.op_name(node) == "native_group_norm" else out
    return normalization(ctx, node, x, [1], "group_norm")


def vector_normalize(ctx: RuleContext, node):
    """F.normalize(x, p, dim): x / ||x|| over ``dim``. Entries that are exactly zero add nothing
    to the norm, so a group along ``dim`` is removable when it reaches it as zeros."""
    x = node.args[0]
    lab = ctx.labels(x)
    if lab is None:
        return None
    dim = arg(node, 2, "dim", 1) % lab.ids.ndim
    if dim in lab.varying_dims():
        ctx.visit(lab, node)
    return lab


def softmax(ctx: RuleContext, node):
    dim = arg(node, 1, "dim")
    return normalization(ctx, node, node.args[0], [dim if dim is not None else -1], "softmax")


def softmax_module(ctx: RuleContext, node):
    return normalization(ctx, node, node.args[0], [ctx.module(node).dim], "Softmax")


# RMS norms whose epsilon a cut may rescale: class -> the attribute holding epsilon (plugins add theirs)
RMS_NORMS: dict[type, str] = {nn.RMSNorm: "eps"}


def register_rms_norm(cls: type, eps_attr: str) -> None:
    """An RMS norm class of a library (its forward: w * x / sqrt(mean(x^2) + eps))."""
    RMS_NORMS[cls] = eps_attr


def rms_scope(ctx: RuleContext, node) -> tuple[str, str] | None:
    """(path, epsilon attribute) of the registered RMS norm whose forward ``node`` belongs to, if any."""
    path, module = ctx.owner_module(node)
    return next(((path, attr) for cls, attr in RMS_NORMS.items() if type(module) is cls), None)


def rms_statistics(ctx: RuleContext, node, x, dim: int, scope: tuple[str, str]) -> None:
    """The mean of squares of an RMS norm over a grouped dim: a channel that arrives as exact zeros
    adds nothing to the sum, so it can go if the norm is rescaled for the smaller count (see
    ``shrink._rescale_rms_norm``). Such channels form ``hidden`` groups (opt-in by recipe)."""
    line = ctx.per_dim(x, dim, node)
    if line is None:
        return
    path, eps = scope
    if getattr(ctx.capture.model.get_submodule(path), "weight", None) is None:
        ctx.taint(line.ids, f"{ctx.where(node)} is an RMS norm without a weight: a smaller width changes its "
                            "output by sqrt(kept/width), and only a weight could take that factor")
        return
    ctx.visit(line, node)
    ids = ctx.new_space(line.ids.numel(), "hidden", f"{path}.{eps}", node)
    ctx.tie(ids.numpy(), line.ids.reshape(-1).numpy(), node)
    ctx.attach(f"{path}.{eps}", Role.RESCALE, line.ids.reshape(-1), 0)


def rms_norm_module(ctx: RuleContext, node):
    """nn.RMSNorm over the last dim(s): its statistics (see ``rms_statistics``) and its per-channel
    weight, which a gate may scale like BatchNorm's."""
    m = ctx.module(node)
    x = node.args[0]
    lab = ctx.labels(x)
    if lab is None:
        return None
    nd = lab.ids.ndim
    dims = list(range(nd - len(m.normalized_shape), nd))
    if len(dims) != 1 or not any(d in lab.varying_dims() for d in dims):
        return normalization(ctx, node, x, dims, "RMSNorm")
    rms_statistics(ctx, node, x, dims[0], (node.target, "eps"))
    weight = ctx.fqn_of(node, "weight")
    if weight is None:
        return lab
    ctx.attach(weight, Role.AFFINE, ctx.per_dim(x, dims[0], node).ids.reshape(-1), 0)
    return Labels.fresh(lab.ids, zaff=True, zall=True)
