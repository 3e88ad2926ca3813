"""The op-rule table: how group labels flow through each op, and what each op ties together.

One rule per *meaning* (conv, linear, batch norm, element-wise unary, binary arithmetic, data
movement, pooling, reduction, normalization over a dim, ...); the table maps every spelling of
that meaning to it: the ``nn`` module class (symbolic tracing), the ``torch``/``F`` function or
tensor method (symbolic tracing of functional code), and the ATen op (``torch.export``). An op
missing from the table is handled conservatively: every group reaching it is marked not
removable, with the op's name as the reason, so the tool never cuts what it does not understand.

A rule gets the analysis ``a`` (see ``groups.Analysis``) and the node, and returns the node's
labels (``Labels``, a list of them for tuple outputs, or None for an unlabelled result).
"""
from __future__ import annotations

import operator
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .labels import NONE, Labels, along

aten = torch.ops.aten

# ---------------------------------------------------------------------------------------------
# helpers


def _arg(node, pos, name, default=None):
    if len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get(name, default)


def _dims(value, ndim):
    if value is None:
        return list(range(ndim))
    if isinstance(value, int):
        value = [value]
    return sorted(d % ndim for d in value)


# ---------------------------------------------------------------------------------------------
# structural rules: ops with parameters that produce or consume groups


def conv(a, node, x, weight, bias, groups, transposed=False):
    """Conv: consumes its input channels, produces fresh output channels. A grouped conv ties each
    of its groups' input and output channels into one unit (removing it decrements ``groups``); a
    depthwise conv is the special case of one channel per group."""
    if weight is None:
        return unknown(a, node)
    out_shape = a.shape(node)
    nd, c_out = len(out_shape), out_shape[1]
    c_in = a.shape(x)[1]
    lab = a.per_dim(x, 1, node)
    out = a.new_space(c_out, "channels", weight, node)
    wdim_out, wdim_in = (1, 0) if transposed else (0, 1)
    wndim = len(a.param_shape(weight))
    if groups == 1:
        if lab is not None:
            a.consume(weight, wdim_in, wndim, lab, node)
        role = "producer"
    else:
        cin_g, cout_g = c_in // groups, c_out // groups
        in_ids = lab.ids.reshape(-1).numpy() if lab is not None else torch.full((c_in,), NONE).numpy()
        out_np = out.numpy()
        group_of_out = torch.arange(c_out).numpy() // cout_g
        a.union(out_np, out_np[group_of_out * cout_g])
        for j in range(cin_g):
            a.union(out_np, in_ids[group_of_out * cin_g + j])
        blocked = (in_ids.reshape(groups, cin_g) < 0).any(axis=1)
        if blocked.any():
            a.taint(out_np[blocked[group_of_out]], f"the input channels of {a.where(node)} (a grouped conv) "
                    "come from no removable group, so its groups cannot be removed")
        role = "affine"
    a.attach(weight, role, along(out, wdim_out, wndim), wdim_out)
    if bias is not None:
        a.attach(bias, role, out, 0)
    return Labels.fresh(along(out, 1, nd), zaff=(role == "affine"), zall=True)


def _conv_module(a, node):
    m = a.module(node)
    return conv(a, node, node.args[0], a.fqn_of(node, "weight"), a.fqn_of(node, "bias"), m.groups,
                transposed=isinstance(m, nn.modules.conv._ConvTransposeNd))


def _conv_call(a, node):
    return conv(a, node, node.args[0], a.fqn(_arg(node, 1, "weight")), a.fqn(_arg(node, 2, "bias")),
                _arg(node, 6, "groups", 1))


def _convolution_call(a, node):  # aten.convolution(x, w, b, stride, pad, dil, transposed, out_pad, groups)
    return conv(a, node, node.args[0], a.fqn(node.args[1]), a.fqn(node.args[2]), node.args[8],
                transposed=node.args[6])


