"""Where a gate acts (issue 10): on the weight slices, on the layer's output, or on the cheaper of the
two per call. Every side computes the same function and the same gradients, compiles without graph
breaks, exports, and shrinks to the same slim model."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import dgating_surgery as dg
from dgating_surgery import gate_sides, set_gate_side
from dgating_surgery.engine.gate_modes import SIDES

RECIPE = {"D": 3, "groups": [{"kind": "channels"}, {"kind": "neurons"}]}


class Mixed(nn.Module):
    """A producer conv with a bias (output side possible), a conv followed by a depthwise conv (the
    gate scales the depthwise weights: output side possible there), a conv + BatchNorm (the gate scales the affine: weight
    side only), a Conv1d, a Linear with and one without a bias."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.conv_a = nn.Conv2d(8, 8, 1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.conv_bn = nn.Sequential(nn.Conv2d(8, 6, 3, stride=2, bias=False), nn.BatchNorm2d(6))
        self.conv1d = nn.Conv1d(6, 5, 3)
        self.fc1 = nn.Linear(5 * 5, 16)
        self.fc2 = nn.Linear(16, 12, bias=False)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        h = F.relu(self.dw(F.relu(self.conv_a(F.relu(self.conv(x))))))
        h = F.relu(self.conv_bn(h))  # N, 6, 7, 7
        h = F.relu(self.conv1d(h.flatten(2)[:, :, :7]))  # N, 5, 5
        return self.head(torch.tanh(self.fc2(F.relu(self.fc1(h.flatten(1))))))


def gated_pair(model=None, x=None, recipe=RECIPE):
    model = model or Mixed()
    x = torch.randn(4, 3, 16, 16) if x is None else x
    return model, dg.gate_model(copy.deepcopy(model), recipe, x[:1]), x


def grads(model, x, run=None):
    model.zero_grad(set_to_none=True)
    (model if run is None else run)(x).square().sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_every_side_is_the_same_function_with_the_same_gradients():
    model, gated, x = gated_pair()
    sides = gate_sides(gated)
    assert sides == {"conv": "auto", "dw": "auto", "conv_bn.1": "weight only", "conv1d": "auto", "fc1": "auto",
                     "fc2": "auto"}
    reference = model(x)
    per_side = {}
    for side in SIDES:
        assert set(set_gate_side(gated, side).values()) == {side, "weight only"}
        torch.testing.assert_close(gated(x), reference, rtol=1e-5, atol=1e-6)
        per_side[side] = grads(gated, x)
    for side in ("auto", "output"):
        assert per_side[side].keys() == per_side["weight"].keys()
        for name, grad in per_side[side].items():
            torch.testing.assert_close(grad, per_side["weight"][name], rtol=1e-4, atol=1e-6, msg=name)


def test_the_output_side_really_scales_the_output_and_auto_picks_the_smaller_tensor():
    """The autograd graph shows where the gate acted: the layer's last op is the matmul (the gate
    was multiplied into the weight) or the multiplication by the gate (output side). Auto takes the
    output for a small batch and the weight once the output outgrows weight and bias (32x64 + 32
    entries: 65 rows of 32)."""
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))
    gated = dg.gate_model(copy.deepcopy(model), {"D": 3, "groups": [{"kind": "neurons"}]}, torch.randn(1, 64))
    for side, batch, last_op in (("weight", 2, "AddmmBackward0"), ("output", 512, "MulBackward0"),
                                 ("auto", 2, "MulBackward0"), ("auto", 65, "MulBackward0"),
                                 ("auto", 66, "AddmmBackward0"), ("auto", 512, "AddmmBackward0")):
        set_gate_side(gated, side)
        out = gated[0](torch.randn(batch, 64))
        assert out.grad_fn.name() == last_op, (side, batch)
        if last_op == "MulBackward0":
            assert out.grad_fn.next_functions[0][0].name() == "AddmmBackward0"
    with torch.no_grad():  # the same choice without autograd
        set_gate_side(gated, "output")
        torch.testing.assert_close(gated(torch.ones(3, 64)), model(torch.ones(3, 64)))


def test_layers_the_output_side_cannot_make_exact_keep_the_weight_side():
    """A first layer whose input features and neurons are both gated (two gates on one weight), and a
    BatchNorm's affine, stay on the weight side, and the model still equals its original."""
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 2))
    x = torch.randn(16, 6)
    gated = dg.gate_model(copy.deepcopy(model), {"D": 2, "groups": [{"kind": "features"}, {"kind": "neurons"}]}, x)
    assert gate_sides(gated) == {"0": "weight only", "3": "weight only"}
    set_gate_side(gated, "output")
    model.train(), gated.train()
    torch.testing.assert_close(gated(x), model(x), rtol=1e-5, atol=1e-6)


