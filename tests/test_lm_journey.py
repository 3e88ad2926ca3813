"""The language-model journey of issue 21, walked as a new user walks it, on tiny configs: tied
word embeddings (Llama-3.2 and Qwen2.5 ship them) gated with the shipped recipe, the gating-time
guard, and the messages that name the layers."""
import importlib
import json
import re
import warnings

import pytest
import torch
from torch import nn

import dgating_surgery as dg

from conftest import assert_exact_cut

T = pytest.importorskip("transformers")

IDS = torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(0))
NO_CACHE = {"use_cache": False}
gates_module = importlib.import_module("dgating_surgery.engine.gates")
shrink_module = importlib.import_module("dgating_surgery.engine.shrink")


def tied(name="llama", tie=True, **overrides):
    """A tiny decoder whose output layer is its embedding (one tensor used twice), as the small
    Llama-3.2 and Qwen2.5 checkpoints ship (``tie=False``: two tensors)."""
    config = {"llama": T.LlamaConfig, "qwen2": T.Qwen2Config}[name](**{
        **dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=128, tie_word_embeddings=tie), **overrides})
    model = {"llama": T.LlamaForCausalLM, "qwen2": T.Qwen2ForCausalLM}[name](config).eval()
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
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
                                             r"\[\"norm\"\]\); please report the model\.$"):
        dg.gate_model(model, HIDDEN, TOKENS)
    assert not hasattr(model, "dgates") and type(model.head) is nn.Linear and type(model.embed) is nn.Embedding
    assert model.head.weight is model.embed.weight
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items()) and state.keys() == model.state_dict().keys()
    assert torch.equal(model(TOKENS), reference)
    monkeypatch.undo()
    assert_exact_cut(model, TOKENS, {"D": 3, "groups": [{"kind": "neurons"}, {"kind": "hidden", "exclude": ["norm"]}]})