def linear(a, node, x, weight, bias, transposed=False):
    """Linear over the last dim: consumes input features, produces fresh neurons. ``transposed``:
    the weight is stored (in, out), as in ``x @ W`` or Hugging Face's GPT-2 ``Conv1D``."""
    if weight is None:
        return unknown(a, node)
    out_shape = a.shape(node)
    nd = len(out_shape)
    w_in, w_out = (0, 1) if transposed else (1, 0)
    lab = a.per_dim(x, nd - 1, node)
    if lab is not None:
        a.consume(weight, w_in, 2, lab, node)
    out = a.new_space(out_shape[-1], "neurons", weight, node)
    a.attach(weight, "producer", along(out, w_out, 2), w_out)
    if bias is not None:
        a.attach(bias, "producer", out, 0)
    return Labels.fresh(along(out, nd - 1, nd), zaff=False, zall=True)


def _matmul_param(a, node):
    """x @ W with W a parameter is a linear layer stored (in, out); a product of two activations
    (attention) has no rule yet."""
    x, w = node.args[0], node.args[1]
    if a.fqn(w) is None or len(a.param_shape(a.fqn(w))) != 2:
        return unknown(a, node)
    return linear(a, node, x, a.fqn(w), None, transposed=True)


def _addmm(a, node):  # addmm(bias, x, W): GPT-2's Conv1D
    bias, x, w = node.args[:3]
    if a.fqn(w) is None:
        return unknown(a, node)
    return linear(a, node, x, a.fqn(w), a.fqn(bias), transposed=True)


def _linear_module(a, node):
    return linear(a, node, node.args[0], a.fqn_of(node, "weight"), a.fqn_of(node, "bias"))


def _linear_call(a, node):
    return linear(a, node, node.args[0], a.fqn(_arg(node, 1, "weight")), a.fqn(_arg(node, 2, "bias")))


def channel_affine(a, node, x, weight, bias, stats, zero_keeping):
    """BatchNorm/InstanceNorm: per-channel along dim 1. Its affine is scaled by the gate, so the
    output is zero when the gate is; without an affine only InstanceNorm keeps zeros."""
    lab = a.per_dim(x, 1, node)
    if lab is None:
        return None
    for fqn in (weight, bias):
        if fqn is not None:
            a.attach(fqn, "affine", lab.ids.reshape(-1), 0)
    for fqn in stats:
        if fqn is not None:
            a.attach(fqn, "stat", lab.ids.reshape(-1), 0)
    if weight is not None:
        return Labels.fresh(lab.ids, zaff=True, zall=True)
    return lab if zero_keeping else Labels(lab.ids, lab.zaff & False, lab.zall & False)


def _bn_module(a, node):
    m = a.module(node)
    stats = (a.fqn_of(node, "running_mean"), a.fqn_of(node, "running_var"))
    return channel_affine(a, node, node.args[0], a.fqn_of(node, "weight"), a.fqn_of(node, "bias"), stats,
                          zero_keeping=isinstance(m, nn.modules.instancenorm._InstanceNorm))


def _bn_call(a, node, w=1, b=2, rm=3, rv=4):  # F.batch_norm / aten.batch_norm (x, w, b, rm, rv, ...)
    get = lambda i, name: a.fqn(_arg(node, i, name))  # noqa: E731
    return channel_affine(a, node, node.args[0], get(w, "weight"), get(b, "bias"),
                          (get(rm, "running_mean"), get(rv, "running_var")), zero_keeping=False)


def _bn_call_f(a, node):  # F.batch_norm(input, running_mean, running_var, weight, bias, ...)
    return _bn_call(a, node, w=3, b=4, rm=1, rv=2)


def normalization(a, node, x, dims, what, weight=None, bias=None):
    """A normalization whose statistics run over ``dims``: removing an entry there changes every
    other entry's value, so groups along those dims are only approximately removable."""
    lab = a.labels(x)
    if lab is None:
        return None
    nd = lab.ids.ndim
    dims = [d % nd for d in dims]
    if any(d in lab.varying_dims() for d in dims):
        a.taint(lab.ids, f"normalized by {what} at {a.where(node)}: removing a channel there changes the "
                         "statistics of the others (approximate; not gated)")
    return Labels(lab.ids, lab.zaff & False, lab.zall & False)


