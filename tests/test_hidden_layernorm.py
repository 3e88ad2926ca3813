"""The residual stream under LayerNorm cut approximately (opt-in ``{kind: hidden, layernorm: approximate}``,
issue 19 item 3): labelled everywhere, every exact set still verified exactly, the approximate change
measured and recorded in the slim checkpoint."""
import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import dgating_surgery as dg
from dgating_surgery.cli import main
from dgating_surgery.engine.measure import collapsed
from dgating_surgery.errors import DGatingWarning

APPROX = {"D": 3, "groups": [{"kind": "hidden", "layernorm": "approximate"}, {"kind": "neurons"}]}
X = torch.randn(8, 5, 6, generator=torch.Generator().manual_seed(0))
UNSEEN = torch.randn(4, 7, 6, generator=torch.Generator().manual_seed(1)) * 2


class PreLN(nn.Module):
    """A hand-written pre-LayerNorm stream (width 32): an embedding, two residual MLP blocks, a final norm, a head.
    The LayerNorms' weights and biases are random: an identity norm could hide a wrong cut."""

    def __init__(self, width=32):
        super().__init__()
        self.embed, self.head = nn.Linear(6, width), nn.Linear(width, 3)
        self.blocks = nn.ModuleList(nn.ModuleDict({"ln": nn.LayerNorm(width), "fc1": nn.Linear(width, 48),
                                                   "fc2": nn.Linear(48, width)}) for _ in range(2))
        self.ln_f = nn.LayerNorm(width)
        generator = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.LayerNorm):
                    m.weight.copy_(1 + 0.3 * torch.randn(width, generator=generator))
                    m.bias.copy_(0.3 * torch.randn(width, generator=generator))

    def forward(self, x):
        h = self.embed(x)
        for block in self.blocks:
            h = h + block.fc2(torch.relu(block.fc1(block.ln(h))))
        return self.head(self.ln_f(h))


def kill_hidden(gated, channels):
    """Zero these channels' gates of the (first) hidden set, the stream's (exactly: each group's factors)."""
    hidden = next(g for g in dg.gates(gated) if g.kind == "hidden")
    with torch.no_grad():
        hidden.factors[:, channels] = 0
    return hidden


def test_without_the_opt_in_the_refusal_names_both_opt_ins():
    with pytest.raises(dg.GatingError, match=r"no exactly removable hidden .*center_layernorm: true.*layernorm: "
                                             r"approximate"):
        dg.gate_model(PreLN(), {"D": 3, "groups": [{"kind": "hidden"}]}, (X,))
    report = dg.analyze(PreLN(), (X,))  # the stream's neurons are blocked by the LayerNorm, with the opt-ins named
    (embed,) = [s for s in report.sets if s.modules[0] == "embed"]
    assert "layernorm: approximate" in embed.reasons[0] and embed.approximate is None


def test_an_approximate_set_is_selected_only_by_the_entry_that_opts_in():
    recipe = {"D": 3, "groups": [{"kind": "hidden", "layernorm": "approximate", "names": ["nothing*"]},
                                 {"kind": "hidden"}, {"kind": "neurons"}]}
    with pytest.raises(dg.GatingError, match=r"groups\[0\] .*layernorm: approximate.* matched nothing"):
        dg.gate_model(PreLN(), recipe, (X,))


def test_the_cut_removes_exactly_the_dead_channels_entries_and_measures_the_change(tmp_path):
    gated = dg.gate_model(PreLN(), APPROX, (X,))
    hidden = kill_hidden(gated, [3, 17])
    assert hidden.approximate and "LayerNorm" in hidden.approximate and "approximate" in repr(hidden)
    assert "(approximate)" in str(dg.sparsity(gated))
    dense = collapsed(gated)  # the gated weights, nothing cut
    params = dg.model_params(gated)
    removable = dg.sparsity(gated).params_removable
    before, before_unseen = gated(X), gated(UNSEEN)
    with pytest.warns(DGatingWarning, match=r"approximate cut .*3 LayerNorms .*differs from the gated one's by "):
        slim = dg.shrink(gated)
    # per dead channel: embed row + bias (7), fc1 columns (2 x 48), fc2 rows + bias (2 x 49), head column (3),
    # three LayerNorms' weight and bias (6)
    assert params - dg.model_params(slim) == removable == 2 * (7 + 96 + 98 + 3 + 6)
    kept = [c for c in range(32) if c not in (3, 17)]
    assert torch.equal(slim.embed.weight, dense.embed.weight[kept]) and torch.equal(slim.head.weight, dense.head.weight[:, kept])
    for name in ("blocks.0.ln", "blocks.1.ln", "ln_f"):
        ln, full = slim.get_submodule(name), dense.get_submodule(name)
        assert torch.allclose(ln.weight, full.weight[kept] * (32 / 30) ** 0.5) and torch.equal(ln.bias, full.bias[kept])
        assert ln.eps == pytest.approx(full.eps * 32 / 30) and type(ln) is nn.LayerNorm
    record = slim.approximate_cut
    assert record["layer_norms"] == {"blocks.0.ln": [32, 30], "blocks.1.ln": [32, 30], "ln_f": [32, 30]}
    assert record["sets"] == [hidden.name]
    change = record["output_change"]
    assert change["example_inputs"] == pytest.approx(dg.max_rel_diff(before, slim(X)), rel=1e-3)
    # 2 of 32 channels: the output moves by about 1% of its largest value (0.008 here), measured, not zero
    assert 1e-5 < change["example_inputs"] < 0.03 and 1e-5 < change["fresh_inputs"] < 0.03
    assert 1e-5 < dg.max_rel_diff(before_unseen, slim(UNSEEN)) < 0.03
    # the label travels with the slim checkpoint
    dg.save_slim(slim, tmp_path / "slim.safetensors", reference="test_hidden_layernorm:PreLN")
    assert dg.read_manifest(tmp_path / "slim.safetensors")["approximate_cut"] == record
    loaded = dg.load_slim(tmp_path / "slim.safetensors", model=PreLN())
    assert loaded.approximate_cut == record and torch.equal(loaded(UNSEEN), slim(UNSEEN))