class Sampling(nn.Module):
    """A forward that samples: no two runs agree, so the guard cannot judge it and lets it be."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x + torch.rand_like(x))))


def test_the_guard_lets_a_sampling_forward_be(monkeypatch):
    monkeypatch.setattr(gates_module, "tied_holders", lambda m: {})  # nothing is tied here anyway
    gated = dg.gate_model(Sampling(), "mlp", torch.randn(3, 4))
    assert [g.num_groups for g in dg.gates(gated)] == [8]


def test_a_balanced_init_that_changes_the_output_is_undone(monkeypatch):
    model = TiedLM().eval()
    reference = model(TOKENS)
    wrong = gates_module.balanced_split
    monkeypatch.setattr(gates_module, "balanced_split", lambda norm, D, exact: (wrong(norm, D, exact)[0], norm * 0 + 1))
    with pytest.raises(dg.GatingError, match=r"^the balanced init changed TiedLM's output by .* even with powers of "
                                             r"two, .* The model was left ungated, its weights as they were"):
        dg.gate_model(model, HIDDEN, TOKENS)
    assert not hasattr(model, "dgates") and not any(isinstance(m, nn.utils.parametrize.ParametrizationList)
                                                    for m in model.modules())
    assert model.head.weight is model.embed.weight and torch.equal(reference, model(TOKENS))


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


# -- 2 and 3. save_pretrained / from_pretrained, Trainer checkpoints, an optimizer kept across shrink --
def gated_llama(tie=True):
    return dg.gate_model(dg.expose_weights(tied(tie=tie)), "llama", IDS, NO_CACHE)


def slim_llama(tie=True):
    gated = gated_llama(tie)
    dg.kill_random_groups(gated, 0.4, seed=2)
    return dg.shrink(gated)


LOADERS = [(T.LlamaForCausalLM, "logits"), (T.AutoModelForCausalLM, "logits"), (T.AutoModel, "last_hidden_state"),
           (T.LlamaModel, "last_hidden_state")]


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_a_slim_directory_loads_in_every_class_with_or_without_ignore_mismatched_sizes(tmp_path, tie):
    """Item 3: the base classes (AutoModel, LlamaModel) read a ...ForCausalLM's directory, whose
    widths are named with the ``model.`` prefix; the reverse too (the base model's directory)."""
    slim = slim_llama(tie)
    assert slim.model.layers[0].mlp.down_proj.in_features < 128 and slim.model.embed_tokens.embedding_dim < 64
    slim.save_pretrained(tmp_path / "causal")
    slim.model.save_pretrained(tmp_path / "base")
    with torch.no_grad():
        expected = {"logits": slim(IDS, **NO_CACHE).logits, "last_hidden_state": slim.model(IDS).last_hidden_state}
    for cls, field in LOADERS:
        for ignore in (False, True):
            loaded = cls.from_pretrained(tmp_path / "causal", ignore_mismatched_sizes=ignore).eval()
            with torch.no_grad():
                assert torch.equal(getattr(loaded(IDS, **NO_CACHE), field), expected[field]), (cls, ignore)
            if field == "logits":
                assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tie
    causal = T.LlamaForCausalLM.from_pretrained(tmp_path / "base").eval()  # its output layer is not in the file
    with torch.no_grad():
        assert torch.equal(causal.model(IDS).last_hidden_state, expected["last_hidden_state"])


GATED_DIRECTORY = (r"holds a gated model \(D-Gating factors and primary weights, saved before dg\.shrink\): "
                   r"from_pretrained cannot build it and would initialise the gated layers at random\. Load it with "
                   r"dgating_surgery\.integrations\.hf\.from_pretrained_gated\(path, recipe\) \(the recipe it was "
                   r"gated with\), or dg\.shrink the gated model before save_pretrained\.")


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_a_gated_directory_is_refused_by_from_pretrained_and_loads_with_from_pretrained_gated(tmp_path, tie):
    from dgating_surgery.integrations.hf import from_pretrained_gated
    gated = gated_llama(tie)
    dg.kill_random_groups(gated, 0.3, seed=4)  # trained gates: not what a fresh gating gives
    gated.save_pretrained(tmp_path)  # a tied weight: saved once, as an ordinary tied checkpoint is
    with torch.no_grad():
        expected = gated(IDS, **NO_CACHE).logits
    for cls, _ in LOADERS:
        for ignore in (False, True):
            with pytest.raises(dg.CheckpointError, match=f"^{tmp_path} {GATED_DIRECTORY}$"):
                cls.from_pretrained(tmp_path, ignore_mismatched_sizes=ignore)
    loaded = from_pretrained_gated(tmp_path, "llama")
    assert loaded.training and {g.kind for g in dg.gates(loaded)} == {"heads", "neurons", "hidden"}
    with torch.no_grad():
        assert torch.equal(loaded.eval()(IDS, **NO_CACHE).logits, expected)
    primaries = (loaded.lm_head.parametrizations.weight.original if tie else loaded.lm_head.weight,
                 loaded.model.embed_tokens.parametrizations.weight.original)
    assert (primaries[0] is primaries[1]) == tie
    assert dg.sparsity(loaded).dead == dg.sparsity(gated).dead > 0
    with pytest.raises(dg.CheckpointError, match=r"does not fit LlamaForCausalLM gated with recipe .*: 1\d weights "
                                                 r"missing .*unexpected .*gate it with the recipe it was gated with"):
        from_pretrained_gated(tmp_path, {"D": 3, "groups": [{"kind": "neurons"}]})


def test_dgate_convert_on_a_gated_directory_is_one_error_line(tmp_path):
    from test_cli import dgate
    gated_llama().save_pretrained(tmp_path / "gated")
    result = dgate("convert", tmp_path / "gated", "-r", "llama", "-o", tmp_path / "again.safetensors", ok=False)
    assert result.exit_code == 1 and re.search(GATED_DIRECTORY, result.output) and not (tmp_path / "again.safetensors").exists()
    assert len([line for line in result.output.splitlines() if line.strip()]) == 1


def test_the_trainer_snippet_on_a_llama_and_its_checkpoint(tmp_path):
    """README's Trainer snippet, corrected (use_cache=False), on a tiny Llama; its checkpoint is a
    gated directory: from_pretrained refuses it, from_pretrained_gated resumes from it."""
    from transformers import Trainer, TrainingArguments
    from dgating_surgery.integrations.hf import DGatingCallback, dgating_optimizer, from_pretrained_gated
    model, ids = tied(), IDS
    train = [{"input_ids": row, "labels": row} for row in torch.randint(0, 100, (16, 12))]
    # -- the snippet --
    gated = dg.gate_model(model, "llama", example_kwargs={"input_ids": ids, "use_cache": False})
    args = TrainingArguments(tmp_path / "out", learning_rate=1e-3, weight_decay=0.01, logging_steps=2, max_steps=4,
                             save_steps=4, report_to="none", use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=gated, args=args, train_dataset=train,
                      optimizers=(dgating_optimizer(gated, args, lam=1e-4), None),   # Adam, coupled decay
                      callbacks=[DGatingCallback(schedule={"warmup_steps": 2})])
    trainer.train()
    # -- end --
    checkpoint = tmp_path / "out" / "checkpoint-4"
    with pytest.raises(dg.CheckpointError, match=GATED_DIRECTORY):
        T.AutoModelForCausalLM.from_pretrained(checkpoint)
    resumed = from_pretrained_gated(checkpoint, "llama").eval()
    with torch.no_grad():
        assert torch.equal(resumed(ids, **NO_CACHE).logits, gated.eval()(ids, **NO_CACHE).logits)


def test_an_optimizer_built_before_shrink_refuses_to_step():
    """shrink replaces the parameters it cuts (and drops the gates): an optimizer holding the old
    ones would train nothing the slim model uses, so its step is an error; a new one steps."""
    gated = gated_llama()
    opt = torch.optim.Adam(dg.param_groups(gated, 1e-4), lr=1e-3)
    gated(IDS, **NO_CACHE).logits.sum().backward()
    opt.step()
    with torch.no_grad():
        dg.gates(gated)[0].factors[0, :] = 1e3  # a cut that verification refuses leaves the model gated ...
    dg.kill_random_groups(gated, 0.4, seed=2)
    with pytest.raises(dg.ShrinkError):
        dg.shrink(gated, threshold=1e9)
    opt.step()  # ... and its optimizer valid
    slim = dg.shrink(gated)
    slim(IDS, **NO_CACHE).logits.sum().backward()
    stale = sum(1 for group in opt.param_groups for p in group["params"] if all(p is not q for q in slim.parameters()))
    with pytest.raises(dg.ShrinkError, match=rf"^Adam\.step\(\): {stale} of its parameters were replaced by dg\.shrink "
                                             r"\(the slim model's weights are new tensors\), so this step would not "
                                             r"train the slim model; build a new optimizer from the slim model"):
        opt.step()
    before = [p.detach().clone() for p in slim.parameters()]
    fresh = torch.optim.SGD(slim.parameters(), lr=0.1)
    fresh.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, slim.parameters()))


