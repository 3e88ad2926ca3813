"""Minimal repros of every failure class benchmarks/fuzz.py found (see FUZZ_REPORT.md).

Each repro is a tiny model, its input, and which gates' groups to zero; ``check`` gates it with
the all-kinds recipe, zeroes those groups, shrinks, and compares the slim model with the gated
one. ``refused`` repros are exact models whose groups the tool declines; they print the reason.

    PYTHONPATH=. python benchmarks/fuzz_repros.py            # all
    PYTHONPATH=. python benchmarks/fuzz_repros.py clamp pad  # those whose name contains a word
"""
from __future__ import annotations

import os
import sys
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import dgating_surgery as dg
from dgating_surgery.shrink import select_features

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import random_arch as R  # noqa: E402

RECIPE = {"D": 3, "groups": [{"kind": "channels"}, {"kind": "neurons"}, {"kind": "features"}]}
REPROS = []


def repro(expect, kill=((0,),), kinds=("channels", "neurons")):
    """Register a repro. ``kill``: per gate of ``kinds`` (in order), the groups to zero."""
    def deco(fn):
        REPROS.append((fn.__name__, expect, fn, kill, kinds))
        return fn
    return deco


def check(model, x, kill=((0,),), kinds=("channels", "neurons")) -> str:
    """The 5-line check: gate, zero some groups, shrink, compare."""
    torch.manual_seed(0)
    model.eval()
    ref = model(x)
    try:
        gated = dg.gate_model(model, RECIPE, x)
    except Exception as exc:  # noqa: BLE001
        return f"gate_model raised {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    with torch.no_grad():
        for i, gate in enumerate(g for g in dg.gates(gated) if g.kind in kinds):
            ks = kill[min(i, len(kill) - 1)]
            gate.factors[0, [k for k in ks if k < gate.num_groups]] = 0
    out = gated(x)
    try:
        slim = dg.shrink(gated)
        (xs,), _ = select_features(slim, (x,))
        found = []
        R._input_hooks(slim, found)  # a layer whose shape attribute disagrees with its input
        with warnings.catch_warnings(record=True) as w, torch.no_grad():
            warnings.simplefilter("always")
            diff = float((slim(xs) - out).abs().max() / out.abs().max())
    except Exception as exc:  # noqa: BLE001
        return f"slim model raised {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    stale = R.stale_attributes(slim) + found
    more = f"; warns: {str(w[0].message)[:100]}" if w else ""
    more += f"; stale: {stale[0]}" if stale else ""
    return f"slim differs by {diff:.3g} of the output{more}"


def reasons(model, x) -> list[str]:
    plan = dg.analyze(model, x)
    return sorted({r for s in plan.sets for r in s.reasons if r and "model output" not in r})


def _init(model):
    """Weights away from 0 and norms away from identity (what the fuzzer does)."""
    R._randomize(model, torch.Generator().manual_seed(0))
    return model.eval()


IMG = torch.randn(2, 4, 4, 5, generator=torch.Generator().manual_seed(1))
VEC = torch.randn(2, 4, generator=torch.Generator().manual_seed(2))
TOK = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(3))


class Sandwich(nn.Module):
    """conv(4->4) -> op -> conv(4->2): the op's effect on a dead channel decides exactness."""

    def __init__(self, op, cin=4, c=4, cout=2, **mods):
        super().__init__()
        self.c1, self.c2, self.op = nn.Conv2d(cin, c, 1), nn.Conv2d(c, cout, 1), op
        for k, v in mods.items():
            setattr(self, k, v)

    def forward(self, x):
        return self.c2(self.op(self, self.c1(x), x))


# ---- wrong: the slim model computes something else ----------------------------------------


@repro("wrong")
def clamp_bounds_exclude_zero():
    return _init(Sandwich(lambda m, h, x: h.clamp(0.1, 2.0))), IMG   # also clip, F.hardtanh, nn.Hardtanh(0.1, 2)


@repro("wrong")
def hardtanh_module_bounds_exclude_zero():
    return _init(Sandwich(lambda m, h, x: m.a(h), a=nn.Hardtanh(-2.0, -0.1))), IMG


@repro("wrong")
def size_of_grouped_dim_as_data():
    return _init(Sandwich(lambda m, h, x: h / h.size(1))), IMG         # or h * (1.0 / h.numel())


@repro("wrong")
def comparison_mask_across_channels():
    return _init(Sandwich(lambda m, h, x: h * (h.flip(1) > 0).float())), IMG


@repro("wrong", kill=((0,), (1,)))
def comparison_mask_from_another_layer():
    return _init(Sandwich(lambda m, h, x: h * (m.c3(x) > 0).float(), c3=nn.Conv2d(4, 4, 1))), IMG


