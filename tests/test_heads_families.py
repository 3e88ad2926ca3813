"""Heads across Hugging Face families (issue 19): a plugin row never makes a model less cuttable, and
the attention spellings of transformers 5 cut exactly (tiny configs, random weights)."""
import copy
import inspect

import pytest
import torch

import dgating_surgery as dg

from conftest import assert_exact_cut

T = pytest.importorskip("transformers")

# one tiny size for every config field that states a width (a field a config class lacks is not passed)
TINY = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=96, head_dim=16, max_position_embeddings=64, n_positions=64, d_kv=16, d_ff=96,
            num_layers=2, num_heads=4, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=96, decoder_ffn_dim=96, d_model=64, ffn_dim=96, n_inner=96,
            moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=4, num_local_experts=4,
            num_experts_per_tok=2, image_size=32, patch_size=8, rotary_dim=8, embedding_size=64,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
FAMILY = {"gpt_neo": {"attention_types": [[["global", "local"], 1]]}}  # what a family's own validation asks
IDS = torch.randint(3, 100, (1, 12), generator=torch.Generator().manual_seed(0))


def tiny(family: str, **overrides):
    """The family's model (causal LM, else seq2seq LM, else base model, from transformers' auto
    mappings) on a tiny config, and its role: causal, seq2seq, base or vision."""
    from transformers.models.auto import modeling_auto as auto
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    config_class = CONFIG_MAPPING[family]
    default = config_class()
    settable = {k: v for k, v in TINY.items() if hasattr(default, k)
                and getattr(getattr(config_class, k, None), "fset", True) is not None}  # not a derived property
    config = config_class(**{**settable, **FAMILY.get(family, {}), **overrides})
    for role, mapping in (("causal", auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
                          ("seq2seq", auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES),
                          ("base", auto.MODEL_MAPPING_NAMES)):
        if family in mapping:
            model = getattr(T, mapping[family])(config).eval()
            if role == "base" and "pixel_values" in inspect.signature(model.forward).parameters:
                role = "vision"
            return model, role
    raise KeyError(f"{family}: no model class in the auto mappings")


def example(role: str):
    if role == "vision":
        return (torch.randn(1, 3, 32, 32),), {}
    kwargs = {} if role == "base" else {"use_cache": False}
    return (IDS,), {**kwargs, **({"decoder_input_ids": IDS[:, :7]} if role == "seq2seq" else {})}


def _removable(model, args, kwargs) -> dict:
    return {(s.kind, s.name): s.removable.tolist() for s in dg.analyze(model, args, kwargs).sets}


def _rows():
    from dgating_surgery.plugins.transformers import ATTRIBUTE_FIXERS
    return sorted(ATTRIBUTE_FIXERS)


def _assert_only_adds(model, args, kwargs, remove) -> None:
    """Every group removable once ``remove(registered fixers)`` has taken some fixers away was
    removable with them."""
    from dgating_surgery.engine import fixers
    with_fixers = _removable(model, args, kwargs)
    remove(fixers.MODULE_FIXERS)
    without = _removable(model, args, kwargs)
    for kind in {kind for kind, _ in with_fixers}:
        count = lambda plan: sum(sum(r) for (k, _), r in plan.items() if k == kind)  # noqa: E731
        assert count(with_fixers) >= count(without), (kind, with_fixers, without)
    for key in with_fixers.keys() & without.keys():
        assert all(w or not wo for w, wo in zip(with_fixers[key], without[key])), (key, with_fixers[key], without[key])
    assert any(any(r) for r in with_fixers.values())


FAST_ROWS = {"GPT2Attention", "LlamaMLP", "Qwen3MLP", "MixtralExperts"}  # the rest: python -m pytest -m slow


@pytest.mark.parametrize("row", [r if r[1] in FAST_ROWS else pytest.param(r, marks=pytest.mark.slow) for r in _rows()],
                         ids=lambda row: row[1])
def test_a_fixer_row_never_makes_a_model_less_cuttable(row, monkeypatch):
    """Each attribute-fixer row of the transformers plugin, both ways: every group removable without
    it is removable with it (a row may only add: GPT-2's lets its views follow the head count).
    Qwen3's attention row took its heads: a fixer lets a view's literal head_dim follow a cut, and
    the head split behind the per-head q_norm was not found, so the groups went on head_dim."""
    from dgating_surgery.plugins import transformers as plugin
    module_name, class_name = row
    family = module_name.rsplit(".modeling_", 1)[1]
    model, role = tiny(family)
    cls = next((c for c in map(type, model.modules()) if c.__name__ == class_name), None)
    if cls is None:
        pytest.skip(f"the tiny {family} model has no {class_name} layer")

    def remove(registered):
        monkeypatch.delitem(plugin.ATTRIBUTE_FIXERS, row)
        monkeypatch.delitem(registered, cls)
    _assert_only_adds(model, *example(role), remove)


# attention classes no row names; Persimmon's fused qkv is viewed (B, T, H, 3, Dh) and selected
ROW_LESS = ["opt", "stablelm", "bart", "distilbert", "gptj", "olmo", "persimmon", "codegen"]


@pytest.mark.parametrize("family", ["llama", "qwen3", "t5", "opt", *(pytest.param(f, marks=pytest.mark.slow) for f in
                                    ["bert", "falcon", *ROW_LESS[1:]])])
def test_the_attention_count_rule_never_makes_a_model_less_cuttable(family, monkeypatch):
    """The one attention fixer (head counts from the projections' widths), registered for every
    ``*Attention`` class, both ways on families with and without their own row."""
    from dgating_surgery.plugins import transformers as plugin
    model, role = tiny(family)

    def remove(registered):
        monkeypatch.setattr(plugin, "_attention_classes", list)
        for cls in [c for c, fix in registered.items() if fix is plugin._attention_counts]:
            monkeypatch.delitem(registered, cls)
    _assert_only_adds(model, *example(role), remove)


@pytest.mark.parametrize("family", ROW_LESS)
def test_heads_of_attention_classes_without_a_row_cut_exactly(family):
    """OPT, StableLM (partial rotary), BART, DistilBERT, GPT-J and OLMo view their projections with the
    layer's own head count (``self.num_heads``): a literal of the code unless a fixer keeps it up to
    date. The attention count rule does, for every attention class: all their heads are removable."""
    model, role = tiny(family)
    args, kwargs = example(role)
    heads = [s for s in dg.analyze(model, args, kwargs).sets if s.kind == "heads"]
    assert heads and all(s.removable.all() for s in heads), [(s.name, set(s.reasons)) for s in heads]
    check = assert_exact_cut(model, args, {"D": 3, "groups": [{"kind": "heads"}]}, fraction=0.5, example_kwargs=kwargs)
    assert check.groups_cut >= len(heads)


@pytest.mark.parametrize("family", ["qwen3"])
def test_heads_behind_a_per_head_norm_cut_exactly(family):
    """Qwen3 normalises each head's queries and keys over head_dim (q_norm, k_norm) between the split
    and the attention: every key/value group is removable and cut exactly."""
    model, role = tiny(family)
    args, kwargs = example(role)
    heads = [s for s in dg.analyze(model, args, kwargs).sets if s.kind == "heads"]
    assert [s.removable.tolist() for s in heads] == [[True, True]] * 2
    check = assert_exact_cut(model, args, {"D": 3, "groups": [{"kind": "heads"}]}, fraction=0.5, example_kwargs=kwargs)
    assert check.groups_cut == 2  # one of each layer's two


def test_the_attention_count_rule_keeps_what_it_cannot_derive():
    """Falcon (multi-query, one fused projection): the rule derives the head count from the output
    projection and leaves the key/value head count and head size alone, so the views that use them
    stay fixed and the neurons cut exactly (a fixer that claimed them broke the slim forward)."""
    model, role = tiny("falcon")
    args, kwargs = example(role)
    check = assert_exact_cut(model, args, {"D": 3, "groups": [{"kind": "neurons"}]}, example_kwargs=kwargs)
    assert check.groups_cut > 0
    assert model.transformer.h[0].self_attention.num_kv_heads == 1


def test_t5_cross_attention_heads_cut_exactly():
    """T5's cross-attention has no position table: its first layer adds ``zeros((1, self.n_heads, T, S))``,
    which every later layer reuses. A tensor built with a kept head count shrinks with the heads it meets,
    so the cross-attention heads are removable (tied across the decoder's layers by the shared tensor)."""
    model, role = tiny("t5")
    args, kwargs = example(role)
    heads = [s for s in dg.analyze(model, args, kwargs).sets if s.kind == "heads"]
    cross = [s for s in heads if any("EncDecAttention" in m for m in s.modules)]
    assert len(heads) == 3 and len(cross) == 1 and cross[0].removable.tolist() == [True] * 4
    check = assert_exact_cut(model, args, {"D": 3, "groups": [{"kind": "heads"}]}, fraction=0.5, example_kwargs=kwargs)
    assert check.groups_cut == 6
    layers = model.decoder.block
    assert [b.layer[1].EncDecAttention.n_heads for b in layers] == [2, 2]


def _padded(length: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(2, length, dtype=torch.long)
    mask[0, :3] = 0
    return {"input_ids": torch.randint(3, 100, (2, length), generator=gen), "attention_mask": mask, "use_cache": False}


def _cut_second_kv_group_of_layer_0(model):
    """Gate heads (two key/value groups per layer), zero layer 0's second and cut: (the slim model,
    unseen padded inputs, the gated model's logits on them, a prompt, its greedy tokens with the cache)."""
    dg.expose_weights(model, 1)
    example, unseen = _padded(12, 0), _padded(9, 1)
    gated = dg.gate_model(model, {"D": 3, "groups": [{"kind": "heads"}]}, (), example)
    gates = dg.gates(gated)
    assert [(g.kind, g.num_groups) for g in gates] == [("heads", 2)] * 2
    with torch.no_grad():
        gates[0].factors[0, 1] = 0
    reference = gated(**unseen).logits
    prompt = {k: example[k] for k in ("input_ids", "attention_mask")}
    tokens = gated.generate(**prompt, max_new_tokens=5, do_sample=False, use_cache=True)
    return dg.shrink(gated, example_kwargs=example), unseen, reference, prompt, tokens


def test_phi3_fused_qkv_heads_cut_exactly_per_layer(tmp_path):
    """Phi-3 slices one fused projection at ``query_pos = config.num_attention_heads * head_dim`` and
    ``query_pos + num_key_value_heads * head_dim``: positions where its parts meet, which the attention
    fixer keeps (each layer's config view states its own head counts after the cut), so the slices
    follow the cut and the key/value groups go (layer 0 loses one of two, layer 1 none). Exact on
    padded inputs it never saw, with the same greedy generation and save/from_pretrained round trip."""
    model, role = tiny("phi3")
    slim, unseen, reference, prompt, tokens = _cut_second_kv_group_of_layer_0(model)
    layers = [layer.self_attn for layer in slim.model.layers]
    assert [a.qkv_proj.out_features for a in layers] == [(2 + 2 * 1) * 16, (4 + 2 * 2) * 16]
    assert [(a.config.num_attention_heads, a.num_key_value_heads, a.num_key_value_groups) for a in layers] == \
        [(2, 1, 2), (4, 2, 2)]
    assert slim.config.num_attention_heads == 4 and layers[1].config is slim.config  # the uncut layer reads the model's
    assert dg.max_rel_diff(reference, slim(**unseen).logits) < 1e-5
    assert torch.equal(slim.generate(**prompt, max_new_tokens=5, do_sample=False, use_cache=True), tokens)
    slim.save_pretrained(tmp_path)
    loaded = T.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.model.layers[0].self_attn.config.num_attention_heads == 2
    assert torch.equal(loaded(**unseen).logits, slim(**unseen).logits)
    copied = copy.deepcopy(slim)  # the layer's config view copies with the model, onto the copy's config
    assert type(copied.model.layers[0].self_attn.config) is type(layers[0].config)
    assert copied.model.layers[0].self_attn.config._base is copied.config
    assert torch.equal(copied(**unseen).logits, slim(**unseen).logits)


def test_phi3_heads_under_a_random_cut_are_exact():
    model, role = tiny("phi3")
    args, kwargs = example(role)
    heads = [s for s in dg.analyze(model, args, kwargs).sets if s.kind == "heads"]
    assert heads and all(s.removable.all() for s in heads), [(s.name, set(s.reasons)) for s in heads]
    check = assert_exact_cut(model, args, {"D": 3, "groups": [{"kind": "heads"}]}, fraction=0.5, example_kwargs=kwargs)
    assert check.groups_cut >= 1


FALCON = {"new_decoder_architecture": dict(new_decoder_architecture=True, num_kv_heads=2),
          "multi_query=False": dict(multi_query=False)}


def _falcon(mode: str):
    """Falcon with 8 heads of width 16 (no head size equal to a head count) in the given mode."""
    model, role = tiny("falcon", hidden_size=128, num_attention_heads=8, **FALCON[mode])
    return model, role


def test_falcon_new_decoder_architecture_heads_cut_exactly_per_layer(tmp_path):
    """Falcon's new decoder architecture views its fused projection per key/value group,
    ``(B, T, kv, num_heads // num_kv_heads + 2, head_dim)`` (the group's query heads, its key, its
    value), takes the queries ``[:, :, :, :-2]`` and key and value with constant index tensors
    ``[[-2]]``, ``[[-1]]``, broadcast to the queries: a whole kv group goes (layer 0 loses one of two,
    layer 1 none), exact on padded inputs it never saw, the same greedy generation, save/from_pretrained."""
    model, _ = _falcon("new_decoder_architecture")
    slim, unseen, reference, prompt, tokens = _cut_second_kv_group_of_layer_0(model)
    layers = [block.self_attention for block in slim.transformer.h]
    assert [(a.query_key_value.out_features, a.dense.in_features, a.num_heads, a.num_kv_heads) for a in layers] == \
        [((4 + 2) * 16, 4 * 16, 4, 1), ((8 + 2 * 2) * 16, 8 * 16, 8, 2)]
    assert dg.max_rel_diff(reference, slim(**unseen).logits) < 1e-5
    assert torch.equal(slim.generate(**prompt, max_new_tokens=5, do_sample=False, use_cache=True), tokens)
    slim.save_pretrained(tmp_path)
    loaded = T.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(loaded(**unseen).logits, slim(**unseen).logits)


@pytest.mark.parametrize("mode", list(FALCON))
def test_falcon_heads_under_a_random_cut_are_exact(mode):
    model, role = _falcon(mode)
    args, kwargs = example(role)
    heads = [s for s in dg.analyze(model, args, kwargs).sets if s.kind == "heads"]
    assert [len(s.removable) for s in heads] == [2 if mode == "new_decoder_architecture" else 8] * 2
    assert all(s.removable.all() for s in heads), [(s.name, set(s.reasons)) for s in heads]
    check = assert_exact_cut(model, args, {"D": 3, "groups": [{"kind": "heads"}]}, fraction=0.5, example_kwargs=kwargs)
    assert check.groups_cut >= 2


def test_falcon_multi_query_heads_say_why():
    """Falcon's multi-query attention: every query head reads the one key and value, which stay (the
    slice ``[..., :-2, :]`` counts them from the back), so ``heads`` (whole key/value groups) has
    nothing to cut; ``query_heads`` cuts its query heads (``test_query_heads``)."""
    model, role = tiny("falcon")
    heads = [s for s in dg.analyze(model, *example(role)).sets if s.kind == "heads"]
    assert heads and not any(s.removable.any() for s in heads)
    assert "counted from the back of a grouped dim: its last 2 stay" in next(r for r in heads[0].reasons if r)


@pytest.mark.parametrize("mode", ["multi_query=False", "new_decoder_architecture"])
def test_falcon_alibi_heads_stay_with_the_reason(mode):
    """With ALiBi, Falcon adds per-head slopes computed from the head count to the attention mask: a
    per-head tensor of no group, so no head can go, and the reason says so."""
    model, role = tiny("falcon", hidden_size=128, num_attention_heads=8, alibi=True, **FALCON[mode])
    heads = [s for s in dg.analyze(model, *example(role)).sets if s.kind == "heads"]
    assert heads and not any(s.removable.any() for s in heads)
    assert "holds one slice per head (a per-head bias such as ALiBi's slopes" in next(r for r in heads[0].reasons if r)
