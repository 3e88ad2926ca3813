"""The residual stream (``hidden``) under every RMS norm formula of transformers 5, found from the
norm's behaviour, and under pre-LayerNorm through the opt-in centring (issue 19 item 3)."""
import importlib
import inspect
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import dgating_surgery as dg
from dgating_surgery.engine.centering import CenteredLayerNorm
from dgating_surgery.engine.rules.normalization import RMS_FORMULAS, rms_norm_of

from conftest import assert_exact_cut

T = pytest.importorskip("transformers")
HIDDEN = {"D": 3, "groups": [{"kind": "hidden"}]}
CENTRED = {"D": 3, "groups": [{"kind": "hidden", "center_layernorm": True}]}
NO_CACHE = {"use_cache": False}


class NormNet(nn.Module):
    """A residual stream under a given norm class (two norms, a residual MLP, a head)."""

    def __init__(self, norm, width=20):
        super().__init__()
        self.embed, self.fc1, self.fc2, self.head = (nn.Linear(6, width), nn.Linear(width, 16), nn.Linear(16, width),
                                                     nn.Linear(width, 3))
        self.norm1, self.norm2 = norm(width), norm(width)

    def forward(self, x):
        h = self.embed(x)
        h = h + self.fc2(torch.relu(self.fc1(self.norm1(h))))
        return self.head(self.norm2(h))


def _rms_norm_classes():
    """Every class named *RMSNorm in transformers' modeling modules (those files that define one)."""
    root = Path(T.__file__).parent / "models"
    found = {}
    for path in sorted(root.glob("*/modeling_*.py")):
        if not re.search(r"^class \w+RMSNorm\(", path.read_text(), re.M):
            continue
        try:
            module = importlib.import_module(f"transformers.models.{path.parent.name}.{path.stem}")
        except Exception:  # noqa: BLE001 - a modeling module needing an optional dependency
            continue
        for name, cls in vars(module).items():
            if name.endswith("RMSNorm") and isinstance(cls, type) and cls.__module__ == module.__name__:
                found[name] = cls
    return found


def _build(cls):
    """An instance over 20 channels, or None when the constructor does not take (hidden_size, eps)."""
    try:
        return cls(20, eps=1e-5)
    except TypeError:
        return None


def test_every_rms_norm_of_transformers_is_recognised_and_cut_exactly_or_refused_with_a_reason():
    """Each class is recognised (one of the formulas) or refused with a reason; one class per distinct
    forward (and _norm) code is cut end to end with 30% of its stream dead."""
    classes = _rms_norm_classes()
    assert len(classes) > 150
    formulas, refused, checked = {}, {}, set()
    for name, cls in classes.items():
        norm = _build(cls)
        if norm is None:
            continue
        found = rms_norm_of(norm)
        if isinstance(found, str):
            refused[name] = found
            continue
        formulas.setdefault(found[1].text, []).append(name)
        code = "".join(re.sub(r"#.*|\s+", " ", inspect.getsource(f)) for f in (cls.forward, getattr(cls, "_norm", None)) if f)
        if code not in checked:  # the code that computes the output: the same code behaves the same
            checked.add(code)
            x = torch.randn(4, 6)
            check = assert_exact_cut(NormNet(lambda w: cls(w, eps=1e-5)).eval(), x, HIDDEN)
            assert check.groups_gated == 20 and check.groups_cut == 6, (name, check)
    assert {f.text for f in RMS_FORMULAS[:2]} <= formulas.keys()
    assert "GemmaRMSNorm" in formulas["(1 + w) * x / sqrt(mean(x^2) + eps)"]
    assert "LlamaRMSNorm" in formulas["w * x / sqrt(mean(x^2) + eps)"]
    assert sum(map(len, formulas.values())) > 170 and len(checked) > 5
    # the ones that are not an RMS norm a cut can rescale, each with its reason
    assert refused.keys() == {"FalconMambaWeightlessRMSNorm", "MuseSparkTextInputScaledRMSNorm"}, refused
    assert "no 1-D weight parameter" in refused["FalconMambaWeightlessRMSNorm"]
    assert "follows none of the RMS norm formulas" in refused["MuseSparkTextInputScaledRMSNorm"]