def test_training_is_the_same_on_every_side():
    """A few SGD steps with dg.param_groups (the same parameters on every side) give the same model."""
    model, _, x = gated_pair()
    results = {}
    for side in ("weight", "auto", "output"):
        torch.manual_seed(0)
        gated = dg.gate_model(copy.deepcopy(model), RECIPE, x[:1])
        set_gate_side(gated, side)
        opt = torch.optim.SGD(dg.param_groups(gated, lam=1e-2), lr=0.05, momentum=0.9)
        for _ in range(3):
            opt.zero_grad()
            (gated(x).square().mean() + 0 * dg.penalty(gated)).backward()
            opt.step()
        results[side] = gated.state_dict()
    for side in ("auto", "output"):
        for key, value in results["weight"].items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(results[side][key], value, rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.parametrize("side", SIDES)
def test_torch_compile_fullgraph_forward_and_backward(side):
    model, gated, x = gated_pair()
    set_gate_side(gated, side)
    expected = grads(gated, x)
    torch._dynamo.reset()
    compiled = torch.compile(gated, fullgraph=True, backend="aot_eager")  # a graph break raises
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)
    got = grads(gated, x, compiled)
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow  # inductor's compile is most of a minute; the fullgraph tests above cover the graph
def test_torch_compile_inductor_on_the_auto_side(one_thread):
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
    x = torch.randn(8, 32)
    gated = dg.gate_model(copy.deepcopy(model), {"D": 3, "groups": [{"kind": "neurons"}]}, x[:1])
    torch._dynamo.reset()
    compiled = torch.compile(gated, fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)
    compiled(x).sum().backward()
    assert gated.dgates["0"].factors.grad is not None


@pytest.mark.parametrize("side", SIDES)
def test_torch_export_with_a_dynamic_batch(side):
    model, gated, x = gated_pair()
    model.eval(), gated.eval()
    set_gate_side(gated, side)
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(gated, (x,), dynamic_shapes=({0: batch},))
    exported = program.module()
    for inputs in (x, x[:1], torch.randn(9, 3, 16, 16)):
        torch.testing.assert_close(exported(inputs), model(inputs), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("side", SIDES)
def test_shrink_folds_the_gates_and_gives_back_plain_layers(side):
    model, gated, x = gated_pair()
    set_gate_side(gated, side)
    dg.kill_random_groups(gated, 0.4, seed=1)
    with torch.no_grad():
        expected = gated.eval()(x)
    slim = dg.shrink(gated, example_inputs=x)
    torch.testing.assert_close(slim(x), expected, rtol=1e-5, atol=1e-6)
    for name in ("conv", "dw", "conv1d", "fc1", "fc2"):
        layer = slim.get_submodule(name)
        assert type(layer) in (nn.Conv2d, nn.Conv1d, nn.Linear) and not parametrize.is_parametrized(layer)
    assert dg.model_params(slim) < dg.model_params(model)


def test_copies_keep_their_own_side_and_cached_weights_give_the_same_output():
    model, gated, x = gated_pair()
    twin = copy.deepcopy(gated)
    set_gate_side(twin, "output")
    assert set(gate_sides(gated).values()) == {"auto", "weight only"}
    with parametrize.cached():  # the latency figures' path: the gated weights, computed once
        torch.testing.assert_close(twin(x), model(x), rtol=1e-5, atol=1e-6)
    slim = dg.shrink(copy.deepcopy(twin), 0.0)  # shrinking a copy leaves the original gated and working
    torch.testing.assert_close(twin(x), slim(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gated(x), model(x), rtol=1e-5, atol=1e-6)


def test_autocast_keeps_the_output_dtype():
    model, gated, x = gated_pair()
    set_gate_side(gated, "output")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, got = model(x), gated(x)
    assert got.dtype == expected.dtype
    torch.testing.assert_close(got.float(), expected.float(), rtol=0.05, atol=0.05)


def test_a_wrong_side_is_refused():
    _, gated, _ = gated_pair()
    with pytest.raises(ValueError, match="side must be one of auto, weight, output"):
        set_gate_side(gated, "input")


def _mobilenet():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    return dg.expose_weights(torchvision.models.mobilenet_v2(num_classes=10)), (torch.randn(2, 3, 32, 32),), {}, "default"


def _llama():
    from test_heads import RECIPE as HEADS, _hf
    model, args, kwargs = _hf("llama")
    return dg.expose_weights(model), args, kwargs, HEADS


@pytest.mark.parametrize("make", [_mobilenet, _llama], ids=["torchvision mobilenet_v2", "transformers llama"])
def test_every_side_on_real_architectures(make):
    """The zoo runs the default side; here every side of a real CNN and a real transformer (heads and
    neurons gated) computes the original function and the same factor gradients."""
    model, args, kwargs, recipe = make()
    model.eval()
    gated = dg.gate_model(copy.deepcopy(model), recipe, args, kwargs)
    assert "auto" in gate_sides(gated).values()  # some gate may act on an output here
    with torch.no_grad():
        reference = model(*args, **kwargs)
    reference = reference if isinstance(reference, torch.Tensor) else reference.logits
    factor_grads = {}
    for side in SIDES:
        set_gate_side(gated, side)
        gated.zero_grad(set_to_none=True)
        out = gated(*args, **kwargs)
        out = out if isinstance(out, torch.Tensor) else out.logits
        assert dg.output_diff(reference, out.detach()) <= 1e-5 * reference.abs().max(), side
        out.square().sum().backward()
        factor_grads[side] = torch.cat([g.factors.grad.reshape(-1) for g in dg.gates(gated)])
    for side in ("weight", "output"):
        torch.testing.assert_close(factor_grads[side], factor_grads["auto"], rtol=1e-3, atol=1e-5)
