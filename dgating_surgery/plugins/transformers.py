"""Hugging Face transformers: its layers' attributes after a cut.

After attention heads are cut, the forward of each attention class reads a few attributes that
must agree with the projections' new widths; they are re-derived here from the module's own
tensors, one row per class. A class is registered once its modeling module has been imported
(``refresh``), so that this plugin imports no model code itself.
"""
from __future__ import annotations

import copy
import functools
import math
import json
import re
import sys
from pathlib import Path

import torch
from torch import nn
from safetensors import safe_open
from transformers.pytorch_utils import Conv1D

from ..engine.branches import ZeroBranch, register_layer_dropper, register_zero_branch, replaced_layers
from ..engine.centering import SWAPPED_ATTR, register_writer
from ..engine.constraints import WIDTH_SET_FINDERS, Slot, WidthSet, WidthSets, register_width_sets
from ..engine.fixers import (MODEL_FIXERS, MODULE_FIXERS, fix_attributes, register_model_fixer, register_module_fixer,
                             register_derived_sizes, register_part_boundaries)
from ..engine.gates import GATES_ATTR, gate_set, primary
from ..engine.shrink import APPROXIMATE_ATTR
from ..engine.kinds import ATTRIBUTE_ROLES
from ..engine.tensors import owner, replace_tensor, tied_holders
from ..errors import CheckpointError, GatingError


def _conv1d(m: Conv1D) -> None:
    """GPT-2's Conv1D stores its weight (in, out) and keeps both sizes as nx, nf."""
    m.nx, m.nf = m.weight.shape


def _rows(layer) -> int:
    """Output width of a projection (a Linear, or a Conv1D stored (in, out))."""
    return layer.weight.shape[1] if isinstance(layer, Conv1D) else layer.weight.shape[0]


# An attention layer's head counts, by what they mean (the names transformers' attention classes use);
# each is re-derived from the projections' widths after a cut. A name the layer lacks is skipped.
HEAD_SIZE = ("head_dim", "attention_head_size", "key_value_proj_dim", "head_size")
QUERY, KEY = ("q_proj", "query", "q", "q_lin", "query_proj", "q_attn"), ("k_proj", "key", "k", "k_lin", "key_proj")
OUTPUT = ("o_proj", "out_proj", "dense", "o", "out_lin", "c_proj")  # reads the heads as its input columns
HEAD_COUNT = ("num_heads", "num_attention_heads", "n_heads", "n_head")
KV_HEAD_COUNT = ("num_key_value_heads", "num_kv_heads", "kv_heads")
HEADS_WIDTH = ("all_head_size", "inner_dim")  # heads x head size
# a fused projection's query and key widths, where a layer states both (GPT-BigCode splits at them; a layer
# with only an embed_dim may compute other sizes from it: CodeGen's shards, embed_dim // 4, stay as they are)
FUSED_WIDTHS = ("embed_dim", "kv_dim")


FUSED = ("qkv_proj", "query_key_value", "c_attn", "Wqkv", "qkv")  # one projection for queries, keys and values


