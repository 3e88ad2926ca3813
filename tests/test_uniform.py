"""Uniform widths (issue 20): ``shrink(uniform=True)`` gives every layer a config states one width for
the same width, the config fields are rewritten, and ``save_pretrained`` writes an ordinary checkpoint:
a process where dgating_surgery cannot be imported loads it with the stock class and gets the gated
model's outputs (causal LMs: the same greedy tokens with the KV cache). Per-layer widths are also
written as transformers' ``per_layer_config``, which round-trips through its config classes."""
import json
import subprocess
import sys

import pytest
import torch

import dgating_surgery as dg

T = pytest.importorskip("transformers")

IDS = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(0))
PIXELS = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
ALL = {"D": 3, "groups": [{"kind": "heads"}, {"kind": "neurons"}, {"kind": "hidden"}]}
HEADS_NEURONS = {"D": 3, "groups": [{"kind": "heads"}, {"kind": "neurons"}]}
SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=8, intermediate_size=96)


def _family(name):
    """(model, recipe, example inputs, example kwargs, whether it generates)."""
    if name == "llama":  # grouped-query attention (2 query heads per key/value head) and the hidden kind
        return T.LlamaForCausalLM(T.LlamaConfig(vocab_size=100, num_key_value_heads=4, **SMALL)), ALL, True
    if name == "qwen2":
        return T.Qwen2ForCausalLM(T.Qwen2Config(vocab_size=100, num_key_value_heads=4, **SMALL)), ALL, True
    if name == "gpt2":
        return T.GPT2LMHeadModel(T.GPT2Config(n_embd=64, n_layer=2, n_head=8, n_inner=96, vocab_size=100)), \
            HEADS_NEURONS, True
    if name == "bert":
        return T.BertModel(T.BertConfig(vocab_size=100, **SMALL)), HEADS_NEURONS, False
    if name == "vit":
        return T.ViTModel(T.ViTConfig(image_size=32, patch_size=8, **SMALL)), HEADS_NEURONS, False
    raise ValueError(name)


def _inputs(name):
    args = (PIXELS,) if name == "vit" else (IDS,)
    return args, ({"use_cache": False} if name in ("llama", "qwen2", "gpt2") else {})


