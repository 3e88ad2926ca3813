"""Where a gate acts: on the weight slices it scales, or on the layer's output activations.

A gate that scales a Linear's or a Conv's whole output rows (the producer policy: the rows of its
weight and its bias, nothing else on that weight) may act on the layer's output instead:
``conv(x, theta * g, b * g) == conv(x, theta, b) * g`` per output channel, exactly in real
arithmetic (float rounding differs by an ulp or so). The two sides cost about the same per element
(forward: one multiplication; backward: one for the input's gradient, one multiplication and a
sum for the gate's), so the cheaper side is the one with fewer elements: the weight (and bias) or
the output the layer computes on this call. ``auto`` (the default) compares the two on every call,
from the shapes of that call (plain Python integers: no synchronization, no graph break; under
symbolic shapes, as in ``torch.export`` with dynamic dims, it takes the output side rather than
guard on the batch size).

Nothing else changes: the D-Gating factors, the parametrization (``module.weight`` is still
``theta * gate`` wherever it is read, so ``dg.penalty``, ``dg.param_groups``, the checkpoint format
and ``dg.shrink`` see what they always saw), and every gate the output side cannot make exact
(a BatchNorm's affine, consumer columns, a weight gated along two dims, any other layer class)
stays on the weight side through its ``GateScale``.

The mechanism: ``torch.nn.utils.parametrize`` gives every parametrized module a class of its own
(``ParametrizedLinear``); an eligible module's class gets the ``forward`` below, which reads the
stored primary weights, computes the gate once per call (weight and bias share it) and applies it on
the chosen side. ``shrink`` puts the original class back, which removes it with the gates. While
``torch.nn.utils.parametrize.cached()`` is active (the latency figures) the cached gated weights are
used, i.e. the dense cost.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from .wrappers import accepts_wrapped

SIDES = ("auto", "weight", "output")


class GateScale(nn.Module):
    """Parametrization ``theta -> theta * gate`` for one parameter (``sources``: the ``DGate`` modules
    it reads). ``index`` maps every entry to its group's position in the concatenated gates of
    ``sources`` (-1: not gated). When one gate
    owns every entry in order (a BatchNorm after its conv, the usual case) the gate vector is used
    as it is: no concatenation or gather in the training step.

    ``side`` is None for a gate that can only act on this weight; for the weight of a Linear/Conv
    whose gate may act on the layer's output instead it is ``"auto"``, ``"weight"`` or ``"output"``
    (``gate_modes``; ``bias_gated``: the bias shares this gate)."""

    def __init__(self, sources: list[nn.Module], index: torch.Tensor):
        super().__init__()
        self.sources = list(sources)  # a plain list: the gates are registered once, under model.dgates
        flat = index.reshape(-1)
        self.in_order = len(sources) == 1 and torch.equal(flat, torch.arange(sources[0].num_groups))
        self.side, self.bias_gated = None, False
        self.register_buffer("index", index + 1, persistent=False)

    def vector(self, dtype: torch.dtype) -> torch.Tensor:
        """The gate of every position along the gated dim, as a 1-D tensor of ``dtype``."""
        if self.in_order:
            g = self.sources[0].gate()
            return g if g.dtype == dtype else g.to(dtype)
        gates = torch.cat([self.sources[0].factors.new_ones(1, dtype=dtype)]
                          + [s.gate().to(dtype) for s in self.sources])
        return gates[self.index.reshape(-1)]

    def forward(self, theta: torch.Tensor) -> torch.Tensor:
        return theta * self.vector(theta.dtype).view(self.index.shape)


def _cheaper(n_out, n_weight) -> str:
    """The side with fewer elements to scale; the output side under symbolic shapes."""
    if not isinstance(n_out, int):
        return "output"
    return "output" if n_out <= n_weight else "weight"


def _gated_forward(self, input, call, out_count, gate_shape):
    """The forward of an eligible layer: ``call(layer, input, weight, bias)`` computes the layer,
    ``out_count(self, input)`` how many outputs this call gives, ``gate_shape(self)`` how the gate
    vector broadcasts over one output."""
    plist = self.parametrizations
    scale = plist["weight"][0]
    if parametrize._cache_enabled:  # cached gated weights: the dense original's cost
        return call(self, input, self.weight, self.bias)
    theta = plist["weight"].original
    bias = plist["bias"].original if scale.bias_gated else None
    side = scale.side
    if side == "auto":
        side = _cheaper(out_count(self, input), theta.numel() + (0 if bias is None else bias.numel()))
    g = scale.vector(theta.dtype)
    if side == "output":
        out = call(self, input, theta, bias)
        return out * (g if g.dtype == out.dtype else g.to(out.dtype)).view(gate_shape(self))
    return call(self, input, theta * g.view((-1,) + (1,) * (theta.ndim - 1)), None if bias is None else bias * g)


def _conv_outputs(self, input) -> int:
    stride = 1
    for s in self.stride:
        stride *= s
    return input.numel() // self.in_channels * self.out_channels // stride


# layer class -> (its computation, its count of outputs on a call, the gate's shape over an output)
_LINEAR = (lambda m, x, w, b: F.linear(x, w, b), lambda m, x: x.numel() // m.in_features * m.out_features,
           lambda m: (-1,))
_CONV = (lambda m, x, w, b: m._conv_forward(x, w, b), _conv_outputs, lambda m: (-1,) + (1,) * len(m.kernel_size))
_RULES = {nn.Linear: _LINEAR, nn.Conv1d: _CONV, nn.Conv2d: _CONV, nn.Conv3d: _CONV}


def _forward_for(rule):
    def forward(self, input):
        return _gated_forward(self, input, *rule)
    return forward


_FORWARDS = {cls: _forward_for(rule) for cls, rule in _RULES.items()}


def _base_class(module: nn.Module) -> type:
    return type(module).__bases__[0] if parametrize.is_parametrized(module) else type(module)


def _eligible_scale(module: nn.Module):
    """The weight's ``GateScale`` when its gate may act on this module's output (see the module
    docstring), with whether the bias is gated too; else None."""
    if _base_class(module) not in _FORWARDS or not parametrize.is_parametrized(module, "weight"):
        return None, False
    plist = module.parametrizations["weight"]
    if len(plist) != 1 or not isinstance(plist[0], GateScale):
        return None, False
    scale = plist[0]
    out_rows = plist.original.shape[0]
    if tuple(scale.index.shape) != (out_rows,) + (1,) * (plist.original.ndim - 1):
        return None, False  # gated along another dim (input features on the columns)
    if parametrize.is_parametrized(module, "bias"):
        blist = module.parametrizations["bias"]
        if len(blist) != 1 or not isinstance(blist[0], GateScale):
            return None, False
        other = blist[0]
        same = (len(other.sources) == len(scale.sources) and all(a is b for a, b in zip(other.sources, scale.sources))
                and torch.equal(other.index.reshape(-1), scale.index.reshape(-1)))
        return (scale, True) if same else (None, False)
    if module._parameters.get("bias") is not None:
        return None, False  # an ungated bias: the output side would scale it too
    return scale, False


def install(model: nn.Module, side: str = "auto") -> int:
    """Give every module whose gate may act on its output the forward that chooses the side;
    returns how many modules got it. Called by ``gate_model`` after the gates are registered."""
    check_side(side)
    count = 0
    for module in model.modules():
        scale, bias_gated = _eligible_scale(module)
        if scale is None:
            continue
        type(module).forward = _FORWARDS[_base_class(module)]  # the module's own parametrized class
        scale.side, scale.bias_gated = side, bias_gated
        count += 1
    return count


def check_side(side: str) -> str:
    if side not in SIDES:
        raise ValueError(f"side must be one of {', '.join(SIDES)}, got {side!r}")
    return side


@accepts_wrapped()
def set_gate_side(model: nn.Module, side: str) -> dict[str, str]:
    """Make every gate that may act on a layer's output act on ``side``: ``"auto"`` (the default:
    whichever of weight and output has fewer elements on each call), ``"weight"`` or ``"output"``.
    Gates that can only act on weights (a BatchNorm's affine, input features, ...) keep doing so.
    Returns ``gate_sides(model)``."""
    check_side(side)
    for module in model.modules():
        scale, _ = _eligible_scale(module)
        if scale is not None and scale.side is not None:
            scale.side = side
    return gate_sides(model)


@accepts_wrapped()
def gate_sides(model: nn.Module) -> dict[str, str]:
    """For every gated layer: ``"weight only"`` (its gates can act only on weights), or the side setting
    of a layer whose gate may act on its output (``"auto"``, ``"weight"``, ``"output"``)."""
    out = {}
    for name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        if not any(isinstance(p, GateScale) for plist in module.parametrizations.values() for p in plist):
            continue
        scale, _ = _eligible_scale(module)
        out[name] = scale.side if scale is not None and scale.side is not None else "weight only"
    return out