class EpsOutside(nn.Module):
    """An RMS norm with epsilon outside the square root and a (1 + w) weight, in float32."""

    def __init__(self, width, eps=1e-5):
        super().__init__()
        self.weight, self.epsilon = nn.Parameter(torch.zeros(width)), eps

    def forward(self, x):
        h = x.float()
        return ((1 + self.weight) * h / (h.pow(2).mean(-1, keepdim=True).sqrt() + self.epsilon)).to(x.dtype)


class NotRms(nn.Module):
    """Looks like one (a mean of squares), but scales before it normalizes: no rescale keeps it."""

    def __init__(self, width, eps=1e-5):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(width)), eps

    def forward(self, x):
        h = x * self.weight
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)


def test_epsilon_outside_the_root_is_found_and_cut_exactly():
    assert rms_norm_of(EpsOutside(8)) == ("epsilon", RMS_FORMULAS[3])
    check = assert_exact_cut(NormNet(EpsOutside).eval(), torch.randn(4, 6), HIDDEN)
    assert check.groups_cut == 6


def test_a_norm_no_formula_fits_keeps_its_groups_with_the_reason():
    plan = dg.analyze(NormNet(NotRms), torch.randn(4, 6))
    reasons = {r for s in plan.sets for r in s.reasons if r}
    assert any("NotRms's output follows none of the RMS norm formulas" in r for r in reasons), reasons
    assert not any(s.kind == "hidden" for s in plan.sets)


def test_gemma_hidden_is_cut_exactly():
    """Gemma's (1 + w) norm: its own rescale, w' = (1 + w) * sqrt(d/d') - 1 (the Llama rescale is off by 8%)."""
    config = T.GemmaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                           num_key_value_heads=1, intermediate_size=32, head_dim=16)
    ids = torch.randint(0, 100, (1, 9), generator=torch.Generator().manual_seed(0))
    check = assert_exact_cut(T.GemmaForCausalLM(config).eval(), (ids,), HIDDEN, example_kwargs=NO_CACHE)
    assert check.groups_gated == 32 and check.groups_cut == 9


def test_gemma_reloads_its_hidden_cut_with_the_embedding_scale_it_was_cut_with(tmp_path):
    """Gemma scales its embeddings by sqrt(config.hidden_size): a config stating the cut hidden size
    rebuilt another scale, and from_pretrained gave other logits (4% of their scale) without a word.
    The field keeps its value and the widths go under our key."""
    config = T.GemmaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                           num_key_value_heads=1, intermediate_size=32, head_dim=16)
    model = T.GemmaForCausalLM(config).eval()
    dg.expose_weights(model, 0)
    ids = torch.randint(0, 100, (1, 9), generator=torch.Generator().manual_seed(0))
    gated = dg.gate_model(model, HIDDEN, example_kwargs={"input_ids": ids, **NO_CACHE})
    with torch.no_grad():
        dg.gates(gated)[0].factors[:, :10] = 0
        reference = gated(ids, **NO_CACHE).logits
    slim = dg.shrink(gated)
    slim.save_pretrained(tmp_path)
    back = T.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert back.model.embed_tokens.weight.shape == (100, 22)
    assert back.config.hidden_size == 32  # the field that sizes the embedding scale keeps its value
    with torch.no_grad():
        for inputs in (ids, UNSEEN_IDS):
            want = reference if inputs is ids else slim(inputs, **NO_CACHE).logits  # slim == gated, verified
            got = back(inputs, **NO_CACHE).logits
            assert float((got - want).abs().max() / want.abs().max()) < 1e-4


# -- pre-LayerNorm: the opt-in centring ---------------------------------------------------------------
def gpt2(tie=False):
    config = T.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=32, tie_word_embeddings=tie)
    return T.GPT2LMHeadModel(config).eval()


def vit():
    config = T.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=48)
    return T.ViTForImageClassification(config).eval()


IDS = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(0))
UNSEEN_IDS = torch.randint(0, 100, (3, 17), generator=torch.Generator().manual_seed(1))
PIXELS = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
UNSEEN_PIXELS = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 3


def _output(model, x):
    out = model(x, **NO_CACHE) if x.dtype == torch.long else model(x)
    return out.logits


