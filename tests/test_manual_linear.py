"""A hand-written linear (its own class computing ``x @ W.T + b``, ``torch.matmul(x, W.t())``,
``addmm``/``baddbmm`` with a transposed weight, ``x @ W`` with W stored (in, out), an einsum) is
the linear it is: its output rows are neurons, gated on the right side of the weight and cut
exactly, under symbolic tracing and under torch.export (issue 19 item 5)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dgating_surgery as dg
import dgating_surgery.engine.tracing as tracing
from dgating_surgery.engine.gates import analyze

from conftest import assert_exact_cut

NEURONS = {"D": 3, "groups": [{"kind": "neurons"}]}
FORWARDS = {  # how the layer multiplies by its weight; "in_out": the weight is stored (in, out)
    "matmul_T": lambda x, w, b: x @ w.T + b,
    "matmul_t": lambda x, w, b: torch.matmul(x, w.t()) + b,
    "transpose": lambda x, w, b: x @ w.transpose(0, 1) + b,
    "permute": lambda x, w, b: torch.matmul(x, w.permute(1, 0)) + b,
    "mT": lambda x, w, b: x @ w.mT + b,
    "linear_tt": lambda x, w, b: F.linear(x, w.t().t(), b),
    "addmm": lambda x, w, b: torch.addmm(b, x, w.t()),  # 2-D inputs (``INPUT_2D``)
    "baddbmm": lambda x, w, b: torch.baddbmm(b, x, w.t().expand(x.shape[0], -1, -1)),
    "bmm_unsqueezed": lambda x, w, b: torch.bmm(x, w.t().unsqueeze(0).expand(x.shape[0], -1, -1)) + b,
    "einsum": lambda x, w, b: torch.einsum("bti,oi->bto", x, w) + b,
    "einsum_weight_first": lambda x, w, b: torch.einsum("oi,...i->...o", w, x) + b,
    "in_out": lambda x, w, b: x @ w + b,
    "einsum_in_out": lambda x, w, b: torch.einsum("bti,io->bto", x, w) + b,
}
INPUT_2D = {"addmm"}


class HandLinear(nn.Module):
    """A linear layer written by hand, as some model families do."""

    def __init__(self, n_in, n_out, how):
        super().__init__()
        self.how = how
        shape = (n_in, n_out) if how.endswith("in_out") else (n_out, n_in)
        self.weight = nn.Parameter(torch.randn(shape) / n_in ** 0.5)
        self.bias = nn.Parameter(torch.randn(n_out))

    def forward(self, x):
        return FORWARDS[self.how](x, self.weight, self.bias)


class HandMLP(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.up, self.down = HandLinear(8, 16, how), HandLinear(16, 4, how)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


@pytest.fixture(params=["fx", "export"])
def frontend(request, monkeypatch):
    """Run a test under symbolic tracing, and again with it failing (the torch.export fallback)."""
    if request.param == "export":
        def refuse(*args):
            raise RuntimeError("symbolic tracing refused by the test")
        monkeypatch.setattr(tracing, "_symbolic_trace", refuse)
    return request.param


@pytest.mark.parametrize("how", sorted(FORWARDS))
def test_hand_written_linear_neurons_are_gated_and_cut_exactly(how, frontend):
    model = HandMLP(how).eval()
    x = torch.randn(15, 8) if how in INPUT_2D else torch.randn(3, 5, 8)
    assert tracing.capture(model, x).frontend == frontend
    check = assert_exact_cut(model, x, NEURONS, fraction=0.3, min_groups=16)
    assert check.groups_gated == 16 and check.groups_cut == 4  # the 16 hidden neurons; 30% of them die
    w_up = model.up.weight
    assert w_up.shape == ((8, 12) if how.endswith("in_out") else (12, 8)) and model.up.bias.shape == (12,)
    assert model.down.weight.shape == ((12, 4) if how.endswith("in_out") else (4, 12))


@pytest.mark.parametrize("how", ["matmul_T", "in_out"])
def test_the_gate_scales_the_rows_the_neuron_owns(how):
    """(out, in) storage: the gate scales rows; (in, out): columns."""
    model = HandMLP(how).eval()
    gated = dg.gate_model(model, NEURONS, torch.randn(3, 5, 8))
    (gate,) = dg.gates(gated)
    assert gate.modules == ["up"] and gate.num_groups == 16
    with torch.no_grad():
        gate.factors[:, 5] = 0
    w = model.up.weight  # the gated weight, as the forward reads it
    neuron = w[:, 5] if how == "in_out" else w[5]
    others = torch.cat([w[:, :5], w[:, 6:]], 1) if how == "in_out" else torch.cat([w[:5], w[6:]])
    assert neuron.abs().max() == 0 and others.abs().min() > 0
    assert model.up.bias[5] == 0


class AddmmOntoActivation(nn.Module):
    """``addmm(h, x, W.t())`` adds an activation, not a bias: the product is no plain linear."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(8, 16)
        self.weight = nn.Parameter(torch.randn(16, 8))
        self.out = nn.Linear(16, 2)

    def forward(self, x):
        h = torch.relu(self.first(x))
        return self.out(torch.addmm(h, x, self.weight.t()))


def test_addmm_onto_an_activation_keeps_the_groups_it_adds(frontend):
    plan = analyze(AddmmOntoActivation(), torch.randn(4, 8))
    first = [s for s in plan.sets if "first" in s.modules]
    assert first and all(r is not None and "addmm" in r for s in first for r in s.reasons)