# -- 5. messages that fit ----------------------------------------------------------------------------
BRANCHY = """
import torch
from torch import nn


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        h = self.fc1(x)
        if h.sum() > 0:
            h = h * 2
        return self.fc2(torch.relu(h))
"""


def test_data_dependent_control_flow_is_one_line_naming_the_code(tmp_path, monkeypatch):
    """torch.export printed its partial graph (~30 lines) to stderr before our one error line."""
    from test_cli import dgate
    (tmp_path / "branchy.py").write_text(BRANCHY)
    monkeypatch.syspath_prepend(tmp_path)
    result = dgate("inspect", "branchy:Branchy", "--input-shape", "2,4", ok=False)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert lines[0] == (f"Error: could not capture Branchy as a graph: its forward branches on a tensor's value at "
                    f"{tmp_path / 'branchy.py'}:13 in forward (`if h.sum() > 0:`), which neither "
                    "torch.fx.symbolic_trace nor torch.export can follow. Make that code independent of tensor values "
                    "(e.g. torch.where instead of if), or gate a submodule that does not contain it")


def test_a_decoder_without_use_cache_false_gets_the_fix_in_one_short_line():
    with pytest.raises(dg.TraceError) as err:
        dg.gate_model(tied(), "llama", example_kwargs={"input_ids": IDS})  # README's old Trainer snippet
    assert str(err.value) == ("could not capture LlamaForCausalLM as a graph: it returns a key/value cache, which "
                              "torch.export cannot capture: pass example_kwargs={'use_cache': False}")


