"""A size target in one run (issue 17): LambdaScheduler(target=..., metric=...) lands within 3
points of the target from starting lambdas 1e-4..1e-1, with SGD and Adam, on an MLP, a
torchvision CNN and a Hugging Face Llama; the chosen groups are held at exactly zero through
recovery and the final cut removes exactly them."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import dgating_surgery as dg
from dgating_surgery.demo import DigitsMLP
from dgating_surgery.engine.report import group_params

pytestmark = pytest.mark.usefixtures("one_thread")

LAMS = (1e-4, 1e-2, 1e-1)
TOL = 0.03


def digits(n=512, seed=0):
    """sklearn's digits, scaled to [0, 1] (n images)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    X = torch.tensor(data.data[:n] / 16.0, dtype=torch.float32)
    return X, torch.tensor(data.target[:n])


def optimizer(model, kind, lam):
    groups = dg.param_groups(model, lam, weight_decay=5e-4)
    return torch.optim.Adam(groups, lr=3e-3) if kind == "adam" else torch.optim.SGD(groups, lr=0.05, momentum=0.9)


def train(model, opt, sched, batches, steps, loss_of):
    """``steps`` optimizer steps over ``batches`` (cycled), the scheduler stepped after each."""
    model.train()
    for step in range(steps):
        loss = loss_of(model, batches[step % len(batches)])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def classify(model, batch):
    X, y = batch
    return F.cross_entropy(model(X), y)


def assert_cut_is_the_held_groups(model, sched, inputs):
    """Held groups are exactly zero; the cut removes exactly them and keeps the function."""
    held = sched.held_masks
    assert held and sched.recovering
    for dgate_key, dgate in model.dgates.items():
        mask = held.get(dgate_key, torch.zeros(dgate.num_groups, dtype=torch.bool))
        assert torch.count_nonzero(dgate.factors.detach()[:, mask]) == 0
        assert torch.equal(dg.plan_cut(model).dead[dgate_key], mask), dgate_key
    report = dg.sparsity(model)
    before = dg.model_params(model)
    with torch.no_grad():
        model.eval()
        reference = model(*inputs)
    slim = dg.shrink(model, example_inputs=inputs)
    with torch.no_grad():
        after = slim(*inputs)
    reference, after = (getattr(o, "logits", o) for o in (reference, after))
    assert (after - reference).abs().max() <= 1e-4 * reference.abs().max()
    assert before - dg.model_params(slim) == report.params_removable


@pytest.mark.parametrize("opt_kind", ["sgd", "adam"])
@pytest.mark.parametrize("lam", LAMS)
def test_mlp_lands_on_a_parameter_target(opt_kind, lam):
    X, y = digits()
    batches = [(X[i:i + 64], y[i:i + 64]) for i in range(0, len(X), 64)]
    torch.manual_seed(0)
    model = dg.gate_model(DigitsMLP(64, (64, 32), 10), {"D": 3, "groups": [{"kind": "neurons"}]}, X[:4])
    opt = optimizer(model, opt_kind, lam)
    sched = dg.LambdaScheduler(opt, model=model, target=0.9, metric="params", start_step=100, by_step=250, every=10)
    train(model, opt, sched, batches, 400, classify)
    removed = dg.removed_fraction(model, "params")
    assert abs(removed - 0.9) <= TOL, (removed, sched.measured[-3:])
    assert sched.lam == 0.0 and all(g["weight_decay"] == 0 for g in opt.param_groups[:1])
    accuracy = float((model(X).argmax(1) == y).float().mean())
    assert accuracy > 0.4  # a trained slim model, not a collapsed one (chance: 0.1)
    assert_cut_is_the_held_groups(model, sched, (X[:32],))


def test_the_controller_raises_lambda_at_most_three_times_its_start():
    """Issue 17 (notes/mlp10.md): uncapped, the controller took lambda on LeNet-300-100 to 30-90x its
    start and held at by_step all the same, and the survivors paid for it. By default lambda stays
    within MAX_SCALE = 3 times its start (the controller still raises it there); the size lands
    all the same, by the hold; an explicit ``max_lam`` still sets the ceiling."""
    X, y = digits()
    batches = [(X[i:i + 64], y[i:i + 64]) for i in range(0, len(X), 64)]
    torch.manual_seed(0)
    model = dg.gate_model(DigitsMLP(64, (64, 32), 10), {"D": 3, "groups": [{"kind": "neurons"}]}, X[:4])
    opt = optimizer(model, "sgd", 1e-3)
    sched = dg.LambdaScheduler(opt, model=model, target=0.9, metric="params", start_step=100, by_step=250, every=10)
    assert sched.max_lam == pytest.approx(3e-3)
    assert dg.LambdaScheduler(None, 1e-3, model=model, target=0.5, by_step=10, max_lam=1e-1).max_lam == 1e-1
    lams = []
    model.train()
    for step in range(400):
        loss = classify(model, batches[step % len(batches)])
        opt.zero_grad()
        loss.backward()
        opt.step()
        lams.append(sched.step())
    assert 1e-3 < max(lams) <= 3e-3 * (1 + 1e-9), max(lams)
    assert abs(dg.removed_fraction(model, "params") - 0.9) <= TOL
    assert_cut_is_the_held_groups(model, sched, (X[:32],))


