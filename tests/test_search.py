"""Lambda search and the removed-fraction metrics it searches on."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dgating_surgery as dg

pytestmark = pytest.mark.usefixtures("one_thread")
from models import MLP


def gated_mlp(seed=0):
    torch.manual_seed(seed)
    return dg.gate_model(MLP(), {"D": 3, "threshold": 1e-4, "groups": [{"kind": "neurons"}]}, torch.randn(2, 10))


def test_macs_dense_and_after_a_cut():
    model = gated_mlp()
    x = torch.randn(3, 10)
    dense = 3 * (10 * 20 + 20 * 15 + 15 * 5)
    assert dg.macs(model, x) == dg.macs_after_cut(model, x) == dense  # the gate scaling is not counted
    with torch.no_grad():
        dg.gates(model)[0].factors[0, :5] = 0  # 5 of fc1's 20 neurons
    kept = 3 * (10 * 15 + 15 * 15 + 15 * 5)
    assert dg.macs_after_cut(model, x) == kept
    assert dg.macs(model, x) == dense  # the gated model itself is left uncut
    assert dg.macs(dg.shrink(model, example_inputs=x), x) == kept


def test_macs_conv():
    conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, groups=4))
    assert dg.macs(conv, torch.randn(1, 3, 6, 6)) == 36 * 8 * 3 * 9 + 16 * 4 * 2 * 9


def test_removed_fraction_metrics():
    model = gated_mlp()
    with torch.no_grad():
        dg.gates(model)[1].factors[0, :3] = 0  # 3 of fc2's 15 neurons
    assert dg.removed_fraction(model, "groups") == pytest.approx(3 / 35)
    report = dg.sparsity(model)
    assert dg.removed_fraction(model, "params") == pytest.approx(report.params_removable / report.params_total)
    assert dg.removed_fraction(model, "macs", example_inputs=torch.randn(1, 10)) == pytest.approx(
        3 * (20 + 5) / (10 * 20 + 20 * 15 + 15 * 5))  # fc2's rows and fc3's columns
    with pytest.raises(ValueError, match="example_inputs"):
        dg.removed_fraction(model, "macs")
    with pytest.raises(ValueError, match="metric"):
        dg.removed_fraction(model, "flops")


def test_search_logic_on_a_known_response():
    """A stand-in 'training' whose removed fraction is a known monotone function of lambda: the
    search must find lambda to within tol in a few trials."""
    def fake_train(model, lam):
        f = min(max((math.log10(lam) + 5) / 5, 0.0), 0.95)  # 0 at 1e-5, rising linearly in log(lam)
        with torch.no_grad():
            for g in dg.gates(model):
                g.factors[0, :round(f * g.num_groups)] = 0

    result = dg.search_lambda(gated_mlp, fake_train, target=0.6, tol=0.02, max_trials=8)
    assert result.reached and abs(result.removed - 0.6) <= 0.02
    assert len(result.trials) <= 6
    assert math.log10(result.lam) == pytest.approx(-2.0, abs=0.15)
    assert dg.removed_fraction(result.model) == result.removed


def toy_train(model, lam, steps=200):
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(256, 10, generator=gen)
    y = (X[:, :3] @ torch.randn(3, 5, generator=gen)).argmax(1)
    opt = torch.optim.SGD(dg.param_groups(model, lam, weight_decay=1e-3), lr=0.1, momentum=0.9)
    for _ in range(steps):
        loss = F.cross_entropy(model(X), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_search_reaches_a_target_by_training():
    result = dg.search_lambda(gated_mlp, toy_train, target=0.5, metric="params", lam_range=(1e-3, 0.3), tol=0.1,
                              max_trials=8)
    assert result.reached, result.trials
    assert abs(dg.removed_fraction(result.model, "params") - 0.5) <= 0.1


def test_search_rejects_bad_arguments():
    with pytest.raises(ValueError, match="target"):
        dg.search_lambda(gated_mlp, toy_train, target=1.5)
    with pytest.raises(ValueError, match="lam_range"):
        dg.search_lambda(gated_mlp, toy_train, target=0.5, lam_range=(1.0, 0.1))