def _layer_norm_module(a, node):
    m = a.module(node)
    return normalization(a, node, node.args[0], list(range(-len(m.normalized_shape), 0)), "LayerNorm")


def _layer_norm_call(a, node):
    shape = _arg(node, 1, "normalized_shape")
    return normalization(a, node, node.args[0], list(range(-len(shape), 0)), "layer_norm")


def _group_norm(a, node):
    return normalization(a, node, node.args[0], [1], "GroupNorm")


def _rms_norm_call(a, node):
    shape = _arg(node, 1, "normalized_shape")
    return normalization(a, node, node.args[0], list(range(-len(shape), 0)), "rms_norm")


def _softmax(a, node, dim_pos=1):
    dim = _arg(node, dim_pos, "dim")
    return normalization(a, node, node.args[0], [dim if dim is not None else -1], "softmax")


def _softmax_module(a, node):
    return normalization(a, node, node.args[0], [a.module(node).dim], "Softmax")


# ---------------------------------------------------------------------------------------------
# element-wise rules


def unary(a, node, keeps_zero: bool):
    """Element-wise: labels pass unchanged; the zero flag survives iff f(0) == 0."""
    lab = a.labels(node.args[0])
    if lab is None or keeps_zero:
        return lab
    return Labels(lab.ids, lab.zaff & False, lab.zall & False)


def binary(a, node, kind: str):
    """Element-wise arithmetic of two operands: entries that meet are tied into one group.
    add/sub is zero when both sides are; mul when either is; div when the numerator is."""
    x, y = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
    lx, ly = a.labels(x), a.labels(y)
    if lx is None and ly is None:
        return None
    scalar_zero = lambda v: isinstance(v, (int, float)) and v == 0  # noqa: E731
    lx = lx if lx is not None else _constant(a, x, scalar_zero(x))
    ly = ly if ly is not None else _constant(a, y, scalar_zero(y))
    ix, iy = torch.broadcast_tensors(lx.ids, ly.ids)
    a.union(ix.numpy(), iy.numpy())
    ids = torch.where(ix >= 0, ix, iy)
    if kind == "add":
        zaff, zall = lx.zaff & ly.zaff, lx.zall & ly.zall
    elif kind == "mul":
        zaff, zall = lx.zaff | ly.zaff, lx.zall | ly.zall
    else:  # div: x / y
        zaff, zall = lx.zaff & torch.ones_like(ly.zaff), lx.zall & torch.ones_like(ly.zall)
    zaff, zall = torch.broadcast_tensors(zaff, zall)
    return Labels(ids, zaff.expand(ids.shape), zall.expand(ids.shape)).compressed()


def _constant(a, value, is_zero: bool) -> Labels:
    """An operand that carries no group: a Python number or an unlabelled tensor."""
    shape = (1,) * len(a.shape(value)) if a.is_tensor(value) else ()
    lab = Labels.unlabeled(shape)
    return Labels(lab.ids, lab.zaff | is_zero, lab.zall | is_zero)


# ---------------------------------------------------------------------------------------------
# data movement: the op itself is run on the label tensors, then a check ties or blocks entries


def movement(a, node, check=None):
    lab_in = [arg for arg in a.tensor_args(node) if a.labels(arg) is not None]
    if not lab_in:
        return None
    out = a.rerun(node)
    if check is not None:
        check(a, node, out)
    if isinstance(out, (list, tuple)):
        return [o.compressed() for o in out]
    return out.compressed()


def _reshape_groups(src, dst):
    """Pairs (input dims, output dims) whose sizes multiply to the same number, left to right."""
    groups, i, j = [], 0, 0
    while i < len(src) or j < len(dst):
        ins, outs, pi, pj = [], [], 1, 1
        if i < len(src):
            pi *= src[i]; ins.append(i); i += 1  # noqa: E702
        if j < len(dst):
            pj *= dst[j]; outs.append(j); j += 1  # noqa: E702
        while pi != pj and (i < len(src) or j < len(dst)):
            if (pi < pj and i < len(src)) or j >= len(dst):
                pi *= src[i]; ins.append(i); i += 1  # noqa: E702
            else:
                pj *= dst[j]; outs.append(j); j += 1  # noqa: E702
        groups.append((ins, outs))
    return groups