def _heads_of(m) -> tuple[int, int | None, int | None]:
    """(head size, heads, key/value heads) of an attention layer from its projections' widths; heads is
    None when the layer has no int head size or neither a query nor an output projection (a wrapper),
    key/value heads None when neither a key projection nor a fused query/key/value projection shows
    them. A fused projection (where the layer has no query projection) holds heads + 2 * kv_heads
    heads' rows (queries, keys, values): its key/value heads are half what the rows leave after the
    queries, where that is a whole number."""
    size = next((v for v in (getattr(m, n, None) for n in HEAD_SIZE) if type(v) is int), None)
    query, key, out = (next((c for c in (getattr(m, n, None) for n in names) if isinstance(c, (nn.Linear, Conv1D))),
                            None) for names in (QUERY, KEY, OUTPUT))
    fused = _fused(m)
    if size is None or query is None and out is None:
        return size, None, None
    heads = _rows(query) // size if query is not None else out.weight.shape[0 if isinstance(out, Conv1D) else 1] // size
    if key is not None:
        return size, heads, _rows(key) // size
    if fused is not None and _rows(fused) % size == 0 and (_rows(fused) // size - heads) % 2 == 0 \
            and _rows(fused) // size > heads:
        return size, heads, (_rows(fused) // size - heads) // 2
    return size, heads, None


def _fused(m):
    """The layer's fused query/key/value projection (where it has no separate query projection), or None."""
    if any(isinstance(getattr(m, n, None), (nn.Linear, Conv1D)) for n in QUERY):
        return None
    return next((c for c in (getattr(m, n, None) for n in FUSED) if isinstance(c, (nn.Linear, Conv1D))), None)


def _attention_values(m) -> dict[str, int]:
    """Any attention layer with an int head size: its head and key/value head counts, the query
    heads per key/value head and the heads' width from the projections' widths (the query's rows,
    else, for a fused qkv projection, the output projection's columns; one rule for the families,
    not a row per class), for the names the layer has. Empty for a layer with neither (a wrapper):
    nothing of it can follow a cut."""
    size, heads, kv_heads = _heads_of(m)
    if heads is None:
        return {}
    values = {**dict.fromkeys(HEAD_COUNT, heads), **dict.fromkeys(HEADS_WIDTH, heads * size)}
    if kv_heads is not None:
        values.update(dict.fromkeys(KV_HEAD_COUNT, kv_heads), num_key_value_groups=heads // max(kv_heads, 1))
        if _fused(m) is not None and all(type(getattr(m, n, None)) is int for n in FUSED_WIDTHS):
            values.update(zip(FUSED_WIDTHS, (heads * size, kv_heads * size)))
    return {name: value for name, value in values.items() if type(getattr(m, name, None)) is int}


def _attention_counts(m) -> None:
    described = _config_describes(m)  # (read before the layer's own counts change)
    for name, value in _attention_values(m).items():
        setattr(m, name, value)
    _layer_config(m, described)


def _stated(m, names) -> list[int]:
    return [v for v in (getattr(m, n, None) for n in names) if type(v) is int]


def _config_describes(m) -> dict[tuple[str, ...], bool]:
    """Per meaning (heads, key/value heads): whether the config's fields of it state this layer's
    count, i.e. the layer has no attribute of that meaning or its attributes agree with the config
    (GPT-BigCode's config may carry a key/value head count its multi-query layers do not use)."""
    config = _base_config(m)
    return {names: all(v == getattr(config, n, None) for v in _stated(m, names) for n in names
                       if type(getattr(config, n, None)) is int) for names in (HEAD_COUNT, KV_HEAD_COUNT)}


def _attention_kept(m) -> tuple[str, ...]:
    """The counts ``_attention_counts`` re-derives on this layer: only those may follow a cut (a
    layer whose projections it cannot find keeps its counts as written, so they fix the heads)."""
    return tuple(name for name, value in _attention_values(m).items() if getattr(m, name) == value)


def _fused_parts(m) -> set[int]:
    """Where the parts of a layer's fused query/key/value projection meet, as ``_attention_counts``
    keeps them: after the queries (heads x head size) and after the keys; empty where it cannot count
    the key/value heads (``fixers.register_part_boundaries``)."""
    size, heads, kv_heads = _heads_of(m)
    if heads is None or kv_heads is None or _fused(m) is None:
        return set()
    described, config = _config_describes(m), getattr(m, "config", None)
    stated = [(v, heads) for v in _stated(m, HEAD_COUNT)] + [(v, kv_heads) for v in _stated(m, KV_HEAD_COUNT)]
    stated += [(v, count) for names, count in ((HEAD_COUNT, heads), (KV_HEAD_COUNT, kv_heads))
               if described[names] and config is not None for v in _stated(config, names)]
    if not any(count == kv_heads for _, count in stated) or any(v != count for v, count in stated):
        return set()  # the layer does not state the counts its projections give: no part follows
    return {heads * size, (heads + kv_heads) * size}


def _fused_slots(m) -> set[int]:
    """The head slots of a layer's fused query/key/value projection, heads + 2 * key/value heads, where
    ``_fused_parts`` finds the counts the layer states (Falcon's multi-query attention views the
    projection as ``(B, T, num_heads + 2, head_dim)``): a view of that many slots follows the cut."""
    if not _fused_parts(m):
        return set()
    _, heads, kv_heads = _heads_of(m)
    return {heads + 2 * kv_heads}


class LayerConfig:
    """An attention layer's view of its model's config with its own head counts: every field is the
    model config's (read through, so that ``set_attn_implementation`` and other changes reach it) but
    the head counts the layer's forward may read from it (Phi-3 slices its fused projection at
    ``config.num_attention_heads * head_dim``), which after a cut are the layer's own."""

    def __init__(self, base, own: dict):
        object.__setattr__(self, "_base", base)
        object.__setattr__(self, "_own", dict(own))

    def __getattr__(self, name):
        if name in ("_base", "_own") or name.startswith("__"):  # (copy and pickle ask for dunders: the view's own)
            raise AttributeError(name)
        own = object.__getattribute__(self, "_own")
        return own[name] if name in own else getattr(object.__getattribute__(self, "_base"), name)

    def __setattr__(self, name, value):
        if name in self._own:
            self._own[name] = value
        else:
            setattr(self._base, name, value)

    def __repr__(self) -> str:
        return f"LayerConfig({self._own}, of {type(self._base).__name__})"


def _base_config(m):
    config = getattr(m, "config", None)
    return config._base if isinstance(config, LayerConfig) else config


def _layer_config(m, described: dict) -> None:
    """Give an attention layer that holds the model config a ``LayerConfig`` stating its head counts
    where they differ from the config's fields that describe the layer (``_config_describes``; the
    plain config again where none does)."""
    config = _base_config(m)
    from transformers import PretrainedConfig
    if not isinstance(config, PretrainedConfig):
        return
    size, heads, kv_heads = _heads_of(m)
    if heads is None:
        return
    counts = dict.fromkeys(HEAD_COUNT, heads) if described[HEAD_COUNT] else {}
    if kv_heads is not None and described[KV_HEAD_COUNT]:
        counts.update(dict.fromkeys(KV_HEAD_COUNT, kv_heads))
    own = {n: v for n, v in counts.items() if type(getattr(config, n, None)) is int and getattr(config, n) != v}
    if own or isinstance(m.config, LayerConfig):
        m.config = LayerConfig(config, own) if own else config


def _gpt2(m) -> None:
    if getattr(m, "is_cross_attention", False):
        return
    m.num_heads = m.c_proj.weight.shape[0] // m.head_dim  # c_proj reads the heads as its input rows
    m.split_size = m.num_heads * m.head_dim


def _gpt2_model(m) -> None:
    """GPT-2 views its hidden states with their own width; the stream's width after a hidden cut."""
    m.embed_dim = m.wte.weight.shape[1]


def _gated_mlp(m) -> None:
    m.intermediate_size = _rows(m.gate_proj)


def _experts(m) -> None:
    """Fused experts (transformers' ``use_experts_implementation``): every expert's width, read off
    ``down_proj`` (``(E, hidden, width)``, or ``(E, width, hidden)`` stored transposed)."""
    m.intermediate_dim = m.down_proj.shape[-2 if m.is_transposed else -1]


# (modeling module, class) -> fixer
ATTRIBUTE_FIXERS = {
    ("transformers.models.gpt2.modeling_gpt2", "GPT2Attention"): _gpt2,
    ("transformers.models.gpt2.modeling_gpt2", "GPT2Model"): _gpt2_model,
    **{(f"transformers.models.{name}.modeling_{name}", f"{prefix}MLP"): _gated_mlp
       for name, prefix in (("llama", "Llama"), ("qwen2", "Qwen2"), ("mistral", "Mistral"), ("qwen3", "Qwen3"),
                            ("qwen2_moe", "Qwen2Moe"), ("qwen3_moe", "Qwen3Moe"), ("olmoe", "Olmoe"))},
    **{(f"transformers.models.{name}.modeling_{name}", f"{prefix}Experts"): _experts
       for name, prefix in (("mixtral", "Mixtral"), ("qwen2_moe", "Qwen2Moe"), ("qwen3_moe", "Qwen3Moe"),
                            ("olmoe", "Olmoe"))},
}


def refresh() -> None:
    """Register the fixers of the model classes whose modules are imported by now. (Their RMS norms
    need no row: ``rules.normalization.rms_norm_of`` finds each one's formula from its behaviour.)"""
    if "transformers.modeling_utils" in sys.modules:
        _register_model_fixer()
        install_loader()
        install_tie_guard()
    for (module, name), fix in ATTRIBUTE_FIXERS.items():
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and cls not in MODULE_FIXERS:
            register_module_fixer(cls, fix)
    for cls in _attention_classes():
        if cls not in MODULE_FIXERS:
            register_module_fixer(cls, _attention_counts, keeps=_attention_kept)
            register_part_boundaries(cls, _fused_parts)
            register_derived_sizes(cls, _fused_slots)


_SCANNED: set[str] = set()  # modeling modules whose attention classes are registered


def _attention_classes() -> list[type]:
    """The attention layers (``*Attention`` modules) of the transformers modeling modules imported
    since the last call."""
    found = []
    for name in [n for n in sys.modules if n.startswith("transformers.models.") and ".modeling_" in n]:
        if name not in _SCANNED:
            _SCANNED.add(name)
            found += [c for c in vars(sys.modules[name]).values() if isinstance(c, type)
                      and issubclass(c, torch.nn.Module) and c.__name__.endswith("Attention")]
    return found


register_module_fixer(Conv1D, _conv1d)
register_writer(Conv1D, 1)  # stored (in, out): its outputs along dim 1


# -- save_pretrained / from_pretrained of a slim model ----------------------------------------------
# After a cut, a width every layer shares is written into its config field (``intermediate_size``...): a
# uniform cut (``shrink(uniform=True)``) leaves a config that states everything, an ordinary checkpoint.
# Widths that differ per layer, which a config field cannot state, go to transformers' ``per_layer_config``
# and to our own key (``config.dgating_surgery``: the shape of every tensor the rewritten config does not
# give, and the layer attributes no tensor shows); with dgating_surgery imported, from_pretrained gives
# the freshly built (meta-device) model those shapes before it loads the weights. Without it the weights
# do not fit and transformers refuses to load them.
CONFIG_KEY = "dgating_surgery"


# The config fields that may state one width for every layer (rewritten one at a time in this order
# when the config class refuses them together), and those that state the epsilon of norms over the
# hidden size. Which tensors each field sizes is measured, not listed (``_probe``).
WIDTH_FIELDS = ("num_key_value_heads", "num_attention_heads", "n_head", "num_heads", "n_heads", "intermediate_size",
                "moe_intermediate_size", "shared_expert_intermediate_size", "n_inner", "ffn_hidden_size", "d_ff", "ffn_dim",
                "encoder_ffn_dim", "decoder_ffn_dim", "hidden_size", "n_embd", "d_model")
EPS_FIELDS = ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_eps")
PER_LAYER_KEY = "per_layer_config"  # transformers' own per-layer overrides (configuration_utils)
_LAYER = re.compile(r"\.(\d+)\.")  # the index of the repeated layer a tensor sits in


def _config_data(model) -> dict:
    """The config as data, without what a cut adds (our key, per-layer overrides): the model it builds
    is the uniform one every layer of the slim model is measured against. A head width the model
    derives from the hidden size (``hidden_size // num_attention_heads``) is pinned as ``head_dim``,
    which the attention reads first, so that cutting heads or the hidden size leaves it as it is."""
    data = {k: v for k, v in model.config.to_dict().items()
            if k not in (CONFIG_KEY, PER_LAYER_KEY, "allow_global_per_layer_attribute_access")}
    if data.get("head_dim") is None and getattr(getattr(type(model.config), "head_dim", None), "fset", True) is not None:
        # (a config whose head_dim is a read-only property, Falcon's, derives it and refuses it)
        head_dim = next((m.head_dim for m in model.modules() if isinstance(getattr(m, "head_dim", None), int)), None)
        if head_dim is not None:
            data["head_dim"] = head_dim
    return data


@functools.lru_cache(maxsize=64)
def _meta_shapes(cls: type, data_json: str) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of ``cls`` built (on the meta device) from a config given as JSON."""
    with torch.device("meta"):
        model = cls(cls.config_class.from_dict(json.loads(data_json)))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _shapes(cls: type, data: dict):
    return _meta_shapes(cls, json.dumps(data, sort_keys=True, default=str))


def _accepted(cls: type, data: dict) -> bool:
    """Whether the config class accepts these values (its own validation, e.g. heads dividing the hidden size)."""
    try:
        cls.config_class.from_dict(data)
    except Exception:  # noqa: BLE001 - any refusal of the config class
        return False
    return True


@functools.lru_cache(maxsize=64)
def _probe(cls: type, data_json: str) -> dict[str, tuple[list[Slot], list[Slot]]]:
    """Per width field of the config: the slots it sizes, found by building the class with the field
    doubled: (slots whose size doubles, with the field's value per unit; slots that change otherwise,
    which only the field's present value can state)."""
    data = json.loads(data_json)
    base = _meta_shapes(cls, data_json)
    out = {}
    for name in WIDTH_FIELDS:
        value = data.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or not _accepted(cls, {**data, name: 2 * value}):
            continue
        try:
            doubled = _shapes(cls, {**data, name: 2 * value})
        except Exception:  # noqa: BLE001 - a model that cannot be built so is not sized by the field
            continue
        scaled, fixed = [], []
        for fqn, shape in base.items():
            other = doubled.get(fqn, shape)
            for dim, (a, b) in enumerate(zip(shape, other)):
                if a != b:
                    if b == 2 * a and a % value == 0:
                        scaled.append(Slot(fqn, dim, a // value))
                    else:
                        fixed.append(Slot(fqn, dim, a))
        if scaled or fixed:
            out[name] = (scaled, fixed)
    return out


def _field_slots(model) -> dict[str, tuple[list[Slot], list[Slot]]]:
    return _probe(type(model), json.dumps(_config_data(model), sort_keys=True, default=str))


@functools.lru_cache(maxsize=64)
def _epsilon_users(cls: type, data_json: str) -> dict[str, list[str]]:
    """Per epsilon field of the config: the modules whose epsilon it sets (those with a float
    attribute that moves when the class is built with the field doubled)."""
    data = json.loads(data_json)
    with torch.device("meta"):
        base = dict(cls(cls.config_class.from_dict(data)).named_modules())
    out = {}
    for name in EPS_FIELDS:
        if isinstance(data.get(name), float) and data[name] > 0:
            with torch.device("meta"):
                other = cls(cls.config_class.from_dict({**data, name: 2 * data[name]}))
            out[name] = [path for path, module in other.named_modules() if path in base and any(
                isinstance(v, float) and getattr(base[path], k, None) != v for k, v in vars(module).items())]
    return out


def _width_sets(model, ctx) -> WidthSets:
    """Uniform widths for a transformers model: one set per config field that sizes a cut tensor (its
    slots no gate cuts stay full, so must the others). A field that also sizes a tensor out of
    proportion (a fused query/key/value projection's rows, a head width it derives: Falcon, StableLM,
    Persimmon, Phi-3, GPT-BigCode) can state no other value, so its set is pinned full; so is a cut
    slot no field sizes (no config could state it). The config class must accept the widths chosen."""
    fields = _field_slots(model)
    sets = [WidthSet(name if not fixed else f"{name} (it also sizes {fixed[0].fqn} dim {fixed[0].dim} out of "
                     "proportion)", scaled + fixed, pinned=bool(fixed)) for name, (scaled, fixed) in fields.items()]
    stated = {(s.fqn, s.dim) for wset in sets for s in wset.slots}
    for key, dgate in ctx.gates.items():
        for cut in dgate.cuts:
            if cut.role not in ATTRIBUTE_ROLES and (cut.fqn, cut.dim) not in stated:
                stated.add((cut.fqn, cut.dim))
                sets.append(WidthSet(f"{cut.fqn} (dim {cut.dim}, no config field states it)",
                                     [Slot(cut.fqn, cut.dim)], pinned=True))
    data, cls = _config_data(model), type(model)
    _pin_shared_epsilons(sets, _epsilon_users(cls, json.dumps(data, sort_keys=True, default=str)))
    return WidthSets(sets, lambda targets: _accepted(cls, {**data, **{k: v for k, v in targets.items() if k in fields}}))


def _pin_shared_epsilons(sets: list[WidthSet], users: dict[str, list[str]]) -> None:
    """Pin (in place) the sets of norms that one epsilon field serves at different widths. A cut RMS
    norm's epsilon is rescaled by the fraction of its width kept, and the config states one epsilon
    for all its norms: norms over the hidden size and norms over a head (Qwen3's q_norm/k_norm) or
    over the heads (OLMo2's) can only share it while no width they span is cut."""
    where = {(s.fqn, s.dim): i for i, wset in enumerate(sets) for s in wset.slots}
    for name, paths in users.items():
        spans = {where.get((f"{path}.weight", 0)) for path in paths}
        if len(spans) > 1:
            for i in spans - {None}:
                sets[i].pinned = True
                sets[i].label += f" (its norms share {name} with norms of other widths)"


def _record_widths(model) -> None:
    """Model-level fixer: state the slim widths in the config (``save_pretrained`` saves them). A width
    every layer shares rewrites its config field (``intermediate_size``...), where the config class
    accepts the value; widths that differ per layer are written as transformers' ``per_layer_config``
    and, with every shape and layer attribute the rewritten config does not give, under our own key,
    which ``restore_widths`` reads. A slim model whose config states everything (a uniform cut) has no
    such key: its directory is an ordinary checkpoint of its class."""
    cls, config = type(model), _own_config(model, copy.deepcopy(model.config))
    data = _config_data(model)
    slots = _field_slots(model)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    attributes = dict(getattr(model, "cut_attributes", {}))
    per_layer: dict[int, dict] = {}
    shared: dict[str, int] = {}  # fields every layer states alike
    for name, (scaled, fixed) in slots.items():
        if any(shapes.get(s.fqn, (None,) * (s.dim + 1))[s.dim] not in (None, s.unit) for s in fixed):
            continue  # a tensor the field sizes otherwise than in proportion has been cut: the field cannot say it
        values: dict[int | None, set[int]] = {}
        for s in scaled:
            if s.fqn in shapes:
                size = shapes[s.fqn][s.dim]
                layer = _LAYER.search(f".{s.fqn}")
                values.setdefault(int(layer.group(1)) if layer else None, set()).add(
                    size // s.unit if size % s.unit == 0 else -1)
        found = set().union(*values.values()) if values else set()
        if -1 in found or any(len(v) > 1 for v in values.values()):
            continue
        if len(found) == 1:
            shared[name] = found.pop()
        elif None not in values and all(0 <= i < getattr(config, "num_hidden_layers", 0) for i in values):
            for layer, (value,) in values.items():
                if value != data[name]:
                    per_layer.setdefault(layer, {})[name] = value
    original = dict(data)
    data = _state_epsilon(cls, _accepted_values(cls, data, shared), attributes)
    data, fresh = _without_drift(model, cls, original, data, set(attributes))
    for name, value in data.items():
        setattr(config, name, value)
    _prune_layer_configs(model, config)
    full = _shapes(cls, data)
    differ = {k: list(v) for k, v in shapes.items() if k in full and full[k] != v}
    unstated = {k: v for k, v in attributes.items() if getattr(*owner(fresh, k)) != v}
    if per_layer:
        config.allow_global_per_layer_attribute_access = True  # the global values stay the layers' largest
    if per_layer or getattr(config, "is_heterogeneous", False):
        config.per_layer_config = per_layer or None
    swapped = getattr(model, SWAPPED_ATTR, [])
    branches = replaced_layers(model)  # the layers of removed residual branches
    approximate = getattr(model, APPROXIMATE_ATTR, None)  # a loader must know the cut was approximate
    if differ or unstated or swapped or branches or approximate:
        setattr(config, CONFIG_KEY, {"shapes": differ, "attributes": unstated, SWAPPED_ATTR: swapped,
                                     "branches": branches, **({"approximate_cut": approximate} if approximate else {})})
    elif hasattr(config, CONFIG_KEY):
        delattr(config, CONFIG_KEY)


def _own_config(model, config):
    """Give ``model`` (every module of it that holds the old config) ``config``, a changed copy: the
    user's config object may build other models, and a cut that fails and is undone restores the old
    one with the modules' attributes. Returns ``config``."""
    old = model.config
    for module in model.modules():
        if getattr(module, "config", None) is old:
            module.config = config
        elif isinstance(getattr(module, "config", None), LayerConfig) and module.config._base is old:
            module.config = LayerConfig(config, module.config._own)  # (a new view: an undone cut restores the old)
    return config


def _prune_layer_configs(model, config) -> None:
    """A layer's ``LayerConfig`` without the counts ``config`` now states alike (a uniform cut rewrote
    them): the plain config where none is left."""
    for module in model.modules():
        view = getattr(module, "config", None)
        if isinstance(view, LayerConfig) and view._base is config:
            own = {n: v for n, v in view._own.items() if getattr(config, n, None) != v}
            if own != view._own:
                module.config = LayerConfig(config, own) if own else config


def _without_drift(model, cls: type, original: dict, data: dict, cut: set[str]):
    """``data`` less every rewritten field that would change a value the slim model computes with,
    and the (meta-device) model it builds. A config field may size more than tensors: Gemma scales its
    embeddings by ``sqrt(hidden_size)``, so a config stating the cut hidden size would rebuild another
    scale and reload a different function. Such a field keeps its value (the widths then go under our
    key): a plain number a module holds must come out of the rewritten config as the slim model has it
    (``cut``: the layer attributes the cut itself set, which our key states)."""
    while True:
        with torch.device("meta"):
            fresh = cls(cls.config_class.from_dict(data))
        drift = _number_drift(model, fresh, cut)
        rewritten = [k for k in data if k in original and data[k] != original[k]]
        if not drift or not rewritten:
            return data, fresh
        for name in rewritten:  # keep the first field whose rewrite alone moves a number back
            trial = {**data, name: original[name]}
            with torch.device("meta"):
                if len(_number_drift(model, cls(cls.config_class.from_dict(trial)), cut)) < len(drift):
                    data = trial
                    break
        else:  # no rewritten field moves it: not the config's doing
            return data, fresh


def _number_drift(model, fresh, cut: set[str]) -> list[str]:
    """Plain float attributes (a scale, an epsilon) that differ between the slim model's modules and a
    model built from its rewritten config."""
    theirs = dict(fresh.named_modules())
    out = []
    for path, module in model.named_modules():
        other = theirs.get(path)
        if other is None:
            continue
        for attr, mine in vars(module).items():
            got = getattr(other, attr, None)
            name = f"{path}.{attr}" if path else attr
            if (name not in cut and isinstance(mine, float) and isinstance(got, float)
                    and not math.isclose(mine, got, rel_tol=1e-9)):
                out.append(name)
    return out


def _accepted_values(cls: type, data: dict, values: dict) -> dict:
    """``data`` with as many of ``values`` as the config class accepts: all at once, else one at a time
    while any is accepted (a head count may need the hidden size that comes after it)."""
    if _accepted(cls, {**data, **values}):
        return {**data, **values}
    pending = dict(values)
    while True:
        name = next((n for n, v in pending.items() if _accepted(cls, {**data, n: v})), None)
        if name is None:
            return data
        data = {**data, name: pending.pop(name)}


def _state_epsilon(cls: type, data: dict, attributes: dict) -> dict:
    """``data`` with the norms' epsilon field set to the rescaled epsilon of a hidden-size cut, when one
    value serves every norm the config builds from that field (the layer attributes are compared on a
    model built from it)."""
    values = {v for v in attributes.values() if isinstance(v, float)}
    if len(values) != 1:
        return data
    (value,) = values
    for name in EPS_FIELDS:
        if isinstance(data.get(name), float) and data[name] != value:
            candidate = {**data, name: value}
            with torch.device("meta"):
                fresh = cls(cls.config_class.from_dict(candidate))
            if all(getattr(*owner(fresh, k)) == v for k, v in attributes.items()):
                return candidate
    return data


def restore_widths(model, path="config.json") -> None:
    """Give a model built from a slim config the saved widths (its tensors are still empty). The
    names are those of the class that was saved; another class of the architecture (the base
    ``LlamaModel`` of a saved ``LlamaForCausalLM``, or the reverse) takes those it has. A config.json
    is data: the key is checked field by field as a manifest is (``manifest.check_config_key``), then
    against the model (names it has, shapes no larger than the tensors its config builds, only the
    attributes a cut writes) before anything is set; a problem is a ``CheckpointError`` naming
    ``path`` and the field."""
    spec = getattr(model.config, CONFIG_KEY, None)
    if not spec:
        return
    from ..checkpoints.checkpoint import _replay_branches, _replay_centering, _set_cut_attributes
    from ..checkpoints.manifest import check_config_key
    spec = check_config_key(spec, path, CONFIG_KEY)
    where = dict(path=path, source="config field")
    branches = _own_names(model, spec.get("branches", {}), f"{CONFIG_KEY}.branches", path)
    _replay_branches(model, {own: spec["branches"][saved] for saved, own in branches.items()},
                     field=f"{CONFIG_KEY}.branches", **where)
    swapped = _own_names(model, [f"{n}.weight" for n in spec.get(SWAPPED_ATTR, [])], f"{CONFIG_KEY}.{SWAPPED_ATTR}", path)
    _replay_centering(model, [own.rpartition(".")[0] for own in swapped.values()],  # centred LayerNorms
                      field=f"{CONFIG_KEY}.{SWAPPED_ATTR}", **where)
    tied = tied_holders(model)
    for saved, name in _own_names(model, spec.get("shapes", {}), f"{CONFIG_KEY}.shapes", path).items():
        module, attr = owner(model, name)
        old, shape = getattr(module, attr), spec["shapes"][saved]
        if attr not in module._parameters and attr not in module._buffers or len(shape) != old.ndim \
                or any(n > full for n, full in zip(shape, old.shape)):
            raise CheckpointError(f"{path}: config field '{CONFIG_KEY}.shapes.{saved}': {shape} is not a cut of the "
                                  f"tensor the config builds there ({_shown(old)}); save the slim model again with "
                                  "save_pretrained")
        replace_tensor(module, attr, torch.empty(shape, dtype=old.dtype, device=old.device),
                       tied=[h for h in tied.get(id(old), []) if h != (module, attr)])
    attributes = _own_names(model, spec.get("attributes", {}), f"{CONFIG_KEY}.attributes", path)
    _set_cut_attributes(model, {own: spec["attributes"][saved] for saved, own in attributes.items()},
                        field=f"{CONFIG_KEY}.attributes", **where)
    fix_attributes(model)
    if spec.get("approximate_cut"):
        setattr(model, APPROXIMATE_ATTR, spec["approximate_cut"])


def _shown(value) -> str:
    return f"shape {list(value.shape)}" if isinstance(value, torch.Tensor) else f"not a tensor: {type(value).__name__}"


def _own_names(model, saved_names, field: str, path) -> dict[str, str]:
    """Saved name -> ``model``'s name (``_own_name``) of each one the model has. One it lacks is an
    error when ``model`` is of the class that was saved (``config.architectures``), else skipped."""
    saved_class = type(model).__name__ in (getattr(model.config, "architectures", None) or ())
    out = {}
    for saved in saved_names:
        own = _own_name(model, saved)
        if own is None and saved_class:
            raise CheckpointError(f"{path}: config field '{field}.{saved}': {type(model).__name__} has no such layer "
                                  "or tensor; save the slim model again with save_pretrained")
        if own is not None:
            out[saved] = own
    return out


def _own_name(model, saved: str) -> str | None:
    """``saved`` (a tensor or layer attribute of the saved model) as ``model`` names it, the base
    model's prefix (``model.``) taken off or put on as transformers does for the weights; None when
    ``model`` has no such thing (the output layer of a task model, read by its base model)."""
    prefix = getattr(model, "base_model_prefix", "")
    for name in (saved, saved.removeprefix(f"{prefix}."), f"{prefix}.{saved}") if prefix else (saved,):
        module_name, _, attr = name.rpartition(".")
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            continue
        if hasattr(module, attr):
            return name
    return None


GATED_KEY = re.compile(rf"(^|\.){GATES_ATTR}\.[^.]+\.factors$")  # a DGate's factors in a state_dict


def _refuse_gated(checkpoint_files, state_dict) -> None:
    """A gated model's checkpoint (``save_pretrained`` or a Trainer checkpoint of a gated model) holds
    D-Gating factors and primary weights under names no ungated model has: from_pretrained would
    initialise the gated layers at random and call it loaded. Refuse it, saying what loads it."""
    keys = list(state_dict or ())
    for path in checkpoint_files or ():
        if str(path).endswith(".safetensors"):
            with safe_open(path, framework="pt") as f:
                keys += list(f.keys())
        else:
            keys += list(torch.load(path, map_location="meta", weights_only=True, mmap=True))
    if any(GATED_KEY.search(k) for k in keys):
        where = Path(checkpoint_files[0]).parent if checkpoint_files else "this state_dict"
        raise CheckpointError(f"{where} holds a gated model (D-Gating factors and primary weights, saved before "
                              "dg.shrink): from_pretrained cannot build it and would initialise the gated layers at "
                              "random. Load it with dgating_surgery.integrations.hf.from_pretrained_gated(path, recipe) "
                              "(the recipe it was gated with), or dg.shrink the gated model before save_pretrained.")


def install_loader() -> None:
    """Wrap ``PreTrainedModel._load_pretrained_model`` (transformers' loader, which from_pretrained
    calls on the model it has just built, with the checkpoint's files) so that a gated checkpoint is
    refused and a slim checkpoint's widths are restored first."""
    from transformers.modeling_utils import PreTrainedModel
    load = PreTrainedModel._load_pretrained_model
    if getattr(load, "_dgating_surgery", False):
        return

    def load_slim_aware(model, state_dict, checkpoint_files, *args, **kwargs):
        _refuse_gated(checkpoint_files, state_dict)
        restore_widths(model, Path(checkpoint_files[0]).parent / "config.json" if checkpoint_files else "config.json")
        return load(model, state_dict, checkpoint_files, *args, **kwargs)
    load_slim_aware._dgating_surgery = True
    PreTrainedModel._load_pretrained_model = staticmethod(load_slim_aware)


def install_tie_guard() -> None:
    """Wrap ``PreTrainedModel.tie_weights`` for gated models. Gating moves a tied weight (an embedding
    and the output layer that reads it) under one parametrization per use, both over one primary
    tensor: transformers would look the weight up as a parameter, find none and raise. A gated model's
    tied pairs are checked to share their primary weight (they are tied: nothing to do) instead; a pair
    that does not cannot be tied any more, and the error says what to do."""
    from transformers.modeling_utils import PreTrainedModel
    tie = PreTrainedModel.tie_weights
    if getattr(tie, "_dgating_surgery", False):
        return

    def tie_weights(self, *args, **kwargs):
        if gate_set(self) is None:
            return tie(self, *args, **kwargs)
        for target, source in self.get_expanded_tied_weights_keys(all_submodels=True).items():
            try:
                tied = primary(self, target) is primary(self, source)
            except AttributeError:
                tied = False
            if not tied:
                raise GatingError(f"{type(self).__name__}.tie_weights: '{target}' and '{source}' of this gated model "
                                  "are not one tensor, and a gated model's weights cannot be tied any more (its gates "
                                  "hold each one); tie them before dg.gate_model, or set tie_word_embeddings=False")
    tie_weights._dgating_surgery = True
    PreTrainedModel.tie_weights = tie_weights


def _register_model_fixer() -> None:
    from transformers.modeling_utils import PreTrainedModel
    register_zero_branch(_zero_attention)
    register_layer_dropper(_drop_layers)
    if PreTrainedModel not in MODEL_FIXERS:
        register_model_fixer(PreTrainedModel, _record_widths)
    if PreTrainedModel not in WIDTH_SET_FINDERS:
        register_width_sets(PreTrainedModel, _width_sets)


# -- residual branches (the blocks kind) -----------------------------------------------------------------
CACHE_ARGUMENTS = ("cache", "past_key_values", "layer_past")  # what the attention classes call their KV cache


class ZeroAttention(ZeroBranch):
    """A removed attention of a decoder layer that keeps the rest of the layer: zeros, and in its
    KV-cache layer one placeholder entry per token (B, 1, T, 1), so that the cache's length, from
    which generation reads positions and mask sizes, is what the attention would have left."""

    def __init__(self, returns: int, layer_idx: int):
        super().__init__(returns)
        self.layer_idx = layer_idx

    def forward(self, *args, **kwargs):
        cache = next((kwargs[k] for k in CACHE_ARGUMENTS if kwargs.get(k) is not None), None)
        if cache is not None:
            cache = getattr(cache, "self_attention_cache", cache)
            x = next(v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor))
            placeholder = x.new_zeros(x.shape[0], 1, x.shape[-2], 1)
            cache.update(placeholder, placeholder, self.layer_idx)
        return super().forward(*args, **kwargs)


def _zero_attention(layer, returns: int, width: int | None):
    """The zero layer of a transformers attention (it has a KV-cache index), else None."""
    if width is None and type(layer).__module__.startswith("transformers.") and "Attention" in type(layer).__name__ \
            and isinstance(getattr(layer, "layer_idx", None), int):
        return ZeroAttention(returns, layer.layer_idx)
    return None


def _drop_layers(model, paths: list[str]) -> list[str]:
    """Take removed decoder layers out of the model's layer list (the list as long as the config's
    ``num_hidden_layers``; a model with two such lists keeps them, bypassed): the config states the new
    depth, its per-layer lists (``layer_types``, any list field named for layers) and per-layer
    overrides lose the removed layers' entries, and every layer after one removed is renumbered (its
    modules' ``layer_idx``, the KV-cache index, and the cut attributes recorded under its name). The
    config is replaced by a changed copy, so a shrink that fails and is undone restores the old one."""
    from transformers.modeling_utils import PreTrainedModel
    if not isinstance(model, PreTrainedModel):
        return []
    old = model.config
    depth = getattr(old, "num_hidden_layers", None)
    lists: dict[str, set[int]] = {}
    for path in paths:
        parent, _, index = path.rpartition(".")
        if index.isdigit() and isinstance(model.get_submodule(parent), torch.nn.ModuleList) \
                and len(model.get_submodule(parent)) == depth:
            lists.setdefault(parent, set()).add(int(index))
    if len(lists) != 1:
        return []
    ((parent, gone),) = lists.items()
    keep = [i for i in range(depth) if i not in gone]
    layers = model.get_submodule(parent)
    holder, _, attr = parent.rpartition(".")
    setattr(model.get_submodule(holder), attr, torch.nn.ModuleList([layers[i] for i in keep]))
    new_index = {old_i: new_i for new_i, old_i in enumerate(keep)}
    for new_i, layer in enumerate(model.get_submodule(parent)):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_i
    config = _own_config(model, copy.deepcopy(old))
    for name, value in list(vars(config).items()):
        if "layer" in name and isinstance(value, list) and len(value) == depth:
            setattr(config, name, [value[i] for i in keep])
    config.num_hidden_layers = len(keep)
    per_layer = getattr(config, PER_LAYER_KEY, None)
    if isinstance(per_layer, dict):
        setattr(config, PER_LAYER_KEY, {new_index[int(i)]: v for i, v in per_layer.items() if int(i) in new_index}
                or None)
    prefix = re.compile(rf"^{re.escape(parent)}\.(\d+)\.")
    if getattr(model, "cut_attributes", None):
        renamed = {}
        for name, value in model.cut_attributes.items():
            found = prefix.match(name)
            if found is None:
                renamed[name] = value
            elif int(found.group(1)) in new_index:
                renamed[prefix.sub(f"{parent}.{new_index[int(found.group(1))]}.", name)] = value
        model.cut_attributes = renamed
    return [f"{parent}.{i}" for i in sorted(gone)]
