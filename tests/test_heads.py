"""Attention heads (issue 9): the heads kind on the transformers people use, grouped-query
attention, the Hugging Face round trip (save_pretrained / from_pretrained / generate with the
cache), and a gated model's state_dict holding only tensors."""
import io
import subprocess
import sys

import pytest
import torch
from torch import nn

import dgating_surgery as dg

from conftest import assert_exact_cut

T = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

RECIPE = {"D": 3, "groups": [{"kind": "heads"}, {"kind": "neurons"}]}
IDS = torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(0))
NO_CACHE = {"use_cache": False}


def _hf(name):
    small = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    if name == "bert":
        return T.BertModel(T.BertConfig(vocab_size=100, **small)), (IDS,), {}
    if name == "vit":
        return T.ViTModel(T.ViTConfig(image_size=32, patch_size=8, **small)), (torch.randn(1, 3, 32, 32),), {}
    if name == "gpt2":
        return (T.GPT2LMHeadModel(T.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_inner=128, vocab_size=100)), (IDS,),
                NO_CACHE)
    if name == "llama":
        return T.LlamaForCausalLM(T.LlamaConfig(vocab_size=100, num_key_value_heads=2, **small)), (IDS,), NO_CACHE
    if name == "qwen2":
        return T.Qwen2ForCausalLM(T.Qwen2Config(vocab_size=100, num_key_value_heads=2, **small)), (IDS,), NO_CACHE
    if name == "t5":
        return (T.T5Model(T.T5Config(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, vocab_size=100)),
                (IDS,), {"decoder_input_ids": IDS, **NO_CACHE})
    raise ValueError(name)


