"""Group discovery tested at the rule: after an op, which entries are tied into one group, which
groups are blocked and with what reason, and which policy a gate gets. A rule regression shows up
here, at the rule, before it shows up as a wrong cut of a whole model."""
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dgating_surgery as dg
from dgating_surgery.engine import fixers, groups, tracing
from dgating_surgery.engine.rules import register_module_rule
from dgating_surgery.engine.rules.elementwise import unary

from conftest import assert_exact_cut
from models import conv_bn


def along(plan, fqn, role=None):
    """The group (root id, -1 for none) of each position of tensor ``fqn`` along the dim its groups
    run on, for its attachments in ``role`` (all roles when None, which must agree)."""
    found = {}
    for att in plan.attachments:
        if att.fqn == fqn and (role is None or att.role == role):
            dim, profile = groups.profile(plan.roots(att.ids), att)
            found[(att.role, dim)] = profile.tolist()
    assert found, f"{fqn} has no attachment"
    return next(iter(found.values())) if len(found) == 1 else found


def reasons(plan) -> list[str]:
    return [r for s in plan.sets for r in s.reasons if r is not None]


def partition(ids) -> list[list[int]]:
    """Positions grouped by their group id, as a canonical partition."""
    out: dict[int, list[int]] = {}
    for pos, g in enumerate(ids):
        out.setdefault(g, []).append(pos)
    return sorted(out.values())


class Pair(nn.Module):
    """producer conv -> op -> consumer conv, with ``op`` given as a function."""

    def __init__(self, op, c=4, c_out=3, consumer_in=None):
        super().__init__()
        self.a = nn.Conv2d(3, c, 1)
        self.op = op
        self.b = nn.Conv2d(consumer_in or c, c_out, 1)

    def forward(self, x):
        return self.b(self.op(self.a(x))).sum()


X = torch.randn(2, 3, 4, 4)


def test_residual_add_ties_channel_i_of_both_producers():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)

        def forward(self, x):
            return self.head(self.a(x) + self.b(x))

    plan = dg.analyze(M(), X)
    assert (along(plan, "a.weight", "producer") == along(plan, "b.weight", "producer")
            == along(plan, "head.weight", "consumer"))
    assert len(set(along(plan, "a.weight", "producer"))) == 4


def test_cat_gives_the_consumer_both_producers_columns_in_order():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = nn.Conv2d(3, 2, 1), nn.Conv2d(3, 3, 1), nn.Conv2d(5, 2, 1)

        def forward(self, x):
            return self.head(torch.cat([self.a(x), self.b(x)], 1))

    plan = dg.analyze(M(), X)
    assert (along(plan, "head.weight", "consumer")
            == along(plan, "a.weight", "producer") + along(plan, "b.weight", "producer"))


def test_chunk_ties_entry_j_of_every_part():
    plan = dg.analyze(Pair(lambda h: sum(h.chunk(2, 1)), c=4, consumer_in=2), X)
    assert partition(along(plan, "a.weight", "producer")) == [[0, 2], [1, 3]]


def test_flatten_gives_each_channel_its_block_of_linear_columns():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 2, 1), nn.Linear(2 * 2 * 2, 3)

        def forward(self, x):
            return self.fc(F.avg_pool2d(self.conv(x), 2).flatten(1))

    plan = dg.analyze(M(), X)
    channel = along(plan, "conv.weight", "producer")
    assert along(plan, "fc.weight", "consumer") == [channel[0]] * 4 + [channel[1]] * 4


class Heads(nn.Module):
    """(B, T, H*Dh) -> (B, T, H, Dh) -> per entry -> back: the split a head rule directs."""

    def __init__(self, heads=2, dh=3):
        super().__init__()
        self.heads, self.dh = heads, dh
        self.proj, self.out = nn.Linear(4, heads * dh), nn.Linear(heads * dh, 4)

    def forward(self, h):
        b, t = h.shape[:2]
        h = self.proj(h).view(b, t, self.heads, self.dh).relu()
        return self.out(h.reshape(b, t, -1))


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Heads()

    def forward(self, x):
        if x.dim() == 4:  # keeps symbolic tracing out: the torch.export graph is analysed
            x = x.flatten(1, 2)
        return self.block(x)


