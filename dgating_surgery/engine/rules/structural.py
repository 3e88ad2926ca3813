"""Structural rules: layers with weights that consume groups on their input and produce fresh
groups on their output (conv, linear, a matmul with a weight)."""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.fx
from torch import nn

from ..kinds import Role
from ..labels import NONE, Labels
from ..tensors import along
from .context import ExpertProduct, ParamRef, RuleContext, unknown


def arg(node, pos, name, default=None):
    """Argument ``pos`` of a call, whether passed by position or as keyword ``name``."""
    if len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get(name, default)


def conv(ctx: RuleContext, node, x, weight, bias, groups, transposed=False):
    """Conv: consumes its input channels, produces fresh output channels. A grouped conv ties each
    of its groups' input and output channels into one unit (removing it decrements ``groups``); a
    depthwise conv is the special case of one channel per group. The weight is (out, in/groups,
    ...), or (in, out/groups, ...) for a transposed conv."""
    if weight is None:
        return unknown_weights(ctx, node)
    out_shape = ctx.shape(node)
    nd, c_out = len(out_shape), out_shape[1]
    c_in = ctx.shape(x)[1]
    lab = ctx.per_dim(x, 1, node)
    out = ctx.new_space(c_out, "channels", weight, node)
    wdim_out, wdim_in = (1, 0) if transposed else (0, 1)
    wndim = len(ctx.param_shape(weight))
    if groups == 1:
        ctx.consume(weight, wdim_in, wndim, lab, node)
        ctx.attach(weight, Role.PRODUCER, along(out, wdim_out, wndim), wdim_out)
        role = Role.PRODUCER
    else:
        cin_g, cout_g = c_in // groups, c_out // groups
        in_ids = lab.ids.reshape(-1).numpy() if lab is not None else torch.full((c_in,), NONE).numpy()
        out_np = out.numpy()
        group_of_out = torch.arange(c_out).numpy() // cout_g
        ctx.union(out_np, out_np[group_of_out * cout_g])
        for j in range(cin_g):
            ctx.union(out_np, in_ids[group_of_out * cin_g + j])
        blocked = (in_ids.reshape(groups, cin_g) < 0).any(axis=1)
        if blocked.any():
            ctx.taint(out_np[blocked[group_of_out]], f"the input channels of {ctx.where(node)} (a grouped conv) "
                      "come from no removable group, so its groups cannot be removed")
        if node.op != "call_module" and ctx.fixed_by_code(node, groups):
            ctx.taint(out_np, f"{ctx.where(node)} is a grouped conv whose groups={groups} is written in the code, "
                              "so its groups cannot be removed")
        role = Role.AFFINE
        # the weight's leading dim runs over out channels (or in channels, transposed): each belongs to its unit
        unit_of_lead = out_np[(torch.arange(c_in).numpy() // cin_g) * cout_g] if transposed else out_np
        ctx.attach(weight, role, along(unit_of_lead, 0, wndim), 0)
    if bias is not None:
        ctx.attach(bias, role, out, 0)
    return Labels.fresh(along(out, 1, nd), zaff=(role == Role.AFFINE), zall=True)


def conv_module(ctx: RuleContext, node):
    m = ctx.module(node)
    return conv(ctx, node, node.args[0], ctx.fqn_of(node, "weight"), ctx.fqn_of(node, "bias"), m.groups,
                transposed=isinstance(m, nn.modules.conv._ConvTransposeNd))


def conv_call(ctx: RuleContext, node, transposed=False):
    """F.conv2d(x, w, b, stride, padding, dilation, groups), F.conv_transpose2d(x, w, b, stride,
    padding, output_padding, groups, dilation): groups is the 7th argument of both."""
    return conv(ctx, node, node.args[0], ctx.fqn(arg(node, 1, "weight")), ctx.fqn(arg(node, 2, "bias")),
                arg(node, 6, "groups", 1), transposed)


def convolution_call(ctx: RuleContext, node):  # aten.convolution(x, w, b, stride, pad, dil, transposed, out_pad, groups)
    return conv(ctx, node, node.args[0], ctx.fqn(node.args[1]), ctx.fqn(node.args[2]), node.args[8],
                transposed=node.args[6])


def linear(ctx: RuleContext, node, x, weight, bias, transposed=False, features=-1, experts=None):
    """Linear over the last dim: consumes input features, produces fresh neurons. ``transposed``:
    the weight is stored (in, out), as in ``x @ W`` or Hugging Face's GPT-2 ``Conv1D``. A weight
    of more than 2 dims holds one matrix per expert (``(E, out, in)``): a neuron here is the same
    row of every expert's matrix; ``experts`` (key, rows: see ``ExpertProduct``) says which expert
    each output row used, so that resolution may split a neuron into one group per expert
    (``groups._per_expert``). ``features``: the dim of the input and of the output that carries
    them (-2 for ``W @ x``)."""
    if weight is None:
        return unknown_weights(ctx, node)
    out_shape = ctx.shape(node)
    nd = len(out_shape)
    features %= nd
    wndim = len(ctx.param_shape(weight))
    w_in, w_out = (wndim - 2, wndim - 1) if transposed else (wndim - 1, wndim - 2)
    ctx.consume(weight, w_in, wndim, ctx.per_dim(x, features - nd + len(ctx.shape(x)), node), node)
    out = ctx.new_space(out_shape[features], "neurons", weight, node)
    if experts is not None and wndim == 3:
        key, rows = experts
        ctx.expert_products[len(ctx.spaces) - 1] = ExpertProduct(node, x, weight, key, ctx.param_shape(weight)[0], rows)
        ctx.expert_weights.setdefault(weight, set()).add(key)
    ctx.attach(weight, Role.PRODUCER, along(out, w_out, wndim), w_out)
    if bias is not None:
        bndim = len(ctx.param_shape(bias))
        ctx.attach(bias, Role.PRODUCER, along(out, bndim - 1, bndim), bndim - 1)
    return Labels.fresh(along(out, features, nd), zaff=False, zall=True)


def linear_module(ctx: RuleContext, node):
    return linear(ctx, node, node.args[0], ctx.fqn_of(node, "weight"), ctx.fqn_of(node, "bias"))


def _plain(ctx: RuleContext, arg) -> str | None:
    """The parameter an argument reads as it is stored (no view of it), or None."""
    ref = ctx.weight(arg)
    return ref.fqn if ref is not None and not ref.transposed and not ref.lead else None


def _times_weight(ctx: RuleContext, node, x, w, bias=None, stored_out_in=False, experts=None):
    """``x`` times a weight argument ``w`` read as (in, out) (``stored_out_in``: as (out, in), the
    convention of ``F.linear``), plus an optional bias: the linear it is, whatever view of the
    parameter the code multiplies by; ``unknown_weights`` when ``w`` is no parameter, ``unknown``
    when the bias is not one either (an activation added in the same call)."""
    ref = ctx.weight(w)
    if ref is None or len(ctx.param_shape(ref.fqn)) < 2:
        return unknown_weights(ctx, node)
    if bias is not None and _plain(ctx, bias) is None:
        return unknown(ctx, node)
    return linear(ctx, node, x, ref.fqn, None if bias is None else _plain(ctx, bias),
                  transposed=ref.transposed == stored_out_in, experts=experts)


def linear_call(ctx: RuleContext, node):
    return _times_weight(ctx, node, node.args[0], arg(node, 1, "weight"), arg(node, 2, "bias"), stored_out_in=True)


def addmm(ctx: RuleContext, node):
    """addmm(bias, x, W) and baddbmm(bias, x, W): ``bias + x @ W`` (GPT-2's Conv1D, or a
    hand-written ``F.linear`` with ``W.t()``)."""
    bias, x, w = node.args[:3]
    if ctx.weight(w) is None:
        return unknown(ctx, node)
    return _times_weight(ctx, node, x, w, bias)


def weight_matmul(ctx: RuleContext, node, otherwise):
    """``x @ W``, ``x @ W.T``, ``torch.matmul(x, W.t())``, ``torch.bmm(x, W.expand(B, -1, -1))``:
    an activation times a parameter is a linear layer; so is ``torch.bmm(W[expert_ids], x)`` (the
    weight on the left, stored (out, in): each row's expert matrix times its column). A product of
    two activations is ``otherwise``'s (attention)."""
    a, b = node.args[0], node.args[1]
    if ctx.weight(b) is not None and ctx.weight(a) is None and ctx.is_tensor(a):
        return _times_weight(ctx, node, a, b, experts=_expert_rows(ctx, node, ctx.weight(b)))
    ref = ctx.weight(a)
    if ref is not None and ctx.weight(b) is None and ctx.is_tensor(b) and len(ctx.shape(b)) >= 2 \
            and len(ctx.param_shape(ref.fqn)) >= 2:
        return linear(ctx, node, b, ref.fqn, None, transposed=ref.transposed, features=-2,
                      experts=_expert_rows(ctx, node, ref))
    return otherwise(ctx, node)


def _expert_rows(ctx: RuleContext, node, ref: ParamRef) -> tuple | None:
    """(key, rows) of a product with a stack of expert matrices (see ``ExpertProduct``), or None:
    grouped matmul over rows sorted by expert (``offs`` the key, one row dim); ``W[expert_ids] @ x``
    (the index node, one row dim); a batched matmul of ``(E, B, in)`` by the stack (``"batch"``,
    the expert and B the row dims)."""
    if len(ctx.param_shape(ref.fqn)) != 3 or ref.lead or not ctx.is_tensor(node):
        return None
    if ctx.op_name(node) in ("_grouped_mm", "grouped_mm_fallback", "grouped_mm"):
        offs = arg(node, 2, "offs")
        return (offs, 1) if isinstance(offs, torch.fx.Node) and len(ctx.shape(node)) == 2 else None
    if ref.gathered:
        return (ref.by, 1) if isinstance(ref.by, torch.fx.Node) else None
    if ctx.op_name(node) == "bmm" and len(ctx.shape(node)) == 3:
        return ("batch", 2)
    return None


def gather(ctx: RuleContext, node, otherwise):
    """``W[expert_ids]`` of a stack of matrices (more than 2 dims): each row's expert matrix, still
    the weight (``ParamRef.gathered``) for the product that reads it; anything else is
    ``otherwise``'s."""
    ref, index = ctx.weight(node.args[0]), node.args[1]
    indices = index if isinstance(index, (list, tuple)) else [index]
    if ref is not None and ref == ParamRef(ref.fqn) and len(ctx.param_shape(ref.fqn)) > 2 and len(indices) == 1 \
            and ctx.is_tensor(indices[0]) and ctx.labels(indices[0]) is None:
        return ParamRef(ref.fqn, gathered=True, by=indices[0])
    return otherwise(ctx, node)


def einsum(ctx: RuleContext, node):
    """``einsum("...i,oi->...o", x, W)`` (or ``"io"``, or the weight first): a linear over the
    last dim; any other equation has no rule."""
    equation, *operands = node.args
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])  # aten.einsum(equation, [x, W])
    inputs, _, result = equation.replace(" ", "").partition("->")
    terms = inputs.split(",")
    if len(operands) == 2 and len(terms) == 2:
        for (x, xs), (w, ws) in (((operands[0], terms[0]), (operands[1], terms[1])),
                                 ((operands[1], terms[1]), (operands[0], terms[0]))):
            ref = ctx.weight(w)
            if ref is None or ref.lead or ctx.weight(x) is not None or len(ws) != 2 or not xs:
                continue
            contracted, produced = xs[-1], result[-1:]
            if sorted(ws) == sorted(contracted + produced) and produced not in xs and result == xs[:-1] + produced:
                return linear(ctx, node, x, ref.fqn, None, transposed=(ws == contracted + produced) != ref.transposed)
    return unknown(ctx, node)