class SelfAttentionNet(nn.Module):
    """nn.MultiheadAttention in a residual block."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, 32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.fc1, self.fc2, self.head = nn.Linear(32, 64), nn.Linear(64, 32), nn.Linear(32, 3)

    def forward(self, x):
        h = self.embed(x)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.head(h + self.fc2(torch.relu(self.fc1(h))))


def _others(name):
    if name == "nn.MultiheadAttention":
        return SelfAttentionNet(), (torch.randn(2, 5, 8),), {}
    if name.startswith("timm/"):
        return timm.create_model(name[5:]), (torch.randn(1, 3, 224, 224),), {}
    if name == "torchvision/VisionTransformer":  # vit_b_16's classes and nn.MultiheadAttention, two layers
        vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4,
                                                   hidden_dim=32, mlp_dim=64)
        return vit, (torch.randn(2, 3, 32, 32),), {}
    return torchvision.models.get_model(name[12:]), (torch.randn(1, 3, 224, 224),), {}


def _heads(model) -> list:
    return [g for g in dg.gates(model) if g.kind == "heads"]


@pytest.mark.parametrize("name, heads_per_layer, layers", [
    ("bert", 4, 2), ("vit", 4, 2), ("gpt2", 4, 2), ("llama", 2, 2), ("qwen2", 2, 2),
    # T5: encoder and decoder self-attention, one set each (every block reuses block 0's position bias);
    # cross-attention, one set (every layer adds the zeros bias shaped by block 0's head count)
    ("t5", 4, 3),
])
def test_transformers_heads_and_neurons_cut_exactly(name, heads_per_layer, layers):
    model, args, kwargs = _hf(name)
    check = assert_exact_cut(model.eval(), args, RECIPE, example_kwargs=kwargs)
    assert check.groups_cut > 0
    model, args, kwargs = _hf(name)
    gated = dg.gate_model(model.eval(), RECIPE, args, kwargs)
    heads = _heads(gated)
    assert len(heads) == layers and all(g.num_groups == heads_per_layer for g in heads), [g.name for g in heads]


@pytest.mark.parametrize("name, min_heads", [
    ("timm/vit_tiny_patch16_224", 12 * 3), ("timm/deit_tiny_patch16_224", 12 * 3),
    ("timm/swin_tiny_patch4_window7_224", 2 * 3 + 2 * 6 + 6 * 12 + 2 * 24),
    ("torchvision/VisionTransformer", 2 * 4), pytest.param("torchvision/vit_b_16", 12 * 12, marks=pytest.mark.slow),
    ("nn.MultiheadAttention", 4),
])
def test_vision_and_torch_attention_heads(name, min_heads):
    model, args, kwargs = _others(name)
    dg.expose_weights(model.eval())
    gated = dg.gate_model(model, RECIPE, args, kwargs)
    assert sum(g.num_groups for g in _heads(gated)) >= min_heads
    model, args, kwargs = _others(name)
    check = assert_exact_cut(model.eval(), args, RECIPE, example_kwargs=kwargs)
    assert check.groups_cut > 0


def test_torchvision_swin_has_no_heads_to_cut():
    """torchvision's Swin computes attention in a wrapped function that takes the head width from the
    input's width: no rule reads it, so its heads are never groups (timm's Swin is cut by heads)."""
    model = torchvision.models.swin_t().eval()
    plan = dg.analyze(model, torch.randn(1, 3, 224, 224))
    assert not [s for s in plan.sets if s.kind == "heads"]
    assert_exact_cut(model, torch.randn(1, 3, 224, 224), RECIPE)  # its MLP neurons still are


def test_grouped_query_attention_cuts_whole_key_value_groups():
    model, args, kwargs = _hf("llama")
    gated = dg.gate_model(model.eval(), RECIPE, args, kwargs)
    first = _heads(gated)[0]
    with torch.no_grad():
        first.factors[0, 1] = 0  # key/value head 1 of layer 0, with the two query heads it serves
    reference = gated(*args, **kwargs).logits
    slim = dg.shrink(gated, example_inputs=args, example_kwargs=kwargs)
    attention = slim.model.layers[0].self_attn
    assert (attention.q_proj.out_features, attention.k_proj.out_features, attention.num_key_value_groups) == (32, 16, 2)
    assert slim.model.layers[1].self_attn.q_proj.out_features == 64
    assert dg.max_rel_diff(reference, slim(*args, **kwargs).logits) < 1e-5


def test_killing_every_head_of_a_layer_keeps_one_and_says_so():
    model, args, kwargs = _hf("llama")
    gated = dg.gate_model(model.eval(), RECIPE, args, kwargs)
    first = _heads(gated)[0]
    with torch.no_grad():
        first.factors[0] = 0
    report = dg.sparsity(gated)
    row = next(r for r in report.rows if r.name == first.name)
    assert row.dead == 1 and row.all_dead and "all dead" in str(report)
    reference = gated(*args, **kwargs).logits
    slim = dg.shrink(gated, example_inputs=args, example_kwargs=kwargs)
    assert slim.model.layers[0].self_attn.k_proj.out_features == 16
    assert dg.max_rel_diff(reference, slim(*args, **kwargs).logits) < 1e-5


@pytest.mark.parametrize("name", ["gpt2", "llama", "qwen2"])
def test_generate_with_the_cache_gives_the_same_tokens(name):
    model, args, kwargs = _hf(name)
    dg.expose_weights(model.eval())
    gated = dg.gate_model(model, RECIPE, args, kwargs)
    dg.kill_random_groups(gated, 0.3, seed=1)
    tokens = gated.generate(IDS, max_new_tokens=8, do_sample=False, use_cache=True)
    slim = dg.shrink(gated, example_inputs=args, example_kwargs=kwargs)
    assert torch.equal(slim.generate(IDS, max_new_tokens=8, do_sample=False, use_cache=True), tokens)


RELOAD = """
import sys, torch, warnings
warnings.simplefilter("ignore")
if sys.argv[2] == "with":
    import dgating_surgery
import transformers as T
reference = torch.load(sys.argv[1] + "/reference.pt")
for cls in (T.LlamaForCausalLM, T.AutoModelForCausalLM):
    try:
        model = cls.from_pretrained(sys.argv[1]).eval()
    except RuntimeError as exc:
        print("refused", str(exc).splitlines()[0][:80])
        continue
    print(cls.__name__, float((model(reference["ids"], use_cache=False).logits - reference["logits"]).abs().max()))
