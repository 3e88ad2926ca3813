"""One minimal model per failure class the random-architecture fuzzer found (benchmarks/fuzz.py):
each is either cut exactly (every invariant of ``random_arch.check_case``: gated == original,
slim == gated, parameter drop == dead groups' parameters, every removed entry dead, no stale shape
attribute) with its groups gated, or refused with the reason a user reads."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dgating_surgery as dg
from dgating_surgery.engine.shrink import select_features
import random_arch as R

IMG = torch.randn(2, 4, 4, 5, generator=torch.Generator().manual_seed(1))
VEC = torch.randn(2, 4, generator=torch.Generator().manual_seed(2))
TOK = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(3))
SEQ = torch.randn(2, 4, 5, generator=torch.Generator().manual_seed(4))


class Sandwich(nn.Module):
    """conv(4->4) -> op -> conv(4->2): the op's effect on a dead channel decides exactness."""

    def __init__(self, op, **layers):
        super().__init__()
        self.c1, self.c2, self.op = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 2, 1), op
        for name, layer in layers.items():
            setattr(self, name, layer)

    def forward(self, x):
        return self.c2(self.op(self, self.c1(x), x))


class Net(nn.Module):
    """A model from a forward function and named layers."""

    def __init__(self, forward, **layers):
        super().__init__()
        self.body = forward
        for name, layer in layers.items():
            setattr(self, name, layer)

    def forward(self, x):
        return self.body(self, x)


def _in_place(op):
    def forward(m, h, x):
        y = h * 2.0
        getattr(y, op)(*([1.0] if op == "add_" else []))  # the graph's `y` is read below, the data is changed
        return y
    return forward


def _export_literal(m, v):
    if v.dim() == 3:  # Python control flow: symbolic tracing fails, torch.export is used
        v = v[0]
    return m.c2(torch.relu(m.fc(v)).view(v.size(0), 6, 1, 1))  # 6 is written in the code


def _export_plain(m, v):
    if v.dim() == 3:
        v = v[0]
    return m.fc(torch.relu(m.fc0(v)))


def _export_size_data(op):
    def forward(m, v):
        if v.dim() == 3:
            v = v[0]
        return m.fc2(op(m, v))  # under torch.export the size is a number in the graph
    return forward


def _export_norm(m, x):
    if x.dim() > 2:  # Python control flow: torch.export; its graph has the norm as an op, no layer
        x = x * 2.0
    return m.c(m.n(x))


