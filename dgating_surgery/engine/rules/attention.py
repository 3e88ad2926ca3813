"""Attention: heads as groups. A head is the block of query/key/value entries that meet only one
another in the attention product; its output reaches the output projection as its own columns.

- ``head_splits`` (a pre-pass, run before the walk): follows each attention operand back to the
  view that splits a projection's output into (heads, head_dim) and directs that split to carry
  the groups on the head dim, so the head, not a head_dim slot, is the group.
- ``sdpa``: ``scaled_dot_product_attention`` ties query head h with key/value head h // rep
  (grouped-query attention: a key/value head serves ``rep`` query heads, and all of them are one
  group), and a per-head mask or bias (T5's and Swin's relative position tables) with it; its output
  is zero where the value is (softmax weights sum to 1).
- ``matmul``: a product of two activations (explicit softmax(QK^T)V attention, or any batched
  matmul): batch dims meet entry by entry, the contracted dim is mixed (a group there must arrive as
  zeros), rows and columns carry their operand's groups.

Every attention site creates a ``heads`` space tied to its heads, so the groups it touches are
``heads`` groups; their gates scale the output projection's columns (``kinds.KINDS``).
"""
from __future__ import annotations

import torch

from ..kinds import PARAM_SPACE, Role
from ..labels import NONE, Labels
from ..tensors import along
from .context import RuleContext, unknown
from .elementwise import _is_zero
from .movement import reshape_groups
from .names import op_name
from .structural import addmm, arg

ATTENTION = {"scaled_dot_product_attention"}
_SAME_DIMS = {"contiguous", "clone", "to", "float", "half", "bfloat16", "type_as", "dropout", "alias", "detach",
              "_to_copy", "neg", "mul", "add", "sub", "truediv", "div", "slice"}
_ELEMENTWISE = {"mul", "add", "sub", "truediv", "div"}  # two operands, either may be the one that carries the heads


# -- the pre-pass: which reshape makes the heads ---------------------------------------------------
def head_splits(gm, values) -> dict[str, int]:
    """For each view/reshape that splits a projection into (heads, head_dim) on its way into an
    attention product: the output dim that is the head dim (node name -> dim)."""
    found: dict[str, int] = {}
    conflicts: set[str] = set()
    for node in gm.graph.nodes:
        for operand, dim in _attention_operands(node, values):
            hit = _trace_head_dim(operand, dim, values)
            if hit is None:
                continue
            name, out_dim = hit
            if found.get(name, out_dim) != out_dim:
                conflicts.add(name)
            found[name] = out_dim
    return {k: v for k, v in found.items() if k not in conflicts}


def _is_activation(n, values) -> bool:
    return isinstance(n, torch.fx.Node) and n.op != "get_attr" and hasattr(values.get(n), "shape")


def _attention_operands(node, values) -> list:
    if node.op not in ("call_function", "call_method"):
        return []
    name = op_name(node)
    if name in ATTENTION:
        return [(a, len(values[a].shape) - 3) for a in node.args[:3] if _is_activation(a, values)
                and len(values[a].shape) >= 4]
    operands = node.args[1:3] if name == "baddbmm" else node.args[:2]
    if name in ("matmul", "bmm", "baddbmm") and len(operands) == 2 and all(_is_activation(a, values) for a in operands):
        # (..., heads, T, D), or (batch * heads, T, D): heads merged into the batch dim (BLOOM, DeBERTa)
        return [(a, max(len(values[a].shape) - 3, 0)) for a in operands if len(values[a].shape) >= 3]
    return []