def _check_reshape(a, node, out, sizes):
    """A reshape that splits a grouped dim keeps the factors the code fixes (a literal size) and
    ties entries across them, so the split still works on the smaller tensor; a grouped dim whose
    size the code fixes cannot shrink at all."""
    x = node.args[0]
    lab = a.labels(x)
    src, dst = a.shape(x), a.shape(node)
    literal = a.literal_sizes(sizes, len(dst))
    full = out.ids
    for ins, outs in _reshape_groups(src, dst):
        if not any(d in lab.varying_dims() for d in ins):
            continue
        big = [d for d in outs if dst[d] > 1]
        fixed = [d for d in big if literal[d]]
        free = [d for d in big if not literal[d]]
        if big and not free:
            a.taint(lab.ids, f"the forward code fixes the size of a grouped dim to {[dst[d] for d in fixed]} "
                             f"at {a.where(node)}, so it cannot shrink")
            continue
        for d in fixed + free[:-1]:
            for k in range(1, dst[d]):
                a.union(full.select(d, 0).numpy(), full.select(d, k).numpy())


def _reshape_sizes(node):
    if node.op == "call_method":
        rest = node.args[1:]
        return list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else list(rest)
    return list(_arg(node, 1, "shape", []))


def _check_view(a, node, out):
    _check_reshape(a, node, out, _reshape_sizes(node))


def _check_unflatten(a, node, out):
    sizes = list(_arg(node, 2, "sizes", []))
    dim = _arg(node, 1, "dim") % len(a.shape(node.args[0]))
    before = [None] * dim
    after = [None] * (len(a.shape(node)) - dim - len(sizes))
    _check_reshape(a, node, out, [-1 if s is None else s for s in before] + sizes + [-1] * len(after))


def _check_chunk(a, node, out, dim_pos=2):
    """chunk(n) splits in equal parts: tie entry j of every part so all parts shrink alike."""
    x = node.args[0]
    lab = a.labels(x)
    dim = _arg(node, dim_pos, "dim", 0) % len(a.shape(x))
    if dim not in lab.varying_dims():
        return
    parts = list(out)
    if len({p.ids.shape for p in parts}) != 1:
        a.taint(lab.ids, f"{a.where(node)} splits a grouped dim into unequal parts")
        return
    for part in parts[1:]:
        a.union(parts[0].ids.numpy(), part.ids.numpy())


def _check_split(a, node, out):
    """split with sizes written in the code: a grouped dim cannot shrink under it, unless the
    sizes come from the tensor itself (a graph node) or, for torch.export graphs, are equal."""
    x = node.args[0]
    lab = a.labels(x)
    nd = len(a.shape(x))
    dim = _arg(node, 2, "dim", 0) % nd
    if dim not in lab.varying_dims():
        return
    size = _arg(node, 1, "split_size")
    if a.frontend == "export" and isinstance(size, int):
        return _check_chunk(a, node, out)
    a.taint(lab.ids, f"{a.where(node)} splits a grouped dim at positions fixed in the code")


def _indexed_dims(a, node):
    """The input dims that an indexing op narrows (anything but a full slice)."""
    x = node.args[0]
    nd = len(a.shape(x))
    name = a.op_name(node)
    if name in ("slice", "narrow", "select"):
        dim = _arg(node, 1, "dim", 0) % nd
        if name == "slice":
            start, end = _arg(node, 2, "start", None), _arg(node, 3, "end", None)
            step = _arg(node, 4, "step", 1)
            if (start in (None, 0)) and (end is None or end >= a.shape(x)[dim]) and step == 1:
                return []
        return [dim]
    index = node.args[1]
    index = index if isinstance(index, tuple) else (index,)
    if any(i is Ellipsis for i in index):
        at = next(k for k, i in enumerate(index) if i is Ellipsis)
        real = [i for i in index if i is not None and i is not Ellipsis]
        index = index[:at] + (slice(None),) * (nd - len(real)) + index[at + 1:]
    dims, d = [], 0
    for i in index:
        if i is None:
            continue
        if not (isinstance(i, slice) and i == slice(None)):
            dims.append(d)
        d += 1
    return dims


