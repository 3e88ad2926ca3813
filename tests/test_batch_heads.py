"""Attention heads merged into the batch dim (issue 19, item 1): ``(batch * heads, T, D)`` products
(``torch.bmm``, ``baddbmm``), as DeBERTa-v2 and BLOOM write their attention. The merged dim holds each
head's ids once per batch element, so its heads are the distinct ids along it; the reshapes in and out
move the ids exactly. DeBERTa-v2's heads cut exactly (with its disentangled relative attention);
BLOOM's are refused, with the reason: ALiBi adds per-head slopes computed from the head count."""
import pytest
import torch
from torch import nn

import dgating_surgery as dg
from dgating_surgery.engine import fixers
from dgating_surgery.engine.execution import output_diff, run

from conftest import assert_exact_cut

T = pytest.importorskip("transformers")

HEADS_ONLY = {"D": 3, "groups": [{"kind": "heads"}]}
HIDDEN, HEADS, HEAD_DIM = 64, 4, 16


def _inputs(batch, length, seed, padded):
    gen = torch.Generator().manual_seed(seed)
    kwargs = {}
    if padded:
        mask = torch.ones(batch, length, dtype=torch.long)
        mask[0, :3] = 0
        kwargs["attention_mask"] = mask
    return (torch.randint(3, 100, (batch, length), generator=gen),), kwargs


def _deberta(**relative):
    config = T.DebertaV2Config(vocab_size=100, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=HEADS,
                               intermediate_size=96, max_position_embeddings=64, **relative)
    return dg.expose_weights(T.DebertaV2Model(config).eval(), seed=5)  # norms and biases away from 1 and 0


RELATIVE = {
    "absolute": {},
    "c2p-p2c": dict(relative_attention=True, pos_att_type=["c2p", "p2c"], max_relative_positions=16),
    "shared-keys-buckets": dict(relative_attention=True, pos_att_type=["c2p", "p2c"], share_att_key=True,
                                position_buckets=8, norm_rel_ebd="layer_norm"),
}


def _per_head(relative: dict) -> int:
    """Parameters one head owns in a layer: its rows (and biases) of the query, key and value
    projections and of the position projections (DeBERTa's own, unless they share the query's and
    key's), and its columns of the output projection."""
    projections = 3 + (len(relative.get("pos_att_type", [])) if relative and not relative.get("share_att_key") else 0)
    return projections * HEAD_DIM * (HIDDEN + 1) + HEAD_DIM * HIDDEN


@pytest.mark.parametrize("name", list(RELATIVE))
def test_deberta_v2_heads_cut_exactly(name, tmp_path):
    model = _deberta(**RELATIVE[name])
    args, kwargs = _inputs(2, 12, 0, padded=False)
    heads = [s for s in dg.analyze(model, args, kwargs).sets if s.kind == "heads"]
    assert [s.removable.tolist() for s in heads] == [[True] * HEADS] * 2, [set(s.reasons) for s in heads]
    gated = dg.gate_model(model, HEADS_ONLY, args, kwargs)
    gen = torch.Generator().manual_seed(11)
    dead = []
    with torch.no_grad():
        for gate in dg.gates(gated):
            killed = torch.randperm(HEADS, generator=gen)[:int(torch.randint(1, HEADS, (), generator=gen))]
            gate.factors[0, killed] = 0.0
            dead.append(len(killed))
    unseen = _inputs(3, 9, 1, padded=True)
    reference = run(gated, *unseen)
    before = dg.model_params(gated)
    dg.shrink(gated, example_inputs=args, example_kwargs=kwargs)
    assert before - dg.model_params(gated) == sum(dead) * _per_head(RELATIVE[name])
    layers = gated.encoder.layer
    assert [layer.attention.self.num_attention_heads for layer in layers] == [HEADS - d for d in dead]
    assert output_diff(reference, run(gated, *unseen)) <= 1e-5
    gated.save_pretrained(tmp_path)
    reloaded = T.DebertaV2Model.from_pretrained(tmp_path).eval()
    assert output_diff(reference, run(reloaded, *unseen)) <= 1e-5


def _bloom():
    config = T.BloomConfig(vocab_size=100, hidden_size=HIDDEN, n_layer=2, n_head=HEADS)
    return dg.expose_weights(T.BloomForCausalLM(config).eval(), seed=5)


