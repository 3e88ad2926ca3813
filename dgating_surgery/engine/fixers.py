"""Attribute fixers: after a cut, every attribute a layer's forward reads beside its tensors
(``in_channels``, ``groups``, ``num_features``, a Hugging Face attention's head count, a model
config's sizes) is re-derived, so the slim model runs and reports its true shape.

Two registries:
- module fixers derive a layer's attributes from the layer's own tensors; ``load_slim`` replays
  them on a model rebuilt at full size and resized to the saved tensors;
- model fixers see the root model (e.g. a Hugging Face config) and run after every module fixer.

A library's rows live in its plugin (``plugins/``), loaded through ``extensions`` once the library is imported.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from . import extensions
from .slim_layers import SlimMultiheadAttention

Fixer = Callable[[nn.Module], None]
MODULE_FIXERS: dict[type, Fixer] = {}
MODEL_FIXERS: dict[type, Fixer] = {}
# class -> the attributes its fixer keeps, or a function of the layer giving them (absent: every int attribute)
KEPT: dict[type, "tuple[str, ...] | Callable[[nn.Module], tuple[str, ...]]"] = {}
# class -> the positions along a fused projection's output at which the layer's forward cuts it into parts
# (Phi-3's ``qkv[..., :query_pos]``: query | key | value), as its fixer re-derives them after a cut
PARTS: dict[type, Callable[[nn.Module], set[int]]] = {}
# class -> sizes the layer's forward computes from the counts its fixer keeps, beside those counts (Falcon
# views its fused projection as ``num_heads + 2`` head slots: the query heads, one key and one value)
DERIVED: dict[type, Callable[[nn.Module], set[int]]] = {}


def register_module_fixer(cls: type, fix: Fixer,
                          keeps: "tuple[str, ...] | Callable[[nn.Module], tuple[str, ...]] | None" = None) -> None:
    """``fix(module)`` re-derives the shape attributes that layers of class ``cls`` add to those of
    their base classes (whose fixers run first) from their tensors. ``keeps``: the attributes it
    re-derives, when not all of the layer's int attributes (an attention layer's head counts, not
    its head size), or a function of the layer giving them (those it can re-derive on that layer):
    only those may follow a cut where the forward uses them as sizes."""
    MODULE_FIXERS[cls] = fix
    if keeps is None:
        KEPT.pop(cls, None)
    else:
        KEPT[cls] = keeps if callable(keeps) else tuple(keeps)


def register_part_boundaries(cls: type, boundaries: Callable[[nn.Module], set[int]]) -> None:
    """``boundaries(module)``: the positions along the output of a fused projection of layers of
    class ``cls`` where its parts meet (a query | key | value projection: after the queries, after
    the keys), those the layer's fixer keeps up to date after a cut (its head counts times the head
    size). A slice or split of a grouped dim at such positions follows the cut (``part_boundaries``)."""
    PARTS[cls] = boundaries


def register_derived_sizes(cls: type, sizes: Callable[[nn.Module], set[int]]) -> None:
    """``sizes(module)``: sizes that layers of class ``cls`` compute in forward from the counts their
    fixer keeps (a fused projection's head slots, heads + 2 * key/value heads), as the fixer's counts
    give them after a cut; a view of such a size follows the cut (``kept_sizes``)."""
    DERIVED[cls] = sizes


def part_boundaries(module: nn.Module) -> set[int]:
    """The positions ``register_part_boundaries`` gives for this layer (empty: none follows a cut)."""
    found = set()
    for cls in type(module).__mro__:
        if cls in PARTS:
            found |= set(PARTS[cls](module))
    return found


def register_model_fixer(cls: type, fix: Fixer) -> None:
    """``fix(root)`` updates model-level attributes (a config) of root models of class ``cls``."""
    MODEL_FIXERS[cls] = fix


def kept_sizes(module: nn.Module) -> set[int]:
    """The values of the int attributes that the layer's fixers keep up to date after a cut, and the
    sizes the layer computes from them (``register_derived_sizes``)."""
    sizes = set()
    for cls in type(module).__mro__:
        if cls in MODULE_FIXERS:
            names = KEPT.get(cls, vars(module))
            names = names(module) if callable(names) else names
            sizes |= {v for v in (getattr(module, n, None) for n in names) if type(v) is int}
            if cls in DERIVED:
                sizes |= set(DERIVED[cls](module))
    return sizes


def _apply(registry: dict[type, Fixer], obj: nn.Module) -> None:
    for cls in reversed(type(obj).__mro__):  # base classes first, the most derived last
        if cls in registry:
            registry[cls](obj)


def fix_module(module: nn.Module) -> None:
    """Re-derive one layer's shape attributes from its own tensors."""
    _apply(MODULE_FIXERS, module)


def fix_attributes(model: nn.Module) -> None:
    """Re-derive every layer's shape attributes from its tensors, then the model-level ones."""
    extensions.load()
    for module in model.modules():
        _apply(MODULE_FIXERS, module)
    _apply(MODEL_FIXERS, model)


def _conv(m: nn.modules.conv._ConvNd) -> None:
    """The weight is (out, in/groups, ...), or (in, out/groups, ...) transposed; a cut removes
    whole groups of a grouped conv, so the per-group sizes the old attributes give still hold."""
    transposed = isinstance(m, nn.modules.conv._ConvTransposeNd)
    lead = m.weight.shape[0]
    per_group_lead = (m.in_channels if transposed else m.out_channels) // m.groups
    m.groups = max(1, lead // per_group_lead) if m.groups > 1 else 1
    if transposed:
        m.in_channels, m.out_channels = lead, m.weight.shape[1] * m.groups
    else:
        m.out_channels, m.in_channels = lead, m.weight.shape[1] * m.groups


def _batch_norm(m: nn.modules.batchnorm._NormBase) -> None:
    ref = m.weight if m.weight is not None else m.running_mean
    if ref is not None:
        m.num_features = ref.shape[0]


def _linear(m: nn.Linear) -> None:
    m.out_features, m.in_features = m.weight.shape


def _layer_norm(m: nn.LayerNorm | nn.RMSNorm) -> None:
    if m.weight is not None:
        m.normalized_shape = tuple(m.weight.shape)


def _group_norm(m: nn.GroupNorm) -> None:
    """Only a GroupNorm with one channel per group loses channels (see the group_norm rule)."""
    if m.weight is not None:
        if m.num_groups == m.num_channels:
            m.num_groups = m.weight.shape[0]
        m.num_channels = m.weight.shape[0]


def _prelu(m: nn.PReLU) -> None:
    m.num_parameters = m.weight.numel()


def _multihead_attention(m: nn.MultiheadAttention) -> None:
    """Heads cut from a packed in_proj: the layer computes with its own widths from now on."""
    inner = m.in_proj_weight.shape[0] // 3
    m.embed_dim = m.in_proj_weight.shape[1]
    m.num_heads = inner // m.head_dim
    if inner != m.embed_dim and not isinstance(m, SlimMultiheadAttention):
        m.__class__ = SlimMultiheadAttention


def _embedding(m: nn.Embedding) -> None:
    m.num_embeddings, m.embedding_dim = m.weight.shape


for _cls, _fix in ((nn.modules.conv._ConvNd, _conv), (nn.Linear, _linear), (nn.modules.batchnorm._NormBase, _batch_norm),
                   (nn.LayerNorm, _layer_norm), (nn.RMSNorm, _layer_norm), (nn.GroupNorm, _group_norm), (nn.PReLU, _prelu), (nn.Embedding, _embedding),
                   (nn.MultiheadAttention, _multihead_attention)):
    register_module_fixer(_cls, _fix)
