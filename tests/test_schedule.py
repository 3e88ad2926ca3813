"""Lambda within one run: warm-up ramp, constant, target sparsity by a step; what it writes into
the optimizer is what check_optimizer checks; resuming continues the schedule."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import dgating_surgery as dg
from dist_worker import WD, data, make_gated

pytestmark = pytest.mark.usefixtures("one_thread")


def quiet(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn()


def test_warmup_ramp_writes_the_decay_and_check_optimizer_follows_it():
    model = make_gated()
    opt = torch.optim.SGD(dg.param_groups(model, lam=0.03, weight_decay=WD), lr=0.1)
    sched = dg.LambdaScheduler(opt, warmup_steps=4, start_step=2)  # lam from the param groups
    seen = [sched.lam]
    for _ in range(8):
        seen.append(sched.step())
        group = opt.param_groups[0]
        assert group["weight_decay"] == pytest.approx(2 * sched.lam / 3, abs=1e-15)
        assert group["dgating_lam"] == sched.lam
        assert opt.param_groups[1]["weight_decay"] == WD  # the rest is left alone
        assert quiet(lambda: dg.check_optimizer(model, opt)) == []  # ramp values, lam 0 included, are not errors
        assert quiet(lambda: dg.check_optimizer(model, opt, lam=1.0)) == []  # the schedule's value wins
    assert seen == pytest.approx([0, 0, 0, 0.0075, 0.015, 0.0225, 0.03, 0.03, 0.03])
    assert "warmup_steps=4" in repr(sched)


def test_constant_and_penalty_mode():
    model = make_gated()
    sched = dg.LambdaScheduler(None, model=model)  # nothing to write: the loss uses dg.penalty(model, sched.lam)
    assert sched.lam == dg.load_recipe({"D": 3, "groups": [{"kind": "neurons"}]}).lam
    assert sched.step() == sched.lam
    assert torch.equal(dg.penalty(model, sched.lam), dg.penalty(model))
    with pytest.raises(dg.LambdaError, match="no D-Gating param group: build it from dg.param_groups"):
        dg.LambdaScheduler(torch.optim.SGD(model.parameters(), lr=0.1), lam=0.01)


@pytest.mark.parametrize("kwargs, message", [
    ({"lam": -1}, "lam=-1"),
    ({"lam": 0.01, "warmup_steps": -3}, "warmup_steps and start_step must be >= 0"),
    ({"lam": 0.01, "target": 1.5, "by_step": 10}, r"target must be a fraction in \(0, 1\)"),
    ({"lam": 0.01, "target": 0.5}, "a target needs by_step"),
    ({"lam": 0.0, "target": 0.5, "by_step": 10}, "starting lam > 0"),
    ({"lam": 0.01, "target": 0.5, "by_step": 10, "factor": 1.0}, "factor > 1"),
])
def test_invalid_schedules_are_refused(kwargs, message):
    with pytest.raises(dg.LambdaError, match=message):
        dg.LambdaScheduler(None, model=make_gated(), **kwargs)
    with pytest.raises(dg.LambdaError, match="pass model=the gated model"):
        dg.LambdaScheduler(None, lam=0.01, target=0.5, by_step=10)


def run(model, opt, sched, steps):
    X, y = data()
    for _ in range(steps):
        loss = F.cross_entropy(model(X), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()


def test_resume_continues_the_schedule():
    model = make_gated()
    opt = torch.optim.SGD(dg.param_groups(model, 0.003, weight_decay=WD), lr=0.2, momentum=0.9)
    kwargs = dict(model=model, target=0.5, by_step=150, every=10)
    sched = dg.LambdaScheduler(opt, **kwargs)
    run(model, opt, sched, 60)
    saved_opt, saved_sched = opt.state_dict(), sched.state_dict()
    assert sched.lam > 0.003
    # a new run: from the scheduler's state, or from the optimizer's alone (what a framework checkpoint holds)
    for restore in ("state_dict", "optimizer"):
        opt2 = torch.optim.SGD(dg.param_groups(model, 0.003, weight_decay=WD), lr=0.2, momentum=0.9)
        opt2.load_state_dict(saved_opt)
        sched2 = dg.LambdaScheduler(opt2, **kwargs)
        if restore == "state_dict":
            sched2.load_state_dict(saved_sched)
        else:
            sched2.resume(60)
        assert sched2.base == {"neurons": 0.003}  # what param_groups was given, not the value the schedule reached
        assert sched2.last_step == 60 and sched2.lam == pytest.approx(sched.lam)
        assert opt2.param_groups[0]["weight_decay"] == pytest.approx(2 * sched.lam / 3)