def param_view(ctx: RuleContext, node, otherwise):
    """A transpose of a weight (``W.T``, ``W.t()``, ``W.transpose(-1, -2)``, ``W.permute(1, 0)``)
    or leading dims added to it (``W.unsqueeze(0)``, ``W.expand(B, -1, -1)``) stays the weight,
    seen through a view (``ParamRef``), so that the product it then takes part in is a linear;
    anything else is ``otherwise``'s."""
    ref = ctx.env.get(node.args[0]) if node.args else None
    if not isinstance(ref, ParamRef) or not ctx.is_tensor(node) or len(ctx.param_shape(ref.fqn)) < 2:
        return otherwise(ctx, node)
    name, shape, nd = ctx.op_name(node), tuple(ctx.shape(node)), len(ctx.shape(node))
    attribute = node.args[1] if name == "getattr" else None
    swap_last = None
    if name in ("t", "numpy_T") or attribute == "T":
        swap_last = nd == 2
    elif name == "mT" or attribute == "mT":
        swap_last = True
    elif name in ("transpose", "swapaxes", "swapdims"):
        swap_last = {node.args[1] % nd, node.args[2] % nd} == {nd - 2, nd - 1}
    elif name == "permute":
        order = [d % nd for d in (node.args[1] if isinstance(node.args[1], (list, tuple)) else node.args[1:])]
        swap_last = order == [*range(nd - 2), nd - 1, nd - 2]
    if swap_last:
        return replace(ref, transposed=not ref.transposed)
    own = list(ctx.param_shape(ref.fqn))
    if ref.transposed:
        own[-2:] = own[:-3:-1]
    if name in ("unsqueeze", "expand") and nd >= len(own) and list(shape[nd - len(own):]) == own \
            and (name == "expand" or node.args[1] % nd < nd - len(own)):
        return replace(ref, lead=nd - len(own))
    return otherwise(ctx, node)


