"""Normalization rules: per-channel affines (BatchNorm, InstanceNorm), which a gate can scale, and
normalizations whose statistics run over a grouped dim (LayerNorm, GroupNorm, RMSNorm, softmax),
where removing one entry changes the others."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..fixers import fix_module
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


def normalization(ctx: RuleContext, node, x, dims, what, hint: str = ""):
    """A normalization whose statistics run over ``dims``: removing an entry there changes every
    other entry's value, so groups along those dims are only approximately removable. ``hint``: what
    the user may do about it (a LayerNorm: the opt-ins)."""
    lab = ctx.labels(x)
    if lab is None:
        return None
    nd = lab.ids.ndim
    if any(d % nd in lab.varying_dims() for d in dims):
        ctx.taint(lab.ids, f"normalized by {what} at {ctx.where(node)}: removing a channel there changes the "
                           f"statistics of the others (approximate; not gated){hint}")
    return lab.not_zero()


def layer_norm_module(ctx: RuleContext, node):
    m = ctx.module(node)
    if type(m) is nn.LayerNorm and ctx.approximate_layernorm:
        out = approximate_layer_norm(ctx, node, node.target, m, ctx.fqn_of(node, "weight"), ctx.fqn_of(node, "bias"))
        if out is not None:
            return out
    return normalization(ctx, node, node.args[0], list(range(-len(m.normalized_shape), 0)), type(m).__name__,
                         _opt_in_hint(ctx, m))


def _opt_in_hint(ctx: RuleContext, m) -> str:
    """The opt-ins that cut a stream under this LayerNorm, when the recipe took neither."""
    if type(m) is not nn.LayerNorm or len(m.normalized_shape) != 1 or ctx.approximate_layernorm:
        return ""
    return f"; a recipe may opt in with {LAYERNORM_OPT_INS}"


def layer_norm_call(ctx: RuleContext, node):
    """F.layer_norm / F.rms_norm, and aten.native_layer_norm, which also returns its statistics."""
    shape = arg(node, 1, "normalized_shape")
    out = None
    path, m = ctx.owner_module(node)
    if type(m) is nn.LayerNorm and ctx.approximate_layernorm and ctx.op_name(node) in ("layer_norm", "native_layer_norm"):
        weight, bias = ctx.fqn(arg(node, 2, "weight")), ctx.fqn(arg(node, 3, "bias"))
        if (weight, bias) == (ctx.tensor_name(f"{path}.weight"), ctx.tensor_name(f"{path}.bias")):  # its own call
            out = approximate_layer_norm(ctx, node, path, m, weight, bias)
    if out is None:
        out = normalization(ctx, node, node.args[0], list(range(-len(shape), 0)), ctx.op_name(node),
                            _opt_in_hint(ctx, m) if ctx.op_name(node) != "rms_norm" else "")
    return [out, None, None] if ctx.op_name(node) == "native_layer_norm" else out


LAYERNORM_OPT_INS = ("{kind: hidden, center_layernorm: true} (exact, pre-LayerNorm streams) or {kind: hidden, "
                     "layernorm: approximate} (approximate, its output change measured by shrink)")


def approximate_layer_norm(ctx: RuleContext, node, path: str, m: nn.LayerNorm, weight, bias):
    """An ``nn.LayerNorm`` over the last dim when the recipe opts in to the approximate cut
    (``{kind: hidden, layernorm: approximate}``): a channel that arrives as exact zeros may go, as under
    an RMS norm (``rms_statistics``), but the LayerNorm's mean and variance then run over the kept
    channels. With the removed channels zero, over d' of d channels mean' = r * mean and
    var' + mean'^2 = r * (var + mean^2) (r = d/d'); shrink rescales weight by sqrt(r) and epsilon by r
    (``shrink._rescale_layer_norm``), which is exact where the stream's mean is zero and otherwise off
    by terms of order (r - 1) * mean / std. The channels form ``hidden`` groups labelled approximate.
    Returns None when this LayerNorm does not qualify (the caller refuses as usual)."""
    lab = ctx.labels(node.args[0])
    if lab is None or len(m.normalized_shape) != 1 or (lab.ids.ndim - 1) not in lab.varying_dims():
        return None
    line = ctx.per_dim(node.args[0], -1, node)
    if line is None:
        return lab.not_zero()
    if weight is None:
        ctx.taint(line.ids, f"{ctx.where(node)} is a LayerNorm without a weight: a smaller width changes its output, "
                            "and only a weight could take the rescale")
        return lab.not_zero()
    ctx.visit(line, node)
    flat = line.ids.reshape(-1)
    ids = ctx.new_space(flat.numel(), "hidden", f"{path}.eps", node)
    ctx.tie(ids.numpy(), flat.numpy(), node)
    ctx.attach(f"{path}.eps", Role.RESCALE, flat, 0)
    for fqn in (weight, bias):
        if fqn is not None:
            ctx.attach(fqn, Role.AFFINE, flat, 0)
    ctx.approximate(flat, f"normalized by the LayerNorm '{path}', whose mean and variance then run over the kept "
                          "channels only")
    return Labels.fresh(lab.ids, zaff=True, zall=True)


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


@dataclass(frozen=True)
class RmsFormula:
    """How an RMS norm's output depends on its weight and epsilon, and the rescale that keeps it when
    its mean of squares runs over ``kept`` of ``width`` entries, the removed ones exactly zero:
    with ``ratio = width / kept``, mean(x^2) over the width is mean over the kept entries / ratio."""

    text: str
    weight: Callable[[torch.Tensor, float], torch.Tensor]  # (weight, ratio) -> the slim weight
    eps: Callable[[float, float], float]  # (epsilon, ratio) -> the slim epsilon


# The formulas a cut can rescale (the first that fits a norm's behaviour is its own): the weight takes
# the factor sqrt(ratio) the smaller mean gives the normalized entries, epsilon the one the mean takes
RMS_FORMULAS = (
    RmsFormula("w * x / sqrt(mean(x^2) + eps)", lambda w, r: w * r ** 0.5, lambda e, r: e * r),
    RmsFormula("(1 + w) * x / sqrt(mean(x^2) + eps)", lambda w, r: (1 + w) * r ** 0.5 - 1, lambda e, r: e * r),
    RmsFormula("w * x / (sqrt(mean(x^2)) + eps)", lambda w, r: w * r ** 0.5, lambda e, r: e * r ** 0.5),
    RmsFormula("(1 + w) * x / (sqrt(mean(x^2)) + eps)", lambda w, r: (1 + w) * r ** 0.5 - 1,
               lambda e, r: e * r ** 0.5),
)
LLAMA = RMS_FORMULAS[0]

# RMS norms whose formula is known without probing: class -> (the attribute holding epsilon, formula)
RMS_NORMS: dict[type, tuple[str, RmsFormula]] = {nn.RMSNorm: ("eps", LLAMA)}


def register_rms_norm(cls: type, eps_attr: str, formula: RmsFormula = LLAMA) -> None:
    """An RMS norm class of a library whose behaviour ``rms_norm_of`` cannot probe (its forward takes
    more than the tensor it normalizes), with its epsilon attribute and formula."""
    RMS_NORMS[cls] = (eps_attr, formula)


_PROBED: dict[tuple, tuple[str, RmsFormula] | str] = {}


def rms_norm_of(module: nn.Module) -> tuple[str, RmsFormula] | str:
    """(epsilon attribute, formula) of a module that is an RMS norm over its last dim, or why it is
    not taken for one. Found from behaviour, not from a list of classes: the module is called on
    random inputs with some channels zero, and a copy with those channels removed and the formula's
    rescale applied must give the same output (for every scalar attribute that is the epsilon the
    output depends on). A module the probe cannot run, or whose output no formula rescales, is no
    RMS norm the cut can keep exact."""
    if type(module) in RMS_NORMS:
        return RMS_NORMS[type(module)]
    attrs = {k: v for k, v in vars(module).items()
             if not k.startswith("_") and isinstance(v, (int, float, str, bool, tuple, torch.dtype, type(None)))}
    floats = [k for k, v in attrs.items() if type(v) is float]
    key = (type(module), tuple(sorted(attrs.items(), key=lambda kv: kv[0])))
    try:
        hash(key)
    except TypeError:  # an attribute that cannot be a key (a tuple holding a list): probe every time
        return _probe_rms_norm(module, floats)
    if key not in _PROBED:
        _PROBED[key] = _probe_rms_norm(module, floats)
    return _PROBED[key]


def _probe_rms_norm(module: nn.Module, floats: list[str]) -> tuple[str, RmsFormula] | str:
    name = type(module).__name__
    weight = getattr(module, "weight", None)
    tensors = [n for n, _ in module.named_parameters()] + [n for n, _ in module.named_buffers()]
    if not isinstance(weight, nn.Parameter) or weight.ndim != 1:
        return (f"{name} has no 1-D weight parameter, which an RMS norm needs to take the factor sqrt(width/kept) a "
                "smaller width gives its output")
    if tensors not in (["weight"], ["weight", "bias"]) or getattr(module, "bias", weight).shape != weight.shape:
        return f"{name} holds tensors besides its weight and bias ({', '.join(t for t in tensors if t != 'weight')})"
    generator = torch.Generator().manual_seed(0)
    width = 12  # the probe's own width: the module's may be 1 after a cut
    kept = torch.randperm(width, generator=generator)[:8].sort().values
    x = torch.randn(2, 3, width, generator=generator)
    x[..., [i for i in range(width) if i not in set(kept.tolist())]] = 0
    w = torch.rand(width, generator=generator) + 0.5  # neither ones nor zeros: w and 1 + w differ
    b = torch.randn(width, generator=generator) if "bias" in tensors else None  # not rescaled: added after the norm
    try:
        reference = _run_norm(module, (w, b), {}, x)
    except Exception as exc:  # noqa: BLE001 - a module that cannot run alone on one tensor
        return f"{name} cannot be run alone on the tensor it normalizes ({type(exc).__name__})"
    eps = [attr for attr in floats if _depends_on(module, (w, b), attr, x, reference)]
    if len(eps) != 1 or reference.shape != x.shape:
        return f"{name} has no single epsilon attribute its output depends on"
    (eps,) = eps
    ratio = width / kept.numel()
    full = _run_norm(module, (w, b), {eps: 1.0}, x)[..., kept]
    for formula in RMS_FORMULAS:
        try:
            slim = _run_norm(module, (formula.weight(w[kept], ratio), None if b is None else b[kept]),
                             {eps: formula.eps(1.0, ratio)}, x[..., kept])
        except Exception as exc:  # noqa: BLE001 - a module whose forward reads a width no fixer updates
            return f"{name} does not run at a smaller width ({type(exc).__name__})"
        if torch.allclose(slim, full, rtol=1e-5, atol=1e-6 * float(full.abs().max())):
            return eps, formula
    return (f"{name}'s output follows none of the RMS norm formulas a cut can rescale "
            f"({'; '.join(f.text for f in RMS_FORMULAS)})")


def _depends_on(module: nn.Module, tensors: tuple, attr: str, x: torch.Tensor, reference) -> bool:
    """Whether the output changes when ``attr`` (a float attribute) does: 1.0 against 4.0, which move
    an epsilon next to a mean of squares near 1 far beyond rounding."""
    try:
        one, four = (_run_norm(module, tensors, {attr: v}, x) for v in (1.0, 4.0))
    except Exception:  # noqa: BLE001 - an attribute the forward cannot take such values for
        return False
    return one.shape == four.shape == reference.shape and not torch.allclose(one, four, rtol=1e-3, atol=1e-4)


def _run_norm(module: nn.Module, tensors: tuple, values: dict, x: torch.Tensor) -> torch.Tensor:
    """``module``'s forward on ``x`` with these (weight, bias) and attribute values (on a shallow
    copy; the module itself is not touched)."""
    probe = copy.copy(module)
    params = {k: nn.Parameter(t.clone()) for k, t in zip(("weight", "bias"), tensors) if t is not None}
    probe.__dict__ = {**module.__dict__, **values, "_parameters": params, "_forward_hooks": {}, "_forward_pre_hooks": {}}
    fix_module(probe)
    with torch.no_grad():
        return probe(x).float()


def rms_scope(ctx: RuleContext, node) -> tuple[str, str] | str | None:
    """(path, epsilon attribute) of the RMS norm whose forward ``node`` belongs to, or why the module
    it belongs to is none (None when it belongs to no module)."""
    path, module = ctx.owner_module(node)
    if module is None:
        return None
    found = rms_norm_of(module)
    return found if isinstance(found, str) else (path, found[0])


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
    """nn.RMSNorm over the last dim(s) (and a registered RMS norm layer with a bias added after it,
    ``centering.CenteredLayerNorm``): its statistics (see ``rms_statistics``) and its per-channel
    weight and bias, which a gate may scale like BatchNorm's."""
    m = ctx.module(node)
    x = node.args[0]
    lab = ctx.labels(x)
    if lab is None:
        return None
    nd = lab.ids.ndim
    dims = list(range(nd - len(m.normalized_shape), nd))
    if len(dims) != 1 or not any(d in lab.varying_dims() for d in dims):
        return normalization(ctx, node, x, dims, type(m).__name__)
    rms_statistics(ctx, node, x, dims[0], (node.target, RMS_NORMS.get(type(m), ("eps",))[0]))
    affine = [fqn for fqn in (ctx.fqn_of(node, "weight"), ctx.fqn_of(node, "bias")) if fqn is not None]
    for fqn in affine:
        ctx.attach(fqn, Role.AFFINE, ctx.per_dim(x, dims[0], node).ids.reshape(-1), 0)
    return Labels.fresh(lab.ids, zaff=True, zall=True) if affine else lab