def test_an_exact_cut_writes_no_label_and_reads_old_files(tmp_path):
    """No hidden channel dead: nothing approximate, no manifest field (a file without it loads as before)."""
    gated = dg.gate_model(PreLN(), APPROX, (X,))
    (neurons, *_) = [g for g in dg.gates(gated) if g.kind == "neurons"]
    with torch.no_grad():
        neurons.factors[:, :5] = 0
    slim = dg.shrink(gated)
    assert not hasattr(slim, "approximate_cut")
    dg.save_slim(slim, tmp_path / "slim.safetensors", reference="test_hidden_layernorm:PreLN")
    assert "approximate_cut" not in dg.read_manifest(tmp_path / "slim.safetensors")


@pytest.mark.parametrize("wrong", ["neurons", "hidden"])
def test_a_wrong_cut_is_still_caught_beside_an_approximate_one(wrong):
    """A group that is small but not zero, cut by a loose threshold, changes the output by less than the
    approximate cut does; the check computes the cut LayerNorms over their old width, so it is exact and
    catches it, in an exact set and in the approximate set itself."""
    gated = dg.gate_model(PreLN(), APPROX, (X,))
    kill_hidden(gated, [3, 17])
    target = next(g for g in dg.gates(gated) if g.kind == wrong)
    with torch.no_grad():
        target.factors[:, 5] *= 0.1  # not dead: its gate is 1% of what it was
    key = next(k for k, g in gated.dgates.items() if g is target)
    norm = float(dg.plan_cut(gated).norms[key][5])
    before = {k: v.clone() for k, v in gated.state_dict().items()}
    with pytest.raises(dg.ShrinkError, match=r"differs from the gated model's by .* \(tolerance 0\.0001\)") as caught:
        dg.shrink(gated, threshold=norm * 1.01)
    assert float(caught.value.args[0].split(" by ")[1].split()[0]) < 0.01  # less than the approximate cut's change
    assert all(torch.equal(v, gated.state_dict()[k]) for k, v in before.items())  # left gated
    assert dg.shrink(gated).approximate_cut["output_change"]["example_inputs"] > 1e-4  # the exact threshold cuts


def test_dgate_shrink_prints_and_records_the_change(tmp_path):
    gated = dg.gate_model(PreLN(), APPROX, (X,))
    kill_hidden(gated, [3])
    dg.save_gated(gated, tmp_path / "gated.safetensors", reference="test_hidden_layernorm:PreLN", example_inputs=X)
    out = tmp_path / "slim.safetensors"
    result = CliRunner().invoke(main, ["shrink", "--trust-code", str(tmp_path / "gated.safetensors"), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "Not exact: approximate cut (opt-in layernorm: approximate)" in " ".join(result.output.split())
    result = CliRunner().invoke(main, ["shrink", "--trust-code", str(tmp_path / "gated.safetensors"), "-o", str(out),
                                       "--force", "--json"])
    data = json.loads(result.stdout)
    assert data["approximate_cut"]["layer_norms"]["ln_f"] == [32, 31]
    assert dg.read_manifest(out)["approximate_cut"] == data["approximate_cut"]


def test_the_recipe_field():
    for entry, why in (({"kind": "hidden", "layernorm": "exact"}, "'approximate'"),
                       ({"kind": "neurons", "layernorm": "approximate"}, "only in a {kind: hidden} entry"),
                       ({"kind": "hidden", "layernorm": "approximate", "center_layernorm": True}, "center_layernorm")):
        with pytest.raises(dg.RecipeError, match=r"field 'groups\[0\]\.layernorm': .*" + why.replace("{", r"\{")):
            dg.load_recipe({"D": 3, "groups": [entry]})
    assert dg.load_recipe(APPROX).to_dict()["groups"][0] == {"kind": "hidden", "layernorm": "approximate"}


# -- Hugging Face: GPT-2 (pre-LN, torch.export) and BERT (post-LN) -------------------------------------
T = pytest.importorskip("transformers")
IDS = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(0))
UNSEEN_IDS = torch.randint(0, 100, (3, 17), generator=torch.Generator().manual_seed(1))


def gpt2():
    config = T.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=32)  # tied lm_head too
    return T.GPT2LMHeadModel(config).eval()