def small_mobilenet():
    """torchvision's MobileNetV2 at test size: three short stages, a 64-channel head, 4 classes."""
    torchvision = pytest.importorskip("torchvision")
    net = torchvision.models.MobileNetV2(num_classes=4, width_mult=0.5,
                                         inverted_residual_setting=[[1, 8, 1, 1], [4, 12, 2, 2], [4, 16, 2, 2]])
    net.features[-1] = torchvision.ops.Conv2dNormActivation(8, 64, kernel_size=1, activation_layer=torch.nn.ReLU6)
    net.classifier[-1] = torch.nn.Linear(64, 4)
    return net


def images(n=256):
    """4 classes: which half of the image is brighter, and the sign of the red channel's mean."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(n, 3, 16, 16, generator=gen)
    y = (X[:, :, :8].mean((1, 2, 3)) > X[:, :, 8:].mean((1, 2, 3))).long() + 2 * (X[:, 0].mean((1, 2)) > 0).long()
    return [(X[i:i + 32], y[i:i + 32]) for i in range(0, n, 32)]


@pytest.mark.parametrize("opt_kind, lam", [pytest.param("sgd", 1e-4, marks=pytest.mark.slow),
                                           pytest.param("adam", 1e-2, marks=pytest.mark.slow), ("sgd", 1e-1)])
def test_torchvision_cnn_lands_on_a_macs_target(opt_kind, lam):
    batches = images()
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the classifier's Dropout
        model = dg.gate_model(small_mobilenet(), {"D": 3, "groups": [{"kind": "channels"}]}, batches[0][0][:2])
    groups = dg.param_groups(model, lam, weight_decay=5e-4)
    opt = torch.optim.Adam(groups, lr=3e-3) if opt_kind == "adam" else torch.optim.SGD(groups, lr=0.02, momentum=0.9)
    sched = dg.LambdaScheduler(opt, model=model, target=0.5, metric="macs", start_step=40, by_step=120, every=10)
    train(model, opt, sched, batches, 160, classify)
    model.eval()
    removed = dg.removed_fraction(model, "macs", example_inputs=batches[0][0][:2])  # measured on a cut copy
    assert abs(removed - 0.5) <= TOL, (removed, sched.measured[-3:])
    assert_cut_is_the_held_groups(model, sched, (batches[0][0][:8],))


def tiny_llama():
    T = pytest.importorskip("transformers")
    config = T.LlamaConfig(vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=4, intermediate_size=64, use_cache=False)
    return T.LlamaForCausalLM(config)


def token_batches(n=8):
    """Sequences that count up modulo the vocabulary from a random start: learnable in a few steps."""
    gen = torch.Generator().manual_seed(0)
    starts = torch.randint(0, 32, (n, 8, 1), generator=gen)
    return list((starts + torch.arange(16)) % 32)


def next_token(model, ids):
    return model(input_ids=ids, labels=ids).loss


@pytest.mark.parametrize("opt_kind, lam", [("adam", 1e-4), ("sgd", 1e-2), ("adam", 1e-1)])
def test_llama_lands_on_per_kind_targets(opt_kind, lam):
    batches = token_batches()
    torch.manual_seed(0)
    model = dg.gate_model(tiny_llama(), {"D": 3, "groups": [{"kind": "heads"}, {"kind": "neurons"}]},
                          example_kwargs={"input_ids": batches[0][:1]})
    opt = optimizer(model, opt_kind, lam)
    assert [g.get("dgating_kind") for g in opt.param_groups] == ["heads", "neurons", None]
    targets = {"heads": 0.5, "neurons": 0.7}
    sched = dg.LambdaScheduler(opt, model=model, target=targets, metric="params", start_step=30, by_step=110,
                               every=10)
    train(model, opt, sched, batches, 150, next_token)
    report = dg.sparsity(model)
    for row_kind, target in targets.items():
        rows = [(r, g) for r, g in zip(report.rows, model.dgates.values()) if r.kind == row_kind]
        own = sum(int(group_params(model, g).sum()) for _, g in rows)
        removed = sum(r.params_removable for r, _ in rows) / own
        assert abs(removed - target) <= TOL, (row_kind, removed)
    assert sched.lams == {"heads": 0.0, "neurons": 0.0}
    assert_cut_is_the_held_groups(model, sched, (batches[0][:2],))


def test_adam_collapses_groups_that_hold_turns_into_an_exact_cut():
    """Issue 21, item 4: under Adam collapsed groups bounce around 1e-3 of their layer's norm and
    never cross the absolute threshold; the relative criterion counts them, and once held at zero
    the cut removes exactly them."""
    X, y = digits()
    batches = [(X[i:i + 64], y[i:i + 64]) for i in range(0, len(X), 64)]
    torch.manual_seed(0)
    model = dg.gate_model(DigitsMLP(64, (64, 32), 10), {"D": 3, "groups": [{"kind": "neurons"}]}, X[:4])
    opt = torch.optim.Adam(dg.param_groups(model, 0.05, weight_decay=5e-4), lr=3e-3)
    train(model, opt, dg.LambdaScheduler(opt), batches, 300, classify)
    report = dg.sparsity(model)
    assert report.dead < report.collapsed  # the absolute threshold misses what has collapsed
    collapsed = dg.collapsed_groups(model)
    assert sum(int(m.sum()) for m in collapsed.values()) == report.collapsed > 0
    entry = dg.track(model).step()
    assert entry["collapsed"] == {"neurons": report.collapsed}
    assert f"({report.collapsed} collapsed)" in dg.SparsityMonitor.format(entry)
    assert "dg.hold(model, optimizer=opt)" in str(report)
    held = dg.hold(model, optimizer=opt)
    train(model, opt, dg.LambdaScheduler(opt, 0.0), batches, 20, classify)  # recovery: Adam's moments cannot move them
    for key, mask in collapsed.items():
        assert torch.count_nonzero(model.dgates[key].factors.detach()[:, mask]) == 0
    dead = dg.plan_cut(model).dead
    assert all(torch.equal(dead[k], collapsed[k]) for k in dead) and held.count == report.collapsed
    removable = dg.sparsity(model).params_removable
    expected = sum(int(group_params(model, model.dgates[k])[m].sum()) for k, m in collapsed.items())
    overlap = int(collapsed["fc1"].sum()) * int(collapsed["fc2"].sum())  # fc2.weight entries both groups own
    assert removable == expected - overlap
    before = dg.model_params(model)
    slim = dg.shrink(model, example_inputs=X[:32])
    assert before - dg.model_params(slim) == removable


def test_a_strong_group_does_not_make_the_rest_of_its_layer_the_first_to_go():
    """Issue 17: the target ranks groups by their norm relative to the root mean square norm of
    their layer's surviving groups (``typical_norms``), not to the layer's strongest. Two layers
    with the same spread of norms, one with a group 3x the median (as the digits CNN's last conv
    layer, whose strongest channel the classifier reads most): a half-the-groups target held at
    ``by_step`` takes about half of each layer; relative to the strongest, every other group of
    the first layer would look weaker than all of the second's (31 of its 32 would go)."""
    from dgating_surgery.engine.deadness import typical_norms
    from dgating_surgery.engine.gates import scale_groups_

    X, _ = digits(8)
    torch.manual_seed(0)
    model = dg.gate_model(DigitsMLP(64, (32, 32), 10), {"D": 3, "groups": [{"kind": "neurons"}]}, X[:4])
    spread = torch.linspace(1.0, 2.0, 32, dtype=torch.float64)
    for i, (key, norm) in enumerate(dg.group_norms(model).items()):
        wanted = spread[torch.randperm(32)]
        wanted[wanted.argmax()] = 4.5 if i == 0 else 2.0
        scale_groups_(model, model.dgates[key], wanted / norm.detach().double())
    norms = {key: norm.detach().double() for key, norm in dg.group_norms(model).items()}
    rms = {key: float(norm.pow(2).mean().sqrt()) for key, norm in norms.items()}  # none has collapsed
    assert typical_norms(model) == pytest.approx(rms, rel=1e-6)
    sched = dg.LambdaScheduler(None, 1e-3, model=model, target=0.5, metric="groups", start_step=0, by_step=2)
    sched.step()
    sched.step()
    assert sched.recovering
    ranked = sorted((float(n / rms[key]), key, j) for key, norm in norms.items()
                    for j, n in enumerate(norm) if j != int(norm.argmax()))[:32]
    held = sched.held_masks
    assert {key: set(mask.nonzero().flatten().tolist()) for key, mask in held.items()} == {
        key: {j for _, k, j in ranked if k == key} for key in norms}
    assert 12 <= int(held["fc1"].sum()) <= 20  # about half of each layer
    for key, mask in held.items():
        assert torch.count_nonzero(model.dgates[key].factors.detach()[:, mask]) == 0