def test_reshape_split_policy_chooses_which_factor_carries_the_groups():
    def fix_heads(m):
        m.heads = m.proj.out_features // m.dh

    capture = tracing.capture(Outer(), torch.randn(2, 5, 4))
    assert capture.frontend == "export"
    view = next(n for n in capture.gm.graph.nodes if n.op == "call_function" and "view" in str(n.target))
    # under torch.export the view's sizes are ints: literals, unless a fixer keeps them as attributes
    literal = groups.discover(capture)
    assert partition(along(literal, "block.proj.weight", "producer")) == [[0], [1], [2], [3], [4], [5]]
    assert not literal.sets[1].removable.any()
    fixers.register_module_fixer(Heads, fix_heads)
    try:
        by_default = groups.discover(capture)
        directed = groups.discover(capture, split_policy={view.name: "outermost"})
    finally:
        del fixers.MODULE_FIXERS[Heads]
    # innermost (default): the head_dim slot carries the groups, tied across heads
    assert partition(along(by_default, "block.proj.weight", "producer")) == [[0, 3], [1, 4], [2, 5]]
    # outermost: the head carries the groups, its head_dim entries tied
    assert partition(along(directed, "block.proj.weight", "producer")) == [[0, 1, 2], [3, 4, 5]]


def test_grouped_conv_ties_each_group_of_input_and_output_channels():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.g, self.head = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 6, 1, groups=2), nn.Conv2d(6, 2, 1)

        def forward(self, x):
            return self.head(self.g(self.a(x)))

    plan = dg.analyze(M(), X)
    a = along(plan, "a.weight", "producer")
    assert partition(a) == [[0, 1], [2, 3]]
    assert along(plan, "g.weight", "affine") == [a[0]] * 3 + [a[2]] * 3


@pytest.mark.parametrize("op, fragment", [
    (torch.sigmoid, "is not exactly zero where it reaches layer 'b' (Conv2d)"),
    (lambda h: F.layer_norm(h.permute(0, 2, 3, 1), (4,)).permute(0, 3, 1, 2), "normalized by layer_norm"),
    (lambda h: h - h.mean(1, keepdim=True), "takes the mean over a grouped dim"),
    (lambda h: h.cumsum(1), "'.cumsum()' at node 'cumsum', which has no rule"),
    (lambda h: torch.cat([h[:, :2] * 2, h[:, 2:]], 1), "selects positions of a grouped dim that the code fixes"),
    (lambda h: torch.cat(h.split([1, 3], 1), 1), "splits a grouped dim at positions fixed in the code"),
    (lambda h: h.roll(1, 1), "rolls a grouped dim by a fixed amount"),
])
def test_blocked_groups_say_why(op, fragment):
    plan = dg.analyze(Pair(op), X)
    (producer,) = [s for s in plan.sets if s.modules[0] == "a"]
    assert not producer.removable.any()
    assert any(fragment in r for r in producer.reasons), producer.reasons


def test_a_rule_that_cannot_read_its_call_blocks_its_groups_with_the_error():
    class Odd(nn.Module):
        def forward(self, h):
            return h * 2

    register_module_rule(Odd, lambda ctx, node: 1 / 0)
    try:
        plan = dg.analyze(Pair(Odd()), X)
    finally:
        from dgating_surgery.engine.rules.table import MODULE_RULES
        del MODULE_RULES[Odd]
    assert any("whose arguments the rule could not read (ZeroDivisionError" in r for r in reasons(plan))


def test_a_registered_module_rule_lets_groups_through():
    class ClampedReLU(nn.Module):
        def forward(self, h):
            return F.threshold(h, 0.0, 0.0)

    blocked = dg.analyze(Pair(ClampedReLU()), X)  # traced inside: threshold has no rule
    assert not blocked.sets[1].removable.any()
    register_module_rule(ClampedReLU, lambda ctx, node: unary(ctx, node, keeps_zero=True))
    try:
        plan = dg.analyze(Pair(ClampedReLU()), X)
    finally:
        from dgating_surgery.engine.rules.table import MODULE_RULES
        del MODULE_RULES[ClampedReLU]
    assert [s.modules for s in plan.sets] == [["x"], ["a"], ["b"]] and plan.sets[1].removable.all()