def _rms_channels(m, x):
    return m.c2(m.n(m.dw(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2))


def _half_layer_then_sum(m, t):
    a, b = t.chunk(2, -1)
    return torch.cat((a, m.f(b)), -1).sum(dim=1)


def _times_max(h):
    return h * h.amax((2, 3), keepdim=True)


def _shuffle(m, x):
    b, c, h, w = x.size()
    return m.c2(x.view(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, -1, h, w))


def _cls_token(m, t):
    t = m.fc(t)
    return m.head(torch.cat([m.cls.expand(t.size(0), -1, -1), t], 1)[:, 0])


def _std_conv():
    from timm.layers.std_conv import ScaledStdConv2d
    return Sandwich(lambda m, h, x: m.c3(torch.relu(m.s(h))), s=ScaledStdConv2d(4, 4, 3, padding=1),
                    c3=nn.Conv2d(4, 4, 1))


def _buffer():
    m = Sandwich(lambda m, h, x: h * m.t)
    m.register_buffer("t", torch.rand(4, 1, 1) + 0.5)
    return m


# (name, model factory, input, the layer whose groups are judged, expectation: "cut" or a reason fragment)
def _input_chunk_mul_(m, x):
    torch.chunk(x, 2, 1)[1].mul_(2)
    return m.c2(torch.relu(m.c1(x)))


def _input_split_sigmoid_(m, v):
    torch.split(v, 1, 1)[2].sigmoid_()
    return m.fc2(torch.relu(m.fc(v)))


CASES = [
    # zero-keeping only when the op maps 0 to 0
    ("clamp bounds exclude 0", lambda: Sandwich(lambda m, h, x: h.clamp(0.1, 2.0)), IMG, "c1", "not exactly zero"),
    ("nn.Hardtanh bounds exclude 0", lambda: Sandwich(lambda m, h, x: m.a(h), a=nn.Hardtanh(-2.0, -0.1)), IMG, "c1",
     "not exactly zero"),
    ("clamp bounds include 0", lambda: Sandwich(lambda m, h, x: h.clamp(-0.5, 2.0)), IMG, "c1", "cut"),
    ("in-place add", lambda: Sandwich(_in_place("add_")), IMG, "c1", "not exactly zero"),
    ("in-place sigmoid", lambda: Sandwich(_in_place("sigmoid_")), IMG, "c1", "not exactly zero"),
    ("in-place neg", lambda: Sandwich(_in_place("neg_")), IMG, "c1", "cut"),
    ("ConstantPad2d non-zero", lambda: Sandwich(lambda m, h, x: m.p(h), p=nn.ConstantPad2d(1, 0.5)), IMG, "c1",
     "not exactly zero"),
    ("F.pad zero", lambda: Sandwich(lambda m, h, x: F.pad(h, (1, 1, 1, 1))), IMG, "c1", "cut"),
    ("pow(2)", lambda: Sandwich(lambda m, h, x: h.pow(2)), IMG, "c1", "cut"),
    ("InstanceNorm tracked stats, no affine",
     lambda: Sandwich(lambda m, h, x: m.n(h), n=nn.InstanceNorm2d(4, track_running_stats=True)), IMG, "c1",
     "not exactly zero"),
    ("InstanceNorm without tensors", lambda: Sandwich(lambda m, h, x: m.n(h), n=nn.InstanceNorm2d(4)), IMG, "c1",
     "cut"),
    ("GroupNorm, a channel per group", lambda: Sandwich(lambda m, h, x: m.n(h), n=nn.GroupNorm(4, 4)), IMG, "c1",
     "cut"),
    ("F.normalize over a spatial dim", lambda: Sandwich(lambda m, h, x: F.normalize(h, dim=-1)), IMG, "c1", "cut"),
    ("F.normalize over channels", lambda: Sandwich(lambda m, h, x: F.normalize(h, dim=1)), IMG, "c1", "cut"),
    # comparisons, masks, where
    ("mask across channels", lambda: Sandwich(lambda m, h, x: h * (h.flip(1) > 0).float()), IMG, "c1", "cut"),
    ("mask from another layer", lambda: Sandwich(lambda m, h, x: h * (m.c3(x) > 0).float(), c3=nn.Conv2d(4, 4, 1)),
     IMG, "c1", "cut"),
    ("masked_fill", lambda: Sandwich(lambda m, h, x: h.masked_fill(h < 0, 0.0)), IMG, "c1", "cut"),
    ("torch.where", lambda: Sandwich(lambda m, h, x: torch.where(h > 0, h, 0.1 * h)), IMG, "c1", "cut"),
    # ops that combine entries along dims without groups: zero only where every combined entry is
    ("max over a map of zeros and ones", lambda: Sandwich(lambda m, h, x: _times_max(torch.cat([h, torch.ones_like(h)],
                                                                                        3))), IMG, "c1",
     "not exactly zero"),
    ("pooling a window of zeros and ones", lambda: Sandwich(lambda m, h, x: F.max_pool2d(
        torch.cat([h, torch.ones_like(h)], 3), (1, 2))), IMG, "c1", "not exactly zero"),
    ("max over space", lambda: Sandwich(lambda m, h, x: _times_max(h)), IMG, "c1", "cut"),
    ("a sum over the input's tokens, neurons along the channels",
     lambda: Net(_half_layer_then_sum, f=nn.Linear(2, 2)), TOK[..., :4], "f", "an entry there belongs to two groups"),
    # sizes
    ("size of a grouped dim as data", lambda: Sandwich(lambda m, h, x: h / h.size(1)), IMG, "c1",
     "size of a grouped dim is used as data"),
    ("numel as data", lambda: Sandwich(lambda m, h, x: h * (1.0 / h.numel())), IMG, "c1",
     "size of a grouped dim is used as data"),
    ("view_as another tensor", lambda: Net(lambda m, v: m.fc2(m.fc(m.fc0(v)).view_as(m.fc0(v))),
                                         fc0=nn.Linear(4, 6), fc=nn.Linear(6, 6), fc2=nn.Linear(6, 2)), VEC, "fc0",
     "cut"),
    ("reshape to another tensor's shape", lambda: Net(lambda m, v: m.fc2(m.fc(m.fc0(v)).reshape(m.fc0(v).shape)),
                                                     fc0=nn.Linear(4, 6), fc=nn.Linear(6, 6), fc2=nn.Linear(6, 2)),
     VEC, "fc0", "cut"),
    # operands that carry no group
    ("full-size buffer", _buffer, IMG, "c1", "cut"),
    ("zeros_like beside it", lambda: Net(lambda m, x: m.c2(torch.cat([torch.zeros_like(m.c1(x)), m.c1(x)], 1)),
                                         c1=nn.Conv2d(4, 4, 1), c2=nn.Conv2d(8, 2, 1)), IMG, "c1", "cut"),
    ("ones_like beside it", lambda: Net(lambda m, x: m.c2(torch.cat([torch.ones_like(m.c1(x)), m.c1(x)], 1)),
                                        c1=nn.Conv2d(4, 4, 1), c2=nn.Conv2d(8, 2, 1)), IMG, "c1", "not exactly zero"),
    ("output of an op without a rule",
     lambda: Sandwich(lambda m, h, x: h * torch.cumsum(m.c3(x), 1), c3=nn.Conv2d(4, 4, 1)), IMG, "c1",
     "belongs to no group but has the full size"),
    ("padding a grouped dim, then a residual", lambda: Net(lambda m, v: m.fc2(F.pad(v, (1, 1)) + m.fc(F.pad(v, (1, 1)))),
                                                          fc=nn.Linear(6, 6), fc2=nn.Linear(6, 2)), VEC, "fc",
     "meets entries of no group"),
    # the model input
    ("depthwise conv on the input", lambda: Net(lambda m, x: m.c2(m.dw(x)), dw=nn.Conv2d(4, 4, 3, padding=1, groups=4),
                                                c2=nn.Conv2d(4, 2, 1)), IMG, "x", "cut"),
    ("BatchNorm then grouped conv on the input",
     lambda: Net(lambda m, x: m.c2(m.dw(m.bn(x))), bn=nn.BatchNorm2d(4), dw=nn.Conv2d(4, 8, 1, groups=4),
                 c2=nn.Conv2d(8, 2, 1)), IMG, "x", "cut"),
    ("a feature group over two positions", lambda: Net(lambda m, x: m.c2(x + x.flip(1)), c2=nn.Conv2d(4, 2, 1)), IMG,
     "x", "cut"),
    ("channel shuffle of the input", lambda: Net(_shuffle, c2=nn.Conv2d(4, 2, 1)), IMG, "x", "cut"),
    ("BatchNorm without tensors on the input",
     lambda: Net(lambda m, x: m.c2(m.n(x)), n=nn.BatchNorm2d(4, affine=False, track_running_stats=False),
                 c2=nn.Conv2d(4, 2, 1)), IMG, "x", "cut"),
    # layers used twice
    ("a layer called twice", lambda: Net(lambda m, x: m.c2(m.f(torch.relu(m.f(m.c0(x))))), c0=nn.Conv2d(4, 4, 1),
                                         f=nn.Conv2d(4, 4, 1), c2=nn.Conv2d(4, 2, 1)), IMG, "c0", "cut"),
    ("a shared layer, once on ungrouped input",
     lambda: Net(lambda m, x: m.head(m.f(x) + m.f(x.new_ones(x.shape))), f=nn.Conv2d(4, 4, 1), head=nn.Conv2d(4, 2, 1)),
     IMG, "x", "used more than once, once on inputs that belong to no group"),
    # conv variants
    ("grouped ConvTranspose", lambda: Net(lambda m, x: m.c2(m.t(m.c0(x))), c0=nn.Conv2d(4, 4, 1),
                                          t=nn.ConvTranspose2d(4, 8, 2, groups=2), c2=nn.Conv2d(8, 2, 1)), IMG, "c0",
     "cut"),
    ("functional grouped conv, groups in the code",
     lambda: Net(lambda m, x: m.c2(F.conv2d(m.c0(x), m.w, groups=2)), c0=nn.Conv2d(4, 4, 1), c2=nn.Conv2d(8, 2, 1),
                 w=nn.Parameter(torch.randn(8, 2, 1, 1))), IMG, "c0", "groups=2 is written in the code"),
    ("nn.PReLU per channel", lambda: Sandwich(lambda m, h, x: m.a(h), a=nn.PReLU(4)), IMG, "c1", "cut"),
    ("timm ScaledStdConv2d: input", _std_conv, IMG, "c1", "standardizes its weight over its input channels"),
    ("timm ScaledStdConv2d: output", _std_conv, IMG, "s", "cut"),
    # data movement
    ("stack, sum, head conv", lambda: Net(lambda m, x: m.head(torch.stack([m.a(x), m.b(x)], 0).sum(0)),
                                          a=nn.Conv2d(4, 3, 1), b=nn.Conv2d(4, 3, 1), head=nn.Conv2d(3, 2, 1)), IMG,
     "a", "cut"),
    ("class token, then x[:, 0]", lambda: Net(_cls_token, fc=nn.Linear(5, 6), head=nn.Linear(6, 2),
                                              cls=nn.Parameter(torch.ones(1, 1, 6))), TOK, "fc", "cut"),
    ("pixel_shuffle", lambda: Net(lambda m, x: m.c2(F.pixel_shuffle(m.c1(x), 2)), c1=nn.Conv2d(4, 8, 1),
                                  c2=nn.Conv2d(2, 2, 1)), IMG, "c1", "cut"),
    ("F.glu over channels", lambda: Net(lambda m, x: m.c2(F.glu(m.c1(x), 1)), c1=nn.Conv2d(4, 8, 1),
                                        c2=nn.Conv2d(4, 2, 1)), IMG, "c1", "cut"),
    ("repeat_interleave", lambda: Net(lambda m, x: m.c2(m.c1(x).repeat_interleave(2, 1)), c1=nn.Conv2d(4, 4, 1),
                                      c2=nn.Conv2d(8, 2, 1)), IMG, "c1", "cut"),
    # torch.export
    ("torch.export: a size written in the code", lambda: Net(_export_literal, fc=nn.Linear(4, 6),
                                                             c2=nn.Conv2d(6, 2, 1)), VEC, "fc", "fixes the size"),
    ("torch.export: size as data", lambda: Net(_export_size_data(lambda m, v: v * v.size(1)), fc2=nn.Linear(4, 2)),
     VEC, "x", "the size of a grouped dim under torch.export"),
    ("torch.export: summed, then divided by the size",
     lambda: Net(_export_size_data(lambda m, v: v - v.sum(1, keepdim=True) / v.size(1)), fc2=nn.Linear(4, 2)), VEC,
     "x", "the size of a grouped dim under torch.export"),
    ("torch.export: 1 / numel", lambda: Net(_export_size_data(lambda m, v: m.fc(v) * (1.0 / m.fc(v).numel())),
                                           fc=nn.Linear(4, 6), fc2=nn.Linear(6, 2)), VEC, "fc",
     "the size of a grouped dim under torch.export"),
    # a forward that writes into its own input: every run of a check gets fresh copies of the inputs
    ("chunk of the input, multiplied in place", lambda: Net(_input_chunk_mul_, c1=nn.Conv2d(4, 6, 1),
                                                             c2=nn.Conv2d(6, 2, 1)), IMG, "c1", "cut"),
    ("split of the input, sigmoid in place", lambda: Net(_input_split_sigmoid_, fc=nn.Linear(4, 6),
                                                         fc2=nn.Linear(6, 2)), VEC, "fc", "cut"),
    # an RMS norm over a grouped dim: exact with its weight and epsilon rescaled, which needs a weight
    ("RMSNorm over the input's channels", lambda: Net(_rms_channels, dw=nn.Conv2d(4, 4, 1, groups=4), n=nn.RMSNorm(4),
                                                        c2=nn.Conv2d(4, 2, 1)), IMG, "x", "cut"),
    ("RMSNorm without a weight", lambda: Net(_rms_channels, dw=nn.Conv2d(4, 4, 1, groups=4),
                                             n=nn.RMSNorm(4, elementwise_affine=False), c2=nn.Conv2d(4, 2, 1)), IMG,
     "x", "RMS norm without a weight"),
    # a set whose gate scales consumers only, with rows tied to it that no gate scales
    ("input features tie a linear's rows by a size, then a sum",
     lambda: Net(lambda m, v: m.head(torch.relu(m.fc(v).view(v.size())).sum(1, keepdim=True)), fc=nn.Linear(4, 4),
                 head=nn.Linear(1, 2)), VEC, "x", "no parameter there can be scaled instead"),
    ("torch.export: InstanceNorm without tensors", lambda: Net(_export_norm, n=nn.InstanceNorm1d(4),
                                                               c=nn.Conv1d(4, 2, 1)), SEQ, "x", "cut"),
    ("torch.export: GroupNorm without tensors", lambda: Net(_export_norm, n=nn.GroupNorm(4, 4, affine=False),
                                                            c=nn.Conv2d(4, 2, 1)), IMG, "x", "cut"),
    ("torch.export: input features", lambda: Net(_export_plain, fc0=nn.Linear(4, 6), fc=nn.Linear(6, 2)), VEC, "x",
     "cut"),
]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.mark.parametrize("name, make, x, layer, expect", CASES, ids=[c[0] for c in CASES])
def test_failure_class(name, make, x, layer, expect):
    model = make()
    R._randomize(model, torch.Generator().manual_seed(0))
    model.eval()
    (judged,) = [s for s in dg.analyze(model, x).sets if s.modules[0] == layer]
    if expect == "cut":
        assert judged.removable.all(), judged.reasons
    else:
        assert not judged.removable.any()
        assert any(expect in r for r in judged.reasons), judged.reasons
    for seed in range(3):  # random subsets of every gate, including the layer judged
        fresh = make()
        R._randomize(fresh, torch.Generator().manual_seed(0))
        outcome = R.check_case(fresh, (x,), seed)
        assert outcome.kind in ("exact", "nothing gated"), f"{name}: {outcome}"
    if expect == "cut":
        assert outcome.kind == "exact"


def _cat_chunk_swap(m, v):
    a, b = torch.chunk(torch.cat([v, m.f(v)], 1), 2, dim=1)
    return m.head(torch.cat([b, a], 1))


def test_input_features_in_two_gates_are_all_cut():
    """Fuzzer seed 2478: ``cat([x, f(x)])`` chunked in two ties input feature j to the entry 5 further
    on, so x's features fall in two sets (pairs of features; a feature tied to a neuron of f) and get
    two gates. The slim model takes the input without the features of either; the kept features were
    once taken from the last gate alone, and the slim model did not run on them."""
    def make():
        model = Net(_cat_chunk_swap, f=nn.Linear(7, 3), head=nn.Linear(10, 2))
        R._randomize(model, torch.Generator().manual_seed(0))
        return model.double().eval()
    x = torch.randn(2, 7, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    feature_sets = [s for s in dg.analyze(make(), x).sets if s.kind == "features"]
    assert [s.positions for s in feature_sets] == [[[0, 5], [1, 6]], [[2], [3], [4]]]
    assert all(s.removable.all() for s in feature_sets)
    gated = dg.gate_model(make(), {"D": 3, "groups": [{"kind": "features"}]}, (x,))
    with torch.no_grad():
        for g in dg.gates(gated):
            g.factors[0, 0] = 0.0  # features 0 and 5 in the first gate, feature 2 (and f's neuron 0) in the second
        want = gated(x)
    slim = dg.shrink(gated, example_inputs=(x,))  # verifies the slim model on the input it takes
    assert slim.kept_input_features["x"].tolist() == [1, 3, 4, 6]
    assert (slim.f.in_features, slim.f.out_features, slim.head.in_features) == (4, 2, 6)
    args, _ = select_features(slim, (x,))
    torch.testing.assert_close(slim(*args), want, rtol=0, atol=1e-12)
    for seed in range(3):
        assert R.check_case(make(), (x,), seed).kind == "exact"
