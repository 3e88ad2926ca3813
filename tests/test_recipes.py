"""Recipes: validation errors name the file and field; every shipped recipe works on its family."""
import pytest
import torch
import torchvision
import yaml

import dgating_surgery as dg
from dgating_surgery.engine.gates import gate_set

from conftest import assert_exact_cut
import models as M


def test_smallest_recipe_and_defaults():
    r = dg.load_recipe({"D": 3, "groups": [{"kind": "channels"}, {"kind": "neurons"}]})
    assert (r.D, r.lam, r.init, r.threshold) == (3, 1e-4, "balanced", 1e-5)
    assert dg.load_recipe(r.to_dict()) == r  # to_dict round-trips


def test_shipped_recipes_are_listed_and_load():
    names = dg.shipped_recipes()
    assert {"default", "resnet", "vgg", "mobilenet", "efficientnet", "densenet", "mlp"} <= set(names)
    for name in names:
        assert dg.load_recipe(name).groups


@pytest.mark.parametrize("text, fragment", [
    ("D: 3\ngroups:\n  - kind: channels\n    modulez: [Conv2d]\n", "line 4: field 'groups[0].modulez': unknown field"),
    ("D: 3\ngroups: [channels]\nlamda: 0.1\n", "line 3: field 'lamda': unknown field"),
    ("D: 1\ngroups: [channels]\n", "line 1: field 'D': must be an integer >= 2"),
    ("groups: [channels]\n", ": field 'D': missing"),
    ("D: 3\ngroups: []\n", "line 2: field 'groups': must be a non-empty list"),
    ("D: 3\ninit: random\ngroups: [channels]\n", "line 2: field 'init': must be one of balanced, ones"),
    ("D: 3\ngroups:\n  - kind: channels\n   names: [a]\n", "YAML syntax error at line 4"),
    ("# a comment\nD: 3\ngroups:\n  - kind: neurons\n  - modules: [Linear]\n",
     "line 5: field 'groups[1].kind': missing"),
    ("D: 3\ngroups:\n  - neurons\n  - kind: channels\n    names: 3\n", "line 5: field 'groups[1].names': must be a list"),
    ("D: 3\nlam: -1e-4\ngroups: [channels]\n", "line 2: field 'lam': must be a finite number >= 0"),
    ("D: 3\nthreshold: .nan\ngroups: [channels]\n", "line 2: field 'threshold': must be a finite number >= 0"),
    ("D: 3\nthreshold: 1e-5x\ngroups: [channels]\n", "line 2: field 'threshold': must be a finite number >= 0"),
    ("D: 3\n1: 2\ngroups: [channels]\n", "line 2: field '1': unknown field"),
])
def test_bad_recipe_files(tmp_path, text, fragment):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(dg.RecipeError) as err:
        dg.load_recipe(path)
    assert str(path) in str(err.value) and fragment in str(err.value)


def test_numbers_written_as_the_readme_writes_them(tmp_path):
    """Item 8: `lam: 1e-4` (the README's default) is a string to YAML 1.1, and was rejected."""
    path = tmp_path / "r.yaml"
    path.write_text("D: 3\nlam: 1e-4\nthreshold: 5E-5\ngroups: [neurons]\n")
    assert yaml.safe_load(path.read_text())["lam"] == "1e-4"  # what PyYAML makes of it
    r = dg.load_recipe(path)
    assert (r.lam, r.threshold) == (1e-4, 5e-5) and isinstance(r.lam, float)
    gated = dg.gate_model(M.MLP(), path, torch.randn(2, 10))
    assert gate_set(gated).recipe.lam == 1e-4


def test_cli_recipe_error_gives_the_line(tmp_path):
    from click.testing import CliRunner

    from dgating_surgery.cli import main
    path = tmp_path / "r.yaml"
    path.write_text("D: 3\nlam: 1e-4\ngroups:\n  - kind: neurons\n    modules: Linear\n    exlude: [fc1]\n")
    result = CliRunner().invoke(main, ["convert", "models:MLP", "-r", str(path), "-o", str(tmp_path / "g.safetensors")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"Error: {path}, line 6: field 'groups[0].exlude': unknown field" in result.stderr
    assert not (tmp_path / "g.safetensors").exists()


def test_unknown_recipe_name_lists_shipped():
    with pytest.raises(dg.RecipeError, match="shipped recipes: .*resnet"):
        dg.load_recipe("resnett")


def _gated_modules(model):
    return {m for g in dg.gates(model) for m in g.modules}


@pytest.mark.parametrize("recipe, factory, size, excluded", [
    ("resnet", torchvision.models.resnet18, 64, "conv1"),
    pytest.param("vgg", torchvision.models.vgg11_bn, 32, None, marks=pytest.mark.slow),  # vgg: the test below
    ("mobilenet", torchvision.models.mobilenet_v3_small, 64, "features.0.0"),
    ("efficientnet", torchvision.models.efficientnet_b0, 64, "features.0.0"),
    ("densenet", torchvision.models.densenet121, 64, "features.conv0"),
])
def test_family_recipes(recipe, factory, size, excluded):
    x = torch.randn(1, 3, size, size)
    model = factory()
    check = assert_exact_cut(model, x, recipe, min_groups=50)
    assert check.groups_cut > 0
    gated = dg.gate_model(factory(), recipe, x)
    assert excluded is None or excluded not in _gated_modules(gated)
    assert {g.kind for g in dg.gates(gated)} <= {s.kind for s in dg.load_recipe(recipe).groups}


def test_vgg_recipe_gates_classifier_neurons_only_there():
    gated = dg.gate_model(torchvision.models.vgg11(), "vgg", torch.randn(1, 3, 32, 32))
    neurons = [g for g in dg.gates(gated) if g.kind == "neurons"]
    assert [g.modules for g in neurons] == [["classifier.0"], ["classifier.3"]]


def test_mlp_recipe():
    assert_exact_cut(M.MLP(), torch.randn(4, 10), "mlp", min_groups=35)
