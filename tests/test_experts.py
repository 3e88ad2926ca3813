"""Expert neurons of mixture-of-experts layers (issue 19 item 4): transformers 5's fused experts
(``gate_up_proj (E, 2I, H)``, ``down_proj (E, H, I)``, grouped matrix multiplication) and per-expert
MLPs in an ``nn.ModuleList``. A fused neuron is the same row of every expert's matrices, so the
tensors stay rectangular; the ``experts`` width constraint keeps their rows whole 16 bytes (what
grouped_mm requires); the router is never cut."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dgating_surgery as dg
from dgating_surgery.engine import constraints
from dgating_surgery.engine.gates import analyze
from dgating_surgery.engine.gates import gate_set
from dgating_surgery.engine.shrink import plan_cut

from conftest import assert_exact_cut

T = pytest.importorskip("transformers")

NEURONS = {"D": 3, "groups": [{"kind": "neurons"}]}
NO_CACHE = {"use_cache": False}
IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
TINY = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            num_experts_per_tok=2, max_position_embeddings=64)
FAMILIES = {  # family -> (config class, model class, config fields, the config field of an expert's width)
    "mixtral": (T.MixtralConfig, T.MixtralForCausalLM, dict(num_local_experts=4, intermediate_size=24),
                "intermediate_size"),
    "qwen2_moe": (T.Qwen2MoeConfig, T.Qwen2MoeForCausalLM,
                  dict(num_experts=4, moe_intermediate_size=24, shared_expert_intermediate_size=40),
                  "moe_intermediate_size"),
    "qwen3_moe": (T.Qwen3MoeConfig, T.Qwen3MoeForCausalLM, dict(num_experts=4, moe_intermediate_size=24),
                  "moe_intermediate_size"),
    "olmoe": (T.OlmoeConfig, T.OlmoeForCausalLM, dict(num_experts=4, intermediate_size=24), "intermediate_size"),
}


def _tiny(family, experts_implementation=None):
    config_cls, model_cls, extra, _ = FAMILIES[family]
    config = config_cls(**TINY, **extra)
    if experts_implementation is not None:
        config._experts_implementation = experts_implementation
    return model_cls(config).eval()


def _expert_gates(model):
    return [g for g in dg.gates(model) if any(c.fqn.endswith("experts.gate_up_proj") for c in g.cuts)]


# per layer, the neurons that die in each of the 4 experts (30% and 40% of the 96 entries, uneven
# across experts): alive counts (18, 15, 20, 14) and (15, 12, 16, 14)
DEAD_PER_EXPERT = [(6, 9, 4, 10), (9, 12, 8, 10)]
ROW_FLOATS = 4  # float32: rows of whole 16 bytes are multiples of 4 entries (grouped_mm)


def _expected_width(dead_counts, width=24):
    """The width every expert keeps, computed from the dead pattern alone: the most any expert keeps,
    rounded up to whole 16-byte rows."""
    most = max(width - d for d in dead_counts)
    return min(width, -(-most // ROW_FLOATS) * ROW_FLOATS)


def _kill_per_expert(gated, seed=3):
    """Zero the per-expert gate entries of ``DEAD_PER_EXPERT`` (random neurons of each expert) and a
    quarter of every other gate's groups; returns {gate key: (experts, neurons) bool dead mask}."""
    gen = torch.Generator().manual_seed(seed)
    dead = {}
    with torch.no_grad():
        for layer, gate in enumerate(_expert_gates(gated)):
            mask = torch.zeros(gate.experts, gate.num_groups // gate.experts, dtype=torch.bool)
            for e, count in enumerate(DEAD_PER_EXPERT[layer]):
                mask[e, torch.randperm(mask.shape[1], generator=gen)[:count]] = True
            gate.factors[0, mask.reshape(-1)] = 0.0
            dead[layer] = mask
        for gate in dg.gates(gated):
            if gate.experts is None:
                gate.factors[0, torch.randperm(gate.num_groups, generator=gen)[:gate.num_groups // 4]] = 0.0
    return dead


def _columns_of(slim, full):
    """For each column of ``slim``, the index of the column of ``full`` it is."""
    return [next(j for j in range(full.shape[1]) if torch.equal(slim[:, c], full[:, j])) for c in range(slim.shape[1])]


@pytest.mark.parametrize("family, implementation", [*((f, None) for f in sorted(FAMILIES)), ("mixtral", "batched_mm")])
def test_each_expert_loses_its_own_neurons_exactly_and_the_slim_model_round_trips(family, implementation, tmp_path):
    """One gate entry per (expert, neuron): each expert's neurons die on their own; the fused tensors
    stay rectangular at the width of the expert that keeps the most (rounded to whole 16-byte rows),
    each expert keeping its own neurons. grouped_mm (transformers' default: tokens sorted by expert,
    ``offs``) and batched_mm (each token's expert matrices gathered, ``W[expert_ids]``). On main a
    neuron is one group shared by every expert: 24 groups per layer, no per-expert death possible."""
    model = dg.expose_weights(_tiny(family, implementation))
    full = sum(p.numel() for p in model.parameters())
    gated = dg.gate_model(model, NEURONS, (IDS,), NO_CACHE)
    experts = _expert_gates(gated)
    assert [(g.num_groups, g.experts) for g in experts] == [(96, 4), (96, 4)]  # 4 experts x 24 neurons
    cuts = {(c.fqn.split(".mlp.")[1], c.dim, c.lead) for g in experts for c in g.cuts}
    assert cuts == {("experts.gate_up_proj", 1, 0), ("experts.down_proj", 2, 0)}  # the router is no part of it
    assert not any("mlp.gate." in c.fqn for g in dg.gates(gated) for c in g.cuts)
    dead = _kill_per_expert(gated)
    collapsed = {i: (layer.mlp.experts.gate_up_proj.detach().clone(), layer.mlp.experts.down_proj.detach().clone())
                 for i, layer in enumerate(gated.model.layers)}
    shared = [g for g in dg.gates(gated) if g.experts is None and "shared_expert." in g.name]
    shared_dead = [int((g.factors[0] == 0).sum()) for g in shared]
    # inputs shrink never sees: another length, a batch with left padding
    fresh = torch.randint(0, 64, (3, 11), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(fresh)
    mask[0, :4] = 0
    reference = gated(fresh, attention_mask=mask, use_cache=False).logits
    tokens = gated.generate(IDS[:1], max_new_tokens=6, do_sample=False, use_cache=True)
    routers = [layer.mlp.gate.weight.detach().clone() for layer in gated.model.layers]
    slim = dg.shrink(gated, example_inputs=(IDS,), example_kwargs=NO_CACHE)

    widths = [_expected_width(counts) for counts in DEAD_PER_EXPERT]
    assert widths == [20, 16]
    H = TINY["hidden_size"]
    for i, layer in enumerate(slim.model.layers):
        fused = layer.mlp.experts
        assert tuple(fused.gate_up_proj.shape) == (4, 2 * widths[i], H) and tuple(fused.down_proj.shape) == (4, H, widths[i])
        assert fused.intermediate_dim == widths[i]
        assert torch.equal(layer.mlp.gate.weight, routers[i])  # the router untouched
        up, down = collapsed[i]
        for e in range(4):  # every expert keeps its own neurons (a gather per expert): its alive ones and dead ones
            kept = _columns_of(fused.down_proj[e], down[e])  # (unscaled, so each column is found again)
            assert len(kept) == widths[i] and set((~dead[i][e]).nonzero().reshape(-1).tolist()) <= set(kept)
            assert kept == sorted(kept) and not up[e][[j for j in kept if dead[i][e][j]]].any()
            assert torch.equal(fused.gate_up_proj[e], up[e][kept + [24 + j for j in kept]])
    expected_removed = sum(4 * (24 - w) * 3 * H for w in widths) + sum(d * 3 * H for d in shared_dead)
    assert full - sum(p.numel() for p in slim.parameters()) == expected_removed

    slim_out = slim(fresh, attention_mask=mask, use_cache=False).logits
    assert dg.max_rel_diff(reference, slim_out) < 1e-4
    assert torch.equal(slim.generate(IDS[:1], max_new_tokens=6, do_sample=False, use_cache=True), tokens)
    slim.save_pretrained(tmp_path / "hf")
    field = FAMILIES[family][3]
    assert [getattr(slim.config.per_layer_config[i], field) for i in range(2)] == widths  # the config states I'
    if family == "qwen2_moe":  # its shared expert: an ordinary gated MLP beside the experts, its own width
        assert [g.num_groups for g in shared] == [40, 40]
        assert [layer.mlp.shared_expert.intermediate_size for layer in slim.model.layers] == [40 - d for d in shared_dead]
    loaded = type(slim).from_pretrained(tmp_path / "hf").eval()  # its experts' implementation: the default one
    assert dg.max_rel_diff(slim_out, loaded(fresh, attention_mask=mask, use_cache=False).logits) < 1e-6
    dg.save_slim(slim, tmp_path / "slim")
    again = dg.load_slim(tmp_path / "slim", model=_tiny(family, implementation))
    assert dg.max_rel_diff(slim_out, again(fresh, attention_mask=mask, use_cache=False).logits) < 1e-6


def test_an_expert_whose_neurons_all_die_keeps_the_common_width_and_routing_is_unchanged():
    """Removing a whole expert would change what the router's softmax and top-k pick: it is never
    done. An expert whose every neuron died keeps the width the others need, its neurons zero (the
    strongest dead ones), so the output is exactly the gated model's and the router is untouched."""
    gated = dg.gate_model(dg.expose_weights(_tiny("qwen3_moe")), NEURONS, (IDS,), NO_CACHE)
    gate = _expert_gates(gated)[0]
    with torch.no_grad():
        gate.factors[0, :24] = 0.0  # expert 0: every neuron
        gate.factors[0, 24:24 + 12] = 0.0  # expert 1: half of them
    reference = gated(IDS, use_cache=False).logits
    slim = dg.shrink(gated, example_inputs=(IDS,), example_kwargs=NO_CACHE)
    fused = slim.model.layers[0].mlp.experts
    assert tuple(fused.down_proj.shape) == (4, 32, 24)  # experts 2 and 3 keep all 24: nothing goes
    assert fused.num_experts == 4 and tuple(slim.model.layers[0].mlp.gate.weight.shape) == (4, 32)
    assert not fused.gate_up_proj[0].any()  # expert 0's rows: all dead, kept, zero
    assert dg.max_rel_diff(reference, slim(IDS, use_cache=False).logits) < 1e-4


def test_per_expert_widths_follow_the_widest_expert():
    """Experts 0..3 keep 6, 10, 3 and 9 of 24 neurons: every expert keeps 12 (10, rounded up to whole
    16-byte rows), each its own strongest dead ones after its alive ones."""
    gated = dg.gate_model(dg.expose_weights(_tiny("mixtral")), NEURONS, (IDS,), NO_CACHE)
    gate = _expert_gates(gated)[0]
    keeps = (6, 10, 3, 9)
    with torch.no_grad():
        for e, keep in enumerate(keeps):  # dead groups of growing strength, under the threshold
            gate.factors[0, e * 24 + keep:(e + 1) * 24] = 1e-7 * torch.arange(1, 25 - keep)
    plan = plan_cut(gated, threshold=1e-4)
    key = next(k for k, g in gate_set(gated).items() if g is gate)
    kept = (~plan.dead[key]).reshape(4, 24)
    assert kept.sum(-1).tolist() == [12, 12, 12, 12]
    norm = plan.norms[key].reshape(4, 24)
    for e, keep in enumerate(keeps):
        strongest = sorted(range(keep, 24), key=lambda j: -float(norm[e, j]))[:12 - keep]
        assert set(kept[e].nonzero().reshape(-1).tolist()) == set(range(keep)) | set(strongest)


def test_the_eager_expert_loop_is_refused_naming_the_line():
    """transformers' eager experts loop over the experts a batch hits (data): no graph to analyse."""
    with pytest.raises(dg.DGatingError) as raised:
        dg.gate_model(_tiny("mixtral", "eager"), NEURONS, (IDS,), NO_CACHE)
    message = str(raised.value)
    assert "\n" not in message and "modeling_mixtral.py" in message and "for expert_idx in expert_hit" in message


class FusedExperts(nn.Module):
    """Experts as one (E, out, in) tensor each, every token through every expert (dense routing)."""

    def __init__(self, experts=4, hidden=8, width=10):
        super().__init__()
        self.router = nn.Linear(hidden, experts)
        self.up = nn.Parameter(torch.randn(experts, width, hidden))
        self.down = nn.Parameter(torch.randn(experts, hidden, width))

    def forward(self, x):  # x (B, hidden)
        weights = F.softmax(self.router(x), dim=-1)  # (B, E)
        per_expert = x.unsqueeze(0).expand(self.up.shape[0], -1, -1)  # (E, B, hidden)
        h = F.relu(torch.bmm(per_expert, self.up.transpose(1, 2)))  # (E, B, width)
        out = torch.bmm(h, self.down.transpose(1, 2))  # (E, B, hidden)
        return (out * weights.t().unsqueeze(-1)).sum(0)


@pytest.mark.parametrize("dtype, multiple", [(torch.float32, 4), (torch.bfloat16, 8)])
def test_the_experts_constraint_keeps_the_strongest_dead_neurons_for_whole_16_byte_rows(dtype, multiple):
    """A batched matmul whose batch index is the expert: per-expert neurons too (4 x 16 groups)."""
    model = FusedExperts(width=16).to(dtype)
    gated = dg.gate_model(model, NEURONS, torch.randn(5, 8, dtype=dtype))
    (gate,) = dg.gates(gated)
    assert (gate.num_groups, gate.experts) == (64, 4) and not any(c.fqn.startswith("router") for c in gate.cuts)
    with torch.no_grad():  # in every expert, neurons 0..12 dead (under the threshold), of growing norm; 13..15 alive
        for e in range(4):
            gate.factors[0, 16 * e:16 * e + 13] = 1e-6 * torch.arange(1, 14, dtype=dtype)
    plan = plan_cut(gated, threshold=1e-3)
    (mask,), (norm,) = plan.dead.values(), plan.norms.values()
    for e in range(4):
        kept = {j for j in range(16) if not mask[16 * e + j]}
        assert len(kept) == multiple  # 3 alive, one multiple of 16 bytes
        strongest_dead = sorted(range(13), key=lambda j: -float(norm[16 * e + j]))[:multiple - 3]
        assert kept == {13, 14, 15, *strongest_dead}  # the strongest dead groups come back first


class CrossedExperts(FusedExperts):
    """A row of expert e's activations read by expert e+1's down matrix (``roll`` over the experts):
    a neuron of one expert reaches another's, so no neuron can die in one expert alone."""

    def forward(self, x):
        weights = F.softmax(self.router(x), dim=-1)
        per_expert = x.unsqueeze(0).expand(self.up.shape[0], -1, -1)
        h = F.relu(torch.bmm(per_expert, self.up.transpose(1, 2))).roll(1, 0)
        out = torch.bmm(h, self.down.transpose(1, 2))
        return (out * weights.t().unsqueeze(-1)).sum(0)


class SummedExperts(FusedExperts):
    """Each expert's activations also summed over the tokens (a read beyond the down matrices)."""

    def forward(self, x):
        weights = F.softmax(self.router(x), dim=-1)
        per_expert = x.unsqueeze(0).expand(self.up.shape[0], -1, -1)
        h = F.relu(torch.bmm(per_expert, self.up.transpose(1, 2)))
        h = h * h.sum(1, keepdim=True).sigmoid()
        out = torch.bmm(h, self.down.transpose(1, 2))
        return (out * weights.t().unsqueeze(-1)).sum(0)


@pytest.mark.parametrize("cls", [CrossedExperts, SummedExperts])
def test_neurons_stay_shared_by_every_expert_when_rows_cross_experts_or_leave_the_products(cls):
    """Per-expert neurons need every activation row to go from its expert's up matrix only to that
    expert's down matrix, through ops that keep rows; otherwise a neuron is one group of every expert
    (exact, as before)."""
    check = assert_exact_cut(cls(width=16), torch.randn(6, 8), NEURONS)  # 4 of 16 die: 12, whole 16-byte rows
    assert check.groups_gated == 16 and check.groups_cut == 4  # one group per neuron, shared by the 4 experts
    assert not any(s.experts for s in analyze(cls(width=16), torch.randn(6, 8)).sets)


def test_the_experts_constraint_is_part_of_every_cut_and_leaves_conv_weights_alone():
    assert constraints.experts in constraints.REQUIRED
    model = nn.Sequential(nn.Conv1d(3, 10, 3), nn.ReLU(), nn.Conv1d(10, 4, 3))  # 3-D weights, cut along dims 0, 1
    gated = dg.gate_model(model, {"D": 3, "groups": [{"kind": "channels"}]}, torch.randn(2, 3, 9))
    with torch.no_grad():
        dg.gates(gated)[0].factors[0, :3] = 0
    assert dg.shrink(gated)[2].in_channels == 7  # not rounded to a multiple of 4


class ListedExperts(nn.Module):
    """Mixtral's original layout: an nn.ModuleList of expert MLPs, each token through the top-2
    experts by dense masking (traceable: no data-dependent indexing)."""

    def __init__(self, experts=4, hidden=8, width=12):
        super().__init__()
        self.router = nn.Linear(hidden, experts, bias=False)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(hidden, width), nn.SiLU(), nn.Linear(width, hidden))
                                     for _ in range(experts))

    def forward(self, x):
        scores = F.softmax(self.router(x), dim=-1)
        top = torch.topk(scores, 2, dim=-1)
        weights = torch.zeros_like(scores).scatter(-1, top.indices, top.values)
        out = torch.zeros_like(x)
        for i, expert in enumerate(self.experts):
            out = out + expert(x) * weights[..., i:i + 1]
        return out


def test_expert_mlps_in_a_module_list_are_gated_per_expert_and_the_router_stays():
    model = ListedExperts()
    check = assert_exact_cut(model, torch.randn(6, 8), NEURONS, min_groups=48)
    assert check.groups_gated == 48  # 4 experts x 12 neurons, each expert its own gate
    assert all(e[0].out_features < 12 for e in model.experts)
    assert model.router.weight.shape == (4, 8)


class RankedRouter(nn.Module):
    """Mixtral's original routing: top-k of the router's logits, then a softmax over the chosen."""

    def __init__(self):
        super().__init__()
        self.router, self.expert = nn.Linear(8, 4), nn.Linear(8, 3)

    def forward(self, x):
        values, chosen = torch.topk(self.router(x), 2, dim=-1)
        weights = torch.zeros_like(self.router.weight[:, 0]).expand(x.shape[0], -1)
        weights = weights.scatter(-1, chosen, F.softmax(values, dim=-1))
        return self.expert(x) * weights[:, :1]


def test_a_router_ranked_by_topk_is_refused_with_the_routing_reason():
    plan = analyze(RankedRouter(), torch.randn(5, 8))
    (router,) = [s for s in plan.sets if s.modules == ["router"]]
    assert {r.split(" (")[0] for r in router.reasons} == {"is ranked at function 'topk' at node 'topk'"}
    assert all("changes which others are picked" in r for r in router.reasons)