def _trace_head_dim(node, dim, values):
    """Follow ``dim`` of ``node`` back through data movement to the reshape that created it by
    splitting a larger dim: (that node's name, the output dim), or None."""
    for _ in range(64):
        if not isinstance(node, torch.fx.Node) or node.op not in ("call_function", "call_method"):
            return None
        name, args = op_name(node), node.args
        if name in ("transpose", "swapaxes", "swapdims"):
            nd = len(values[node].shape)
            a, b = args[1] % nd, args[2] % nd
            dim = b if dim == a else a if dim == b else dim
        elif name == "permute":
            order = args[1] if isinstance(args[1], (list, tuple)) else args[1:]
            dim = order[dim] % len(order)
        elif name == "unsqueeze":
            u = args[1] % len(values[node].shape)
            if dim == u:
                return None
            dim = dim - 1 if dim > u else dim
        elif name == "select":  # one part of a fused projection (BLOOM-style ``view(B, T, H, 3, Dh)[..., 0, :]``)
            s = args[1] % len(values[args[0]].shape)
            node, dim = args[0], dim if dim < s else dim + 1
            continue
        elif name == "getitem" and isinstance(args[1], int) and isinstance(args[0], torch.fx.Node) \
                and op_name(args[0]) == "unbind":
            unbind = args[0]
            u = arg(unbind, 1, "dim", 0) % len(values[unbind.args[0]].shape)
            node, dim = unbind.args[0], dim if dim < u else dim + 1
            continue
        elif name in ("view", "reshape", "_unsafe_view", "unflatten", "expand"):
            src, dst = values[args[0]].shape, values[node].shape
            if name == "expand":
                node = args[0]
                continue
            for ins, outs in reshape_groups(src, dst):
                if dim not in outs:
                    continue
                big_in = [i for i in ins if src[i] > 1]
                big_out = [o for o in outs if dst[o] > 1]
                if len(big_in) == 1 and len(big_out) > 1:
                    return node.name, dim  # the split that makes the heads
                if len(big_in) >= 1 and len(big_out) == 1:
                    # a merge (grouped-query attention's repeat, heads merged into the batch dim): the one
                    # merged dim that traces back to a split (a repeat's copies or the batch trace to none)
                    hits = {hit for i in big_in if (hit := _trace_head_dim(args[0], i, values)) is not None}
                    return hits.pop() if len(hits) == 1 else None
                return None
            else:
                return None
        elif name == "repeat":  # tiled copies along a dim keep its entries' order (DeBERTa's position keys)
            extra = len(values[node].shape) - len(values[args[0]].shape)
            if dim < extra:
                return None
            node, dim = args[0], dim - extra
            continue
        elif name == "cat" and isinstance(args[0], (list, tuple)) and args[0]:
            if arg(node, 1, "dim", 0) % len(values[node].shape) == dim:
                return None
            node = args[0][0]
            continue
        elif name not in _SAME_DIMS:
            return None
        elif name in _ELEMENTWISE:  # a per-head norm's ``weight * x`` (Qwen3's q_norm): follow the activation
            full = [a for a in args[:2] if _is_activation(a, values) and values[a].shape == values[node].shape]
            if not full:
                return None
            node = full[0]
            continue
        node = args[0]
    return None


# -- the rules ---------------------------------------------------------------------------------------
def _heads(ctx: RuleContext, node, count: int) -> torch.Tensor:
    """A fresh ``heads`` space of the attention module the node belongs to."""
    path, _ = ctx.owner_module(node)
    return ctx.new_space(count, "heads", f"{path}.heads" if path else "heads", node)


def _head_line(ctx: RuleContext, x, hdim: int, node, count: int) -> Labels | None:
    """Labels of attention operand ``x`` per head (1-D, ``count`` long; a broadcast operand is
    repeated), or None when it carries no group; groups within a head are blocked (``per_dim``)."""
    lab = ctx.per_dim(x, hdim, node)
    if lab is None:
        return None
    flat = lab.map(lambda t: t.reshape(-1))
    return flat if flat.ids.numel() == count else flat.map(lambda t: t.expand(count))


