"""Per-expert neurons: when a neuron of a stack of expert matrices may be one group per expert.

The walk sees a fused expert layer (``gate_up_proj (E, 2I, H)``, ``down_proj (E, H, I)``) as one
neuron j shared by every expert: row j of every expert's up matrix, column j of every expert's down
matrix (``rules.structural.linear``). That neuron is exactly removable per expert when every row of
the activations between the two products belongs to one expert and meets only that expert's
matrices: the row of a token routed to expert e is made by expert e's up matrix and read by expert
e's down matrix, so a zero row j of expert e's up matrix (its gate zero) reaches only expert e's
column j, which it multiplies by zero. ``split_experts`` says when the graph guarantees that:

- every layer making the set's neurons is a product with a stack of E expert matrices
  (``rules.context.ExpertProduct``), all with one key: the same node assigns every row its expert
  (grouped matmul's ``offs``, the index of ``W[expert_ids]``, or a batched matmul's batch index);
- every tensor slice tied to the neurons is a slice of such a stack, read only by products with that
  key, and cut along a dim other than the experts' (a bias shared by all experts, a norm over the
  neurons or any other tensor tied to them keeps the neurons whole across experts);
- from each product, the activations reach only ops that keep every entry's row (element-wise ops,
  casts, a split of the neuron dim, a dim added or dropped after the rows) and then products of the
  same key, which read them as their input: nothing else (a sum over rows, a re-ordering, another
  product, the output) sees them.

Otherwise the neurons stay shared by every expert (exact, as before). The cut then keeps every
expert at one width (``constraints.experts``): the fused tensors stay rectangular, each expert
keeping its own neurons (gathered per expert), the width the one that keeps the most.
"""
from __future__ import annotations

import numpy as np
import torch.fx

from .rules.context import ExpertProduct, RuleContext
from .rules.elementwise import add, clamp, clamp_min_max, div, masked_fill, mul, power, unary, where
from .rules.names import mutated_argument
from .rules.table import SHAPE_ONLY_FN, rule_for

POSITIONWISE = {add, mul, div, where, masked_fill, clamp, clamp_min_max, power, unary}
NEURON_DIM_OPS = {"chunk", "split", "split_with_sizes", "squeeze", "unsqueeze"}


def split_experts(ctx: RuleContext, spaces: tuple, attachments: list) -> int | None:
    """The number of experts when the neurons of the set made by ``spaces`` may be one group per
    expert (see the module), else None. ``attachments``: every slice tied to the set's groups."""
    products = [ctx.expert_products.get(s) for s in spaces]
    if not products or any(p is None for p in products):
        return None
    key, E = products[0].key, products[0].experts
    if E < 2 or any(not _same(p.key, key) or p.experts != E for p in products):
        return None
    for att in attachments:
        shape = ctx.param_shape(att.fqn)
        if len(shape) != 3 or shape[0] != E or att.ids.shape[0] != 1 or not _only(ctx.expert_weights.get(att.fqn), key):
            return None
        if _read_elsewhere(ctx, att.fqn):
            return None
    consumers = {id(p.node): p for p in ctx.expert_products.values() if _same(p.key, key)}
    return E if all(_rows_kept(ctx, p, consumers) for p in products) else None


def _same(a, b) -> bool:
    """Two keys are one: the same node, or both ``"batch"``."""
    return a is b if isinstance(a, torch.fx.Node) or isinstance(b, torch.fx.Node) else a == b


def _only(keys, key) -> bool:
    return bool(keys) and all(_same(k, key) for k in keys)


def _read_elsewhere(ctx: RuleContext, fqn: str) -> bool:
    """Whether the stack is read by anything but the expert products (and views on their way)."""
    products = {id(p.node) for p in ctx.expert_products.values() if p.weight == fqn}
    for node in ctx.gm.graph.nodes:
        if node.op == "get_attr" and ctx.fqn(node) == fqn:
            frontier = [node]
            while frontier:
                current = frontier.pop()
                for user in current.users:
                    if id(user) in products or _reads_shape(ctx, user):
                        continue
                    if ctx.weight(user) is not None and ctx.weight(user).fqn == fqn:  # a view, a gather
                        frontier.append(user)
                        continue
                    return True
    return False


