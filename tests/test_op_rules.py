"""The core invariant on hand-written models, one per op rule, plus the reasons given for groups
that are not exactly removable."""
import pytest
import torch

import dgating_surgery as dg

from conftest import assert_exact_cut
import models as M

IMG = torch.randn(2, 3, 16, 16)


@pytest.mark.parametrize("factory", [M.Residual, M.Concat, M.Shuffle, M.FlattenLinear, M.Grouped, M.SqueezeExcite,
                                     M.ChannelsLast, M.Functional])
@pytest.mark.parametrize("fraction", [0.3, 0.6])
def test_exact_cut_per_op_rule(factory, fraction):
    model = factory()
    _randomize_bn(model)
    assert_exact_cut(model, IMG, fraction=fraction, seed=int(fraction * 10))


def _randomize_bn(model):
    """Non-trivial BatchNorm statistics, so that an unscaled BN would show up as a difference."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)


def test_mlp_exact_parameter_count_and_shapes():
    model = M.MLP().eval()
    x = torch.randn(4, 10)
    gated = dg.gate_model(model, "mlp", x)
    assert gated is model and type(gated) is M.MLP
    by_layer = {g.modules[0]: g for g in dg.gates(gated)}
    assert set(by_layer) == {"fc1", "fc2"}  # fc3's neurons are the output: never gated
    assert by_layer["fc1"].num_groups == 20 and by_layer["fc2"].num_groups == 15
    with torch.no_grad():
        by_layer["fc1"].factors[0, [0, 3, 7]] = 0
        by_layer["fc2"].factors[1, [2]] = 0
    before = gated(x)
    report = dg.sparsity(gated)
    # fc1: 3 rows of 10 + 3 biases, fc2: 3 input columns; fc2: 1 row of (20 - 3), 1 bias; fc3: 1 column of 5
    expected = 3 * 10 + 3 + 3 * 15 + 17 + 1 + 5
    assert report.params_removable == expected
    assert report.dead == 4 and report.groups == 35
    slim = dg.shrink(gated, example_inputs=x)
    assert (slim.fc1.out_features, slim.fc2.in_features, slim.fc2.out_features, slim.fc3.in_features) == (17, 17, 14, 14)
    assert sum(p.numel() for p in slim.parameters()) == 10 * 20 + 20 + 20 * 15 + 15 + 15 * 5 + 5 - expected
    assert dg.max_rel_diff(before, slim(x)) < 1e-6
    assert not hasattr(slim, "dgates")


def test_ones_and_balanced_init_keep_function():
    x = torch.randn(3, 10)
    for init in ("ones", "balanced"):
        model = M.MLP()
        ref = model(x)
        gated = dg.gate_model(model, {"D": 4, "init": init, "groups": [{"kind": "neurons"}]}, x)
        assert dg.max_rel_diff(ref, gated(x)) < 1e-6
        gate = dg.gates(gated)[0]
        assert gate.factors.shape == (3, 20)
        if init == "ones":
            assert torch.equal(gate.factors, torch.ones(3, 20))
        else:  # balanced: |gamma_d| = ||theta_j|| for every factor d
            theta = gated.fc1.parametrizations.weight.original
            bias = gated.fc1.parametrizations.bias.original
            theta_norm = torch.sqrt(theta.pow(2).sum(1) + bias.pow(2))
            assert torch.allclose(gate.factors, theta_norm.expand(3, 20), rtol=1e-4)


def test_input_feature_selection():
    model = M.MLP(n_in=8).eval()
    x = torch.randn(5, 8)
    gated = dg.gate_model(model, {"D": 3, "groups": [{"kind": "features"}]}, x)
    (gate,) = dg.gates(gated)
    assert gate.kind == "features" and gate.positions == [[p] for p in range(8)]
    with torch.no_grad():
        gate.factors[0, [1, 6]] = 0
    before = gated(x)
    slim = dg.shrink(gated)  # the gate knows the input's width: no example inputs needed
    assert slim.fc1.in_features == 6
    assert slim.kept_input_features["x"].tolist() == [0, 2, 3, 4, 5, 7]
    assert dg.max_rel_diff(before, slim(x[:, slim.kept_input_features["x"]])) < 1e-6


@pytest.mark.parametrize("factory, fragment", [
    (M.WithLayerNorm, "normalized by LayerNorm at layer 'norm'"),
    (M.SigmoidBetween, "is not exactly zero where it reaches layer 'conv2'"),
    (M.FixedView, "fixes the size of a grouped dim"),
])
def test_not_removable_groups_say_why(factory, fragment):
    model = factory()
    x = torch.randn(2, 6) if factory is M.WithLayerNorm else torch.randn(2, 3, 8, 8)
    plan = dg.analyze(model, x)
    reasons = [r for s in plan.sets for r in s.reasons if r]
    assert any(fragment in r for r in reasons), reasons


def test_output_groups_are_never_cut():
    plan = dg.analyze(M.MLP(), torch.randn(2, 10))
    (out_set,) = [s for s in plan.sets if s.modules == ["fc3"]]
    assert not out_set.removable.any()
    assert out_set.reasons[0] == "reaches the model output (never cut)"


def test_grouped_conv_units_and_groups_attribute():
    model = M.Grouped().eval()
    gated = dg.gate_model(model, "default", IMG)
    by_first = {g.modules[0]: g for g in dg.gates(gated)}
    # the grouped conv ties each of its 4 groups (4 stem channels + 2 output channels) into one unit
    assert by_first["stem.0"].num_groups == 4
    dg.kill_random_groups(gated, 0.5, seed=1)
    before = gated(IMG)
    slim = dg.shrink(gated, example_inputs=IMG)
    assert slim.grouped[0].groups == 2 and slim.grouped[0].in_channels == 8
    assert slim.dw2.groups == slim.dw2.in_channels and slim.dw2.out_channels == 2 * slim.dw2.in_channels
    assert dg.max_rel_diff(before, slim(IMG)) < 1e-5


def test_export_fallback_when_symbolic_tracing_fails():
    model = M.NeedsDim()
    from dgating_surgery.engine.tracing import capture
    assert capture(model, torch.randn(1, 3, 8, 8)).frontend == "export"
    assert_exact_cut(model, torch.randn(2, 3, 8, 8))


def test_export_fallback_when_the_traced_graph_does_not_run():
    from dgating_surgery.engine.tracing import capture
    assert capture(M.GraphWontRun(), torch.randn(1, 3, 8, 8)).frontend == "export"
    assert_exact_cut(M.GraphWontRun(), torch.randn(2, 3, 8, 8))


def test_threshold_decides_dead_groups():
    x = torch.randn(4, 10)
    gated = dg.gate_model(M.MLP(), {"D": 2, "init": "ones", "threshold": 0.0, "groups": ["neurons"]}, x)
    with torch.no_grad():
        dg.gates(gated)[0].factors[0, :5] = 1e-3
    assert dg.sparsity(gated).dead == 0
    assert dg.sparsity(gated, threshold=1.0).dead >= 5


def test_gated_sequential_still_runs():
    model = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.ReLU(), torch.nn.Linear(10, 3))
    assert_exact_cut(model, torch.randn(4, 6), "mlp")


def test_features_and_neurons_on_the_same_layer():
    x = torch.randn(5, 10)
    model = M.MLP().eval()
    ref = model(x)
    gated = dg.gate_model(model, {"D": 3, "groups": [{"kind": "features"}, {"kind": "neurons"}]}, x)
    assert dg.max_rel_diff(ref, gated(x)) < 1e-5
    kinds = {g.kind: g for g in dg.gates(gated)}
    with torch.no_grad():
        kinds["features"].factors[0, [2, 5]] = 0
        dg.gates(gated)[1].factors[0, [0, 1]] = 0
    before = gated(x)
    slim = dg.shrink(gated, example_inputs=x)
    assert slim.fc1.weight.shape == (18, 8)
    assert dg.max_rel_diff(before, slim(x[:, slim.kept_input_features["x"]])) < 1e-5


def test_shrinking_a_copy_leaves_the_gated_model_intact():
    import copy
    x = torch.randn(2, 3, 16, 16)
    gated = dg.gate_model(M.Residual().eval(), "default", x)
    dg.kill_random_groups(gated, 0.3)
    before = gated(x)
    slim = dg.shrink(copy.deepcopy(gated), example_inputs=x)
    assert torch.equal(gated(x), before) and dg.max_rel_diff(before, slim(x)) < 1e-5
    assert dg.sparsity(gated).dead > 0
