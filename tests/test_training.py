"""Training helpers: the penalty and param_groups are the paper's objective, the monitor and the
optimizer check see what users get wrong, and a short run on a toy problem kills groups."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import dgating_surgery as dg

pytestmark = pytest.mark.usefixtures("one_thread")
from dgating_surgery.training.regularizer import gated_parameters
from models import MLP

LAM = 0.01


def gated_mlp(D=3, init="balanced", lam=LAM):
    x = torch.randn(4, 10)
    return dg.gate_model(MLP(), {"D": D, "lam": lam, "init": init, "groups": [{"kind": "neurons"}]}, x)


@pytest.mark.parametrize("D", [2, 3, 4])
def test_penalty_is_the_papers_objective(D):
    model = gated_mlp(D)
    thetas = [model.fc1.parametrizations.weight.original, model.fc1.parametrizations.bias.original,
              model.fc2.parametrizations.weight.original, model.fc2.parametrizations.bias.original]
    gammas = [g.factors for g in dg.gates(model)]
    expected = LAM / D * (sum(t.pow(2).sum() for t in thetas) + sum(g.pow(2).sum() for g in gammas))
    assert torch.allclose(dg.penalty(model), expected)
    assert torch.allclose(dg.penalty(model, lam=2 * LAM), 2 * expected)
    # thetas, gammas and nothing else: fc3 (the output layer) is not gated
    ids = {id(p) for p in sum(gated_parameters(model), [])}
    assert ids == {id(p) for p in thetas + gammas}


def test_param_groups_decay_is_the_penalty_gradient():
    """One SGD step with dg.param_groups and no loss moves every parameter exactly as one step on
    dg.penalty with no weight decay: the decay 2*lam/D is the penalty's gradient."""
    D = 3
    a, b = gated_mlp(D), gated_mlp(D)
    b.load_state_dict(a.state_dict())
    groups = dg.param_groups(a, weight_decay=0.0)
    assert groups[0]["weight_decay"] == pytest.approx(2 * LAM / D)
    assert groups[1]["weight_decay"] == 0.0
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in sum(gated_parameters(a), [])}
    opt_a = torch.optim.SGD(groups, lr=0.5)
    for p in a.parameters():
        p.grad = torch.zeros_like(p)
    opt_a.step()
    opt_b = torch.optim.SGD(b.parameters(), lr=0.5)
    dg.penalty(b).backward()
    opt_b.step()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-7), name
    assert not torch.equal(a.fc1.parametrizations.weight.original, gated_mlp(D).fc1.parametrizations.weight.original)


def test_group_norms_match_the_cut_plan():
    model = gated_mlp()
    plan = dg.plan_cut(model)
    for key, norm in dg.group_norms(model).items():
        assert torch.allclose(norm.double(), plan.norms[key], rtol=1e-5)
    # balanced init: every factor equals ||theta_j|| = ||w_j||^(1/D)
    assert dg.imbalance(model) < 1e-4