def _reads_shape(ctx: RuleContext, node) -> bool:
    """A read of a tensor's shape (``W.shape``, ``W.size(0)``), not of its values."""
    if node.op not in ("call_function", "call_method"):
        return False
    name = ctx.op_name(node)
    return name in ("size", "sym_size", "dim", *SHAPE_ONLY_FN) or (
        name == "getattr" and len(node.args) > 1 and node.args[1] in ("shape", "ndim", "dtype", "device"))


def _rows_kept(ctx: RuleContext, product: ExpertProduct, consumers: dict[int, ExpertProduct]) -> bool:
    """Whether the product's output reaches only row-keeping ops and then products of its key, as
    their input (see the module)."""
    rows = ctx.shape(product.node)[:product.rows]
    seen, frontier = {product.node}, [product.node]
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if user in seen:
                continue
            consumer = consumers.get(id(user))
            if consumer is not None and consumer.x is node:  # read as the input of a product of the same key
                continue
            if _reads_shape(ctx, user):
                continue  # a check of its metadata, nothing computed
            if not _keeps_rows(ctx, user, seen, rows, product.rows):
                return False
            seen.add(user)
            frontier.append(user)
    return True


def _keeps_rows(ctx: RuleContext, node, seen: set, rows: tuple, n_rows: int) -> bool:
    """Whether ``node`` keeps every entry of the activations it reads from ``seen`` in its row."""
    if node.op not in ("call_function", "call_method", "call_module"):
        return False
    target = mutated_argument(node, ctx.module(node) if node.op == "call_module" else None)
    if target is not None and target not in seen:
        return False  # an in-place write into a tensor the walk does not follow
    name = ctx.op_name(node) if node.op != "call_module" else None
    if name == "getitem":
        return node.args[0] in seen and ctx.op_name(node.args[0]) in ("chunk", "split", "split_with_sizes") \
            and isinstance(node.args[1], int) and _rows_of(ctx, node, rows, n_rows)
    if name in NEURON_DIM_OPS:
        dim = node.args[2] if name in ("chunk", "split", "split_with_sizes") and len(node.args) > 2 else \
            node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if not isinstance(dim, int):
            return False
        ndim = len(ctx.shape(node.args[0])) + (1 if name == "unsqueeze" else 0)
        return dim % ndim >= n_rows and (name in ("chunk", "split", "split_with_sizes")
                                         or _rows_of(ctx, node, rows, n_rows))
    rule = rule_for(ctx, node)
    return getattr(rule, "func", rule) in POSITIONWISE and _rows_of(ctx, node, rows, n_rows)


def _rows_of(ctx: RuleContext, node, rows: tuple, n_rows: int) -> bool:
    """The node's result has the product's rows first (no dim added in front by broadcasting)."""
    return ctx.is_tensor(node) and tuple(ctx.shape(node)[:n_rows]) == tuple(rows) \
        and len(ctx.shape(node)) > n_rows


def attachments_by_root(ctx: RuleContext, root_of: np.ndarray) -> dict[int, list]:
    """Per group root: the slices tied to it (only for the roots of expert products' spaces)."""
    wanted = set()
    for s in ctx.expert_products:
        space = ctx.spaces[s]
        wanted.update(root_of[space.start:space.start + space.size].tolist())
    found: dict[int, list] = {}
    for att in ctx.attachments:
        flat = att.ids.reshape(-1).numpy()
        roots = np.unique(root_of[flat[flat >= 0]])
        for r in roots.tolist():
            if r in wanted:
                found.setdefault(r, []).append(att)
    return found