def test_per_kind_lambda_reaches_the_optimizer_and_the_penalty():
    """A recipe's per-kind lam: one param group per kind with 2*lam/D decay, the penalty weighs each
    kind's parameters with its own lambda, and a per-kind target drives each group separately."""
    recipe = {"D": 3, "lam": 1e-3, "groups": [{"kind": "heads", "lam": 4e-3}, {"kind": "neurons"}]}
    model = dg.gate_model(tiny_llama(), recipe, example_kwargs={"input_ids": token_batches()[0][:1]})
    groups = dg.param_groups(model, weight_decay=1e-4)
    assert [(g["name"], g["dgating_lam"], g["weight_decay"]) for g in groups[:2]] == [
        ("dgating/heads", 4e-3, pytest.approx(2 * 4e-3 / 3)), ("dgating/neurons", 1e-3, pytest.approx(2 * 1e-3 / 3))]
    assert groups[2]["weight_decay"] == 1e-4
    heads, neurons = ({id(p) for p in g["params"]} for g in groups[:2])
    assert not heads & neurons and len(heads) + len(neurons) == sum(len(g["params"]) for g in groups[:2])
    squares = [sum(float(p.detach().pow(2).sum()) for p in g["params"]) for g in groups[:2]]
    assert float(dg.penalty(model).detach()) == pytest.approx((4e-3 * squares[0] + 1e-3 * squares[1]) / 3, rel=1e-5)
    assert float(dg.penalty(model, {"heads": 0.0}).detach()) == pytest.approx(1e-3 * squares[1] / 3, rel=1e-5)
    opt = torch.optim.SGD(groups, lr=0.01)
    assert dg.check_optimizer(model, opt) == []
    sched = dg.LambdaScheduler(opt, model=model, target={"heads": 0.5}, by_step=10, every=1)
    assert sched.base == {"heads": 4e-3, "neurons": 1e-3}
    sched.scale["heads"] = 2.0
    sched.step()
    assert [g["dgating_lam"] for g in opt.param_groups[:2]] == [pytest.approx(8e-3), 1e-3]  # the target's kind only
    with pytest.raises(dg.RecipeError, match=r"groups\[1\].lam.*heads already has lam 0.004"):
        dg.load_recipe({"D": 3, "groups": [{"kind": "heads", "lam": 4e-3}, {"kind": "heads", "lam": 1e-3}]})
    with pytest.raises(dg.LambdaError, match="target names kind 'channels'"):
        dg.LambdaScheduler(opt, model=model, target={"channels": 0.5}, by_step=10)
    with pytest.raises(dg.LambdaError, match="per-kind targets count groups or parameters"):
        dg.LambdaScheduler(opt, model=model, target={"heads": 0.5}, metric="macs", by_step=10)


