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


@pytest.mark.parametrize("family, implementation", [*((f, None) for f in sorted(FAMILIES)), ("mixtral", "batched_mm")])
def test_fused_expert_neurons_are_cut_exactly_and_the_slim_model_round_trips(family, implementation, tmp_path):
    """grouped_mm (transformers' default) over tokens sorted by expert, and batched_mm (each token's
    expert matrices gathered, ``W[expert_ids]``, the weight on the left of bmm)."""
    model = dg.expose_weights(_tiny(family, implementation))
    gated = dg.gate_model(model, NEURONS, (IDS,), NO_CACHE)
    experts = _expert_gates(gated)
    assert [g.num_groups for g in experts] == [24, 24]  # every layer's experts, one group per neuron
    cuts = {(c.fqn.split(".mlp.")[1], c.dim) for g in experts for c in g.cuts}
    assert cuts == {("experts.gate_up_proj", 1), ("experts.down_proj", 2)}  # the router is no part of it
    assert not any("mlp.gate." in c.fqn for g in dg.gates(gated) for c in g.cuts)
    dg.kill_random_groups(gated, 0.3, seed=1)
    # inputs shrink never sees: another length, a batch with left padding
    fresh = torch.randint(0, 64, (3, 11), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(fresh)
    mask[0, :4] = 0
    reference = gated(fresh, attention_mask=mask, use_cache=False).logits
    tokens = gated.generate(IDS[:1], max_new_tokens=6, do_sample=False, use_cache=True)
    slim = dg.shrink(gated, example_inputs=(IDS,), example_kwargs=NO_CACHE)
    widths = [layer.mlp.experts.down_proj.shape[-1] for layer in slim.model.layers]
    assert all(w < 24 and w % 4 == 0 for w in widths), widths  # 7 of 24 dead, rows kept whole 16 bytes
    assert [layer.mlp.experts.gate_up_proj.shape[1] for layer in slim.model.layers] == [2 * w for w in widths]
    assert [layer.mlp.experts.intermediate_dim for layer in slim.model.layers] == widths
    assert dg.max_rel_diff(reference, slim(fresh, attention_mask=mask, use_cache=False).logits) < 1e-4
    assert torch.equal(slim.generate(IDS[:1], max_new_tokens=6, do_sample=False, use_cache=True), tokens)
    slim.save_pretrained(tmp_path)
    field = FAMILIES[family][3]
    if len(set(widths)) == 1:
        assert getattr(slim.config, field) == widths[0]
    else:
        assert slim.config.per_layer_config == {i: {field: w} for i, w in enumerate(widths) if w != max(widths)}
    if family == "qwen2_moe":  # its shared expert, an ordinary gated MLP beside the experts
        shared = [layer.mlp.shared_expert.intermediate_size for layer in slim.model.layers]
        assert all(w < 40 for w in shared) and (len(set(shared)) > 1 or slim.config.shared_expert_intermediate_size
                                                == shared[0]), shared
    loaded = type(slim).from_pretrained(tmp_path).eval()  # its experts' implementation: the default one
    assert dg.max_rel_diff(slim(fresh, attention_mask=mask, use_cache=False).logits,
                           loaded(fresh, attention_mask=mask, use_cache=False).logits) < 1e-6


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
    model = FusedExperts(width=16).to(dtype)
    gated = dg.gate_model(model, NEURONS, torch.randn(5, 8, dtype=dtype))
    (gate,) = dg.gates(gated)
    assert gate.num_groups == 16 and not any(c.fqn.startswith("router") for c in gate.cuts)
    with torch.no_grad():  # groups 0..12 dead (under the threshold), of growing norm; 13..15 alive
        gate.factors[0, :13] = 1e-6 * torch.arange(1, 14, dtype=dtype)
    plan = plan_cut(gated, threshold=1e-3)
    (mask,), (norm,) = plan.dead.values(), plan.norms.values()
    kept = {j for j in range(16) if not mask[j]}
    assert len(kept) == multiple  # 3 alive, one multiple of 16 bytes
    strongest_dead = sorted(range(13), key=lambda j: -float(norm[j]))[:multiple - 3]
    assert kept == {13, 14, 15, *strongest_dead}  # the strongest dead groups come back first


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
