"""timm: rules for its weight-standardized convs (BiT, NFNets), and the attributes of its attention
layers after heads are cut.

``StdConv2d`` and ``ScaledStdConv2d`` standardize each output channel's weight over its input
channels and kernel in every forward. Removing an input channel changes that standardization, so
the groups reaching their input are blocked; scaling a weight row is undone by it, so a gate scales
``gain`` (ScaledStdConv2d) and the bias instead, and the rows are only cut.
"""
from __future__ import annotations

import sys

from timm.layers.std_conv import ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d, StdConv2dSame

from ..engine.fixers import MODULE_FIXERS, register_module_fixer
from ..engine.kinds import Role
from ..engine.labels import Labels
from ..engine.rules import RuleContext, register_module_rule, unknown
from ..engine.tensors import along


def std_conv(ctx: RuleContext, node):
    m = ctx.module(node)
    if m.groups != 1:
        return unknown(ctx, node)
    lab = ctx.labels(node.args[0])
    if lab is not None:
        ctx.taint(lab.ids, f"flows into {ctx.where(node)}, which standardizes its weight over its input channels, so "
                           "removing one changes every output")
    out = ctx.new_space(ctx.shape(node)[1], "channels", ctx.fqn_of(node, "weight"), node)
    ctx.attach(ctx.fqn_of(node, "weight"), Role.CUT_ONLY, along(out, 0, 4), 0)
    gain, bias = ctx.fqn_of(node, "gain"), ctx.fqn_of(node, "bias")
    for fqn in (gain, bias):
        if fqn is not None:
            ctx.attach(fqn, Role.AFFINE, along(out, 0, len(ctx.param_shape(fqn))), 0)
    return Labels.fresh(along(out, 1, len(ctx.shape(node))), zaff=gain is not None, zall=gain is not None)


for _cls in (StdConv2d, StdConv2dSame, ScaledStdConv2d, ScaledStdConv2dSame):
    register_module_rule(_cls, std_conv)


def _attention(m) -> None:
    """timm's Attention reshapes qkv to (B, N, 3, num_heads, head_dim) and back to attn_dim."""
    m.num_heads = m.proj.weight.shape[1] // m.head_dim
    m.attn_dim = m.num_heads * m.head_dim


def _window_attention(m) -> None:
    """Swin's WindowAttention: num_heads also sizes its relative-position bias (table columns)."""
    m.num_heads = m.relative_position_bias_table.shape[1]


def refresh() -> None:
    """Register the fixers of timm's attention classes whose modules are imported by now."""
    for module, name, fix in (("timm.layers.attention", "Attention", _attention),
                              ("timm.models.swin_transformer", "WindowAttention", _window_attention)):
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and cls not in MODULE_FIXERS:
            register_module_fixer(cls, fix)