def sdpa(ctx: RuleContext, node):
    """scaled_dot_product_attention(q, k, v, attn_mask, ..., enable_gqa): heads are tied across
    q, k, v and the mask; the output is zero where v is."""
    q, k, v = (arg(node, i, n) for i, n in enumerate(("query", "key", "value")))
    mask = arg(node, 3, "attn_mask")
    if all(ctx.labels(t) is None for t in (q, k, v, mask) if t is not None):
        return None
    nd = len(ctx.shape(q))
    hdim = nd - 3
    heads = ctx.shape(q)[hdim]
    kv_heads = ctx.shape(k)[hdim]
    rep = heads // kv_heads if kv_heads and heads % kv_heads == 0 else 1
    if ctx.query_heads:
        split = _query_heads(ctx, node, (q, k, v, mask), hdim, heads, kv_heads)
        if split is not None:
            return split
    ids = _heads(ctx, node, heads)
    value = None
    for t, step in ((q, 1), (k, rep), (v, rep)):
        line = _head_line(ctx, t, hdim, node, heads // step)
        if line is None and t is not q:  # said before the tie below blocks the heads in the engine's terms
            path = ctx.owner_module(node)[0]
            ctx.taint(ids, f"the query heads of {repr(path) if path else ctx.where(node)} share keys and values that "
                           "are not split by head (as in multi-query attention: one key/value head for all query "
                           "heads), so no head can go without the others")
        mapped = line.map(lambda x: x[torch.arange(heads) // step]) if line is not None else None
        ctx.tie(ids.numpy(), mapped.ids.numpy() if mapped is not None else torch.full((heads,), NONE).numpy(), node)
        if t is v:
            value = mapped
    mask_size = (1,) * (nd - len(ctx.shape(mask))) + tuple(ctx.shape(mask)) if ctx.is_tensor(mask) else None
    if mask_size is not None and ctx.labels(mask) is None and mask_size[hdim] > 1:
        ctx.taint(ids, f"the attention mask at {ctx.where(node)} holds one slice per head (a per-head bias such as "
                       "ALiBi's slopes, computed from the head count) that belongs to no group, so no head can go")
        ctx.tie(ids.numpy(), torch.full((heads,), NONE).numpy(), node)  # a per-head mask of no group: heads stay
    if mask is not None and ctx.labels(mask) is not None:
        size = mask_size
        if size[hdim] == heads:
            line = _head_line(ctx, mask, hdim - (nd - len(ctx.shape(mask))), node, heads)
            if line is not None:
                ctx.tie(ids.numpy(), line.ids.numpy(), node)
        elif ctx.labels(mask).any:
            ctx.taint(ctx.labels(mask).ids, f"the attention mask at {ctx.where(node)} carries groups that are not heads")
    zaff = value.zaff if value is not None else torch.zeros(heads, dtype=torch.bool)
    zall = value.zall if value is not None else torch.zeros(heads, dtype=torch.bool)
    return Labels(along(ids, hdim, nd), along(zaff, hdim, nd), along(zall, hdim, nd)).compressed()


def _past_copies(node):
    """The tensor a chain of copies (``contiguous``, ``clone``) was made from."""
    while isinstance(node, torch.fx.Node) and op_name(node) in ("contiguous", "clone", "alias"):
        node = node.args[0]
    return node


def _repeated_heads(node, dim, values) -> int | None:
    """``repeat_kv``'s form: ``dim`` of ``node`` merges (kv, r) -> kv * r in a reshape of an expand that
    broadcast the r dim (every query head of a group reads the same key/value head); kv, else None."""
    node = _past_copies(node)
    if not isinstance(node, torch.fx.Node) or op_name(node) not in ("reshape", "view", "_unsafe_view"):
        return None
    expand = _past_copies(node.args[0])
    if not isinstance(expand, torch.fx.Node) or op_name(expand) != "expand":
        return None
    src, dst, before = values[node.args[0]].shape, values[node].shape, values[expand.args[0]].shape
    for ins, outs in reshape_groups(src, dst):
        if outs == [dim] and len(ins) == 2 and len(before) == len(src) and before[ins[1]] == 1:
            return src[ins[0]]
    return None


def _query_heads(ctx: RuleContext, node, operands, hdim: int, heads: int, kv_heads: int) -> Labels | None:
    """Grouped-query attention split open (``ctx.query_heads``, a recipe asking for kind
    ``query_heads``): a ``query_heads`` space with one entry per query head (tied to its query rows;
    the output projection's columns gate it) and one per key/value group (tied to its key and value
    rows, gated as their producer: the value then reaches the attention as zeros, so every query head
    it serves outputs zeros). Query head h reads key/value head h // r, r = heads / kv heads, read off
    the shapes: ``enable_gqa`` (or a kv head broadcast to all), or ``repeat_kv``'s expand-and-merge,
    whose repeated ids must show it. The cut keeps that true (``equal_query_heads``). None where the
    attention is not so (each kv head serves one query head, a per-head mask or bias, heads that carry
    no group): the whole-group rule applies."""
    q, k, v, mask = operands
    nd = len(ctx.shape(q))
    if ctx.is_tensor(mask) and (ctx.labels(mask) is not None or ((1,) * nd + tuple(ctx.shape(mask)))[-nd:][hdim] > 1):
        return None
    query = _head_line(ctx, q, hdim, node, heads)
    if query is None or query.ids.numel() != heads or not kv_heads:
        return None
    width = 1  # positions per key/value head along the attention's head dim
    if kv_heads == heads:  # repeat_kv: one position per query head, each kv head repeated
        repeated = {_repeated_heads(t, hdim, ctx.values) for t in (k, v)}
        if len(repeated) != 1 or None in repeated or heads % min(repeated):
            return None
        width = heads // repeated.pop()
    groups = kv_heads // width
    if heads % groups or groups == heads:
        return None
    lines = [_head_line(ctx, t, hdim, node, kv_heads) for t in (k, v)]
    path = ctx.owner_module(node)[0]
    if groups == 1:  # multi-query: the one kv head stays (it serves every query head)
        for line in lines:
            if line is not None:
                ctx.taint(line.ids, f"the one key/value head of {repr(path) if path else ctx.where(node)} serves "
                                    "every query head (multi-query attention): it stays")
        groups, lines = 0, None
    elif any(line is None or line.ids.numel() != kv_heads or not bool((line.ids.reshape(groups, width) ==
                                                                      line.ids[::width, None]).all())
             for line in lines):
        return None
    ids = ctx.new_space(heads + groups, "query_heads", f"{path}.heads" if path else "heads", node)
    per_group = heads // max(groups, 1)
    ctx.spaces[-1].kv_of = [heads + h // per_group if groups else -1 for h in range(heads)] + \
                           [heads + j for j in range(groups)]
    ctx.tie(ids[:heads].numpy(), query.ids.numpy(), node)
    for line in lines or ():
        ctx.tie(ids[heads:].numpy(), line.ids[::width].numpy(), node)
    if lines:  # a key/value group's value is read by the attention's weighted sum: it must arrive as zeros
        value = lines[1].map(lambda t: t[::width])
        ctx.visit(value, node)
    none = torch.zeros(heads, dtype=torch.bool)
    return Labels(along(ids[:heads], hdim, nd), along(none, hdim, nd), along(none, hdim, nd)).compressed()


def matmul(ctx: RuleContext, node, operands=None):
    """A product of two activations A @ B (an activation times a parameter is a linear layer:
    ``structural.weight_matmul``, which the table asks first): a group may run along the batch dims
    (both operands meet there entry by entry: attention heads, also when merged into the batch dim
    of a 3-D product, which then holds each head's ids once per batch element), along A's rows, or
    along B's columns, and along the contracted dim (mixed: it must arrive as zeros, from either
    side); two of these at once would put an entry in two groups, and is blocked. A parameter here
    has no rule. ``operands``: (A, B) when they are not the node's first two arguments."""
    a, b = operands or node.args[:2]
    if ctx.fqn(a) is not None or ctx.fqn(b) is not None or not (ctx.is_tensor(a) and ctx.is_tensor(b)):
        return unknown(ctx, node)
    if ctx.labels(a) is None and ctx.labels(b) is None:
        return None
    out = tuple(ctx.shape(node))
    nd = len(out)
    if len(ctx.shape(a)) < 2 or len(ctx.shape(b)) < 2:
        return unknown(ctx, node)
    (la, sa), (lb, sb) = (_aligned(ctx, t, nd) for t in (a, b))
    batch = list(range(nd - 2))
    va, vb = set(la.varying_dims()), set(lb.varying_dims())
    contracted = (nd - 1 in va) or (nd - 2 in vb)
    kinds = {"batch" if d in batch else "rows" for d in va - {nd - 1}} | \
            {"batch" if d in batch else "cols" for d in vb - {nd - 2}}
    if len(kinds) > 1 or (contracted and kinds) or len(va) > 1 or len(vb) > 1:
        ctx.taint_inputs(node, f"{ctx.where(node)} multiplies tensors grouped along different dims (an entry would "
                               "belong to two groups)")
        return None
    if contracted:  # sum_k a_k b_k: a group along k adds nothing when either side of it is zero
        x, y = torch.broadcast_tensors(_line(la, nd - 1), _line(lb, nd - 2))
        ctx.tie(x.numpy(), y.numpy(), node)
        zero = _line_flag(la, nd - 1, "zall") | _line_flag(lb, nd - 2, "zall")
        ctx.visit(Labels(torch.where(x >= 0, x, y), zero, zero), node)
        return None
    ids = torch.full(out, NONE, dtype=torch.int64)
    zaff = torch.zeros(out, dtype=torch.bool)
    zall = torch.zeros(out, dtype=torch.bool)
    if kinds == {"batch"}:
        for d in sorted(va | vb):
            lines = [_line(lab, d) for lab, size in ((la, sa), (lb, sb)) if size[d] > 1]
            if len(lines) == 2:
                ctx.tie(lines[0].numpy(), lines[1].numpy(), node)
        if nd >= 4 and nd - 3 in (va | vb):
            line = _line(la, nd - 3) if nd - 3 in va else _line(lb, nd - 3)
            ctx.tie(_heads(ctx, node, out[nd - 3]).numpy(), line.expand(out[nd - 3]).numpy(), node)
        if nd == 3 and 0 in (va | vb):  # (batch * heads, T, D): one entry per distinct head of the merged dim
            line = (_line(la, 0) if 0 in va else _line(lb, 0)).expand(out[0])
            distinct, position = torch.unique(line, return_inverse=True)
            if distinct.numel() == line.numel():  # a batch of 1 hides the order of batch and heads
                ctx.taint(line, f"{ctx.where(node)} multiplies heads merged into the batch dim, and at a batch "
                                "of 1 the order of batch and heads cannot be seen: give example inputs with a "
                                "batch of 2 or more")
            else:
                ctx.tie(_heads(ctx, node, distinct.numel())[position].numpy(), line.numpy(), node)
    for lab, keep in ((la, [*batch, nd - 2]), (lb, [*batch, nd - 1])):
        part = _project(lab, keep, nd, out)
        ids = torch.where(ids >= 0, ids, part.ids)
        zaff, zall = zaff | part.zaff, zall | part.zall
    return Labels(ids, zaff, zall).compressed()


def baddbmm(ctx: RuleContext, node):
    """bias + A @ B: a weight B is a linear (``structural.addmm``); two activations are attention
    scores (``matmul``) plus a bias. A bias that carries no group but varies along the dims the
    product's groups run along (BLOOM's ALiBi: per-head slopes computed from the head count, outside
    the layer) cannot shrink with them; one that carries groups has no rule."""
    bias, a, b = node.args[:3]
    if ctx.weight(b) is not None or not (ctx.is_tensor(a) and ctx.is_tensor(b)):
        return addmm(ctx, node)
    if ctx.labels(bias) is not None:
        return unknown(ctx, node)
    out = matmul(ctx, node, (a, b))
    if out is None or not ctx.is_tensor(bias):
        return out
    size = (1,) * (out.ids.ndim - len(ctx.shape(bias))) + tuple(ctx.shape(bias))
    if any(size[d] > 1 for d in out.varying_dims()):
        ctx.taint(out.ids, f"{ctx.where(node)} adds a tensor that carries no group along the heads (a bias built "
                           "outside the layer from the head count, such as ALiBi's per-head slopes), which cannot "
                           "shrink with them")
    return out.not_zero()


def _aligned(ctx: RuleContext, x, nd: int) -> tuple[Labels, tuple]:
    """A matmul operand's labels and shape with leading batch dims of size 1 up to ``nd`` dims."""
    shape = tuple(ctx.shape(x))
    lab = ctx.labels(x) or Labels.unlabeled((1,) * len(shape))
    lead = (1,) * (nd - len(shape))
    return lab.map(lambda t: t.reshape(lead + tuple(t.shape))), lead + shape


def _line(lab: Labels, dim: int) -> torch.Tensor:
    """The ids along ``dim`` (the operand varies along no other dim)."""
    t = lab.ids
    for d in range(t.ndim):
        if d != dim:
            t = t.narrow(d, 0, 1)
    return t.reshape(-1)


def _line_flag(lab: Labels, dim: int, flag: str) -> torch.Tensor:
    """A zero flag along ``dim``: zero where every entry of that position is."""
    t = getattr(lab, flag)
    for d in range(t.ndim):
        if d != dim:
            t = t.all(d, keepdim=True)
    return t.reshape(-1)


def _project(lab: Labels, keep: list[int], nd: int, out) -> Labels:
    """An operand's labels on the output's dims ``keep`` (its other dim is contracted away)."""
    def project(t):
        for d in range(nd):
            if d not in keep:
                t = t.narrow(d, 0, 1)
        return t.expand(*out)
    return Labels(project(lab.ids), project(lab.zaff), project(lab.zall))


def multihead_attention(ctx: RuleContext, node):
    """nn.MultiheadAttention (self-attention, packed in_proj): head h is the rows [h*D, (h+1)*D) of
    each third (query, key, value) of ``in_proj_weight`` and the same columns of ``out_proj``. Its
    forward derives the head width from ``embed_dim``, so a cut layer becomes a
    ``slim_layers.SlimMultiheadAttention``, which computes from its own tensors' widths."""
    m = ctx.module(node)
    query, key, value = (arg(node, i, n) for i, n in enumerate(("query", "key", "value")))
    unsupported = (not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn
                   or not (query is key is value))
    weight, bias = ctx.fqn_of(node, "in_proj_weight"), ctx.fqn_of(node, "in_proj_bias")
    if unsupported or weight is None:
        ctx.taint_inputs(node, f"flows into {ctx.where(node)}: only self-attention with one packed in_proj and no "
                               "bias_k/bias_v or zero attention is cut by heads")
        return [None, None]
    nd = len(ctx.shape(query))
    feature_dim = nd - 1
    heads, dim = m.num_heads, m.head_dim
    ctx.consume(weight, 1, 2, ctx.per_dim(query, feature_dim, node), node)
    ids = _heads(ctx, node, heads)
    rows = ids.repeat_interleave(dim).repeat(3)  # q, k and v thirds, each head's D rows
    ctx.attach(weight, Role.PRODUCER, along(rows, 0, 2), 0)
    if bias is not None:
        ctx.attach(bias, Role.PRODUCER, rows, 0)
    columns = ids.repeat_interleave(dim)
    out_weight, out_bias = ctx.fqn_of(node, "out_proj.weight"), ctx.fqn_of(node, "out_proj.bias")
    ctx.consume(out_weight, 1, 2, Labels.fresh(columns, zaff=False, zall=True), node)
    out = ctx.new_space(m.embed_dim, "neurons", out_weight, node)
    ctx.attach(out_weight, Role.PRODUCER, along(out, 0, 2), 0)
    if out_bias is not None:
        ctx.attach(out_bias, Role.PRODUCER, out, 0)
    return [Labels.fresh(along(out, feature_dim, nd), zaff=False, zall=True), None]


def created(ctx: RuleContext, node, fill=None):
    """torch.zeros / ones / full of a size that follows a cut: a dim sized by an attribute a fixer keeps
    (T5's zero position bias, ``zeros((1, self.n_heads, T, S))`` in a layer without its own table) gets
    entries of its own, which shrink with whatever they meet (the heads they are added to); nothing is
    cut, the forward builds the tensor with the new count. Sizes the code fixes keep no group."""
    size = arg(node, 0, "size")
    if not isinstance(size, (list, tuple)):
        return None
    free = [d for d, n in enumerate(size) if type(n) is int and n > 1 and not ctx.fixed_by_code(node, n)]
    if len(free) != 1:
        return None
    path = ctx.owner_module(node)[0]
    ids = ctx.new_space(size[free[0]], PARAM_SPACE, f"{path}.{node.name}", node, module_type="constant")
    zero = _is_zero(fill if fill is not None else arg(node, 1, "fill_value"))
    flags = torch.full((size[free[0]],), zero, dtype=torch.bool)
    return Labels(*(along(t, free[0], len(size)) for t in (ids, flags, flags)))
