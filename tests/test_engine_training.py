"""A gated model that has trained (BatchNorm statistics moving, optimizer state present) still
shrinks exactly once some of its gates are zero."""
import torch
import torchvision

import dgating_surgery as dg

import models as M


def _train(model, x, y, steps=3):
    params = dg.param_groups(model, lam=1e-4) if dg.gates(model) else model.parameters()
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return opt


def test_trained_resnet_shrinks_exactly():
    x, y = torch.randn(8, 3, 64, 64), torch.randint(0, 1000, (8,))
    model = dg.gate_model(torchvision.models.resnet18(), "resnet", x[:1])
    stats_before = model.bn1.running_mean.clone()
    factors_before = [g.factors.detach().clone() for g in dg.gates(model)]
    opt = _train(model, x, y)
    assert not torch.equal(stats_before, model.bn1.running_mean)
    assert any(not torch.equal(a, g.factors) for a, g in zip(factors_before, dg.gates(model)))
    assert all("momentum_buffer" in opt.state[g.factors] for g in dg.gates(model))
    dg.kill_random_groups(model, 0.4, seed=3)
    model.eval()
    with torch.no_grad():
        gated_out = model(x)
    expected = dg.model_params(model) - dg.sparsity(model).params_removable
    slim = dg.shrink(model, example_inputs=x)
    assert dg.model_params(slim) == expected
    assert dg.max_rel_diff(gated_out, slim(x)) < 1e-4
    _train(slim, x, y, steps=1)  # the slim model still trains


def test_gated_state_dict_round_trip():
    """A gated model's state (weights, gates, what to cut) saves and loads like any module's."""
    x = torch.randn(2, 3, 16, 16)
    a = dg.gate_model(M.Residual(), "default", x)
    dg.kill_random_groups(a, 0.5, seed=1)
    b = dg.gate_model(M.Residual(), "default", x)
    b.load_state_dict(a.state_dict())
    a.eval(), b.eval()
    assert torch.equal(a(x), b(x))
    assert dg.sparsity(a).params_removable == dg.sparsity(b).params_removable
    assert torch.equal(dg.shrink(a)(x), dg.shrink(b)(x))