def test_input_dtype_advice_fits_the_failure():
    float16 = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).half()
    with pytest.raises(dg.TraceError, match=r"^the model failed on the example inputs at layer '0' \(Linear\): "
                                            r"RuntimeError: .*dtype.* The example inputs are float32 but the model's "
                                            r"weights are float16: pass inputs of the weights' dtype "
                                            r"\(x\.to\(torch\.float16\); from the shell: --input-dtype float16\), or "
                                            r"cast the model to float32 first$"):
        dg.gate_model(float16, "mlp", torch.randn(2, 4))
    with pytest.raises(dg.TraceError, match=r"^could not capture LlamaForCausalLM as a graph: torch\.export failed "
                                            r"\(RuntimeError: Expected tensor for argument #1 'indices'.*\)\. The model "
                                            r"looks its inputs up in an embedding, which takes integer token ids: "
                                            r"pass e\.g\. torch\.randint\(0, vocab_size, \(1, 16\)\) \(from the shell: "
                                            r"--input-dtype int64\)$"):
        dg.gate_model(tied(), "llama", IDS.float(), NO_CACHE)
    with pytest.raises(dg.TraceError, match=r"shapes cannot be multiplied.*Pass example_inputs shaped like a real "
                                            r"batch"):  # a shape problem keeps the shape advice
        dg.gate_model(float16.float(), "mlp", torch.randn(2, 5))


def test_the_command_line_on_a_text_model_with_an_input_shape(tmp_path):
    """--input-shape alone keeps a text model's token ids integers, and a recipe kind the model
    has but cannot remove is shown once, with why."""
    from test_cli import dgate
    tied(num_key_value_heads=1).save_pretrained(tmp_path)  # multi-query attention: one key/value head
    result = dgate("inspect", tmp_path, "--input-shape", "1,8", "--recipe", "llama", "--json")
    data = json.loads(result.stdout)
    assert data["inputs"] == "1x8 int64, use_cache=False"
    heads = [s for s in data["sets"] if s["kind"] == "heads"]
    assert len(heads) == 2 and not any(s["gated"] for s in heads)
    mqa = ("the query heads of 'model.layers.{}.self_attn' share keys and values that are not split by head (as in "
           "multi-query attention: one key/value head for all query heads), so no head can go without the others")
    assert [s["not_removable"] for s in heads] == [[{"groups": 4, "reason": mqa.format(i)}] for i in (0, 1)]
    warnings_shown = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings_shown) == 1 and "groups[0] {kind: heads} matched nothing in LlamaForCausalLM" in warnings_shown[0]


# -- 6. heads in the default recipe, grouped-query attention as a reader counts it, CLI to Hugging Face --
def test_the_default_recipe_gates_heads_exactly_and_says_nothing_of_them_on_a_cnn():
    check = assert_exact_cut(tied(tie=False, num_attention_heads=8), (IDS,), "default", fraction=0.5,
                             example_kwargs=NO_CACHE)
    assert check.groups_gated == 2 * (2 + 128) and check.groups_cut == 2 * (1 + 64)
    import models as M
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gated = dg.gate_model(M.Residual(), "default", torch.randn(2, 3, 8, 8))
    assert {g.kind for g in dg.gates(gated)} == {"channels"}
    assert [str(w.message).split(";")[0] for w in caught] == [
        "recipe default (shipped): groups[1] {kind: neurons} matched nothing in Residual"]