def test_distiller_adds_the_kl_to_a_frozen_copy_to_the_models_loss():
    from dgating_surgery.training.distill import Distiller

    batch = token_batches()[0]
    torch.manual_seed(0)
    model = dg.gate_model(tiny_llama(), {"D": 3, "groups": [{"kind": "heads"}, {"kind": "neurons"}]},
                          example_kwargs={"input_ids": batch[:1]})
    distiller = Distiller(model, weight=0.5, temperature=2.0)
    with pytest.raises(dg.LambdaError, match=r"before start\(\)"):
        distiller.loss(torch.zeros(2, 3), batch)
    distiller.start().attach()
    model.train()
    out = model(input_ids=batch, labels=batch)
    assert float(distiller.loss(out.logits, input_ids=batch).detach()) == pytest.approx(0.0, abs=1e-6)  # the same function
    with torch.no_grad():
        model.dgates[next(iter(model.dgates))].factors[:, :2] = 0  # two heads off: predictions move
    distiller.detach()
    plain = model(input_ids=batch, labels=batch)
    term = distiller.loss(plain.logits, input_ids=batch)
    assert float(term.detach()) > 1e-4
    distiller.attach()
    torch.testing.assert_close(model(input_ids=batch, labels=batch).loss, plain.loss + term)
    model.eval()
    torch.testing.assert_close(model(input_ids=batch, labels=batch).loss, plain.loss)  # evaluation is not distilled