def _check_index(a, node, out):
    lab = a.labels(node.args[0])
    if set(_indexed_dims(a, node)) & set(lab.varying_dims()):
        a.taint(lab.ids, f"{a.where(node)} selects positions of a grouped dim that the code fixes")


def _check_roll(a, node, out):
    lab = a.labels(node.args[0])
    dims = _arg(node, 2, "dims", None)
    nd = lab.ids.ndim
    dims = list(range(nd)) if dims is None else _dims(dims, nd)
    if set(dims) & set(lab.varying_dims()):
        a.taint(lab.ids, f"{a.where(node)} rolls a grouped dim by a fixed amount")


def _check_cat(a, node, out):
    """Tensors joined along a dim they are not grouped along share positions of their grouped
    dims (a class token before a patch sequence; every input of a stack): tie those positions."""
    dim = _arg(node, 1, "dim", 0)
    stack = a.op_name(node) == "stack"
    shared, plain = [], []
    for t in node.args[0]:
        lab = a.labels(t)
        if lab is None:
            plain.append(t)
        elif stack or dim % lab.ids.ndim not in lab.varying_dims():
            shared.append(lab.ids)
    if not any(ids.numel() > 1 for ids in shared):
        return
    for other in shared[1:]:
        x, y = torch.broadcast_tensors(shared[0], other)
        a.union(x.numpy(), y.numpy())
    if plain:
        a.taint(torch.cat([ids.reshape(-1) for ids in shared]),
                f"{a.where(node)} joins grouped tensors with '{plain[0]}', which belongs to no group")


# ---------------------------------------------------------------------------------------------
# pooling, reductions, outputs and the unknown


def spatial(a, node):
    """Pooling and resizing over dims 2..: channels pass, entries of a channel stay zero."""
    lab = a.labels(node.args[0])
    if lab is None:
        return None
    if any(d >= 2 for d in lab.varying_dims()):
        a.taint(lab.ids, f"{a.where(node)} pools over a grouped dim")
        return None
    return lab if a.is_tensor(node) else [lab, None]  # max_pool2d_with_indices: (values, indices)


def reduction(a, node, kind: str, dim_pos=1, keep_pos=2):
    """sum/mean/max over dims. Summing a grouped dim consumes it (zeros add nothing); a mean divides
    by the count and a max compares entries, so a group there is not exactly removable."""
    x = node.args[0]
    lab = a.labels(x)
    if lab is None:
        return None
    nd = lab.ids.ndim
    dims = _dims(_arg(node, dim_pos, "dim"), nd)
    keep = bool(_arg(node, keep_pos, "keepdim", False))
    grouped = [d for d in dims if d in lab.varying_dims()]
    if grouped:
        if kind != "sum":
            a.taint(lab.ids, f"{a.where(node)} takes the {kind} over a grouped dim")
            return None
        a.visit(lab, node)
        return None
    idx = [slice(None)] * nd
    for d in dims:
        idx[d] = slice(0, 1)
    out = lab.map(lambda t: t[tuple(idx)])
    if not keep:
        out = out.map(lambda t: t.reshape([s for d, s in enumerate(t.shape) if d not in dims]))
    return out


def output(a, node):
    for lab in a.all_labels(node.args):
        a.taint(lab.ids, "reaches the model output (never cut)")
    return None


def unknown(a, node):
    """No rule: every group reaching this op keeps all its entries."""
    for lab in a.all_labels((node.args, node.kwargs)):
        a.taint(lab.ids, f"flows into {a.where(node)}, which has no rule: the tool cannot tell how "
                         "it uses the channels")
    return None


def shape_only(a, node):
    """Ops that read only a tensor's shape or make a new tensor of its shape: no data flows."""
    return None


