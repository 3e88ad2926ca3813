"""The op-rule table: one rule per *meaning* of an op, and every spelling of that meaning mapped
to it: the ``nn`` module class (symbolic tracing), the ``torch``/``F`` function or tensor method
(functional code), and the ATen op (``torch.export``). An op missing from the table gets
``unknown``: every group reaching it keeps all its entries, with the op's name as the reason, so
the tool never cuts what it does not understand.

Adding an op is one function (in the module of its family) and one row here; a library's own
layers get rows from its plugin (``register_module_rule``).
"""
from __future__ import annotations

from functools import partial

from torch import nn

from .context import RuleContext, unknown
from .elementwise import (add, clamp, clamp_min_max, compare, div, glu, like, masked_fill, mul, power, prelu,
                          unary, where)
from .movement import (check_as, check_cat, check_chunk, check_index, check_pixel_shuffle, check_roll, check_split,
                       check_unflatten, check_view, constant_index, getitem, movement, pack, pad, take_along)
from .names import op_name
from .normalization import (batch_norm_call, batch_norm_functional, batch_norm_module, group_norm_call,
                            group_norm_module, layer_norm_call, layer_norm_module, register_rms_norm,
                            rms_norm_module, softmax, softmax_module, vector_normalize)
from .pooling import reduction, spatial, top_k
from .shapes import numel, shape_only, size
from .branches import residual_branches
from .attention import baddbmm, created, head_splits, matmul, multihead_attention, sdpa
from .structural import (addmm, conv_call, conv_module, convolution_call, einsum, embedding, gather, linear_call,
                         linear_module, param_view, weight_matmul)

ZERO_KEEPING = [nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU,
                nn.Mish, nn.Tanh, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity,
                nn.Hardshrink, nn.Softshrink, nn.Tanhshrink, nn.Softsign]
NOT_ZERO_KEEPING = [nn.Sigmoid, nn.Hardsigmoid, nn.Softplus, nn.LogSigmoid]
ZERO_KEEPING_FN = ["relu", "relu_", "relu6", "gelu", "silu", "silu_", "hardswish", "hardswish_", "leaky_relu",
                   "leaky_relu_", "elu", "elu_", "selu", "selu_", "celu", "celu_", "mish", "mish_", "tanh", "tanh_",
                   "dropout", "dropout_", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_dropout",
                   "stochastic_depth", "drop_path", "neg", "neg_", "negative", "abs", "abs_", "clone", "contiguous",
                   "detach", "float", "half", "double", "bfloat16", "to", "_to_copy", "type_as", "type", "alias",
                   "native_dropout", "sign", "sign_", "square", "square_", "sin", "sin_", "sinh", "asinh", "erf",
                   "tan", "atan", "sqrt", "sqrt_", "trunc", "round", "floor", "ceil", "nan_to_num", "softsign",
                   "hardshrink", "softshrink", "tanhshrink", "relu6_"]
NOT_ZERO_KEEPING_FN = ["sigmoid", "sigmoid_", "hardsigmoid", "hardsigmoid_", "exp", "exp_", "cos", "cosh",
                       "softplus", "logsigmoid", "log_sigmoid", "reciprocal", "rsqrt", "log", "log1p", "erfc",
                       "logical_not", "bitwise_not"]
MOVEMENT_FN = ["flatten", "permute", "transpose", "transpose_", "t", "squeeze", "unsqueeze", "squeeze_",
               "unsqueeze_", "expand", "broadcast_to", "repeat", "flip", "movedim", "moveaxis", "swapaxes", "swapdims",
               "unbind", "_unsafe_view", "permute_copy", "view_copy", "transpose_copy", "repeat_interleave",
               "pixel_unshuffle"]
SPATIAL = [nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
           nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
           nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d]
PADS = [nn.modules.padding._ConstantPadNd, nn.modules.padding._ReflectionPadNd, nn.modules.padding._ReplicationPadNd,
        nn.modules.padding._CircularPadNd]