@pytest.mark.parametrize("build, x, unseen", [(gpt2, IDS, UNSEEN_IDS), (vit, PIXELS, UNSEEN_PIXELS)], ids=["gpt2", "vit"])
def test_centred_layernorm_stream_is_cut_exactly(build, x, unseen, tmp_path):
    """Centring keeps the function, every LayerNorm becomes a CenteredLayerNorm, 30% of the stream
    dead is cut exactly (also on inputs shrink never saw), and both round trips rebuild the norms."""
    model = dg.expose_weights(build())
    kwargs = NO_CACHE if x.dtype == torch.long else None
    reference = _output(model, unseen)
    gated = dg.gate_model(model, CENTRED, (x,), kwargs)
    assert dg.max_rel_diff(reference, _output(gated, unseen)) < 1e-5
    norms = [m for m in gated.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 5 and all(isinstance(m, CenteredLayerNorm) for m in norms)
    (hidden,) = dg.gates(gated)
    assert hidden.kind == "hidden" and hidden.num_groups == 32
    assert dg.kill_random_groups(gated, 0.3, seed=2) == 9
    before, before_unseen = _output(gated, x), _output(gated, unseen)
    removable, params = dg.sparsity(gated).params_removable, dg.model_params(gated)
    slim = dg.shrink(gated)
    assert params - dg.model_params(slim) == removable > 0
    assert dg.max_rel_diff(before, _output(slim, x)) < 1e-4
    assert dg.max_rel_diff(before_unseen, _output(slim, unseen)) < 1e-4
    widths = {m.weight.numel() for m in slim.modules() if isinstance(m, CenteredLayerNorm)}
    assert widths == {23 if build is gpt2 else 24}  # ViT's config keeps the width a multiple of its 4 heads
    slim.save_pretrained(tmp_path / "hf")
    again = type(slim).from_pretrained(tmp_path / "hf").eval()
    assert sum(type(m) is CenteredLayerNorm for m in again.modules()) == 5
    assert dg.max_rel_diff(before_unseen, _output(again, unseen)) < 1e-4
    dg.save_slim(slim, tmp_path / "slim.safetensors")
    loaded = dg.load_slim(tmp_path / "slim.safetensors", model=build())
    assert sum(type(m) is CenteredLayerNorm for m in loaded.modules()) == 5
    assert dg.max_rel_diff(before_unseen, _output(loaded, unseen)) < 1e-4


def test_without_the_opt_in_a_layernorm_stream_is_not_gated():
    with pytest.raises(dg.GatingError, match=r"matched nothing in GPT2LMHeadModel; GPT2LMHeadModel has no exactly removable hidden"):
        dg.gate_model(gpt2(), HIDDEN, (IDS,), NO_CACHE)


def test_post_layernorm_bert_is_refused_with_the_reason_and_left_as_it_was():
    config = T.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                          intermediate_size=48)
    model = T.BertModel(config).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(dg.GatingError, match=r"^the residual stream is the output of the LayerNorm .*: a post-LayerNorm model"):
        dg.gate_model(model, CENTRED, (IDS,))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert not any(type(m) is CenteredLayerNorm for m in model.modules())


def test_a_gate_model_that_fails_after_centring_undoes_it():
    model = dg.expose_weights(gpt2())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(dg.GatingError, match=r"groups\[0\] \{kind: hidden, names: \['nothing\*'\]\} matched nothing"):
        dg.gate_model(model, {"D": 3, "groups": [{"kind": "hidden", "center_layernorm": True, "names": ["nothing*"]}]},
                      (IDS,), NO_CACHE)
    assert all(type(m) is nn.LayerNorm for m in model.modules() if isinstance(m, nn.LayerNorm))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items()) and not hasattr(model, "centered_layernorms")


def test_a_tied_embedding_is_refused_with_the_reason():
    with pytest.raises(dg.GatingError, match=r"'transformer.wte.weight' writes into the residual stream and is also "
                                             r"used elsewhere \(a tied weight\).*untie it first"):
        dg.gate_model(gpt2(tie=True), CENTRED, (IDS,), NO_CACHE)


def test_center_layernorm_belongs_to_hidden_only():
    with pytest.raises(dg.RecipeError, match=r"groups\[0\]\.center_layernorm"):
        dg.load_recipe({"D": 3, "groups": [{"kind": "neurons", "center_layernorm": True}]})
    assert dg.load_recipe(CENTRED).to_dict()["groups"] == [{"kind": "hidden", "center_layernorm": True}]