def pack(a, node):
    """A tuple or namedtuple built in forward (GoogLeNet's outputs): its items keep their labels."""
    return [a.state(arg) if a.is_tensor(arg) else None for arg in list(node.args) + list(node.kwargs.values())]


def getitem(a, node):
    state = a.state(node.args[0])
    if isinstance(state, (list, tuple)):
        return state[node.args[1]]
    if not a.is_tensor(node.args[0]):
        return None
    if any(a.is_tensor(i) for i in a.flat_nodes(node.args[1])):
        return unknown(a, node)  # indexing with a tensor of positions
    return movement(a, node, _check_index)


# ---------------------------------------------------------------------------------------------
# the table

ZERO_KEEPING = [nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU,
                nn.Mish, nn.Tanh, nn.Hardtanh, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                nn.AlphaDropout, nn.Identity, nn.Hardshrink, nn.Softshrink, nn.PReLU, nn.Tanhshrink]
NOT_ZERO_KEEPING = [nn.Sigmoid, nn.Hardsigmoid, nn.Softplus, nn.LogSigmoid]
ZERO_KEEPING_FN = ["relu", "relu_", "relu6", "gelu", "silu", "silu_", "hardswish", "hardswish_", "leaky_relu",
                   "leaky_relu_", "elu", "elu_", "selu", "celu", "mish", "tanh", "tanh_", "hardtanh", "hardtanh_",
                   "dropout", "dropout_", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_dropout",
                   "stochastic_depth", "drop_path", "neg", "abs", "clone", "contiguous", "detach", "float", "half",
                   "double", "bfloat16", "to", "_to_copy", "type_as", "type", "alias", "native_dropout",
                   "sign", "square", "sin", "sinh", "asinh", "erf", "tan", "atan", "sqrt", "trunc", "round",
                   "floor", "ceil", "nan_to_num", "clamp", "clamp_", "clip"]
NOT_ZERO_KEEPING_FN = ["sigmoid", "sigmoid_", "hardsigmoid", "hardsigmoid_", "exp", "cos", "cosh", "softplus",
                       "logsigmoid", "log_sigmoid", "reciprocal", "rsqrt", "log", "log1p", "pow", "exp_"]
MOVEMENT_FN = ["flatten", "permute", "transpose", "transpose_", "t", "squeeze", "unsqueeze", "squeeze_",
               "unsqueeze_", "expand", "expand_as", "repeat", "flip", "movedim", "moveaxis", "swapaxes",
               "swapdims", "contiguous", "view_as", "reshape_as", "pad", "constant_pad_nd", "unbind",
               "_unsafe_view", "alias", "clone", "permute_copy", "view_copy", "transpose_copy"]
SPATIAL = [nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
           nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
           nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample, nn.UpsamplingNearest2d,
           nn.UpsamplingBilinear2d, nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d]
SPATIAL_FN = ["max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
              "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d",
              "adaptive_max_pool2d", "adaptive_max_pool3d", "interpolate", "upsample", "upsample_nearest2d",
              "upsample_bilinear2d", "_adaptive_avg_pool2d", "max_pool2d_with_indices"]
SHAPE_ONLY_FN = ["size", "dim", "numel", "new_zeros", "new_ones", "new_empty", "new_full", "zeros_like",
                 "ones_like", "empty_like", "full_like", "randn_like", "rand_like", "sym_size", "getattr",
                 "_assert", "_assert_scalar", "sym_constrain_range_for_size", "_guards_fn", "eq", "ne",
                 "lt", "gt", "le", "ge", "_assert_tensor_metadata"]

MODULE_RULES = {
    **{cls: _conv_module for cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                                      nn.ConvTranspose3d)},
    nn.Linear: _linear_module,
    **{cls: _bn_module for cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
                                    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)},
    nn.LayerNorm: _layer_norm_module,
    nn.GroupNorm: _group_norm,
    nn.Softmax: _softmax_module,
    nn.Flatten: movement,
    **{cls: partial(unary, keeps_zero=True) for cls in ZERO_KEEPING},
    **{cls: partial(unary, keeps_zero=False) for cls in NOT_ZERO_KEEPING},
    **{cls: spatial for cls in SPATIAL},
}
if hasattr(nn, "RMSNorm"):
    MODULE_RULES[nn.RMSNorm] = _layer_norm_module

