"""The vocabulary of the engine, defined once: group kinds, attachment roles and gating policies.

- A *kind* is what a group is to the user (a conv channel, a linear neuron, an input feature).
  Rules create groups of a kind; recipes select them by kind; gates record it.
- A *role* is how a parameter or buffer slice is attached to a group: the cut removes every
  attached slice, but a gate scales only the roles its policy names.
- A *policy* is the set of roles a gate scales so that the group's contribution is exactly zero
  when the gate is; each kind lists the policies it may use, and the first that is exact wins.

Adding a kind is one row in ``KINDS`` plus the rule that creates its groups.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Role(str, Enum):
    """How a tensor slice is tied to a group."""

    PRODUCER = "producer"  # a conv/linear's output slice (rows of its weight, its bias)
    AFFINE = "affine"  # a per-group scale or shift after the producer (BatchNorm, depthwise conv, a parameter)
    STAT = "stat"  # running statistics: cut with the group, never scaled
    CONSUMER = "consumer"  # a conv/linear's input slice (columns of its weight)
    CUT_ONLY = "cut_only"  # cut with the group, never scaled (a buffer, PReLU's slopes, attention's query/key rows)
    COUNT = "count"  # not a tensor: a layer attribute counting the group's entries, set after the cut
    RESCALE = "rescale"  # not a tensor: an RMS norm over the group's dim; its weight and epsilon are rescaled
    # after the cut (its mean of squares runs over fewer entries), ``fqn`` naming its epsilon attribute
    BRANCH = "branch"  # a whole tensor of a residual branch: removed with the branch's layers, never sliced
    BRANCH_OUTPUT = "branch_output"  # a whole tensor of a residual branch's last layer: scaled, and removed as BRANCH


# roles that name a layer attribute, not a tensor: shrink sets them after the cut
ATTRIBUTE_ROLES = (Role.COUNT, Role.RESCALE)


@dataclass(frozen=True)
class Policy:
    """Which roles a gate scales, and when that is exact. ``needs``: the group has a slice of one
    of these roles. ``zero_flag``: the label flag (see ``labels.Labels``) that says which of the
    group's entries are exactly zero when these roles are scaled, None when no entry is (only
    consumers are scaled). ``by_consumers``: False, the group must be zero at every op that mixes
    it; True, every op that mixes it where it is not zero must read it through a parameter slice,
    which the gate scales (a group that a consumer-scaling gate leaves alive, e.g. a linear's rows
    tied to the input features by a size, reaches a sum unscaled: not exact)."""

    name: str
    scales: tuple[Role, ...]
    needs: tuple[Role, ...]
    zero_flag: str | None
    by_consumers: bool = False


POLICIES: tuple[Policy, ...] = (
    # the cheapest: scale only the per-channel affines (a BatchNorm after the conv)
    Policy("affine", (Role.AFFINE,), (Role.AFFINE,), "zaff"),
    # scale the producing conv/linear too (nothing per-channel follows it, or it would undo the gate)
    Policy("producer", (Role.AFFINE, Role.PRODUCER), (Role.PRODUCER, Role.AFFINE), "zall"),
    # input features: nothing produces them, so scale the columns of every layer that reads them
    Policy("consumer", (Role.AFFINE, Role.CONSUMER), (Role.CONSUMER,), "zaff", by_consumers=True),
    # attention heads: scale the output projection's columns of the head, nothing else (its query,
    # key and value rows and per-head tables are cut with it; softmax never gives zeros)
    Policy("head_output", (Role.CONSUMER,), (Role.CONSUMER,), None, by_consumers=True),
    # residual branches: scale the weights of the branch's last layer (every op after it is homogeneous),
    # so the branch adds exact zeros; shrink replaces its layers (``branches``)
    Policy("branch", (Role.BRANCH_OUTPUT,), (Role.BRANCH_OUTPUT,), "zall"),
)
POLICY = {p.name: p for p in POLICIES}


@dataclass(frozen=True)
class Kind:
    """A group kind. ``precedence``: a set whose groups mix kinds (a feature tied into a conv's
    channels, a linear's neurons tied into attention heads) is named by its kind of lowest
    precedence. ``policies``: the gating policies it may use, the first that is exact wins.
    ``records_input``: its gate records each group's positions along the model input and the
    input's width, so shrink knows which input features remain without example inputs."""

    name: str
    precedence: int
    policies: tuple[str, ...] = ("affine", "producer")
    records_input: bool = False


KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("channels", 3),  # conv output channels
    Kind("neurons", 4),  # linear output features
    # attention heads: made by the attention rules, tied to the q/k/v projections' rows of the head
    Kind("heads", 1, policies=("head_output",)),
    # grouped-query attention split open (opt-in: asking for it changes discovery, ``rules.attention``): one
    # group per query head (its query rows, gated at the output projection's columns) and one per key/value
    # group (its key and value rows, gated as their producer); the cut keeps them consistent
    # (``constraints.equal_query_heads``)
    Kind("query_heads", 1, policies=("head_output", "producer")),
    # the residual stream of a transformer under RMSNorm: a channel zero in every producer (embedding,
    # every output projection) is removed exactly with the norms rescaled; made by the RMSNorm rule, so
    # a recipe asks for it by name (opt-in)
    Kind("hidden", 2),
    # model input features (dim 1); they take precedence, so that a set tied to the input (a
    # depthwise conv on it) is only cut when the recipe asks for features: it changes the inputs
    Kind("features", 0, policies=("affine", "producer", "consumer"), records_input=True),
    # residual branches x + f(x) (a ResNet block, a transformer's attention or MLP): one group per branch,
    # made by ``rules.branches``; a dead one is removed whole (depth pruning), its layers replaced
    Kind("blocks", 5, policies=("branch",)),
)}

PARAM_SPACE = "param"  # ids of a parameter used element-wise: tied to groups, never a group kind itself


def set_kind(kinds) -> str:
    """The kind a set of groups made of these kinds is shown and selected as."""
    return min(kinds, key=lambda k: KINDS[k].precedence)