SPATIAL_FN = ["max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
              "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d",
              "adaptive_max_pool2d", "adaptive_max_pool3d", "interpolate", "upsample", "upsample_nearest2d",
              "upsample_bilinear2d", "_adaptive_avg_pool2d", "max_pool2d_with_indices"]
SHAPE_ONLY_FN = ["dim", "new_zeros", "new_ones", "new_empty", "new_full", "empty_like", "randn_like", "rand_like",
                 "_assert", "_assert_scalar", "sym_constrain_range_for_size", "_assert_tensor_metadata"]

MODULE_RULES = {
    **{cls: conv_module for cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                                     nn.ConvTranspose3d)},
    nn.Linear: linear_module,
    nn.Embedding: embedding,
    nn.MultiheadAttention: multihead_attention,
    **{cls: batch_norm_module for cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
                                           nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)},
    nn.LayerNorm: layer_norm_module,
    nn.RMSNorm: rms_norm_module,
    nn.GroupNorm: group_norm_module,
    nn.Softmax: softmax_module,
    nn.Flatten: movement,
    nn.PixelShuffle: partial(movement, check=check_pixel_shuffle),
    nn.PixelUnshuffle: movement,
    nn.Hardtanh: clamp,
    nn.PReLU: prelu,
    nn.GLU: glu,
    **{cls: partial(unary, keeps_zero=True) for cls in ZERO_KEEPING},
    **{cls: partial(unary, keeps_zero=False) for cls in NOT_ZERO_KEEPING},
    **{cls: spatial for cls in SPATIAL},
    **{cls: pad for cls in PADS},
}
try:  # torch.export's check of the inputs' shapes, a submodule of exported graphs (torch >= 2.9)
    from torch.export._unlift import GuardsFn
    MODULE_RULES[GuardsFn] = shape_only
except ImportError:
    pass

