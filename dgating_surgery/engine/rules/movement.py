"""Data-movement rules: the op itself is run on the label tensors (``ctx.rerun``), so every
permutation, view, slice and concatenation moves group ids exactly as it moves data. A check then
ties entries that must shrink together (the parts of a chunk) or blocks groups whose positions the
code fixes (a literal split size, a fixed index)."""
from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ..fixers import kept_sizes
from ..labels import Labels
from ..tensors import along
from .context import RuleContext, SizeRef, unknown
from .structural import arg, embedding


def movement(ctx: RuleContext, node, check=None, call=None):
    """Move labels with the op (or ``call``, given the node's arguments); ``check(ctx, node, out)``
    then ties or blocks entries."""
    if not any(ctx.labels(a) is not None for a in ctx.tensor_args(node)):
        return None
    out = ctx.rerun(node, call)
    if check is not None:
        check(ctx, node, out)
    if isinstance(out, (list, tuple)):
        return [o.compressed() for o in out]
    return out.compressed()


def pad(ctx: RuleContext, node):
    """F.pad / constant_pad_nd / the Pad modules. Padding a dim that carries no group widens every
    group there with padded entries of its own: they stay zero with the group unless the padding
    writes a non-zero constant. Padding a grouped dim adds entries of no group (constant mode
    only: reflected or replicated entries would copy groups to positions the code fixes)."""
    x = node.args[0]
    lab = ctx.labels(x)
    if lab is None:
        return None
    if node.op == "call_module":
        m = ctx.module(node)
        pads, value = list(m.padding), getattr(m, "value", 0.0)
        mode = "constant" if isinstance(m, (nn.ZeroPad2d, nn.modules.padding._ConstantPadNd)) else "copy"
    else:
        pads = list(arg(node, 1, "pad"))
        mode = "constant" if ctx.op_name(node) == "constant_pad_nd" else arg(node, 2, "mode", "constant")
        value = arg(node, 3 if ctx.op_name(node) != "constant_pad_nd" else 2, "value", 0.0)
    nd = len(ctx.shape(x))
    padded = {nd - 1 - i // 2 for i, p in enumerate(pads) if p != 0}
    keeps_zero = mode != "constant" or not value
    if not padded & set(lab.varying_dims()):
        return lab if keeps_zero else lab.not_zero()
    if mode != "constant" or any(p < 0 for p in pads):
        ctx.taint(lab.ids, f"{ctx.where(node)} pads a grouped dim by copying its entries, or crops it")
        return None
    return movement(ctx, node, call=lambda t, *_, **__: F.pad(t, pads))


def reshape_groups(src, dst):
    """Pairs (input dims, output dims) whose sizes multiply to the same number, left to right."""
    groups, i, j = [], 0, 0
    while i < len(src) or j < len(dst):
        ins, outs, pi, pj = [], [], 1, 1
        if i < len(src):
            pi *= src[i]; ins.append(i); i += 1  # noqa: E702
        if j < len(dst):
            pj *= dst[j]; outs.append(j); j += 1  # noqa: E702
        while pi != pj and (i < len(src) or j < len(dst)):
            if (pi < pj and i < len(src)) or j >= len(dst):
                pi *= src[i]; ins.append(i); i += 1  # noqa: E702
            else:
                pj *= dst[j]; outs.append(j); j += 1  # noqa: E702
        groups.append((ins, outs))
    return groups


def _check_reshape(ctx: RuleContext, node, out, sizes):
    """A reshape that splits a grouped dim keeps the factors the code fixes (a literal size) and
    ties entries across every factor but the one that carries the groups (``ctx.split_carrier``),
    so the split still works on the smaller tensor; a grouped dim whose sizes the code fixes
    entirely cannot shrink at all."""
    x = node.args[0]
    lab = ctx.labels(x)
    src, dst = ctx.shape(x), ctx.shape(node)
    literal = ctx.literal_sizes(node, sizes, len(dst))
    full = out.ids
    for ins, outs in reshape_groups(src, dst):
        if not any(d in lab.varying_dims() for d in ins):
            continue
        big = [d for d in outs if dst[d] > 1]
        free = [d for d in big if not literal[d]]
        if ctx.frontend == "export" and len(big) == 1 and sum(src[i] > 1 for i in ins) > 1:
            free = big  # torch.export wrote a merge's computed size (grouped-query attention's repeat) as an int
        if big and not free:
            ctx.taint(lab.ids, f"the forward code fixes the size of a grouped dim to {[dst[d] for d in big]} "
                               f"at {ctx.where(node)}, so it cannot shrink")
            continue
        carrier = ctx.split_carrier(node, free) if free else None
        if free and carrier is None:
            ctx.taint(lab.ids, f"the forward code fixes the head count at {ctx.where(node)} (a literal, or an "
                               "attribute no fixer keeps up to date), so heads cannot be removed")
            continue
        if _mixes_copies(full, outs, [d for d in big if d != carrier]):
            ctx.taint(lab.ids, f"{ctx.where(node)} splits a dim that holds each group once per batch element (heads "
                               "merged into the batch dim) at other factors than it was merged by, so which groups "
                               "it mixes depends on the batch size")
            continue
        for d in big:
            if d != carrier:
                for k in range(1, dst[d]):
                    ctx.tie(full.select(d, 0).numpy(), full.select(d, k).numpy(), node)


def _mixes_copies(full: torch.Tensor, outs: list[int], tied: list[int]) -> bool:
    """Whether the split dims ``outs`` of a reshape's output ids hold some group more than once (the
    copies of a merge with the batch: ``(batch * heads)``) and the ties across ``tied`` would join
    different ids: the split then regroups the copies, and its groups follow the batch size."""
    line = full
    for d in range(full.ndim):
        if d not in outs:
            line = line.narrow(d, 0, 1)
    line = line.reshape(-1)
    line = line[line >= 0]
    if line.unique().numel() == line.numel():
        return False
    return any(bool(((a != b) & (a >= 0) & (b >= 0)).any())
               for d in tied for a, b in [(full.select(d, 0), full.select(d, k)) for k in range(1, full.shape[d])])


def _view_sizes(ctx: RuleContext, node) -> list:
    """The sizes a view asks for, one per output dim: an int (written in the code, or computed
    from dims that carry no group: it will not change) or the SizeRef of a grouped dim it reads
    (``x.view(b, c // 2, 2)``, ``x.reshape(y.shape)``)."""
    if node.op == "call_method":
        rest = node.args[1:]
        sizes = list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else list(rest)
    else:
        sizes = list(arg(node, 1, "shape", []))
    if len(sizes) == 1 and isinstance(ctx.values.get(sizes[0]), (list, tuple)):  # a whole shape
        state = ctx.env.get(sizes[0])
        refs = state if isinstance(state, (list, tuple)) else [None] * len(ctx.values[sizes[0]])
        return [ref if isinstance(ref, SizeRef) else value for ref, value in zip(refs, ctx.values[sizes[0]])]
    return [_size(ctx, s) for s in sizes]


def _size(ctx: RuleContext, s):
    if not isinstance(s, torch.fx.Node):
        return s
    state = ctx.env.get(s)
    return state if isinstance(state, SizeRef) else ctx.values.get(s)


def check_view(ctx: RuleContext, node, out):
    """A view: the reshape check, and each output dim sized by another tensor's grouped dim
    (``x.view(y.size())``) tied to that dim's entries, so both shrink alike."""
    sizes = _view_sizes(ctx, node)
    _check_reshape(ctx, node, out, sizes)
    if len(sizes) == out.ids.ndim:
        for d, ref in enumerate(sizes):
            if isinstance(ref, SizeRef) and ref.exact and ref.ids.numel() == ctx.shape(node)[d]:
                ctx.tie(out.ids.numpy(), along(ref.ids, d, out.ids.ndim).numpy(), node)


def check_as(ctx: RuleContext, node, out):
    """view_as / reshape_as / expand_as: the result has the other tensor's shape, so it is tied to
    the other tensor's groups entry by entry (a tensor with none never shrinks: nor may the result)."""
    other = ctx.labels(node.args[1])
    if other is None:
        other = Labels.unlabeled(ctx.shape(node.args[1]))
    ids, others = torch.broadcast_tensors(out.ids, other.ids)
    ctx.tie(ids.numpy(), others.numpy(), node)


def check_unflatten(ctx: RuleContext, node, out):
    sizes = list(arg(node, 2, "sizes", []))
    dim = arg(node, 1, "dim") % len(ctx.shape(node.args[0]))
    after = len(ctx.shape(node)) - dim - len(sizes)
    _check_reshape(ctx, node, out, [-1] * dim + sizes + [-1] * after)


def check_chunk(ctx: RuleContext, node, out, dim_pos=2):
    """chunk(n) splits in equal parts: tie entry j of every part so all parts shrink alike."""
    x = node.args[0]
    lab = ctx.labels(x)
    dim = arg(node, dim_pos, "dim", 0) % len(ctx.shape(x))
    if dim not in lab.varying_dims():
        return
    parts = list(out)
    if len({p.ids.shape for p in parts}) != 1:
        ctx.taint(lab.ids, f"{ctx.where(node)} splits a grouped dim into unequal parts")
        return
    for part in parts[1:]:
        ctx.tie(parts[0].ids.numpy(), part.ids.numpy(), node)


def check_split(ctx: RuleContext, node, out):
    """split into parts of a size: like chunk when the size follows the tensor (a graph node, or
    under torch.export a layer attribute a fixer keeps, see ``ctx.fixed_by_code``); unequal parts
    where the parts of a fused projection meet (``ctx.follows_parts``: GPT-BigCode's
    ``split((embed_dim, kv_dim, kv_dim))``) each keep their own groups; a size written in the code
    fixes the positions of a grouped dim, which then cannot shrink."""
    x = node.args[0]
    lab = ctx.labels(x)
    dim = arg(node, 2, "dim", 0) % len(ctx.shape(x))
    if dim not in lab.varying_dims():
        return
    sizes = arg(node, 1, "split_size")
    if isinstance(sizes, (list, tuple)) and len(set(sizes)) > 1 \
            and ctx.follows_parts(node, [sum(sizes[:k]) for k in range(1, len(sizes))]):
        return  # the parts of a fused projection, split where they meet (each part keeps its own groups)
    if not any(ctx.fixed_by_code(node, s) for s in (sizes if isinstance(sizes, (list, tuple)) else [sizes])):
        return check_chunk(ctx, node, out)
    ctx.taint(lab.ids, f"{ctx.where(node)} splits a grouped dim at positions fixed in the code")


def _indexed_dims(ctx: RuleContext, node):
    """The input dims that an indexing op narrows (anything but a full slice)."""
    x = node.args[0]
    nd = len(ctx.shape(x))
    name = ctx.op_name(node)
    if name in ("slice", "narrow", "select"):
        dim = arg(node, 1, "dim", 0) % nd
        if name == "slice":
            start, end = arg(node, 2, "start", None), arg(node, 3, "end", None)
            step = arg(node, 4, "step", 1)
            if (start in (None, 0)) and (end is None or end >= ctx.shape(x)[dim]) and step == 1:
                return []
        return [dim]
    index = node.args[1]
    index = index if isinstance(index, tuple) else (index,)
    if any(i is Ellipsis for i in index):
        at = next(k for k, i in enumerate(index) if i is Ellipsis)
        real = [i for i in index if i is not None and i is not Ellipsis]
        index = index[:at] + (slice(None),) * (nd - len(real)) + index[at + 1:]
    dims, d = [], 0
    for i in index:
        if i is None:
            continue
        if not (isinstance(i, slice) and i == slice(None)):
            dims.append(d)
        d += 1
    return dims


def take_along(ctx: RuleContext, node):
    """torch.gather(x, dim, index): each output entry is an entry of x at the same position but along
    ``dim``, where the index picks it (DeBERTa's relative positions). Exact for groups that do not
    run along ``dim`` and whose dims the index keeps whole; an index that carries groups, or one that
    picks positions of a grouped dim, fixes positions the cut would move."""
    x, index = node.args[0], arg(node, 2, "index")
    lab = ctx.labels(x)
    if lab is None and ctx.labels(index) is None:
        return None
    if lab is None or ctx.labels(index) is not None:
        return unknown(ctx, node)
    src, dst = ctx.shape(x), ctx.shape(node)
    dim = arg(node, 1, "dim") % len(src)
    changed = [d for d in range(len(src)) if d == dim or src[d] != dst[d]]
    if set(changed) & set(lab.varying_dims()):
        ctx.taint(lab.ids, f"{ctx.where(node)} gathers positions of a grouped dim that the index fixes")
        return None
    return lab.reduced(changed).compressed()


def check_index(ctx: RuleContext, node, out):
    """Indexing a grouped dim fixes the positions it selects, unless it is a slice (step 1) whose
    ends are where the parts of a fused projection meet, as the layer's fixer keeps them (Phi-3's
    ``qkv[..., :query_pos]``, ``query_pos = config.num_attention_heads * head_dim``): after the cut
    each end counts the kept positions before it, so each part keeps its own groups."""
    lab = ctx.labels(node.args[0])
    narrowed = set(_indexed_dims(ctx, node)) & set(lab.varying_dims())
    if narrowed and not _part_slice(ctx, node, narrowed):
        ctx.taint(lab.ids, f"{ctx.where(node)} selects positions of a grouped dim that the code fixes")


def _part_slice(ctx: RuleContext, node, narrowed: set[int]) -> bool:
    """Whether ``node`` is a step-1 slice of the one grouped dim it narrows whose ends follow a cut: an
    end inside the dim at a position where the parts of a fused projection meet (``ctx.follows_parts``),
    or an end counted from the back (Falcon's ``fused_qkv[..., :-2, :]``) when the positions behind it
    stay (``_keep_tail``)."""
    nd = len(ctx.shape(node.args[0]))
    if ctx.op_name(node) == "slice":
        dim, start, end, step = (arg(node, 1, "dim", 0) % nd, arg(node, 2, "start", None), arg(node, 3, "end", None),
                                 arg(node, 4, "step", 1))
    elif ctx.op_name(node) == "getitem" and len(_indexed_dims(ctx, node)) == 1:
        index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        cut = [i for i in index if isinstance(i, slice) and i != slice(None)]
        if len(cut) != 1:
            return _list_index(ctx, node, narrowed, index)
        dim, (start, end, step) = _indexed_dims(ctx, node)[0], (cut[0].start, cut[0].stop, cut[0].step)
    else:
        return False
    size = ctx.shape(node.args[0])[dim]
    ends = [e for e in (start, end) if e is not None]
    if narrowed != {dim} or step not in (None, 1) or any(type(e) is not int for e in ends):
        return False
    back = [e for e in ends if -size <= e < 0]
    inside = [e for e in ends if 0 < e < size]
    if not back and not inside or back and not _keep_tail(ctx, node, dim, -min(back)):
        return False
    return not inside or ctx.follows_parts(node, inside)


def _keep_tail(ctx: RuleContext, node, dim: int, count: int) -> bool:
    """A selection counted from the back of grouped dim ``dim`` (its last ``count`` positions, or an
    end before them) follows a cut when those positions never go: they stay (tainted), so that after
    the cut the same count from the back finds the same entries, and everything before them keeps its
    order. Refused (False) when ``count`` is a size the layer's fixer changes: the code may compute it
    from that count (``self.num_kv_heads``), which a cut would then move (not the last position alone:
    a cut only lowers a count, and a count of 1 lowered is none of what it counted)."""
    _, module = ctx.owner_module(node)
    if count > 1 and module is not None and count in kept_sizes(module):
        return False
    lab = ctx.labels(node.args[0])
    size = ctx.shape(node.args[0])[dim]
    ids = lab.ids.expand(ctx.shape(node.args[0])).narrow(dim, size - count, count)
    ctx.taint(ids, f"{ctx.where(node)} selects positions counted from the back of a grouped dim: its last {count} "
                   "stay, so that the same count from the back still finds them")
    return True


def _list_index(ctx: RuleContext, node, narrowed: set[int], index: tuple) -> bool:
    """``x[..., [-2], :]``: positions of one grouped dim written as a list of ints counted from the back
    (symbolic tracing keeps the list): they follow a cut when the positions from the first of them to
    the end stay (``_keep_tail``)."""
    lists = [i for i in index if isinstance(i, (list, tuple))]
    if len(lists) != 1 or len(narrowed) != 1 or not lists[0] \
            or not all(type(p) is int and p < 0 for p in lists[0]):
        return False
    dim = next(iter(narrowed))
    size = ctx.shape(node.args[0])[dim]
    return -min(lists[0]) <= size and _keep_tail(ctx, node, dim, -min(lists[0]))


def _constant(ctx: RuleContext, node) -> torch.Tensor | None:
    """The value of a tensor the code wrote as a constant (torch.export lifts ``[-2]`` in an index to a
    constant of the graph, read through ``lift_fresh_copy``), or None: a model parameter or buffer, or
    anything computed in the forward."""
    while isinstance(node, torch.fx.Node) and node.op == "call_function" \
            and ctx.op_name(node) in ("lift_fresh_copy", "clone", "detach", "alias"):
        node = node.args[0]
    if not isinstance(node, torch.fx.Node) or node.op != "get_attr" or ctx.tensor_name(node.target) is not None:
        return None
    value = ctx.gm
    for part in node.target.split("."):
        value = getattr(value, part, None)
    return value if isinstance(value, torch.Tensor) else None


def constant_index(ctx: RuleContext, node):
    """``aten.index`` with one constant index tensor (``fused_qkv[..., [-2], :]`` under torch.export):
    labels move as the data does; on a grouped dim only positions counted from the back, which follow
    a cut when the positions from the first of them to the end stay (``_keep_tail``). Anything else
    (an index computed in the forward, positions counted from the front) has no rule."""
    x, indices = node.args[0], node.args[1] if len(node.args) > 1 else None
    lab = ctx.labels(x)
    if lab is None or not isinstance(indices, (list, tuple)):
        return unknown(ctx, node)
    picked = [(d, i) for d, i in enumerate(indices) if i is not None]
    if len(picked) != 1:
        return unknown(ctx, node)
    dim, index = picked[0]
    value = _constant(ctx, index)
    if value is None or value.ndim != 1 or value.dtype not in (torch.int64, torch.int32) or not value.numel() \
            or ctx.labels(index) is not None:
        return unknown(ctx, node)
    size = ctx.shape(x)[dim]
    if dim in lab.varying_dims():
        if not bool((value < 0).all()) or int(-value.min()) > size or not _keep_tail(ctx, node, dim, int(-value.min())):
            ctx.taint(lab.ids, f"{ctx.where(node)} selects positions of a grouped dim that the code fixes")
            return None
    positions = value.clone()
    return movement(ctx, node, call=lambda t, *_, **__: t[(slice(None),) * dim + (positions,)])


def check_roll(ctx: RuleContext, node, out):
    lab = ctx.labels(node.args[0])
    dims = arg(node, 2, "dims", None)
    nd = lab.ids.ndim
    dims = range(nd) if dims is None else [d % nd for d in ([dims] if isinstance(dims, int) else dims)]
    if set(dims) & set(lab.varying_dims()):
        ctx.taint(lab.ids, f"{ctx.where(node)} rolls a grouped dim by a fixed amount")


def check_cat(ctx: RuleContext, node, out):
    """Tensors joined along a dim they are not grouped along share positions of their grouped
    dims (a class token before a patch sequence; every input of a stack): tie those positions."""
    dim = arg(node, 1, "dim", 0)
    stack = ctx.op_name(node) == "stack"
    shared, plain = [], []
    for t in node.args[0]:
        lab = ctx.labels(t)
        if lab is None:
            plain.append(t)
        elif stack or dim % lab.ids.ndim not in lab.varying_dims():
            shared.append(lab.ids)
    if not any(ids.numel() > 1 for ids in shared):
        return
    for other in shared[1:]:
        x, y = torch.broadcast_tensors(shared[0], other)
        ctx.tie(x.numpy(), y.numpy(), node)
    if plain:
        ctx.taint(torch.cat([ids.reshape(-1) for ids in shared]),
                  f"{ctx.where(node)} joins grouped tensors with '{plain[0]}', which belongs to no group")


def check_pixel_shuffle(ctx: RuleContext, node, out):
    """pixel_shuffle spreads r*r consecutive channels of a group over one output channel's
    positions: those channels are one group."""
    r = ctx.module(node).upscale_factor if node.op == "call_module" else arg(node, 1, "upscale_factor")
    ids = out.ids
    base = ids[..., 0::r, 0::r].numpy()
    for i in range(r):
        for j in range(r):
            ctx.tie(base, ids[..., i::r, j::r].numpy(), node)


def getitem(ctx: RuleContext, node):
    """``x[i]``: an item of a tuple result keeps its labels; indexing a tensor moves them."""
    state = ctx.env.get(node.args[0])
    if isinstance(state, (list, tuple)):
        return state[node.args[1]]
    if not ctx.is_tensor(node.args[0]):
        return None
    if any(ctx.is_tensor(i) for i in ctx.flat_nodes(node.args[1])):
        if ctx.fqn(node.args[0]) is not None and ctx.is_tensor(node.args[1]):
            return embedding(ctx, node)  # a parameter table read by indices (a relative position bias)
        return unknown(ctx, node)  # indexing with a tensor of positions
    return movement(ctx, node, check_index)


def pack(ctx: RuleContext, node):
    """A tuple or namedtuple built in forward (GoogLeNet's outputs): its items keep their labels."""
    return [ctx.env.get(a) if ctx.is_tensor(a) else None for a in list(node.args) + list(node.kwargs.values())]