@repro("wrong")
def instance_norm_tracked_stats_no_affine():
    return _init(Sandwich(lambda m, h, x: m.n(h), n=nn.InstanceNorm2d(4, affine=False, track_running_stats=True))), IMG


@repro("wrong")
def instance_norm_no_affine_stale_num_features():
    return _init(Sandwich(lambda m, h, x: m.n(h), n=nn.InstanceNorm2d(4))), IMG


def _inplace_add(m, h, x):
    y = h * 2.0
    y.add_(1.0)          # the graph's `y` node is read below, but the data is y + 1
    return y


@repro("wrong")
def inplace_add_then_read():
    return _init(Sandwich(_inplace_add)), IMG


def _inplace_sigmoid(m, h, x):
    y = h * 1.0
    y.sigmoid_()
    return y


@repro("wrong")
def inplace_sigmoid_then_read():
    return _init(Sandwich(_inplace_sigmoid)), IMG


@repro("wrong")
def constant_pad_nonzero_value():
    return _init(Sandwich(lambda m, h, x: m.p(h), p=nn.ConstantPad2d(1, 0.5))), IMG


# ---- crash: gate_model, shrink or the slim model raises --------------------------------------


@repro("crash")
def depthwise_conv_on_input():
    return _init(_DwOnInput()), IMG


class _DwOnInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.dw, self.c2 = nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.c2(self.dw(x))


class _BnDwOnInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn, self.dw, self.c2 = nn.BatchNorm2d(4), nn.Conv2d(4, 8, 1, groups=4), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.c2(self.dw(self.bn(x)))


@repro("crash")
def batchnorm_then_grouped_conv_on_input():
    return _init(_BnDwOnInput()), IMG


class _Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.c0, self.f, self.c2 = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.c2(self.f(torch.relu(self.f(self.c0(x)))))


@repro("crash")
def module_called_twice():
    return _init(_Twice()), IMG


class _SharedUnlabelled(nn.Module):
    def __init__(self):
        super().__init__()
        self.f, self.head = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        h = torch.cumsum(self.f(x), 1)   # the second call reads a tensor without labels
        return self.head(self.f(h))


@repro("crash", kinds=("features",))
def shared_layer_other_call_unlabelled():
    return _init(_SharedUnlabelled()), IMG


class _BnInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.n, self.c2 = nn.BatchNorm2d(4, affine=False, track_running_stats=False), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.c2(self.n(x))   # the input's features are cut: n keeps num_features=4


@repro("wrong", kinds=("features",))
def batchnorm_no_affine_no_stats_stale_num_features():
    return _init(_BnInput()), IMG


@repro("crash")
def elementwise_with_full_size_buffer():
    m = Sandwich(lambda m, h, x: h * m.t)
    m.register_buffer("t", torch.ones(4, 1, 1))   # per-channel or full-size: never sliced
    return _init(m), IMG


@repro("crash")
def elementwise_with_ones_like_input():
    return _init(Sandwich(lambda m, h, x: h * torch.ones_like(x))), IMG


@repro("crash")
def elementwise_with_output_of_op_without_rule():
    return _init(Sandwich(lambda m, h, x: h * torch.cumsum(m.c3(x), 1), c3=nn.Conv2d(4, 4, 1))), IMG


@repro("crash")
def cat_with_ones_like():
    return _init(_CatOnes()), IMG