def unknown_weights(ctx: RuleContext, node):
    """A conv/linear/matmul whose weight is not a parameter the graph reads directly."""
    ctx.taint_inputs(node, f"flows into {ctx.where(node)}, whose weight is computed in the forward (not a "
                           "parameter the tool can slice), so it keeps every group reaching it")
    return None


def embedding(ctx: RuleContext, node):
    """A parameter table read by indices (``F.embedding``, ``aten.embedding``, ``table[idx]``): each
    column of the table makes an entry of the output's last dim, like a layer's neuron."""
    if node.op == "call_module":
        weight = ctx.fqn_of(node, "weight")
    elif ctx.op_name(node) == "embedding" and node.op == "call_function" and ctx.fqn(node.args[0]) is not None:
        weight = ctx.fqn(node.args[0])  # aten.embedding(weight, indices)
    else:
        weight = ctx.fqn(arg(node, 1, "weight")) if ctx.op_name(node) == "embedding" else ctx.fqn(node.args[0])
    if weight is None or len(ctx.param_shape(weight)) != 2:
        return unknown(ctx, node)
    out_shape = ctx.shape(node)
    cols = ctx.new_space(out_shape[-1], "neurons", weight, node)
    ctx.attach(weight, Role.PRODUCER, along(cols, 1, 2), 1)
    return Labels.fresh(along(cols, len(out_shape) - 1, len(out_shape)), zaff=False, zall=True)
