"""Query heads inside key/value groups (issue 19, item 2): a recipe asking for kind ``query_heads``
gates each query head of grouped-query and multi-query attention, and each key/value group; the cut
keeps every kept kv group with the same number of query heads (the ``equal_query_heads`` width
constraint), removes a kv group only with all of its query heads, and stays exact."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dgating_surgery as dg
from dgating_surgery.engine import constraints

from conftest import assert_exact_cut

T = pytest.importorskip("transformers")

QH = {"D": 3, "groups": [{"kind": "query_heads"}]}
HIDDEN, HEADS, HEAD_DIM = 64, 8, 8


FAMILIES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
            "mistral": ("MistralConfig", "MistralForCausalLM"), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
            "gemma": ("GemmaConfig", "GemmaForCausalLM")}  # qwen2: biased q/k/v projections


def _lm(family="llama", kv=2, heads=HEADS, hidden=HIDDEN):
    config, cls = (getattr(T, name) for name in FAMILIES[family])
    model = cls(config(vocab_size=100, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=heads,
                       num_key_value_heads=kv, head_dim=hidden // heads, intermediate_size=96))
    return dg.expose_weights(model.eval(), seed=3)  # norms, biases drawn away from 1 and 0


def _batch(batch, length, seed):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, :2] = 0  # left padding: the attention takes the repeat_kv path with a mask
    return {"input_ids": torch.randint(0, 100, (batch, length), generator=gen), "attention_mask": mask,
            "use_cache": False}


def _gated(model, example, kv=2, heads=HEADS):
    """Gated by query heads; each layer's gate: the query heads in order, then the kv groups (none
    under multi-query attention, whose one kv head stays)."""
    gated = dg.gate_model(model, QH, (), example)
    structure = [heads + h // (heads // kv) for h in range(heads)] + [-1] * kv if kv > 1 else [-2] * heads
    assert [(g.kind, g.kv_of) for g in dg.gates(gated)] == [("query_heads", structure)] * 2
    return gated


def _kill(gate, queries=(), kv_groups=()):
    """Zero these query heads and kv groups of a query_heads gate."""
    with torch.no_grad():
        gate.factors[0, sorted(queries)] = 0
        gate.factors[0, [HEADS + g for g in kv_groups]] = 0


def _expected(kv: int, dead_queries: set, dead_kv: set, bias: bool) -> tuple[int, int, int]:
    """(query heads, kv heads) a layer keeps and the parameters its cut removes: a kv group is kept
    if its gate or one of its query heads is alive; every kept group keeps as many query heads as the
    one keeping the most (at least one)."""
    per = HEADS // kv
    alive = {g: sum(h // per == g and h not in dead_queries for h in range(HEADS)) for g in range(kv)}
    kept = [g for g in range(kv) if g not in dead_kv or alive[g]]
    r = max([1] + [alive[g] for g in kept])
    queries, kvs = r * len(kept), len(kept)
    per_query = 2 * HIDDEN * HEAD_DIM + bias * HEAD_DIM  # its query rows (and bias), its output columns
    per_kv = 2 * (HIDDEN * HEAD_DIM + bias * HEAD_DIM)  # its key and value rows (and biases)
    return queries, kvs, (HEADS - queries) * per_query + (kv - kvs) * per_kv


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_uneven_query_heads_cut_exactly_with_equal_heads_per_kv_group(family):
    model = _lm(family)
    example, unseen = _batch(2, 12, 0), _batch(3, 9, 1)
    gated = _gated(model, example)
    layer0, layer1 = dg.gates(gated)
    dead = [({0, 1, 4}, set()), ({2, 3, 5, 6, 7}, {1})]  # kv 0: 2 and 1 alive; kv 1: 3 and 1 (its own gate dead)
    gen = torch.Generator().manual_seed(7)
    dead[1] = (set(torch.randperm(HEADS, generator=gen)[:5].tolist()), {1}) if family == "qwen2" else dead[1]
    for gate, (queries, kv_groups) in zip((layer0, layer1), dead):
        _kill(gate, queries, kv_groups)
    reference = gated(**unseen).logits
    tokens = gated.generate(example["input_ids"], attention_mask=example["attention_mask"], max_new_tokens=6,
                            do_sample=False, use_cache=True)
    before = sum(p.numel() for p in gated.parameters()) - sum(g.factors.numel() for g in dg.gates(gated))
    slim = dg.shrink(gated, example_kwargs=example)
    removed = 0
    for layer, (queries, kv_groups) in zip(slim.model.layers, dead):
        n_q, n_kv, params = _expected(2, queries, kv_groups, family == "qwen2")
        attention = layer.self_attn
        assert (attention.q_proj.out_features, attention.o_proj.in_features) == (n_q * HEAD_DIM,) * 2
        assert (attention.k_proj.out_features, attention.v_proj.out_features) == (n_kv * HEAD_DIM,) * 2
        assert attention.num_key_value_groups == n_q // n_kv
        removed += params
    assert before - sum(p.numel() for p in slim.parameters()) == removed
    assert dg.max_rel_diff(reference, slim(**unseen).logits) < 1e-5
    assert torch.equal(slim.generate(example["input_ids"], attention_mask=example["attention_mask"], max_new_tokens=6,
                                     do_sample=False, use_cache=True), tokens)


def test_save_pretrained_and_from_pretrained_round_trip(tmp_path):
    model = _lm("qwen2")
    example, unseen = _batch(2, 12, 0), _batch(2, 7, 2)
    gated = _gated(model, example)
    _kill(dg.gates(gated)[0], {0, 1, 2, 5})  # 1 and 3 alive: kv 0 keeps one of its dead heads
    _kill(dg.gates(gated)[1], {4, 5, 6, 7}, {1})
    slim = dg.shrink(gated, example_kwargs=example)
    assert [layer.self_attn.q_proj.out_features // HEAD_DIM for layer in slim.model.layers] == [6, 4]
    slim.save_pretrained(tmp_path)
    loaded = T.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert [layer.self_attn.num_key_value_groups for layer in loaded.model.layers] == [3, 4]
    assert torch.equal(loaded(**unseen).logits, slim(**unseen).logits)


def test_a_kv_group_goes_whole_only_when_its_own_gate_is_dead():
    """Its query heads all dead: with its gate dead the kv group goes whole (layer 0); with its gate
    alive it keeps as many query heads as the others, its strongest (layer 1). A dead kv group whose
    query head lives is kept (its value reaches that head): nothing is lost, nothing wrong."""
    model = _lm("llama")
    example, unseen = _batch(2, 12, 0), _batch(3, 9, 1)
    gated = _gated(model, example)
    layer0, layer1 = dg.gates(gated)
    _kill(layer0, {0, 4, 5, 6, 7}, {1})
    _kill(layer1, {0})
    with torch.no_grad():  # layer 1: kv 1's query heads fade (below the threshold, distinct), its gate lives
        layer1.factors[0, 4:8] = torch.tensor([3e-9, 1e-9, 4e-9, 2e-9])
    plan = dg.plan_cut(gated)
    assert plan.dead["model_layers_0_self_attn"].tolist() == [True, False, False, False, True, True, True, True,
                                                             False, True]
    # kv 0 keeps 3 query heads, so kv 1 keeps its 3 strongest: 6, 4 and 7
    assert plan.dead["model_layers_1_self_attn"].tolist() == [True, False, False, False, False, True, False, False,
                                                             False, False]
    reference = gated(**unseen).logits
    slim = dg.shrink(gated, example_kwargs=example)
    widths = [(a.q_proj.out_features, a.k_proj.out_features) for a in (l.self_attn for l in slim.model.layers)]
    assert widths == [(3 * HEAD_DIM, HEAD_DIM), (6 * HEAD_DIM, 2 * HEAD_DIM)]
    assert dg.max_rel_diff(reference, slim(**unseen).logits) < 1e-5


def test_multi_query_attention_cuts_query_heads_and_keeps_its_one_kv_head():
    model = _lm("llama", kv=1)
    example, unseen = _batch(2, 12, 0), _batch(3, 9, 1)
    gated = _gated(model, example, kv=1)
    _kill(dg.gates(gated)[0], {1, 2, 6})
    _kill(dg.gates(gated)[1], set(range(HEADS)))  # all dead: one is kept
    reference = gated(**unseen).logits
    tokens = gated.generate(example["input_ids"], attention_mask=example["attention_mask"], max_new_tokens=6,
                            do_sample=False, use_cache=True)
    slim = dg.shrink(gated, example_kwargs=example)
    assert [(a.q_proj.out_features // HEAD_DIM, a.k_proj.out_features // HEAD_DIM, a.num_key_value_groups)
            for a in (layer.self_attn for layer in slim.model.layers)] == [(5, 1, 5), (1, 1, 1)]
    assert dg.max_rel_diff(reference, slim(**unseen).logits) < 1e-5
    assert torch.equal(slim.generate(example["input_ids"], attention_mask=example["attention_mask"], max_new_tokens=6,
                                     do_sample=False, use_cache=True), tokens)


def test_round_to_and_equal_query_heads_hold_together():
    """12 query heads of width 4 over 3 kv heads, one query head alive per kv group (12 rows):
    round_to 8 keeps one more head (16 rows), which leaves the groups unequal, so the constraints run
    again until both hold: two heads per group, 24 rows."""
    model = _lm("llama", kv=3, heads=12, hidden=48)
    example, unseen = _batch(2, 12, 0), _batch(3, 9, 1)
    gated = _gated(model, example, kv=3, heads=12)
    with torch.no_grad():
        gated.dgates["model_layers_0_self_attn"].factors[0, [1, 2, 3, 5, 6, 7, 9, 10, 11]] = 0
    reference = gated(**unseen).logits
    assert int((~dg.plan_cut(gated, round_to=1).dead["model_layers_0_self_attn"][:12]).sum()) == 3
    slim = dg.shrink(gated, example_kwargs=example, round_to=8)
    assert slim.model.layers[0].self_attn.q_proj.out_features == 24 and slim.model.layers[0].self_attn.num_key_value_groups == 2
    assert dg.max_rel_diff(reference, slim(**unseen).logits) < 1e-5


def test_the_heads_kind_still_gates_whole_kv_groups():
    model = _lm("llama")
    gated = dg.gate_model(model, {"D": 3, "groups": [{"kind": "heads"}]}, (), _batch(2, 12, 0))
    assert [(g.kind, g.num_groups) for g in dg.gates(gated)] == [("heads", 2)] * 2


class PlainGQA(nn.Module):
    """Grouped-query attention written with torch alone: 8 query heads of width 4 over 2 kv heads,
    through ``enable_gqa``, ``repeat_kv``'s expand-and-merge, or a repeat that interleaves the other
    way (query head h reads kv head h % 2)."""

    def __init__(self, form):
        super().__init__()
        self.form = form
        self.embed = nn.Embedding(50, 16)
        self.q, self.k, self.v = nn.Linear(16, 32), nn.Linear(16, 8), nn.Linear(16, 8)
        self.o, self.head = nn.Linear(32, 16), nn.Linear(16, 3)

    def forward(self, ids):
        x = self.embed(ids)
        B, L, _ = x.shape
        q, k, v = (p(x).view(B, L, -1, 4).transpose(1, 2) for p in (self.q, self.k, self.v))
        r = q.shape[1] // k.shape[1]
        if self.form == "enable_gqa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            if self.form == "repeat_kv":
                k, v = (t[:, :, None].expand(-1, -1, r, -1, -1).reshape(B, -1, L, 4) for t in (k, v))
            elif self.form == "sized_by_query":
                k, v = (t[:, :, None].expand(-1, -1, r, -1, -1).reshape(B, q.shape[1], L, 4) for t in (k, v))
            else:
                k, v = (t[:, None].expand(-1, r, -1, -1, -1).reshape(B, -1, L, 4) for t in (k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.head(x + self.o(y.transpose(1, 2).reshape(B, L, -1)))


@pytest.mark.parametrize("form", ["enable_gqa", "repeat_kv"])
def test_plain_grouped_query_attention(form):
    ids = torch.randint(0, 50, (2, 6))
    plan = dg.analyze(PlainGQA(form), ids, None, QH)
    (query_heads,) = [s for s in plan.sets if s.kind == "query_heads"]
    assert query_heads.kv_of == [8] * 4 + [9] * 4 + [-1, -1] and query_heads.removable.all()
    for seed in range(3):
        assert_exact_cut(PlainGQA(form).eval(), ids, QH, fraction=0.5, seed=seed)


def test_an_attention_whose_query_heads_read_kv_heads_otherwise_is_not_split():
    """Query head h reading kv head h % 2: cutting query heads would pair the rest with other kv heads
    (the forward pairs by h // r), so the layer keeps whole kv groups (kind heads), never query heads."""
    plan = dg.analyze(PlainGQA("interleaved"), torch.randint(0, 50, (2, 6)), None, QH)
    assert not [s for s in plan.sets if s.kind == "query_heads"]
    (heads,) = [s for s in plan.sets if s.kind == "heads"]
    assert len(heads.roots) == 2


def test_query_heads_tied_to_their_kv_heads_stay_with_the_reason():
    """``reshape(B, q.shape[1], ...)`` sizes the repeated keys by the query heads: the engine ties the
    two, so the layer's query heads and kv groups cannot go one by one, and none is gated."""
    plan = dg.analyze(PlainGQA("sized_by_query"), torch.randint(0, 50, (2, 6)), None, QH)
    (query_heads,) = [s for s in plan.sets if s.kind == "query_heads"]
    assert not query_heads.removable.any()
    assert any("is tied to another query head or key/value group" in r for r in query_heads.reasons)


def test_the_constraint_only_keeps_dead_groups():
    """equal_query_heads on its own: dead kv groups with a live query head come back, then each kept
    group refills to the largest count with its strongest dead heads; an alive group is never cut."""
    from dgating_surgery.engine.constraints import equal_query_heads

    class Gate:
        kv_of = [8, 8, 8, 8, 9, 9, 9, 9, -1, -1]
    dead = torch.tensor([True, True, False, True, False, False, True, True, True, True])
    norm = torch.tensor([0.1, 0.3, 1, 0.2, 1, 1, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    ctx = constraints.WidthContext(nn.Linear(1, 1), {"attn": Gate()}, {"attn": norm})
    out = constraints.apply_constraints(ctx, {"attn": dead.clone()}, [equal_query_heads])["attn"]
    # kv 1 serves live heads 4, 5: kept; both groups keep 2, kv 0 takes its strongest dead head (1)
    assert out.tolist() == [True, False, False, True, False, False, True, True, False, False]


def _fused_lm(family: str):
    """8 query heads of width 8 in one fused projection: Phi-3 (grouped, 2 kv heads; sliced at
    ``config.num_attention_heads * head_dim``) or GPT-BigCode (multi-query, split at ``(embed_dim,
    kv_dim, kv_dim)``), or Falcon (multi-query: viewed ``(B, T, num_heads + 2, head_dim)``, the queries
    ``[..., :-2, :]``, key and value ``[..., [-2], :]`` and ``[..., [-1], :]``)."""
    if family == "falcon":
        model = T.FalconForCausalLM(T.FalconConfig(vocab_size=100, hidden_size=HIDDEN, num_hidden_layers=2,
                                                   num_attention_heads=HEADS, ffn_hidden_size=96, multi_query=True,
                                                   max_position_embeddings=64))
    elif family == "phi3":
        model = T.Phi3ForCausalLM(T.Phi3Config(vocab_size=100, hidden_size=HIDDEN, num_hidden_layers=2,
                                               num_attention_heads=HEADS, num_key_value_heads=2, intermediate_size=96,
                                               pad_token_id=0))
    else:
        model = T.GPTBigCodeForCausalLM(T.GPTBigCodeConfig(vocab_size=100, n_embd=HIDDEN, n_layer=2, n_head=HEADS,
                                                           n_inner=96, multi_query=True, n_positions=64))
    return dg.expose_weights(model.eval(), seed=3)


def _fused_widths(slim, family):
    """(query heads, kv heads) per layer, off the fused projection and the output projection."""
    layers = [layer.self_attn for layer in slim.model.layers] if family == "phi3" else \
        [block.self_attention if family == "falcon" else block.attn for block in slim.transformer.h]
    names = {"phi3": ("o_proj", "qkv_proj"), "falcon": ("dense", "query_key_value")}.get(family, ("c_proj", "c_attn"))
    out, fused = ([getattr(a, name) for a in layers] for name in names)
    return [(o.in_features // HEAD_DIM, (f.out_features - o.in_features) // (2 * HEAD_DIM)) for o, f in zip(out, fused)]


@pytest.mark.parametrize("family", ["phi3", "gpt_bigcode", "falcon"])
def test_query_heads_of_a_fused_qkv_projection_cut_exactly(family, tmp_path):
    """Fused query/key/value projections sliced or split where their parts meet: the query heads go
    one by one (equal per kv group; under multi-query the one kv head stays), exact on padded inputs
    the cut never saw, the same greedy generation, and save_pretrained + from_pretrained equal."""
    model = _fused_lm(family)
    example, unseen = _batch(2, 12, 0), _batch(3, 9, 1)
    gated = dg.gate_model(model, QH, (), example)
    kv = 2 if family == "phi3" else 1
    structure = [HEADS + h // 4 for h in range(HEADS)] + [-1] * 2 if kv == 2 else [-2] * HEADS
    assert [(g.kind, g.kv_of) for g in dg.gates(gated)] == [("query_heads", structure)] * 2
    _kill(dg.gates(gated)[0], {0, 1, 4})  # kv 0: 2 alive, kv 1: 3 alive -> 3 each (MQA: 5 query heads)
    _kill(dg.gates(gated)[1], {4, 5, 6, 7}, {1} if kv == 2 else ())  # kv 1 goes whole (MQA: 4 query heads)
    reference = gated(**unseen).logits
    prompt = {k: example[k] for k in ("input_ids", "attention_mask")}
    tokens = gated.generate(**prompt, max_new_tokens=6, do_sample=False, use_cache=True)
    slim = dg.shrink(gated, example_kwargs=example)
    assert _fused_widths(slim, family) == ([(6, 2), (4, 1)] if kv == 2 else [(5, 1), (4, 1)])
    assert dg.max_rel_diff(reference, slim(**unseen).logits) < 1e-5
    assert torch.equal(slim.generate(**prompt, max_new_tokens=6, do_sample=False, use_cache=True), tokens)
    slim.save_pretrained(tmp_path)
    loaded = T.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(loaded(**unseen).logits, slim(**unseen).logits)


def test_uniform_widths_keep_equal_query_heads_per_kv_group(tmp_path):
    """``shrink(uniform=True)`` with query heads: layer 0 keeps 2 query heads per kv group (4), layer
    1 one per group (2). Uniform widths revive layer 1's dead query heads by kv group, one more in
    each (4 query heads, 2 kv heads, like layer 0), not its two strongest wherever they are (both in
    kv group 0 would leave the groups unequal, and evening them out then keeps 6, which the config
    refuses: every layer would keep all 8). The config states the widths: stock from_pretrained
    reloads it."""
    model = _lm("llama")
    example, unseen = _batch(2, 12, 0), _batch(3, 9, 1)
    gated = _gated(model, example)
    _kill(dg.gates(gated)[0], {0, 1, 4, 5})
    _kill(dg.gates(gated)[1], {1, 2, 3, 5, 6, 7})
    with torch.no_grad():  # layer 1's dead heads: kv group 0's strongest (below the threshold)
        dg.gates(gated)[1].factors[0, [1, 2, 3, 5, 6, 7]] = torch.tensor([3e-9, 2.5e-9, 2e-9, 1e-9, 0.5e-9, 0.2e-9])
    plan = dg.plan_cut(gated, uniform=True)
    assert plan.dead["model_layers_0_self_attn"].tolist() == [True, True, False, False,
                                                             True, True, False, False, False, False]
    assert plan.dead["model_layers_1_self_attn"].tolist() == [False, False, True, True,
                                                             False, False, True, True, False, False]
    reference = gated(**unseen).logits
    slim = dg.shrink(gated, example_kwargs=example, uniform=True)
    assert [(a.q_proj.out_features // HEAD_DIM, a.k_proj.out_features // HEAD_DIM, a.num_key_value_groups)
            for a in (layer.self_attn for layer in slim.model.layers)] == [(4, 2, 2)] * 2
    assert slim.config.num_attention_heads == 4 and slim.config.num_key_value_heads == 2
    assert dg.max_rel_diff(reference, slim(**unseen).logits) < 1e-5
    slim.save_pretrained(tmp_path)
    assert "dgating_surgery" not in (tmp_path / "config.json").read_text()
    loaded = T.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(loaded(**unseen).logits, slim(**unseen).logits)