def test_bloom_heads_are_refused_for_alibi_and_its_neurons_still_cut_exactly():
    """BLOOM's attention (fused qkv viewed (B, T, H, 3, Dh), heads merged into the batch dim) is
    found, but the scores get ALiBi added: per-head slopes computed from the model's head count and
    shared by every layer, which no cut of one layer's heads can keep."""
    model = _bloom()
    args, kwargs = _inputs(2, 12, 0, padded=False)
    kwargs["use_cache"] = False
    heads = [s for s in dg.analyze(model, args, kwargs).sets if s.kind == "heads"]
    assert len(heads) == 2 and all(len(s.removable) == HEADS and not s.removable.any() for s in heads)
    assert all("ALiBi" in r for s in heads for r in s.reasons), [set(s.reasons) for s in heads]
    gated = dg.gate_model(model, {"D": 3, "groups": [{"kind": "neurons"}]}, args, kwargs)
    with torch.no_grad():
        for gate in dg.gates(gated):
            gate.factors[0, ::3] = 0.0
    prompt = torch.randint(3, 100, (1, 5), generator=torch.Generator().manual_seed(2))
    generate = lambda m: m.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)  # noqa: E731
    tokens = generate(gated)
    before = dg.model_params(gated)
    dg.shrink(gated, example_inputs=args, example_kwargs=kwargs)
    assert dg.model_params(gated) < before
    assert torch.equal(generate(gated), tokens)


# -- plain torch: heads merged into the batch dim, in either order --------------------------------------
E, D = 32, 8


class BatchHeads(nn.Module):
    """Self-attention over ``(batch * heads, T, D)`` (``order`` "bh": b * H + h, as BLOOM and DeBERTa;
    "hb": h * B + b), split back with the layer's head count; ``literal``: the merge written with a
    head count fixed in the code (``B * 4``)."""

    def __init__(self, order="bh", literal=False):
        super().__init__()
        self.order, self.literal, self.num_heads = order, literal, E // D
        self.q, self.k, self.v, self.out = (nn.Linear(E, E) for _ in range(4))

    def merge(self, t, B, T):  # (B, H, T, D) -> (B * H, T, D) or (H * B, T, D)
        t = t if self.order == "bh" else t.transpose(0, 1)
        return t.reshape(B * 4 if self.literal else -1, T, D)

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = (self.merge(p(x).view(B, T, self.num_heads, D).transpose(1, 2), B, T) for p in (self.q, self.k, self.v))
        o = torch.bmm(torch.bmm(q, k.transpose(1, 2)).softmax(-1), v)
        o = o.view(B, self.num_heads, T, D) if self.order == "bh" else o.view(self.num_heads, B, T, D).transpose(0, 1)
        return self.out(o.transpose(1, 2).reshape(B, T, -1))


