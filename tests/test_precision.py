"""Precision: gating a bfloat16/float16 model keeps its function bit for bit; pure low-precision
weights, where weight decay rounds away, are warned about at the user's line; autocast with
float32 weights trains as it should; shrink keeps channels_last."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import dgating_surgery as dg
from dgating_surgery.training.regularizer import gated_parameters
from models import MLP, Residual

pytestmark = pytest.mark.usefixtures("one_thread")


def record(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [w for w in caught if "gated parameters" in str(w.message)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("make, shape, recipe", [(MLP, (8, 10), {"D": 3, "groups": [{"kind": "neurons"}]}),
                                                 (Residual, (2, 3, 8, 8), {"D": 4, "groups": [{"kind": "channels"}]})])
def test_gating_a_low_precision_model_keeps_its_function_exactly(dtype, make, shape, recipe):
    torch.manual_seed(0)
    model = make().to(dtype).eval()
    x = torch.randn(shape).to(dtype)
    with torch.no_grad():
        expected = model(x)
        gated = dg.gate_model(model, recipe, x).eval()
        assert torch.equal(gated(x), expected)  # the balanced rescale rounded nothing
    for dgate in dg.gates(gated):
        exponents = dgate.factors.detach().double().abs().log2()
        assert torch.equal(exponents, exponents.round())  # powers of two: exact in any float format
    assert 0 < dg.imbalance(gated) <= math.log(2) * 1.5 + 1e-6  # balanced within a factor of ~2


def test_float32_gating_is_still_perfectly_balanced():
    torch.manual_seed(0)
    gated = dg.gate_model(MLP(), {"D": 3, "groups": [{"kind": "neurons"}]}, torch.randn(4, 10))
    assert dg.imbalance(gated) < 1e-4


def decay_only_steps(model, lr, lam, steps):
    """``steps`` SGD steps with zero gradients: weight decay alone."""
    opt = torch.optim.SGD(dg.param_groups(model, lam), lr=lr)
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()


def test_pure_bfloat16_weights_warn_and_the_decay_really_rounds_away():
    torch.manual_seed(0)
    x = torch.randn(4, 10)
    model = dg.gate_model(MLP(), {"D": 3, "groups": [{"kind": "neurons"}]}, x)
    low = dg.gate_model(MLP(), {"D": 3, "groups": [{"kind": "neurons"}]}, x).to(torch.bfloat16)
    low.load_state_dict({k: (v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v)
                         for k, v in model.state_dict().items()})
    lr, lam = 0.05, 1e-3  # lr * 2*lam/D = 3.3e-5 per step: a usual decay
    opt = torch.optim.SGD(dg.param_groups(low, lam), lr=lr)
    caught = record(lambda: dg.check_optimizer(low, opt))
    assert len(caught) == 1 and caught[0].filename == __file__
    assert str(caught[0].message) == (
        "6 gated parameters are stored in bfloat16 (e.g. fc1.parametrizations.weight.original): an SGD weight-decay "
        "step changes a weight by lr*wd = 3.3e-05 of itself, below bfloat16's resolution (0.002): p - lr*wd*p rounds "
        "back to p, so no group ever dies. Keep the weights in float32 and compute in low precision with "
        "torch.autocast(device_type, dtype=torch.bfloat16) (or FSDP2's MixedPrecisionPolicy(param_dtype="
        "torch.bfloat16)), so that the optimizer updates float32 weights.")
    before = [p.clone() for p in sum(gated_parameters(low), [])]
    decay_only_steps(low, lr, lam, 200)
    assert all(torch.equal(a, b) for a, b in zip(before, sum(gated_parameters(low), [])))  # what the warning says
    before = [p.clone() for p in sum(gated_parameters(model), [])]
    decay_only_steps(model, lr, lam, 200)  # float32: every gated weight decays
    after = sum(gated_parameters(model), [])
    assert all(bool((b.abs() < a.abs())[a != 0].all()) and (a != 0).any() for a, b in zip(before, after))
    # dg.track warns too, at the line that calls step(), with or without an optimizer
    for monitor in (dg.track(low, optimizer=opt), dg.track(low)):
        caught = record(lambda: monitor.step(0))
        assert len(caught) == 1 and caught[0].filename == __file__ and "stored in bfloat16" in str(caught[0].message)


def test_autocast_with_float32_weights_trains_without_warning():
    from dist_worker import LAM, LR, WD, data, make_gated
    X, y = data()
    model = make_gated()
    opt = torch.optim.SGD(dg.param_groups(model, LAM, weight_decay=WD), lr=LR, momentum=0.9)
    monitor = dg.track(model, optimizer=opt, threshold=1e-4)
    assert record(lambda: monitor.step(0)) == []
    for _ in range(100):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(X)
        assert logits.dtype == torch.bfloat16 and dg.gates(model)[0].factors.dtype == torch.float32
        loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert 10 < monitor.step(1)["dead"]["neurons"] < 35


def test_shrink_keeps_channels_last():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).to(memory_format=torch.channels_last)
    x = torch.randn(1, 3, 32, 32)
    gated = dg.gate_model(model, "resnet", x)
    dg.kill_random_groups(gated, 0.3)
    slim = dg.shrink(gated, example_inputs=x)
    convs = [m.weight for m in slim.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 20
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert sum(not w.is_contiguous() for w in convs) >= 16  # the layout is really channels_last, not ambiguous
    assert slim.layer1[0].conv1.out_channels < 64
