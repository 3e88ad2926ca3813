"""The width-constraint mechanism (dgating_surgery.engine.constraints): constraints only keep dead groups, the
strongest first; they compose; without a config, ``uniform`` equalizes the layers at the same place
in repeated blocks; and the cut stays exact."""
import copy

import pytest
import torch
from torch import nn

import dgating_surgery as dg
from dgating_surgery.engine import constraints

NEURONS = {"D": 3, "groups": [{"kind": "neurons"}]}


class Blocks(nn.Module):
    """Three residual MLP blocks in a ModuleList (the shape of a transformer without attention)."""

    def __init__(self, width=12, hidden=40):
        super().__init__()
        self.embed = nn.Linear(6, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, width))
                                    for _ in range(3))
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        h = self.embed(x)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)


def _gated(alive=(30, 17, 25)):
    x = torch.randn(5, 6)
    gated = dg.gate_model(Blocks().eval(), NEURONS, x)
    with torch.no_grad():
        for i, n in enumerate(alive):  # the blocks' hidden neurons (the residual stream is a gate too)
            gated.dgates[f"blocks_{i}_0"].factors[:, n:] = 0.0  # dead: exactly zero
    return gated, x


def _widths(model):
    return [block[0].out_features for block in model.blocks]


def test_uniform_without_a_config_equalizes_repeated_blocks_exactly():
    gated, x = _gated()
    reference = gated(x)
    slim = dg.shrink(copy.deepcopy(gated), example_inputs=x, uniform=True)
    assert _widths(slim) == [30, 30, 30]  # the largest alive width
    torch.testing.assert_close(slim(x), reference, rtol=0, atol=1e-6)
    assert _widths(dg.shrink(gated, example_inputs=x)) == [30, 17, 25]
    cost = dg.uniform_cost(_gated()[0])
    assert cost.groups == 13 + 5 and cost.params == (13 + 5) * (12 + 1 + 12)  # a row with its bias, a column


def test_round_to_composes_with_uniform():
    gated, x = _gated()
    plan = dg.plan_cut(gated, round_to=8, uniform=True)
    kept = [int((~plan.dead[f"blocks_{i}_0"]).sum()) for i in range(3)]
    assert kept == [32, 32, 32]  # 30 rounds up to 32, then every block keeps it
    slim = dg.shrink(gated, example_inputs=x, round_to=8, uniform=True)
    assert _widths(slim) == [32, 32, 32]


def test_the_strongest_dead_groups_fill_and_alive_groups_are_never_cut():
    gated, _ = _gated()
    with torch.no_grad():  # faded but distinct groups in the narrowest block, below the threshold
        gated.dgates["blocks_1_0"].factors[0, 17:] = torch.linspace(1e-9, 1e-7, 23)
        gated.dgates["blocks_1_0"].factors[1, 17:] = 1.0
    plain, uniform = dg.plan_cut(gated, threshold=1e-5), dg.plan_cut(gated, threshold=1e-5, uniform=True)
    dead, now = plain.dead["blocks_1_0"], uniform.dead["blocks_1_0"]
    revived = (dead & ~now).nonzero().reshape(-1).tolist()
    assert revived == list(range(27, 40))  # the 13 strongest, those with the largest factors
    for key in plain.dead:
        assert not (now & ~dead).any() and not (uniform.dead[key] & ~plain.dead[key]).any()


def test_a_constraint_that_kills_an_alive_group_is_refused():
    gated, _ = _gated()
    norms = dg.group_norms(gated)
    ctx = constraints.WidthContext(gated, dict(gated.dgates.items()), norms)
    dead = {k: n == 0 for k, n in norms.items()}

    def greedy(ctx, masks):
        return {k: torch.ones_like(m) for k, m in masks.items()}
    with pytest.raises(AssertionError, match="greedy killed an alive group"):
        constraints.apply_constraints(ctx, dead, [greedy])


def test_revive_takes_the_strongest_first_and_reports_an_unreachable_goal():
    norm = torch.tensor([0.5, 0.1, 0.9, 0.3])
    dead = torch.tensor([True, True, True, False])
    assert constraints.revive(norm, dead, lambda m: int((~m).sum()) >= 2).tolist() == [True, True, False, False]
    assert constraints.revive(norm, dead, lambda m: int((~m).sum()) >= 5) is None


def test_a_registered_constraint_applies_to_every_cut_before_round_to():
    """What a structure needs (equal widths across experts, ...) is registered once and every cut
    (plan_cut, shrink, sparsity) follows it; here: block 1 must keep as many neurons as block 0."""
    gated, x = _gated()
    reference = gated(x)

    def match_block_0(ctx, dead):
        want = int((~dead["blocks_0_0"]).sum())
        dead["blocks_1_0"] = constraints.revive(ctx.norms["blocks_1_0"], dead["blocks_1_0"],
                                                lambda m: int((~m).sum()) >= want, monotone=True)
        return dead
    constraints.register_constraint(match_block_0)
    try:
        assert dg.sparsity(gated).rows[2].alive == 30  # the rows follow the gates' order: embed, blocks 0-2
        slim = dg.shrink(gated, example_inputs=x, round_to=4)
    finally:
        constraints.REQUIRED.remove(match_block_0)
    assert _widths(slim) == [32, 32, 28]  # 30 kept for block 1 first, then rounded to 4
    torch.testing.assert_close(slim(x), reference, rtol=0, atol=1e-6)
