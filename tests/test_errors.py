"""Bad input gets a clear error that names the problem and says what to do."""
import pytest
import torch
from torch import nn

import dgating_surgery as dg

import models as M


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: neither tracer can follow it
            return self.fc(x)
        return -self.fc(x)


def test_untraceable_model_names_module_and_both_reasons():
    with pytest.raises(dg.TraceError) as err:
        dg.gate_model(Untraceable(), "mlp", torch.randn(2, 4))
    msg = str(err.value)
    assert "Untraceable" in msg and "symbolic_trace failed" in msg and "torch.export" in msg
    assert "control flow" in msg


def test_wrong_input_shape_names_the_layer():
    with pytest.raises(dg.TraceError) as err:
        dg.gate_model(M.MLP(), "mlp", torch.randn(2, 7))
    msg = str(err.value)
    assert "layer 'fc1' (Linear)" in msg and "example_inputs" in msg


def test_missing_example_inputs():
    with pytest.raises(dg.TraceError, match="needs example_inputs"):
        dg.gate_model(M.MLP(), "mlp")


def test_recipe_matching_nothing_names_entry_and_alternatives():
    recipe = {"D": 3, "groups": [{"kind": "neurons", "names": ["decoder.*"]}]}
    with pytest.raises(dg.GatingError) as err:
        dg.gate_model(M.MLP(), recipe, torch.randn(2, 10))
    msg = str(err.value)
    assert "groups[0]" in msg and "decoder.*" in msg and "fc1" in msg and "dgate inspect" in msg


def test_recipe_without_any_match():
    with pytest.raises(dg.GatingError, match="has no exactly removable channels"):
        dg.gate_model(M.MLP(), {"D": 3, "groups": ["channels"]}, torch.randn(2, 10))


def test_unknown_kind():
    with pytest.raises(dg.RecipeError) as err:
        dg.gate_model(M.MLP(), {"D": 3, "groups": [{"kind": "filters"}]}, torch.randn(2, 10))
    assert "groups[0].kind" in str(err.value) and "channels, neurons, features" in str(err.value)


def test_already_gated_and_not_gated():
    x = torch.randn(2, 10)
    gated = dg.gate_model(M.MLP(), "mlp", x)
    with pytest.raises(dg.GatingError, match="already gated"):
        dg.gate_model(gated, "mlp", x)
    with pytest.raises(dg.NotGatedError, match="not gated"):
        dg.shrink(M.MLP())


def test_verification_catches_a_cut_that_changes_the_function():
    x = torch.randn(4, 10)
    gated = dg.gate_model(M.MLP(), "mlp", x)
    with pytest.raises(dg.ShrinkError, match="differs from the gated model"):
        dg.shrink(gated, threshold=1.0, example_inputs=x)  # kills live neurons