# functions, tensor methods and ATen ops, by name (``F.relu``, ``x.relu()`` and ``aten.relu`` alike)
NAME_RULES = {
    "conv1d": conv_call, "conv2d": conv_call, "conv3d": conv_call, "convolution": convolution_call,
    "conv_transpose1d": partial(conv_call, transposed=True), "conv_transpose2d": partial(conv_call, transposed=True),
    "conv_transpose3d": partial(conv_call, transposed=True),
    "linear": linear_call, "addmm": addmm, "baddbmm": baddbmm, "gather": take_along, "einsum": einsum,
    **{name: partial(weight_matmul, otherwise=matmul) for name in ("mm", "matmul", "bmm")},
    # x @ W[e] for each row's expert e (the rows sorted by expert, ``offs`` their ends): a linear per expert
    **{name: partial(weight_matmul, otherwise=unknown) for name in ("_grouped_mm", "grouped_mm_fallback")},
    "scaled_dot_product_attention": sdpa, "embedding": embedding,
    "batch_norm": batch_norm_call, "_native_batch_norm_legit_no_training": batch_norm_call,
    "instance_norm": batch_norm_call, "F.batch_norm": batch_norm_functional,
    "layer_norm": layer_norm_call, "native_layer_norm": layer_norm_call, "group_norm": group_norm_call,
    "native_group_norm": group_norm_call, "rms_norm": layer_norm_call, "normalize": vector_normalize,
    "softmax": softmax, "_softmax": softmax, "log_softmax": softmax, "_log_softmax": softmax,
    **{name: add for name in ("add", "add_", "iadd", "sub", "sub_", "isub", "rsub")},
    **{name: mul for name in ("mul", "mul_", "imul")},
    **{name: div for name in ("truediv", "div", "div_", "itruediv")},
    **{name: compare for name in ("eq", "ne", "lt", "gt", "le", "ge", "eq_", "ne_", "lt_", "gt_", "le_", "ge_")},
    "where": where, "masked_fill": masked_fill, "masked_fill_": masked_fill,
    **{name: clamp for name in ("clamp", "clamp_", "clip", "clip_", "hardtanh", "hardtanh_")},
    "clamp_min": partial(clamp_min_max, bound="min"), "clamp_min_": partial(clamp_min_max, bound="min"),
    "clamp_max": partial(clamp_min_max, bound="max"), "clamp_max_": partial(clamp_min_max, bound="max"),
    "pow": power, "pow_": power, "prelu": prelu, "_prelu_kernel": prelu, "glu": glu,
    "zeros": partial(created, fill=0), "ones": partial(created, fill=1), "full": created,
    "zeros_like": partial(like, value=0), "ones_like": partial(like, value=1), "full_like": partial(like, value_pos=1),
    "size": size, "sym_size": size, "numel": numel,
    **{name: partial(unary, keeps_zero=True) for name in ZERO_KEEPING_FN},
    **{name: partial(unary, keeps_zero=False) for name in NOT_ZERO_KEEPING_FN},
    **{name: movement for name in MOVEMENT_FN},
    "pixel_shuffle": partial(movement, check=check_pixel_shuffle),
    **{name: partial(movement, check=check_as) for name in ("view_as", "reshape_as", "expand_as")},
    "pad": pad, "constant_pad_nd": pad,
    "view": partial(movement, check=check_view), "reshape": partial(movement, check=check_view),
    "unflatten": partial(movement, check=check_unflatten),
    "chunk": partial(movement, check=check_chunk),
    "split": partial(movement, check=check_split), "split_with_sizes": partial(movement, check=check_split),
    **{name: partial(movement, check=check_index) for name in ("slice", "narrow", "select")},
    "roll": partial(movement, check=check_roll),
    **{name: partial(movement, check=check_cat) for name in ("cat", "concat", "stack")},
    "getitem": partial(gather, otherwise=getitem), "index": partial(gather, otherwise=constant_index),
    # a weight transposed or broadcast for a hand-written linear stays that weight (``structural.param_view``)
    **{name: partial(param_view, otherwise=movement)
       for name in ("t", "numpy_T", "mT", "transpose", "swapaxes", "swapdims", "permute", "unsqueeze", "expand")},
    "getattr": partial(param_view, otherwise=size),
    **{name: spatial for name in SPATIAL_FN},
    "sum": partial(reduction, kind="sum"), "mean": partial(reduction, kind="mean"),
    "amax": partial(reduction, kind="max"), "amin": partial(reduction, kind="min"), "topk": top_k,
    "std": partial(reduction, kind="std"), "var": partial(reduction, kind="var"),
    "norm": partial(reduction, kind="norm", dim_pos=2), "linalg_vector_norm": partial(reduction, kind="norm",
                                                                                         dim_pos=2),
    **{name: shape_only for name in SHAPE_ONLY_FN},
}


# passes over the whole graph before the walk; each returns split directions (node name -> the output
# dim that carries the groups) for reshapes whose carrier a later rule knows (the attention heads)
PREPASSES = [head_splits]
# passes over the whole graph after the walk, for groups that no single op makes: residual branches
GRAPH_PASSES = [residual_branches]


def register_module_rule(cls: type, rule) -> None:
    """A rule for a library's own layer class (called by plugins, see ``plugins``); symbolic
    tracing then keeps the layer as one node instead of tracing its forward."""
    MODULE_RULES[cls] = rule


def has_module_rule(module) -> bool:
    """Whether a layer's own class (not a base class) has a rule: the tracer keeps it whole."""
    return type(module) in MODULE_RULES


def rule_for(ctx: RuleContext, node):
    """The rule of a node: by module class (most derived first), else by op name; else ``unknown``."""
    if node.op == "call_module":
        for cls in type(ctx.module(node)).__mro__:
            if cls in MODULE_RULES:
                return MODULE_RULES[cls]
        return unknown
    if node.op == "call_function" and isinstance(node.target, type) and issubclass(node.target, tuple):
        return pack
    return NAME_RULES.get(op_name(node), unknown)