"""


def test_save_pretrained_and_from_pretrained_round_trip(tmp_path):
    model, args, kwargs = _hf("llama")
    dg.expose_weights(model.eval())
    gated = dg.gate_model(model, "llama", args, kwargs)  # heads, neurons and the residual stream
    dg.kill_random_groups(gated, 0.4, seed=2)
    slim = dg.shrink(gated, example_inputs=args, example_kwargs=kwargs)
    widths = [layer.mlp.down_proj.in_features for layer in slim.model.layers]
    assert widths != [128, 128] and slim.model.embed_tokens.embedding_dim < 64
    slim.save_pretrained(tmp_path)
    torch.save({"ids": IDS, "logits": slim(IDS, use_cache=False).logits}, tmp_path / "reference.pt")
    runs = {mode: subprocess.run([sys.executable, "-c", RELOAD, str(tmp_path), mode], capture_output=True, text=True,
                                 check=True).stdout.split("\n") for mode in ("with", "without")}
    assert runs["with"][:2] == ["LlamaForCausalLM 0.0", "AutoModelForCausalLM 0.0"], runs["with"]
    assert all(line.startswith("refused") for line in runs["without"][:2]), runs["without"]  # loudly, never wrong


def test_gated_state_dict_holds_only_tensors(tmp_path):
    from safetensors.torch import load_file, save_file
    model, args, kwargs = _hf("gpt2")
    gated = dg.gate_model(model.eval(), RECIPE, args, kwargs)
    state = gated.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    save_file({k: v.contiguous() for k, v in state.items() if k != "lm_head.weight"}, tmp_path / "gated.safetensors")
    assert set(load_file(tmp_path / "gated.safetensors")) == set(state) - {"lm_head.weight"}
    gated.save_pretrained(tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").exists()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True).keys() == state.keys()  # a Trainer checkpoint loads it so


def test_legacy_onnx_export_of_a_gated_model(tmp_path):
    pytest.importorskip("onnx")
    model = SelfAttentionNet().eval()
    x = torch.randn(2, 5, 8)
    gated = dg.gate_model(model, RECIPE, x)
    with torch.no_grad():  # gates away from their balanced values, so that a mis-folded gate shows
        for g in dg.gates(gated):
            g.factors.mul_(torch.rand(g.factors.shape, generator=torch.Generator().manual_seed(0)) + 0.5)
        reference = gated(x)
    torch.onnx.export(gated, (x,), str(tmp_path / "gated.onnx"), dynamo=False)
    import onnx
    from onnx.reference import ReferenceEvaluator
    graph = onnx.load(str(tmp_path / "gated.onnx"))
    (out,) = ReferenceEvaluator(graph).run(None, {graph.graph.input[0].name: x.numpy()})
    assert dg.output_diff(reference, torch.from_numpy(out)) <= 1e-5 * reference.abs().max()


@pytest.mark.parametrize("recipe, name, kinds", [("vit", "vit", {"heads", "neurons"}), ("bert", "bert", {"heads", "neurons"}),
                                                ("gpt2", "gpt2", {"heads", "neurons"}),
                                                ("llama", "llama", {"heads", "neurons", "hidden"})])
def test_transformer_recipes(recipe, name, kinds):
    model, args, kwargs = _hf(name)
    check = assert_exact_cut(model.eval(), args, recipe, example_kwargs=kwargs)
    assert check.groups_cut > 0
    model, args, kwargs = _hf(name)
    assert {g.kind for g in dg.gates(dg.gate_model(model.eval(), recipe, args, kwargs))} == kinds


class RMSNormNet(nn.Module):
    """A residual stream under nn.RMSNorm (symbolic tracing keeps the norm as one layer)."""

    def __init__(self):
        super().__init__()
        self.embed, self.norm1, self.fc = nn.Linear(6, 16), nn.RMSNorm(16, eps=1e-3), nn.Linear(16, 16)
        self.norm2, self.head = nn.RMSNorm(16), nn.Linear(16, 3)

    def forward(self, x):
        h = self.embed(x)
        h = h + self.fc(torch.relu(self.norm1(h)))
        return self.head(self.norm2(h))


def test_residual_stream_under_rmsnorm_is_cut_exactly_with_the_norms_rescaled():
    x = torch.randn(4, 6)
    gated = dg.gate_model(dg.expose_weights(RMSNormNet().eval()), {"D": 3, "groups": [{"kind": "hidden"}]}, x)
    (hidden,) = dg.gates(gated)
    assert hidden.kind == "hidden" and hidden.num_groups == 16
    with torch.no_grad():
        hidden.factors[0, :4] = 0
    reference = gated(x)
    slim = dg.shrink(gated, example_inputs=x)
    assert slim.embed.out_features == slim.norm1.weight.numel() == slim.head.in_features == 12
    assert slim.norm1.eps == pytest.approx(1e-3 * 16 / 12) and slim.norm1.normalized_shape == (12,)
    assert dg.max_rel_diff(reference, slim(x)) < 1e-5
    assert dg.analyze(RMSNormNet(), x).sets[1].kind == "hidden"  # never cut unless a recipe asks for it
    with pytest.raises(dg.GatingError, match="matched nothing"):  # channels and neurons: the stream is not among them
        dg.gate_model(RMSNormNet(), "default", x)