@pytest.fixture
def kept_head_count(monkeypatch):
    """A fixer keeping ``num_heads`` up to date, as a user registers for their own attention layer."""
    monkeypatch.setitem(fixers.MODULE_FIXERS, BatchHeads, lambda m: setattr(m, "num_heads", m.q.weight.shape[0] // D))
    monkeypatch.setitem(fixers.KEPT, BatchHeads, ("num_heads",))


@pytest.mark.parametrize("order", ["bh", "hb"])
def test_heads_merged_into_the_batch_dim_cut_exactly_in_either_order(order, kept_head_count):
    model = nn.Sequential(nn.Linear(E, E), BatchHeads(order), nn.Linear(E, 3)).eval()
    x = torch.randn(2, 5, E, generator=torch.Generator().manual_seed(0))
    heads = [s for s in dg.analyze(model, (x,)).sets if s.kind == "heads"]
    assert [s.removable.tolist() for s in heads] == [[True] * 4], [set(s.reasons) for s in heads]
    check = assert_exact_cut(model, (x,), HEADS_ONLY, fraction=0.5)
    assert check.groups_cut == 2 and model[1].num_heads == 2


def test_a_merge_that_fixes_the_head_count_is_refused(kept_head_count):
    """``reshape(B * 4, T, D)``: the code writes the head count, which a cut cannot change."""
    model = nn.Sequential(nn.Linear(E, E), BatchHeads("bh", literal=True), nn.Linear(E, 3)).eval()
    x = torch.randn(2, 5, E, generator=torch.Generator().manual_seed(0))
    heads = [s for s in dg.analyze(model, (x,)).sets if s.kind == "heads"]
    assert len(heads) == 1 and not heads[0].removable.any()
    assert {r for r in heads[0].reasons} == {"the forward code fixes the size of a grouped dim to [8] at method "
                                             "'.reshape()' at node 'reshape', so it cannot shrink"}


class MixedBatchHeads(BatchHeads):
    """Merges heads into the batch dim as h * B + b, then splits it back as if it were b * H + h:
    each output slot reads a head of another batch element, and which depends on the batch size."""

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = (p(x).view(B, T, self.num_heads, D).transpose(1, 2).transpose(0, 1).reshape(-1, T, D)
                   for p in (self.q, self.k, self.v))
        o = torch.bmm(torch.bmm(q, k.transpose(1, 2)).softmax(-1), v).view(B, self.num_heads, T, D)
        return self.out(o.transpose(1, 2).reshape(B, T, -1))


def test_a_split_that_mixes_heads_with_batch_elements_is_refused(monkeypatch):
    """Tying the heads the example's batch pairs up would cut exactly at that batch size only (a slim
    model 0.4 of the output off at batch 3 after examples of batch 2): refused, with the reason."""
    monkeypatch.setitem(fixers.MODULE_FIXERS, MixedBatchHeads, lambda m: setattr(m, "num_heads", m.q.weight.shape[0] // D))
    monkeypatch.setitem(fixers.KEPT, MixedBatchHeads, ("num_heads",))
    model = nn.Sequential(nn.Linear(E, E), MixedBatchHeads(), nn.Linear(E, 3)).eval()
    for batch in (2, 3):
        x = torch.randn(batch, 5, E, generator=torch.Generator().manual_seed(0))
        heads = [s for s in dg.analyze(model, (x,)).sets if s.kind == "heads"]
        assert heads and not any(s.removable.any() for s in heads)
        assert {r for s in heads for r in s.reasons} == {
            "method '.view()' at node 'view_3' splits a dim that holds each group once per batch element (heads "
            "merged into the batch dim) at other factors than it was merged by, so which groups it mixes depends "
            "on the batch size"}


def test_a_batch_of_one_cannot_show_the_order_and_is_refused(monkeypatch):
    """At a batch of 1 the mixed merge above looks like plain heads (each head once along the merged
    dim): a cut tied from it would be exact at batch 1 only. Refused, asking for a larger batch; the
    ordinary order is refused alike (the same evidence), and cut at batch 2 (the test above)."""
    for cls in (MixedBatchHeads, BatchHeads):
        monkeypatch.setitem(fixers.MODULE_FIXERS, cls, lambda m: setattr(m, "num_heads", m.q.weight.shape[0] // D))
        monkeypatch.setitem(fixers.KEPT, cls, ("num_heads",))
        model = nn.Sequential(nn.Linear(E, E), cls(), nn.Linear(E, 3)).eval()
        x = torch.randn(1, 5, E, generator=torch.Generator().manual_seed(0))
        sets = dg.analyze(model, (x,)).sets
        assert not any(s.kind == "heads" for s in sets)
        refused = [s for s in sets if any("at a batch of 1 the order of batch and heads cannot be seen: give example "
                                          "inputs with a batch of 2 or more" in str(r) for r in s.reasons)]
        assert len(refused) == 1 and len(refused[0].removable) == 4 and not refused[0].removable.any()


def test_head_counts_follow_a_cut_only_where_the_fixer_can_derive_them():
    """The attention count fixer is registered for every transformers *Attention class; a layer whose
    projections it cannot find keeps its head count as written, so that count must fix the heads
    (DeBERTa-v2's first cut, before the fixer knew `query_proj`, came out 2.2e-4 off)."""
    model = _deberta()
    dg.analyze(model, *_inputs(2, 6, 0, padded=False))  # loads the plugin's fixers for the classes imported
    layer = model.encoder.layer[0].attention.self
    assert fixers.kept_sizes(layer) == {HEADS, HIDDEN}  # num_attention_heads, all_head_size
    layer.renamed_query = layer.query_proj
    del layer.query_proj
    assert fixers.kept_sizes(layer) == set()