def test_grouped_query_heads_are_shown_as_kv_groups_of_query_heads(tmp_path):
    from test_cli import dgate
    from dgating_surgery import display
    tied(num_attention_heads=8).save_pretrained(tmp_path)
    table = dgate("inspect", tmp_path, "-r", "llama").stdout
    rows = [line for line in table.splitlines() if "self_attn" in line and "│ heads " in line]
    assert len(rows) == 2 and all("│ heads   │ 2 kv groups (8 query heads) │" in row for row in rows), table
    gated = dg.gate_model(tied(num_attention_heads=8), "llama", IDS, NO_CACHE)
    assert [g.per_group for g in dg.gates(gated) if g.kind == "heads"] == [4, 4]
    console = display.Console(width=250, record=True)
    console.print(display.sparsity_table(dg.sparsity(gated)))
    assert console.export_text().count("2 kv groups (8 query heads)") == 2
    assert display.groups("heads", 12, 1) == display.groups("neurons", 12, 4) == "12"


def test_a_cli_slim_checkpoint_becomes_a_hugging_face_directory(tmp_path):
    """convert and shrink from the shell, then dg.load_slim(...).save_pretrained(dir): the directory
    loads with AutoModelForCausalLM and gives the slim model's logits; the tie survives."""
    from test_cli import dgate
    tied().save_pretrained(tmp_path / "base")
    dgate("convert", tmp_path / "base", "-r", "llama", "-o", tmp_path / "gated.safetensors")
    gated = dg.load_gated(tmp_path / "gated.safetensors")
    dg.kill_random_groups(gated, 0.4, seed=1)
    dg.save_gated(gated, tmp_path / "gated.safetensors")
    dgate("shrink", tmp_path / "gated.safetensors", "-o", tmp_path / "slim.safetensors")
    # -- the two lines --
    slim = dg.load_slim(tmp_path / "slim.safetensors")
    slim.save_pretrained(tmp_path / "slim-hf")
    # --
    assert slim.lm_head.weight is slim.model.embed_tokens.weight and slim.config.dgating_surgery
    again = T.AutoModelForCausalLM.from_pretrained(tmp_path / "slim-hf").eval()
    with torch.no_grad():
        assert torch.equal(again(IDS, **NO_CACHE).logits, slim.eval()(IDS, **NO_CACHE).logits)
    assert again.lm_head.weight is again.model.embed_tokens.weight
    assert dg.model_params(again) == dg.model_params(slim) < dg.model_params(tied())


def test_dgate_report_names_the_layer_a_cut_breaks(tmp_path):
    """`dgate report` on a cut the slim model cannot run (a size torch.export wrote as a number) says
    where it fails and which gated set's cut did it (it said "the layers named there", naming none)."""
    from test_cli import dgate
    (tmp_path / "features.yaml").write_text("D: 3\ngroups:\n  - kind: features\n")
    gated_path = tmp_path / "gated.safetensors"
    dgate("convert", "test_errors:SizeAsLiteral", "--input-shape", "2,3,5", "-r", tmp_path / "features.yaml",
          "-o", gated_path)
    gated = dg.load_gated(gated_path, trust_code=True)
    with torch.no_grad():
        dg.gates(gated)[0].factors[0, 1] = 0
    dg.save_gated(gated, gated_path)
    result = dgate("report", gated_path, "--trust-code", ok=False)
    assert result.exit_code == 1
    assert ("Error: a cut at threshold 1e-05 gives a model that does not run on the example inputs: the forward of "
            "SizeAsLiteral itself fails: a size its forward uses did not follow the cut of 'x' (features) "
            "(RuntimeError: shape '[2, 2, 1]' is invalid for input of size 6)") in " ".join(result.output.split())
