"""gate_model's guard (``gates._Unchanged``): a model that amplifies the rounding of the balanced
init is balanced with powers of two (the output kept), a gate that misses a use of its weight is
still refused with the set named and the model restored bit for bit; and the fuzzer seeds that
found each case (``random_arch``), from the generator itself."""
import importlib
import random
import re
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import dgating_surgery as dg
import random_arch as R
from dgating_surgery.errors import DGatingWarning

gates_module = importlib.import_module("dgating_surgery.engine.gates")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _case(seed):
    torch.manual_seed(seed)
    return R.make_case(seed)


# seed -> the sets whose float balance the model amplifies (and where it does)
AMPLIFYING = {372: ["'blocks.0.f0.up' (channels)"],  # h / cumsum(conv(h)): a sum near zero
              1678: ["'x' (features)", "'blocks.0.f' (channels)"]}  # an instance norm's output of rounding noise


@pytest.mark.parametrize("seed", sorted(AMPLIFYING))
def test_rounding_the_model_amplifies_is_balanced_with_powers_of_two(seed):
    model, inputs, _ = _case(seed)
    reference = model(*inputs)
    names = re.escape(", ".join(AMPLIFYING[seed]))
    with pytest.warns(DGatingWarning, match=rf"^the balanced init moved Net's output by .* the model amplifies the "
                                            rf"rounding of the weights of {names}; the gates of .* were balanced "
                                            r"with powers of two instead"):
        gated = dg.gate_model(model, R.recipe_for(model), inputs)
    assert dg.output_diff(reference, gated(*inputs)) <= 1e-4
    powers = [g for g in dg.gates(gated) if f"'{g.name}' ({g.kind})" in AMPLIFYING[seed]]
    assert len(powers) == len(AMPLIFYING[seed])
    for g in powers:  # balanced within a factor of 2, each factor a power of two
        exponents = torch.log2(g.factors.detach())
        assert torch.equal(exponents, exponents.round()) and (exponents.max(0).values - exponents.min(0).values).le(1).all()


@pytest.mark.parametrize("seed", [372, 1678, 1612, 977, 3418])
def test_fuzzer_seeds_gate_kill_and_shrink_exactly(seed):
    """372, 1678: the rounding above; 1612: an output of 1e-46 that float32 called all zeros;
    977: ``linear(h).view_as(h)`` of an h with no groups, which kept the linear's neurons free;
    3418: two sets that compare equal field by field (``select`` sorted them with ``list.index``)."""
    outcome, desc = R.run_seed(seed)
    assert outcome.kind == "exact", f"seed {seed}: {outcome}\n  model: {desc}"


def test_a_view_as_of_a_tensor_without_groups_keeps_the_layer():
    model, inputs, _ = _case(977)
    plan = dg.analyze(model, inputs)
    (linear,) = [s for s in plan.sets if s.name.startswith("blocks.1.f")]
    assert not linear.removable.any()
    assert "meets entries of no group at method '.view_as()' at node 'view_as'" in linear.reasons[0]


@pytest.mark.parametrize("seed, layer, cut", [(717, "blocks.2", "'blocks.1.conv' (channels)"),
                                              (870, "blocks.0", "'x' (features)")])
def test_a_size_torch_export_wrote_as_a_number_is_refused_by_shrink(seed, layer, cut):
    """``reshape(p.shape)`` under torch.export: the engine cannot see the tie, shrink's check can
    (the fuzzer's classification, then shrink itself on the same cut)."""
    outcome, desc = R.run_seed(seed)
    assert (outcome.kind, outcome.stage) == ("refused", "shrink check"), f"seed {seed}: {outcome}\n  model: {desc}"
    assert outcome.detail.startswith(f"the slim model does not run: layer '{layer}' (Block) fails: a size its forward "
                                     f"uses did not follow the cut of ") and cut in outcome.detail
    model, inputs, _ = _case(seed)
    gated = dg.gate_model(model, R.recipe_for(model), inputs)
    R._kill(dg.gates(gated), random.Random(seed ^ 0x5EED))  # the groups check_case zeroes
    before = gated(*inputs)
    with pytest.raises(dg.ShrinkError, match=rf"^the slim model does not run on the example inputs: layer '{layer}' "
                                             rf"\(Block\) fails: .*{re.escape(cut)}"):
        dg.shrink(gated)
    assert torch.equal(gated(*inputs), before)


def test_float64_outputs_are_compared_in_float64():
    """A float64 output of 1e-46 is not all zeros (float32 would say so), nor is 1e-12 no difference."""
    tiny = torch.tensor([5.6e-46, -2e-46], dtype=torch.float64)
    assert dg.output_diff(tiny, tiny * (1 + 1e-6)) == pytest.approx(1e-6)
    one = torch.ones(3, dtype=torch.float64)
    assert dg.output_diff(one, one + 1e-12) == pytest.approx(1e-12, rel=1e-3)


class NormalizedTiedLM(nn.Module):
    """A tied embedding and output layer whose every use is blind to one scale of the weight (a
    norm per token after the embedding, one over all logits after the head): a gate that misses one
    use hides from the doubled check (a uniform scale), not from the balanced init (one per group)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(30, 8)
        self.head = nn.Linear(8, 30, bias=False)
        self.head.weight = self.embed.weight
        self.norm = nn.RMSNorm(8, eps=1e-30)
        with torch.no_grad():  # group norms powers of two apart: no two round to the same power
            self.embed.weight.mul_(2.0 ** torch.arange(-4, 4).float())
            self.norm.weight.uniform_(0.5, 1.5)

    def forward(self, ids):
        return F.normalize(self.head(self.norm(self.embed(ids))).flatten(), dim=0)


IDS = torch.randint(0, 30, (2, 5), generator=torch.Generator().manual_seed(0))
HIDDEN = {"D": 3, "groups": [{"kind": "hidden"}]}


def test_the_balanced_init_catches_a_gate_that_misses_a_use(monkeypatch):
    model = NormalizedTiedLM().eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    reference = model(IDS)
    monkeypatch.setattr(gates_module, "tied_holders", lambda m: {})  # gate one use of the tied weight only
    with pytest.raises(dg.GatingError, match=r"^the balanced init changed NormalizedTiedLM's output by \d.* of its "
                                             r"largest value on the example inputs \(tolerance 0\.0001\) even with "
                                             r"powers of two, which round nothing: a weight of the group set\(s\) "
                                             r"'norm \(\+1 coupled\)' \(hidden\) is also used where its gate does not reach\. The "
                                             r"model was left ungated, its weights as they were; use `init: ones` in "
                                             r"the recipe or exclude them \(exclude: \[\"norm\"\]\); please report "
                                             r"the model\.$"):
        dg.gate_model(model, HIDDEN, IDS)
    assert not hasattr(model, "dgates") and type(model.head) is nn.Linear and model.head.weight is model.embed.weight
    assert state.keys() == model.state_dict().keys() and all(torch.equal(state[k], v)
                                                             for k, v in model.state_dict().items())
    assert torch.equal(model(IDS), reference)


def test_the_same_model_gated_in_every_use_passes_the_guard():
    model = NormalizedTiedLM().eval()
    reference = model(IDS)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DGatingWarning)  # no fallback to powers of two either
        gated = dg.gate_model(model, HIDDEN, IDS)
    assert dg.gates(gated)[0].num_groups == 8 and dg.output_diff(reference, gated(IDS)) <= 1e-5