class _CatOnes(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(4, 4, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        h = self.c1(x)
        return self.c2(torch.cat([torch.ones_like(h), h], 1))


class _ConvTGrouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.c0, self.t, self.c2 = nn.Conv2d(4, 4, 1), nn.ConvTranspose2d(4, 8, 2, groups=2), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.c2(self.t(self.c0(x)))


@repro("crash")
def grouped_conv_transpose():
    return _init(_ConvTGrouped()), IMG


class _FlipInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.c2 = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.c2(x + x.flip(1))   # feature groups {0, 3} and {1, 2}


@repro("crash", kinds=("features",))
def feature_group_spanning_two_positions():
    return _init(_FlipInput()), IMG


@repro("crash")
def prelu_per_channel():
    return _init(Sandwich(lambda m, h, x: m.a(h), a=nn.PReLU(4))), IMG


class _ViewAsOther(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc0, self.fc, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 2)

    def forward(self, v):
        h = self.fc0(v)
        return self.fc2(self.fc(h).view_as(h))   # also reshape_as(h), view(h.size())


@repro("crash", kill=((0,), (1, 2)))
def view_as_another_tensor():
    return _init(_ViewAsOther()), VEC


class _Stack2(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Conv2d(4, 3, 1), nn.Conv2d(4, 3, 1), nn.Conv2d(3, 2, 1)

    def forward(self, x):
        return self.head(torch.stack([self.a(x), self.b(x)], 0).sum(0))


@repro("crash")
def stack_two_branches_sum_head_conv():
    return _init(_Stack2()), IMG


class _FConvGrouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.c0, self.c2 = nn.Conv2d(4, 4, 1), nn.Conv2d(8, 2, 1)
        self.w = nn.Parameter(torch.randn(8, 2, 1, 1))

    def forward(self, x):
        return self.c2(F.conv2d(self.c0(x), self.w, groups=2))


@repro("crash")
def functional_grouped_conv_literal_groups():
    return _init(_FConvGrouped()), IMG


@repro("crash", kinds=("features",))
def channel_shuffle_on_input():
    return _init(_ShuffleInput()), IMG


class _ShuffleInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.c2 = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        b, c, h, w = x.size()
        return self.c2(x.view(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, -1, h, w))


class _ExportLiteral(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.c2 = nn.Linear(4, 6), nn.Conv2d(6, 2, 1)

    def forward(self, v):
        if v.dim() == 3:   # python control flow: torch.export is used
            v = v[0]
        return self.c2(torch.relu(self.fc(v)).view(v.size(0), 6, 1, 1))   # 6 is written in the code


@repro("crash")
def export_frontend_literal_view_size():
    return _init(_ExportLiteral()), VEC


# ---- refused although exact ----------------------------------------------------------------


class _Cls(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(5, 6), nn.Linear(6, 2)
        self.cls = nn.Parameter(torch.ones(1, 1, 6))

    def forward(self, t):
        t = self.fc(t)
        return self.head(torch.cat([self.cls.expand(t.size(0), -1, -1), t], 1)[:, 0])


@repro("refused")
def cls_token_cat_then_select():
    return _init(_Cls()), TOK


def _std_conv():
    from timm.layers.std_conv import ScaledStdConv2d
    return Sandwich(lambda m, h, x: m.c3(torch.relu(m.s(h))), s=ScaledStdConv2d(4, 4, 3, padding=1), c3=nn.Conv2d(4, 4, 1))


@repro("refused")
def timm_scaled_std_conv2d():
    return _init(_std_conv()), IMG


@repro("refused")
def pow_positive_exponent():
    return _init(Sandwich(lambda m, h, x: h.pow(2))), IMG


@repro("refused")
def group_norm_one_channel_per_group():
    return _init(Sandwich(lambda m, h, x: m.n(h), n=nn.GroupNorm(4, 4))), IMG


@repro("refused")
def pixel_shuffle():
    return _init(_PixShuf()), IMG


class _PixShuf(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(4, 8, 1), nn.Conv2d(2, 2, 1)

    def forward(self, x):
        return self.c2(F.pixel_shuffle(self.c1(x), 2))


@repro("refused")
def repeat_interleave():
    return _init(_RepInt()), IMG


class _RepInt(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(4, 4, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.c2(self.c1(x).repeat_interleave(2, 1))


@repro("refused")
def masked_fill():
    return _init(Sandwich(lambda m, h, x: h.masked_fill(h < 0, 0.0))), IMG


@repro("refused")
def torch_where_zero_keeping():
    return _init(Sandwich(lambda m, h, x: torch.where(h > 0, h, 0.1 * h))), IMG


@repro("refused")
def f_normalize_over_spatial():
    return _init(Sandwich(lambda m, h, x: F.normalize(h, dim=-1))), IMG


def _neg_(m, h, x):
    y = h.clone()
    y.neg_()
    return y


@repro("refused")
def inplace_neg_():
    return _init(Sandwich(_neg_)), IMG


@repro("refused")
def f_pad_rule_fails():
    return _init(Sandwich(lambda m, h, x: F.pad(h, (1, 1, 1, 1)))), IMG


class _Export(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc0, self.fc = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, v):
        if v.dim() == 3:   # python control flow: symbolic tracing fails, torch.export is used
            v = v[0]
        return self.fc(torch.relu(self.fc0(v)))


@repro("refused", kinds=("features",))
def export_fallback_guards_fn_blocks_features():
    return _init(_Export()), VEC


def main(words):
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    for name, expect, fn, kill, kinds in REPROS:
        if words and not any(w in name for w in words):
            continue
        model, x = fn()
        if expect == "refused":
            why = reasons(model, x)
            print(f"{name:46s} [{expect}] {why[0][:150] if why else 'gated: ' + check(model, x, kill, kinds)}")
        else:
            print(f"{name:46s} [{expect}] {check(model, x, kill, kinds)}")


if __name__ == "__main__":
    main(sys.argv[1:])