# functions, tensor methods and ATen ops, by name (``F.relu``, ``x.relu()`` and ``aten.relu`` alike)
NAME_RULES = {
    "conv1d": _conv_call, "conv2d": _conv_call, "conv3d": _conv_call, "convolution": _convolution_call,
    "linear": _linear_call, "addmm": _addmm, "mm": _matmul_param, "matmul": _matmul_param,
    "batch_norm": _bn_call, "_native_batch_norm_legit_no_training": _bn_call, "instance_norm": _bn_call,
    "F.batch_norm": _bn_call_f,
    "layer_norm": _layer_norm_call, "native_layer_norm": _layer_norm_call, "group_norm": _group_norm,
    "native_group_norm": _group_norm, "rms_norm": _rms_norm_call,
    "softmax": _softmax, "_softmax": _softmax, "log_softmax": _softmax, "_log_softmax": _softmax,
    "add": partial(binary, kind="add"), "add_": partial(binary, kind="add"), "iadd": partial(binary, kind="add"),
    "sub": partial(binary, kind="add"), "sub_": partial(binary, kind="add"), "isub": partial(binary, kind="add"),
    "rsub": partial(binary, kind="add"),
    "mul": partial(binary, kind="mul"), "mul_": partial(binary, kind="mul"), "imul": partial(binary, kind="mul"),
    "truediv": partial(binary, kind="div"), "div": partial(binary, kind="div"), "div_": partial(binary, kind="div"),
    "itruediv": partial(binary, kind="div"),
    **{name: partial(unary, keeps_zero=True) for name in ZERO_KEEPING_FN},
    **{name: partial(unary, keeps_zero=False) for name in NOT_ZERO_KEEPING_FN},
    **{name: movement for name in MOVEMENT_FN},
    "view": partial(movement, check=_check_view), "reshape": partial(movement, check=_check_view),
    "unflatten": partial(movement, check=_check_unflatten),
    "chunk": partial(movement, check=_check_chunk),
    "split": partial(movement, check=_check_split), "split_with_sizes": partial(movement, check=_check_split),
    "slice": partial(movement, check=_check_index), "narrow": partial(movement, check=_check_index),
    "select": partial(movement, check=_check_index),
    "roll": partial(movement, check=_check_roll),
    "cat": partial(movement, check=_check_cat), "concat": partial(movement, check=_check_cat),
    "stack": partial(movement, check=_check_cat),
    "getitem": getitem,
    **{name: spatial for name in SPATIAL_FN},
    "sum": partial(reduction, kind="sum"), "mean": partial(reduction, kind="mean"),
    "amax": partial(reduction, kind="max"), "amin": partial(reduction, kind="min"),
    "std": partial(reduction, kind="std"), "var": partial(reduction, kind="var"),
    **{name: shape_only for name in SHAPE_ONLY_FN},
}
FUNCTION_ALIASES = {operator.add: "add", operator.iadd: "iadd", operator.sub: "sub", operator.isub: "isub",
                    operator.mul: "mul", operator.imul: "imul", operator.truediv: "truediv",
                    operator.itruediv: "itruediv", operator.getitem: "getitem", F.dropout: "dropout",
                    getattr: "getattr", F.batch_norm: "F.batch_norm", F.instance_norm: "F.batch_norm",
                    operator.matmul: "matmul"}


def rule_for(a, node):
    """The rule of a node: by module class (most derived first), else by op name; else ``unknown``."""
    if node.op == "call_module":
        for cls in type(a.module(node)).__mro__:
            if cls in MODULE_RULES:
                return MODULE_RULES[cls]
        return unknown
    if node.op == "call_function" and isinstance(node.target, type) and issubclass(node.target, tuple):
        return pack
    return NAME_RULES.get(a.op_name(node), unknown)