def _output(model, name, args, kwargs):
    out = model(*args, **kwargs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _gated(name, seed=0):
    """The family gated, a random 30% of every gate zeroed, and layer 0 losing more (uneven widths)."""
    torch.manual_seed(seed)
    model, recipe, generates = _family(name)
    args, kwargs = _inputs(name)
    gated = dg.gate_model(dg.expose_weights(model.eval()), recipe, args, kwargs)
    dg.kill_random_groups(gated, 0.3, seed=seed)
    with torch.no_grad():
        for dgate in dg.gates(gated):
            if ".0." in dgate.name or dgate.name.startswith("model.layers.0"):
                alive = (dgate.factors[0] != 0).nonzero().reshape(-1)
                dgate.factors[0, alive[: max(1, len(alive) // 4)]] = 0.0
    return gated, args, kwargs, generates


LOAD_STOCK = r"""
import json, sys
class NoDgating:  # dgating_surgery cannot be imported here, whatever sys.path holds
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "dgating_surgery":
            raise ImportError("dgating_surgery is blocked in this process")
sys.meta_path.insert(0, NoDgating())
import torch, warnings
warnings.simplefilter("ignore")
import transformers as T
results = {}
for directory, generates in json.loads(sys.argv[1]):
    saved = torch.load(directory + "/reference.pt")
    cls = T.AutoModelForCausalLM if generates else T.AutoModel
    model = cls.from_pretrained(directory).eval()
    with torch.no_grad():
        out = model(*saved["args"], **saved["kwargs"])
        out = out.logits if hasattr(out, "logits") else out.last_hidden_state
    row = {"class": type(model).__name__, "diff": float((out - saved["output"]).abs().max()),
           "scale": float(saved["output"].abs().max())}
    if generates:
        tokens = model.generate(saved["args"][0], max_new_tokens=6, do_sample=False, use_cache=True)
        row["tokens_equal"] = bool(torch.equal(tokens, saved["tokens"]))
    results[directory] = row
try:
    import dgating_surgery
    results["blocked"] = False
except ImportError:
    results["blocked"] = "dgating_surgery" not in sys.modules
print(json.dumps(results))
"""

FAMILIES = ["llama", "qwen2", "gpt2", "bert", "vit"]


def _load_stock(runs) -> dict:
    """Each (directory, generates) loaded in a process where dgating_surgery cannot be imported."""
    done = subprocess.run([sys.executable, "-c", LOAD_STOCK, json.dumps(runs)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert results.pop("blocked") is True
    return results


def test_uniform_slim_checkpoints_load_in_stock_transformers(tmp_path):
    runs, expect = [], {}
    for name in FAMILIES:
        gated, args, kwargs, generates = _gated(name)
        per_layer = dg.plan_cut(gated)
        with torch.no_grad():
            reference = _output(gated, name, args, kwargs)
            tokens = gated.generate(IDS, max_new_tokens=6, do_sample=False, use_cache=True) if generates else None
        slim = dg.shrink(gated, uniform=True)
        assert "dgating_surgery" not in slim.config.to_dict(), name  # the config states every width
        expect[name] = _check_widths(name, slim, per_layer)
        directory = tmp_path / name
        slim.save_pretrained(directory)
        torch.save({"args": args, "kwargs": kwargs, "output": reference, "tokens": tokens}, directory / "reference.pt")
        runs.append((str(directory), generates))
    results = _load_stock(runs)
    for (directory, generates), name in zip(runs, FAMILIES):
        row = results[directory]
        assert row["diff"] <= 1e-4 * row["scale"], (name, row)
        assert row.get("tokens_equal", True), (name, row)
        assert row["class"] == type(_family(name)[0]).__name__


def _check_widths(name, slim, per_layer):
    """Every layer has one width per kind, below the full width where the config can say so."""
    layers = slim.model.layers if name in ("llama", "qwen2") else (
        slim.transformer.h if name == "gpt2" else slim.encoder.layer if name == "bert" else slim.layers)
    if name in ("llama", "qwen2"):
        config = slim.config
        widths = {(l.self_attn.q_proj.out_features, l.self_attn.k_proj.out_features, l.mlp.gate_proj.out_features)
                  for l in layers}
        assert widths == {(config.num_attention_heads * 8, config.num_key_value_heads * 8, config.intermediate_size)}
        assert config.num_attention_heads == 2 * config.num_key_value_heads < 8  # GQA: whole kv groups
        assert config.intermediate_size < 96 and config.hidden_size < 64
        if name == "llama":  # LlamaConfig demands it (Qwen2Config does not)
            assert config.hidden_size % config.num_attention_heads == 0
        assert slim.model.embed_tokens.embedding_dim == config.hidden_size
        dead = sum(int(d.sum()) for d in per_layer.dead.values())
        assert dead > 0
    elif name == "gpt2":  # head width is n_embd / n_head: no config states fewer heads, so every head stays
        assert {l.attn.c_attn.nf for l in layers} == {3 * 64} and {l.mlp.c_fc.nf for l in layers} == {slim.config.n_inner}
        assert slim.config.n_inner < 96
    elif name == "bert":  # the same: all_head_size is the hidden size
        assert {l.intermediate.dense.out_features for l in layers} == {slim.config.intermediate_size} != {96}
        assert {l.attention.self.query.out_features for l in layers} == {64}
    else:  # ViT reads its head width from the config: heads are cut, one count for every layer
        config = slim.config
        assert {l.mlp.fc1.out_features for l in layers} == {config.intermediate_size} != {96}
        assert {l.attention.q_proj.out_features for l in layers} == {config.num_attention_heads * config.head_dim}
        assert config.num_attention_heads < 8 and config.head_dim == 8
    return name


def test_uniform_keeps_the_largest_alive_width_with_the_strongest_dead_groups():
    gated, args, kwargs, _ = _gated("llama", seed=3)
    norms = dg.group_norms(gated)
    plain, uniform = dg.plan_cut(gated), dg.plan_cut(gated, uniform=True)
    mlps = [k for k, g in gated.dgates.items() if g.kind == "neurons"]
    alive = [int((~plain.dead[k]).sum()) for k in mlps]
    assert len(set(alive)) > 1  # uneven per-layer widths to begin with
    assert {int((~uniform.dead[k]).sum()) for k in mlps} == {max(alive)}
    for key in plain.dead:
        revived = plain.dead[key] & ~uniform.dead[key]
        assert not (uniform.dead[key] & ~plain.dead[key]).any()  # never kills
        if revived.any() and (plain.dead[key] & uniform.dead[key]).any():
            assert norms[key][revived].min() >= norms[key][plain.dead[key] & uniform.dead[key]].max()
    cost = dg.uniform_cost(gated)
    assert cost.groups == sum(int((plain.dead[k] & ~uniform.dead[k]).sum()) for k in plain.dead) > 0
    assert cost.params == dg.sparsity(gated).params_removable - dg.sparsity(gated, uniform=True).params_removable > 0
    assert dg.sparsity(gated, uniform=True).params_uniform_padding == cost.params
    assert f"{cost.params} parameters" in str(cost)


def test_callbacks_log_what_a_uniform_cut_would_keep_back():
    """Issue 20 item 5: with uniform=True the training callbacks log the padding a uniform cut would
    need now, so a run that must deploy uniform widths can watch it and steer."""
    from dgating_surgery.integrations import CallbackCore
    gated, *_ = _gated("llama", seed=3)
    logged = CallbackCore(model=gated, uniform=True).metrics()
    cost = dg.uniform_cost(gated)
    assert cost.params > 0
    assert logged["dgating/uniform_padding_groups"] == cost.groups
    assert logged["dgating/uniform_padding_params"] == cost.params
    assert "dgating/uniform_padding_params" not in CallbackCore(model=gated).metrics()
    pytest.importorskip("lightning")
    from dgating_surgery.integrations.hf import DGatingCallback as HFCallback
    from dgating_surgery.integrations.lightning import DGatingCallback as LightningCallback
    assert HFCallback(model=gated, uniform=True).core.uniform and LightningCallback(model=gated, uniform=True).core.uniform


def test_per_layer_widths_are_written_as_transformers_per_layer_config(tmp_path):
    gated, args, kwargs, _ = _gated("llama", seed=4)
    reference = _output(gated, "llama", args, kwargs)
    slim = dg.shrink(gated)  # per-layer widths: layer 0 narrower
    widths = [layer.mlp.gate_proj.out_features for layer in slim.model.layers]
    kv = [layer.self_attn.k_proj.out_features // 8 for layer in slim.model.layers]
    assert len(set(widths)) == 2
    slim.save_pretrained(tmp_path)
    config = T.AutoConfig.from_pretrained(tmp_path)  # transformers' own classes read it back
    assert type(config) is T.LlamaConfig and config.is_heterogeneous
    assert [config.per_layer_config[i].intermediate_size for i in range(2)] == widths
    assert [config.per_layer_config[i].num_key_value_heads for i in range(2)] == kv
    again = T.LlamaConfig.from_dict(config.to_dict())
    assert again.to_dict()["per_layer_config"] == json.loads((tmp_path / "config.json").read_text())["per_layer_config"]
    loaded = T.LlamaForCausalLM.from_pretrained(tmp_path).eval()  # dgating_surgery is imported here
    assert dg.max_rel_diff(reference, _output(loaded, "llama", args, kwargs)) < 1e-4


def test_dgate_shrink_and_report_uniform_give_the_cost_and_the_onnx_export_runs_in_onnxruntime(tmp_path):
    """`dgate shrink --uniform --export onnx` on a Llama: one width per layer set, the cost against the
    per-layer cut (as dg.sparsity counts it, and as `dgate report --uniform` foresees it), and where
    onnxruntime is installed, the exported graph computes the gated model's output."""
    from click.testing import CliRunner

    from dgating_surgery.cli import main
    T.LlamaConfig(vocab_size=100, num_key_value_heads=4, **SMALL).save_pretrained(tmp_path / "tiny")
    gated_path, slim_path = tmp_path / "gated.safetensors", tmp_path / "slim.safetensors"
    runner = CliRunner()
    done = runner.invoke(main, ["convert", str(tmp_path / "tiny"), "-r", "llama", "-o", str(gated_path)])
    assert done.exit_code == 0, done.output
    gated = dg.load_gated(gated_path)
    dg.kill_random_groups(gated, 0.3, seed=1)
    with torch.no_grad():
        gated.dgates["layers_0_mlp_gate_proj"].factors[0, :40] = 0.0  # layer 0 narrower
    dg.save_gated(gated, gated_path)
    padding = dg.sparsity(gated).params_removable - dg.sparsity(gated, uniform=True).params_removable
    done = runner.invoke(main, ["shrink", str(gated_path), "-o", str(slim_path), "--uniform", "--export", "onnx",
                                "--json"])
    assert done.exit_code == 0, done.output
    data = json.loads(done.output)
    assert data["uniform_cost"]["params"] == padding > 0 and data["uniform_cost"]["macs"] > 0
    report = runner.invoke(main, ["report", str(gated_path), "--uniform", "--json"])
    assert report.exit_code == 0, report.output
    assert json.loads(report.output)["uniform_cost"] == data["uniform_cost"]  # the same cost, foreseen
    slim = dg.load_slim(slim_path)
    assert len({layer.mlp.gate_proj.out_features for layer in slim.layers}) == 1
    ort = pytest.importorskip("onnxruntime")
    args, kwargs = gated.dgate_origin.inputs.make()
    with torch.no_grad():
        reference = gated(*args, **kwargs).last_hidden_state
    session = ort.InferenceSession(str(slim_path.with_suffix(".onnx")))
    out = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: args[0].numpy()})[0])
    assert float((out - reference).abs().max()) <= 1e-4 * float(reference.abs().max())


PINNED = {  # family -> (config fields the uniform cut must leave as they were, fields it must narrow)
    "phi3": (("num_attention_heads", "num_key_value_heads"), ("hidden_size", "intermediate_size")),  # fused qkv rows
    "falcon": (("hidden_size",), ("ffn_hidden_size",)),  # hidden_size derives the head width and sizes the fused qkv
    "stablelm": (("hidden_size", "num_attention_heads"), ("intermediate_size",)),  # the same, separate q/k/v
    "qwen3": (("hidden_size",), ("intermediate_size",)),  # rms_norm_eps also serves q_norm/k_norm over a head
    "olmo2": (("hidden_size", "num_attention_heads"), ("intermediate_size",)),  # ... and over the heads
}


@pytest.mark.slow  # five families built, cut and reloaded; benchmarks/hf_families.py --uniform runs all 44
def test_uniform_pins_a_field_that_sizes_a_tensor_out_of_proportion_or_shares_an_epsilon(tmp_path):
    """A config field that also sizes a tensor out of proportion (a fused query/key/value projection's
    rows, a head width derived from the hidden size) can state no other value, nor can an epsilon field
    whose norms span widths the cut would narrow differently: their widths stay full, the others are cut
    uniformly, and the directory loads in stock transformers with the gated model's outputs and tokens."""
    from test_heads_families import tiny
    runs = []
    for name, (kept, narrowed) in PINNED.items():
        torch.manual_seed(0)
        model, _ = tiny(name)
        kinds = [{"kind": k} for k in ("heads", "neurons", "hidden")]
        gated = dg.gate_model(dg.expose_weights(model), {"D": 3, "groups": kinds}, (IDS,), {"use_cache": False})
        dg.kill_random_groups(gated, 0.3, seed=0)
        full = {k: getattr(gated.config, k) for k in kept + narrowed}
        with torch.no_grad():
            reference = gated(IDS, use_cache=False).logits
            tokens = gated.generate(IDS, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
        slim = dg.shrink(gated, uniform=True)
        assert "dgating_surgery" not in slim.config.to_dict(), name
        assert {k: getattr(slim.config, k) for k in kept} == {k: full[k] for k in kept}, name
        assert all(getattr(slim.config, k) < full[k] for k in narrowed), (name, slim.config)
        slim.save_pretrained(tmp_path / name)
        torch.save({"args": (IDS,), "kwargs": {"use_cache": False}, "output": reference, "tokens": tokens},
                   tmp_path / name / "reference.pt")
        runs.append((str(tmp_path / name), True))
    results = _load_stock(runs)
    for (directory, _), name in zip(runs, PINNED):
        row = results[directory]
        assert row["diff"] <= 1e-4 * row["scale"] and row["tokens_equal"], (name, row)


def test_shrink_gives_the_model_its_own_config_and_leaves_the_users_object_alone(tmp_path):
    """Models built from one config object: shrinking one rewrites its own copy, never the object the
    others (and any model built from it later) read."""
    config = T.LlamaConfig(vocab_size=100, num_key_value_heads=4, **SMALL)
    before = config.to_dict()
    torch.manual_seed(0)
    a, b = T.LlamaForCausalLM(config).eval(), T.LlamaForCausalLM(config).eval()
    gated = dg.gate_model(dg.expose_weights(a), ALL, (IDS,), {"use_cache": False})
    dg.kill_random_groups(gated, 0.3, seed=0)
    reference = _output(gated, "llama", (IDS,), {"use_cache": False})
    slim = dg.shrink(gated, uniform=True)
    assert slim.config is not config and slim.config.intermediate_size < 96 and slim.config.hidden_size < 64
    assert all(m.config is slim.config for m in slim.modules() if hasattr(m, "config"))
    assert b.config is config and config.to_dict() == before
    c = T.LlamaForCausalLM(config)
    assert c.model.layers[0].mlp.gate_proj.out_features == 96 and c.model.embed_tokens.embedding_dim == 64
    slim.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["intermediate_size"] == slim.config.intermediate_size
    loaded = T.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert dg.max_rel_diff(reference, _output(loaded, "llama", (IDS,), {"use_cache": False})) < 1e-4


@pytest.fixture(scope="module")
def per_layer_directory(tmp_path_factory):
    """A per-layer slim Llama's directory (its config.json carries the dgating_surgery key)."""
    gated, *_ = _gated("llama", seed=4)
    directory = tmp_path_factory.mktemp("slim")
    dg.shrink(gated).save_pretrained(directory)
    assert json.loads((directory / "config.json").read_text())["dgating_surgery"]["shapes"]
    return directory


GATE_PROJ = "model.layers.0.mlp.gate_proj.weight"
CRAFTED = [  # (the key's field, what replaces it, what the error names)
    ("attributes", {"model.layers.0.self_attn.__class__": 1}, "attributes.model.layers.0.self_attn.__class__"),
    ("attributes", {"model.layers.0.self_attn.forward": 1.0}, "not LlamaAttention.forward"),
    ("attributes", {"model.layers.0.self_attn.layer_idx": 1}, "not LlamaAttention.layer_idx"),
    ("attributes", {"model.norm.variance_epsilon": "1e-6"}, "must be a finite number"),
    ("shapes", {GATE_PROJ: [1 << 30, 64]}, f"shapes.{GATE_PROJ}': [1073741824, 64] is not a cut"),
    ("shapes", {GATE_PROJ: [47.5, 64]}, f"shapes.{GATE_PROJ}[0]': must be an integer"),
    ("shapes", {GATE_PROJ: [1] * 9}, "at most 8 sizes"),
    ("shapes", {"model.layers.0.mlp.forward": [2]}, "is not a cut of the tensor the config builds there (not a tensor"),
    ("shapes", {"model.layers.9.mlp.gate_proj.weight": [2, 2]}, "LlamaForCausalLM has no such layer"),
    ("branches", {"model.layers.0.mlp": {"as": "exec", "returns": 1}}, "must be 'bypass' or 'zeros'"),
    ("evil", 1, "'dgating_surgery.evil': unknown field"),
]


@pytest.mark.parametrize("field, value, named", CRAFTED, ids=[c[2][:40] for c in CRAFTED])
def test_a_crafted_config_key_is_refused_before_anything_is_set(per_layer_directory, tmp_path, field, value, named):
    """config.json is data: from_pretrained with dgating_surgery imported checks its key as a manifest
    is checked, and refuses names a cut never writes, shapes no cut leaves, values of other types."""
    from dgating_surgery.errors import CheckpointError
    for item in per_layer_directory.iterdir():
        (tmp_path / item.name).write_bytes(item.read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    config["dgating_surgery"][field] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as info:
        T.LlamaForCausalLM.from_pretrained(tmp_path)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'config.json'}: config field 'dgating_surgery."), message
    assert named in message and "\n" not in message, message


def _word_tokenizer(directory, vocab_size: int) -> list[str]:
    """A word-level tokenizer of ``vocab_size`` words (CTranslate2's converter copies one), the last
    one the special token Qwen2's tokenizer class adds; returns the words by id."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = [f"t{i}" for i in range(vocab_size - 1)] + ["<|endoftext|>"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    T.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="t0", bos_token="t1", eos_token="t2").save_pretrained(
        directory)
    return words


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_a_uniform_slim_model_runs_in_ctranslate2(tmp_path, name):
    """Issue 20 item 3, a serving runtime: CTranslate2 (a wheel) converts the uniform slim directory with
    its transformers converter and gives the gated model's logits (1e-4 of their scale) and greedy tokens.
    Its Llama and Qwen2 converters take the head width as hidden_size / num_attention_heads (they do not
    read config.head_dim), so only the MLP neurons are cut here: a cut of heads or of the hidden size
    converts to another function (docs/deployment.md)."""
    ctranslate2 = pytest.importorskip("ctranslate2")
    from ctranslate2.converters import TransformersConverter
    torch.manual_seed(0)
    model, _, _ = _family(name)
    gated = dg.gate_model(dg.expose_weights(model.eval()), {"D": 3, "groups": [{"kind": "neurons"}]}, (IDS,),
                          {"use_cache": False})
    dg.kill_random_groups(gated, 0.3, seed=0)
    with torch.no_grad():
        gated.dgates["model_layers_0_mlp_gate_proj"].factors[0, :48] = 0.0  # layer 0 narrower: uniform keeps more
    prompt = IDS[:1]
    with torch.no_grad():
        reference = gated(prompt, use_cache=False).logits[0]
        tokens = gated.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)[0, 10:]
    dg.shrink(gated, uniform=True).save_pretrained(tmp_path / "hf")
    vocabulary = _word_tokenizer(tmp_path / "hf", gated.config.vocab_size)
    TransformersConverter(str(tmp_path / "hf")).convert(str(tmp_path / "ct2"), quantization="float32")
    generator = ctranslate2.Generator(str(tmp_path / "ct2"), device="cpu", compute_type="float32")
    words = [vocabulary[i] for i in prompt[0].tolist()]
    logits = torch.from_numpy(__import__("numpy").array(generator.forward_batch([words])))[0]
    assert float((logits - reference).abs().max()) <= 1e-4 * float(reference.abs().max())
    result = generator.generate_batch([words], max_length=8, sampling_topk=1, include_prompt_in_result=False)
    assert [vocabulary.index(w) for w in result[0].sequences[0]] == tokens.tolist()


def test_a_width_set_that_cannot_keep_one_width_is_refused_naming_the_layer_and_widths(monkeypatch):
    """A set whose layers cannot all reach one width (here a unit of 4 positions over layers of 6):
    the cut is refused, naming the layer, its size, the width asked and the set, and the model stays gated."""
    from torch import nn

    from dgating_surgery.engine import constraints

    class Blocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 4)) for _ in range(2))

        def forward(self, x):
            for block in self.blocks:
                x = x + block(x)
            return x

    slots = [constraints.Slot(f"blocks.{i}.0.weight", 0, 4) for i in range(2)]
    monkeypatch.setitem(constraints.WIDTH_SET_FINDERS, Blocks,
                        lambda model, ctx: constraints.WidthSets([constraints.WidthSet("the blocks' width", slots)]))
    torch.manual_seed(0)
    gated = dg.gate_model(Blocks(), {"D": 3, "groups": [{"kind": "neurons"}]}, torch.randn(2, 4))
    with torch.no_grad():
        next(g for g in dg.gates(gated) if g.modules[0] == "blocks.0.0").factors[0, 0] = 0.0  # 5 of 6 kept
    with pytest.raises(dg.ShrinkError, match=r"uniform widths: blocks\.0\.0\.weight \(dim 0\) has 6 positions and "
                                             r"cannot reach 8 \(2 units of 4\), the width the other layers of the "
                                             r"blocks' width keep; shrink without uniform"):
        dg.shrink(gated, uniform=True)
    assert len(list(dg.gates(gated))) == 2 and dg.plan_cut(gated).dead  # still gated; the per-layer cut plans