@pytest.mark.parametrize("model, x, kind, policy", [
    (nn.Sequential(conv_bn(3, 4), nn.Conv2d(4, 2, 1)), X, "channels", "affine"),  # BatchNorm's affine suffices
    (nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1)), X, "channels", "producer"),  # nothing after
    (nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2)), torch.randn(2, 5), "features", "consumer"),
])
def test_policy_table_picks_the_cheapest_exact_policy(model, x, kind, policy):
    first = next(s for s in dg.analyze(model, x).sets if s.kind == kind)
    assert set(first.policies) == {policy}


def test_fixer_registries_rederive_layer_and_model_attributes():
    class Scaled(nn.Linear):
        """A layer keeping a size attribute its forward reads."""

        def __init__(self, n_in, n_out):
            super().__init__(n_in, n_out)
            self.width = n_out

        def forward(self, x):
            return super().forward(x) * (1.0 / self.width) * self.width

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = Scaled(5, 6), nn.Linear(6, 2)
            self.widths = None

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))

    def fix_scaled(m):
        m.width = m.weight.shape[0]

    def fix_net(root):
        root.widths = [root.fc1.width]

    fixers.register_module_fixer(Scaled, fix_scaled)
    fixers.register_model_fixer(Net, fix_net)
    try:
        x = torch.randn(3, 5)
        gated = dg.gate_model(Net(), {"D": 3, "groups": ["neurons"]}, x)
        with torch.no_grad():
            dg.gates(gated)[0].factors[0, :2] = 0
        slim = dg.shrink(gated, example_inputs=x)
    finally:
        del fixers.MODULE_FIXERS[Scaled], fixers.MODEL_FIXERS[Net]
    assert slim.fc1.width == 4 and slim.widths == [4]


def test_plugins_load_only_with_their_library():
    code = ("import sys, torch, dgating_surgery as dg; "
            "dg.gate_model(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)), "
            "'mlp', torch.randn(2, 3)); "
            "print(sorted(m for m in sys.modules if m in ('transformers', 'timm') or 'plugins.' in m))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    code = code.replace("import sys,", "import sys, transformers,")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "dgating_surgery.plugins.transformers" in out


class Tail(nn.Module):
    """A producer of 6 neurons whose consumers read it by positions counted from the back:
    ``y[..., :-2]`` and ``y[..., [-1]]`` (``back``), or a position counted from the front (``[1]``)."""

    def __init__(self, index):
        super().__init__()
        self.index = index
        self.a, self.b, self.c = nn.Linear(8, 6), nn.Linear(4, 3), nn.Linear(1, 3)

    def forward(self, x):
        y = torch.relu(self.a(x))
        return self.b(y[..., :-2]) + self.c(y[..., self.index])


@pytest.mark.parametrize("index", [[-1], [1]])
def test_positions_counted_from_the_back_follow_a_cut_when_the_tail_stays(index):
    """A slice end or list index counted from the back of a grouped dim still finds the same entries
    after a cut when the positions behind it never go: they stay, with the reason, and the others are
    cut exactly. A position counted from the front is fixed by the code: every neuron stays."""
    model = Tail(index)
    x = torch.randn(5, 8)
    (neurons,) = [s for s in dg.analyze(model, (x,)).sets if s.kind == "neurons" and s.name == "a"]
    if index == [1]:
        assert not neurons.removable.any()
        return
    assert neurons.removable.tolist() == [True] * 4 + [False] * 2
    assert "counted from the back of a grouped dim: its last 2 stay" in next(r for r in neurons.reasons if r)
    check = assert_exact_cut(model, (x,), {"D": 3, "groups": [{"kind": "neurons"}]}, fraction=0.5)
    assert check.groups_cut == 2 and model.b.in_features == 2