def toy_data(n=256, seed=0):
    """5 classes that depend on the first 3 of 10 features: most neurons are superfluous."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 10, generator=gen)
    y = (X[:, :3] @ torch.randn(3, 5, generator=gen)).argmax(1)
    return X, y


def train(model, lam, steps=150, lr=0.1, monitor_every=None, monitor=None):
    X, y = toy_data()
    opt = torch.optim.SGD(dg.param_groups(model, lam, weight_decay=1e-3), lr=lr, momentum=0.9)
    for step in range(steps):
        loss = F.cross_entropy(model(X), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if monitor is not None and (step + 1) % monitor_every == 0:
            monitor.step(step)
    return opt


def test_balance_improves_under_weight_decay():
    torch.manual_seed(0)
    model = gated_mlp(D=3, init="ones")  # gates 1, ||theta_j|| ~ 0.5: unbalanced
    before = dg.imbalance(model)
    train(model, lam=0.02, steps=100)
    after = dg.imbalance(model)
    assert before > 0.3
    assert after < 0.5 * before


def test_short_training_kills_groups_and_shrinks():
    torch.manual_seed(0)
    model = gated_mlp(D=3)
    monitor = dg.track(model, threshold=1e-4)
    train(model, lam=0.02, steps=300, monitor=monitor, monitor_every=50)
    last = monitor.history[-1]
    assert len(monitor.history) == 6
    assert last["groups"] == {"neurons": 35}
    assert 0 < last["dead"]["neurons"] < 35
    assert monitor.history[0]["dead"]["neurons"] <= last["dead"]["neurons"]
    assert 0 < last["params_removable_fraction"] < 1
    X, y = toy_data()
    acc_gated = (model(X).argmax(1) == y).float().mean()
    before = dg.report.model_params(model)
    slim = dg.shrink(model, threshold=1e-4, example_inputs=X)
    assert dg.report.model_params(slim) < before
    assert slim.fc1.out_features + slim.fc2.out_features == 35 - last["dead"]["neurons"]
    assert (slim(X).argmax(1) == y).float().mean() == acc_gated
    assert acc_gated > 0.8


def messages(model, optimizer, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        returned = dg.check_optimizer(model, optimizer, **kwargs)
    assert [str(w.message) for w in caught] == returned
    return returned


def test_check_optimizer_accepts_the_right_setups():
    model = gated_mlp()
    assert messages(model, torch.optim.SGD(dg.param_groups(model), lr=0.1)) == []
    assert messages(model, torch.optim.Adam(dg.param_groups(model, lam=0.5), lr=0.1), lam=0.5) == []
    assert messages(model, torch.optim.SGD(model.parameters(), lr=0.1), uses_penalty=True) == []


def test_check_optimizer_warns_where_the_equivalence_breaks():
    model = gated_mlp()
    found = messages(model, torch.optim.AdamW(dg.param_groups(model), lr=0.1))
    assert len(found) == 1 and "decoupled weight decay" in found[0]
    found = messages(model, torch.optim.SGD(model.fc3.parameters(), lr=0.1))
    assert "not in the optimizer" in found[0]
    found = messages(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert len(found) == 1 and "nothing regularizes the gates" in found[0]
    found = messages(model, torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=1e-4))
    assert f"2*lam/D={2 * LAM / 3:g}" in found[0]
    found = messages(model, torch.optim.SGD(dg.param_groups(model), lr=0.1), uses_penalty=True)
    assert "set weight_decay=0" in found[0]


def test_monitor_checks_the_optimizer_once_on_its_first_step():
    model = gated_mlp()
    monitor = dg.track(model, optimizer=torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.01))
    with pytest.warns(UserWarning, match="decoupled"):
        entry = monitor.step(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        monitor.step(1)
    assert entry["dead"] == {"neurons": 0} and math.isclose(entry["dead_fraction"], 0.0)
    assert "neurons 0/35 dead" in monitor.format(entry)


def test_helpers_refuse_an_ungated_model():
    with pytest.raises(dg.NotGatedError, match="not gated"):
        dg.penalty(MLP(), 0.1)
    with pytest.raises(dg.NotGatedError, match="not gated"):
        dg.track(MLP())


def test_readme_training_snippet_gives_no_warning():
    """The README's 'Training with D-Gating' snippet, walked: lam=1e-2 given to param_groups (the
    recipe says 1e-3) is what track checks, so nothing is reported."""
    x = torch.randn(4, 10)
    gated = dg.gate_model(MLP(), "mlp", example_inputs=x)
    assert dg.load_recipe("mlp").lam != 1e-2
    opt = torch.optim.SGD(dg.param_groups(gated, lam=1e-2, weight_decay=5e-4), lr=0.05, momentum=0.9)
    assert opt.param_groups[0]["dgating_lam"] == 1e-2 and opt.param_groups[0]["dgating_D"] == 3
    monitor = dg.track(gated, optimizer=opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for epoch in range(2):
            monitor.format(monitor.step(epoch))
    # an explicit lam that differs from what the optimizer does is still reported
    assert "lam=0.001, D=3 needs 2*lam/D=0.000666667" in messages(gated, opt, lam=1e-3)[0]


def test_warnings_point_at_the_users_line():
    model = gated_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.01)
    with warnings.catch_warnings(record=True) as direct:
        warnings.simplefilter("always")
        dg.check_optimizer(model, opt)
    monitor = dg.track(model, optimizer=opt)
    with warnings.catch_warnings(record=True) as tracked:
        warnings.simplefilter("always")
        monitor.step(0)
    for caught in (direct, tracked):
        assert len(caught) == 1 and "decoupled" in str(caught[0].message)
        assert caught[0].filename == __file__


@pytest.mark.parametrize("lam", [-1, -1e-9, float("nan"), float("inf"), "much"])
def test_an_invalid_lambda_is_refused(lam):
    model = gated_mlp()
    for call in (lambda: dg.param_groups(model, lam=lam), lambda: dg.penalty(model, lam),
                 lambda: dg.check_optimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), lam=lam),
                 lambda: dg.track(model, lam=lam)):
        with pytest.raises(dg.LambdaError, match=r"lam=|lam must be a number") as info:
            call()
        assert isinstance(info.value, ValueError)
    assert dg.param_groups(model, lam=0)[0]["weight_decay"] == 0.0