def bert():
    config = T.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=48)
    return T.BertForMaskedLM(config).eval()


@pytest.mark.parametrize("build, norms, sets, kwargs", [(gpt2, 5, 1, {"use_cache": False}), (bert, 6, 1, {})],
                         ids=["gpt2", "bert"])
def test_hugging_face_layernorm_streams_are_cut_approximately(build, norms, sets, kwargs, tmp_path):
    """GPT-2 (torch.export, its lm_head tied to the embedding) and BERT (post-LN: the stream is each LayerNorm's
    output; its masked-LM decoder is tied to the word embeddings, so the head's own LayerNorm is cut with the stream)."""
    recipe = {"D": 3, "groups": [{"kind": "hidden", "layernorm": "approximate"}, {"kind": "heads"}, {"kind": "neurons"}]}
    gated = dg.gate_model(build(), recipe, (IDS,), kwargs)
    assert sum(bool(g.approximate) for g in dg.gates(gated)) == sets
    kill_hidden(gated, [1, 9, 20])
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a fifth of every head and neuron set dead too: exact sets beside the approximate one
        for g in dg.gates(gated):
            if not g.approximate:
                g.factors[:, torch.randperm(g.num_groups, generator=generator)[: g.num_groups // 5]] = 0
    before = gated(UNSEEN_IDS, **kwargs).logits
    with pytest.warns(DGatingWarning, match="approximate cut"):
        slim = dg.shrink(gated)
    record = slim.approximate_cut
    assert len(record["layer_norms"]) == norms and set(map(tuple, record["layer_norms"].values())) == {(32, 29)}
    change = record["output_change"]
    assert all(1e-6 < change[k] < 0.1 for k in ("example_inputs", "fresh_inputs"))
    assert dg.max_rel_diff(before, slim(UNSEEN_IDS, **kwargs).logits) < 0.1
    dg.save_slim(slim, tmp_path / "slim.safetensors")
    loaded = dg.load_slim(tmp_path / "slim.safetensors", model=build())
    assert loaded.approximate_cut == record
    assert torch.equal(loaded(UNSEEN_IDS, **kwargs).logits, slim(UNSEEN_IDS, **kwargs).logits)
    slim.save_pretrained(tmp_path / "hf")  # the Hugging Face config carries the label too
    again = type(slim).from_pretrained(tmp_path / "hf")
    assert again.approximate_cut == record
    torch.testing.assert_close(again(UNSEEN_IDS, **kwargs).logits, slim(UNSEEN_IDS, **kwargs).logits)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["dgating_surgery"]["approximate_cut"]["layer_norms"] = {"transformer.h.0.ln_1": [32]}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(dg.CheckpointError, match=r"config.json.*approximate_cut\.layer_norms"):
        type(slim).from_pretrained(tmp_path / "hf")


class TiedDecoder(nn.Module):
    """An output layer sharing the embedding's weight, reading a hidden layer's neurons: the weight's columns are
    the embedding's outputs in one use and the hidden neurons in the other, so the two sets are one."""

    def __init__(self):
        super().__init__()
        self.emb, self.proj, self.dec = nn.Embedding(50, 16), nn.Linear(16, 16), nn.Linear(16, 50, bias=False)
        self.dec.weight = self.emb.weight

    def forward(self, ids):
        return self.dec(torch.relu(self.proj(self.emb(ids))))


def test_a_weight_tied_across_two_sets_ties_them():
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    gated = dg.gate_model(TiedDecoder(), {"D": 3, "groups": [{"kind": "neurons"}]}, (ids,))
    (only,) = dg.gates(gated)  # on main: two sets, whose cuts of emb.weight's columns disagree
    assert only.modules == ["emb", "proj"]
    dg.kill_random_groups(gated, 0.3)
    before = gated(ids)
    slim = dg.shrink(gated)
    assert slim.emb.weight.shape == (50, 16 - 4) and dg.max_rel_diff(before, slim(ids)) < 1e-5
