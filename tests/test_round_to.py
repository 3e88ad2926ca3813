"""Hardware-friendly widths (issue 10): ``round_to`` keeps every cut layer's width a multiple of N by
keeping the strongest dead groups; the cut stays exact (the slim model equals the gated one, and the
dead groups kept are zero in it)."""
import copy
import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import dgating_surgery as dg
from dgating_surgery.cli import main

import models as M

NEURONS = {"D": 3, "groups": [{"kind": "neurons"}]}


def mlp(n_in=12, hidden=(37, 29), n_out=5):
    return M.MLP(n_in, hidden, n_out)


def eval_out(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("N", [4, 8])
def test_widths_are_multiples_and_the_cut_is_exact(N):
    x = torch.randn(6, 12)
    gated = M.kill(dg.gate_model(mlp(), NEURONS, x), 0.5)
    plain, rounded = dg.plan_cut(gated), dg.plan_cut(gated, round_to=N)
    reference = eval_out(gated, x)
    slim = dg.shrink(copy.deepcopy(gated), example_inputs=x, round_to=N)
    assert slim.fc1.out_features % N == 0 and slim.fc2.out_features % N == 0
    assert slim.fc1.out_features < 37 and slim.fc2.out_features < 29  # still a cut
    torch.testing.assert_close(eval_out(slim, x), reference, rtol=0, atol=1e-6)
    for key, layer, nxt in (("fc1", slim.fc1, slim.fc2), ("fc2", slim.fc2, slim.fc3)):
        kept = ~rounded.dead[key]
        revived = plain.dead[key] & kept
        assert 0 < int(revived.sum()) < N  # the fewest dead groups that reach the multiple
        position = torch.cumsum(kept.long(), 0) - 1  # where each kept group sits in the slim layer
        rows = position[revived]
        assert layer.weight[rows].abs().max() == 0 and layer.bias[rows].abs().max() == 0  # kept dead groups are zero
        assert layer.out_features == int(kept.sum()) == nxt.in_features


def test_the_strongest_dead_groups_are_kept():
    """Groups below the threshold but not exactly zero: the ones kept back are the largest of them."""
    x = torch.randn(6, 12)
    gated = dg.gate_model(mlp(), NEURONS, x)
    with torch.no_grad():
        for g in dg.gates(gated):
            g.factors[:, : g.num_groups - 3] *= torch.linspace(1e-4, 1e-3, g.num_groups - 3)  # faded, distinct
    norms, plain = dg.group_norms(gated), dg.plan_cut(gated, threshold=1e-2)
    rounded = dg.plan_cut(gated, threshold=1e-2, round_to=4)
    for key, dead in plain.dead.items():
        revived = dead & ~rounded.dead[key]
        assert int((~rounded.dead[key]).sum()) % 4 == 0
        assert norms[key][revived].min() >= norms[key][dead & rounded.dead[key]].max()


def test_channels_of_a_residual_network():
    x = torch.randn(2, 3, 16, 16)
    gated = M.kill(dg.gate_model(M.Residual(c=8), "default", x), 0.6, seed=3)
    reference = eval_out(gated, x)
    slim = dg.shrink(gated, example_inputs=x, round_to=4)
    torch.testing.assert_close(eval_out(slim, x), reference, rtol=0, atol=1e-5)
    widths = [m.out_channels for m in slim.modules() if isinstance(m, nn.Conv2d)]
    assert all(w % 4 == 0 for w in widths) and sum(widths) < 8 + 12 + 8 + 6 + 8


def test_the_recipe_sets_the_default_and_an_unreachable_multiple_keeps_nothing_back():
    x = torch.randn(6, 12)
    gated = M.kill(dg.gate_model(mlp(hidden=(10, 29)), {**NEURONS, "round_to": 8}, x), 0.5)
    assert gated.dgates.recipe.round_to == 8 and gated.dgates.recipe.to_dict()["round_to"] == 8
    with torch.no_grad():  # fc1: 9 of 10 alive: the next multiple of 8 (16) is wider than the layer
        gated.dgates["fc1"].factors.fill_(1.0)
        gated.dgates["fc1"].factors[:, 3] = 0.0
    by_recipe, explicit = dg.plan_cut(gated), dg.plan_cut(gated, round_to=8)
    assert all(torch.equal(by_recipe.dead[k], explicit.dead[k]) for k in explicit.dead)
    assert int(explicit.dead["fc1"].sum()) == 1  # 9 kept: not a multiple, nothing gained by keeping the 10th
    assert int((~explicit.dead["fc2"]).sum()) % 8 == 0
    assert int((~dg.plan_cut(gated, round_to=1).dead["fc2"]).sum()) % 8 != 0  # 1: no rounding


@pytest.mark.parametrize("value", [0, -8, 2.5, True, "8", None])
def test_bad_round_to_values_are_refused(value):
    with pytest.raises(dg.RecipeError, match="round_to.*integer >= 1"):
        dg.load_recipe({**NEURONS, "round_to": value})
    if not isinstance(value, (str, type(None))):
        gated = dg.gate_model(mlp(), NEURONS, torch.randn(2, 12))
        with pytest.raises(dg.RecipeError, match="round_to"):
            dg.shrink(gated, round_to=value)


def test_recipe_round_trip():
    recipe = dg.load_recipe({**NEURONS, "round_to": 16})
    assert recipe.round_to == 16 and dg.load_recipe(recipe.to_dict()) == recipe
    assert dg.load_recipe(NEURONS).round_to == 1


def test_dgate_shrink_round_to(tmp_path):
    path, out = tmp_path / "gated.safetensors", tmp_path / "slim.safetensors"
    runner = CliRunner()
    convert = runner.invoke(main, ["convert", "models:MLP", "--arg", "hidden=[37, 29]", "--arg", "n_in=12", "-r",
                                   "mlp", "-o", str(path)])
    assert convert.exit_code == 0, convert.output
    dg.save_gated(M.kill(dg.load_gated(path, trust_code=True), 0.5), path)
    result = runner.invoke(main, ["shrink", str(path), "-o", str(out), "--round-to", "8", "--json", "--trust-code"])
    assert result.exit_code == 0, result.output
    slim = dg.load_slim(out, trust_code=True)
    assert slim.fc1.out_features % 8 == 0 and slim.fc2.out_features % 8 == 0 and slim.fc1.out_features < 37
    assert json.loads(result.output)["groups_cut"] == 37 + 29 - slim.fc1.out_features - slim.fc2.out_features
    bad = runner.invoke(main, ["shrink", str(path), "-o", str(tmp_path / "x.safetensors"), "--round-to", "0"])
    assert bad.exit_code == 2 and "--round-to" in bad.output


def test_a_torchvision_resnet():
    """round_to on a real network: every conv the cut narrows keeps a multiple of 8, the cut stays exact."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = dg.expose_weights(torchvision.models.resnet18(num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32)
    gated = M.kill(dg.gate_model(model, "default", x), 0.3, seed=1)
    reference = eval_out(gated, x)
    slim = dg.shrink(gated, example_inputs=x, round_to=8)
    torch.testing.assert_close(eval_out(slim, x), reference, rtol=0, atol=1e-4 * float(reference.abs().max()))
    widths = [m.out_channels for m in slim.modules() if isinstance(m, nn.Conv2d)]
    assert all(w % 8 == 0 for w in widths) and sum(widths) < sum(
        m.out_channels for m in torchvision.models.resnet18().modules() if isinstance(m, nn.Conv2d))
