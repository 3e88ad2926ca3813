"""The language-model journey of issue 21, walked as a new user walks it, on tiny configs: tied
word embeddings (Llama-3.2 and Qwen2.5 ship them) gated with the shipped recipe, the gating-time
guard, and the messages that name the layers."""
import importlib

import pytest
import torch
from torch import nn

import dgating_surgery as dg

from conftest import assert_exact_cut

T = pytest.importorskip("transformers")

IDS = torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(0))
NO_CACHE = {"use_cache": False}
gates_module = importlib.import_module("dgating_surgery.gates")
shrink_module = importlib.import_module("dgating_surgery.shrink")


def tied(name="llama", **overrides):
    """A tiny decoder whose output layer is its embedding (one tensor used twice)."""
    config = {"llama": T.LlamaConfig, "qwen2": T.Qwen2Config}[name](
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, tie_word_embeddings=True, **overrides)
    model = {"llama": T.LlamaForCausalLM, "qwen2": T.Qwen2ForCausalLM}[name](config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


# -- 1. tied word embeddings ------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_tied_embeddings_with_the_shipped_recipe_gate_and_cut_exactly(name):
    """Heads, neurons and the residual stream (which the tied weight carries in both its uses):
    gating keeps the logits, half of every gate's groups cut keeps them and removes exactly their
    parameters, and the output layer is still the embedding, cut with it."""
    model = tied(name)
    check = assert_exact_cut(model, (IDS,), "llama", fraction=0.5, example_kwargs=NO_CACHE)
    assert check.groups_gated == 2 * (2 + 128) + 64 and check.groups_cut == 2 * (1 + 64) + 32
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.shape == (100, 32) and model.config.hidden_size == 32


@pytest.mark.parametrize("kind", ["heads", "neurons", "hidden"])
def test_each_kind_on_a_tied_llama(kind):
    model = tied()
    reference = model(IDS, **NO_CACHE).logits
    gated = dg.gate_model(model, {"D": 3, "groups": [{"kind": kind}]}, IDS, NO_CACHE)
    assert dg.max_rel_diff(reference, gated(IDS, **NO_CACHE).logits) < 1e-5
    dg.kill_random_groups(gated, 0.5, seed=3)
    before = gated(IDS, **NO_CACHE).logits
    removable = dg.sparsity(gated).params_removable
    params = dg.model_params(gated)
    slim = dg.shrink(gated)  # verified on the kept example inputs
    assert dg.max_rel_diff(before, slim(IDS, **NO_CACHE).logits) < 1e-5
    assert params - dg.model_params(slim) == removable > 0
    assert slim.lm_head.weight is slim.model.embed_tokens.weight


class TiedLM(nn.Module):
    """A hand-written decoder with a tied output layer (symbolic tracing: two layers, one tensor)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        self.fc1, self.fc2 = nn.Linear(32, 64), nn.Linear(64, 32)
        self.norm, self.final_norm = nn.RMSNorm(32), nn.RMSNorm(32)
        self.head = nn.Linear(32, 50, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        h = self.embed(ids)
        h = h + self.fc2(torch.relu(self.fc1(self.norm(h))))
        return self.head(self.final_norm(h))


TOKENS = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))
HIDDEN = {"D": 3, "groups": [{"kind": "neurons"}, {"kind": "hidden"}]}


def test_a_hand_written_tied_model_is_cut_exactly_and_stays_tied():
    model = TiedLM().eval()
    check = assert_exact_cut(model, TOKENS, HIDDEN)
    assert check.groups_gated == 64 + 32 and model.head.weight is model.embed.weight
    assert model.head.in_features == model.embed.embedding_dim == 32 - 9


def test_gating_that_would_change_the_output_is_refused_and_the_model_restored(monkeypatch):
    """The guard: were a use of a tied weight left outside its gate (the bug this issue found),
    gate_model names the set, leaves the model exactly as it was, and returns nothing."""
    model = dg.expose_weights(TiedLM().eval())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    reference = model(TOKENS)
    monkeypatch.setattr(gates_module, "tied_holders", lambda m: {})  # gate one use of the tied weight only
    with pytest.raises(dg.GatingError, match=r"^gating TiedLM would change its output \(by 0\.\d+ of its largest value "
                                             r"on the example inputs\): a weight of the group set\(s\) 'norm \(\+3 "
                                             r"coupled\)' \(hidden\) is also used where its gate does not reach\. The "
                                             r"model was left ungated; exclude them in the recipe \(exclude: "
                                             r"\[\"norm\"\]\)"):
        dg.gate_model(model, HIDDEN, TOKENS)
    assert not hasattr(model, "dgates") and type(model.head) is nn.Linear and type(model.embed) is nn.Embedding
    assert model.head.weight is model.embed.weight
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items()) and state.keys() == model.state_dict().keys()
    assert torch.equal(model(TOKENS), reference)
    monkeypatch.undo()
    assert_exact_cut(model, TOKENS, {"D": 3, "groups": [{"kind": "neurons"}, {"kind": "hidden", "exclude": ["norm"]}]})


def test_a_balanced_init_that_changes_the_output_is_undone(monkeypatch):
    model = TiedLM().eval()
    reference = model(TOKENS)
    wrong = gates_module.balanced_split
    monkeypatch.setattr(gates_module, "balanced_split", lambda norm, D, exact: (wrong(norm, D, exact)[0], norm * 0 + 1))
    with pytest.raises(dg.GatingError, match=r"^the balanced init changed TiedLM's output by .* the model was left "
                                             r"ungated \(its weights within rounding of the original\)"):
        dg.gate_model(model, HIDDEN, TOKENS)
    assert not hasattr(model, "dgates") and not any(isinstance(m, nn.utils.parametrize.ParametrizationList)
                                                    for m in model.modules())
    assert model.head.weight is model.embed.weight and dg.max_rel_diff(reference, model(TOKENS)) < 1e-6


def test_a_slim_model_that_does_not_run_is_reported_at_its_layer():
    """shrink's message names the layer that fails and the gated sets that cut it."""
    model = TiedLM().eval()
    gated = dg.gate_model(model, HIDDEN, TOKENS)
    cut_by = shrink_module.sets_by_layer(gated)
    assert cut_by["head"] == cut_by["embed"] == ["'norm (+3 coupled)' (hidden)"]  # one tensor, both its layers
    broken = TiedLM().eval()
    broken.fc2 = nn.Linear(63, 32)  # as a cut that missed one of the layers reading fc1 would leave it
    where = shrink_module.where_it_fails(broken, (TOKENS,), {}, {"fc2": ["'fc1' (neurons)"], "head": ["other"]})
    assert where == "layer 'fc2' (Linear) fails: a size its forward uses did not follow the cut of 'fc1' (neurons)"
    broken.fc2 = nn.Linear(64, 31)  # the residual sum, in the model's own forward, fails
    assert shrink_module.where_it_fails(broken, (TOKENS,), {}, {"fc2": ["'fc1' (neurons)"], "head": ["other"]}) == (
        "the forward of TiedLM itself fails: a size its forward uses did not follow the cut of 'fc1' (neurons), other")
