"""The manifest of a checkpoint: read, checked field by field, and covered by the checksum.

A manifest is JSON in the safetensors metadata. Reading one checks, before anything is built:
the format and version (only what this package writes), a SHA-256 over the canonical manifest (every
field but the checksum itself) and the tensors, then every field against ``FIELDS``: its type, its
range, the keys it may hold. Each problem is one ``CheckpointError`` naming the file and the field.

The checksum finds corruption and careless edits, not an attacker: whoever edits a file can compute
it again. What loading may run is decided by ``trust.py``, whatever the checksum says.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re

import torch

from ..errors import CheckpointError, DGatingError, ModelSpecError
from .inputs import DTYPES

FORMAT_VERSION = 2  # 2: the checksum covers the manifest too
FORMATS = ("gated", "slim")
MAX_INPUTS, MAX_NDIM, MAX_TEXT, MAX_DEPTH = 64, 8, 1000, 32
IDENTIFIER_PATH = re.compile(r"[A-Za-z_]\w*(\.\w+)*")


class FieldError(Exception):
    """A field's problem: ``field`` its path in the manifest, the message what is wrong."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


# -- checksum --------------------------------------------------------------------------------------
def canonical(manifest: dict) -> bytes:
    """The manifest as the checksum sees it: every field but ``sha256``, keys sorted, no spaces."""
    body = {k: v for k, v in manifest.items() if k != "sha256"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def digest(manifest: dict, tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the canonical manifest and then every tensor (name, dtype, shape, bytes)."""
    h = hashlib.sha256()
    h.update(canonical(manifest))
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(f"\0{key}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


# -- the fields ------------------------------------------------------------------------------------
def _text(value, field: str, limit: int = MAX_TEXT) -> str:
    if not isinstance(value, str) or len(value) > limit:
        raise FieldError(field, f"must be a string of at most {limit} characters, not {_show(value)}")
    return value


def _count(value, field: str, low: int = 0, high: int | None = None) -> int:
    if type(value) is not int or value < low or (high is not None and value >= high):
        bound = f" and below {high}" if high is not None else ""
        raise FieldError(field, f"must be an integer >= {low}{bound}, not {_show(value)}")
    return value


def _object(value, field: str, keys: tuple[str, ...] | None = None) -> dict:
    if not isinstance(value, dict):
        raise FieldError(field, f"must be an object, not {_show(value)}")
    unknown = [k for k in value if keys is not None and k not in keys]
    if unknown:
        raise FieldError(f"{field}.{unknown[0]}", f"unknown field (known: {', '.join(keys)})")
    return value


def _indices(value, field: str, size: int | None = None) -> list[int]:
    """Sorted unique non-negative integers below ``size``: the positions a cut kept."""
    if not isinstance(value, list):
        raise FieldError(field, f"must be a list of indices, not {_show(value)}")
    for i, v in enumerate(value):
        _count(v, f"{field}[{i}]", 0, size)
    if any(a >= b for a, b in zip(value, value[1:])):
        raise FieldError(field, "indices must be sorted and unique")
    return value


def _model(value, field, manifest, state):
    from .models import ModelRef
    try:
        ModelRef.from_dict(value)
    except ModelSpecError as exc:
        raise FieldError(field, str(exc)) from None


def _recipe(value, field, manifest, state):
    from ..engine.recipe import load_recipe
    try:
        load_recipe(_object(value, field))
    except DGatingError as exc:  # a RecipeError names the recipe's own field
        raise FieldError(field, str(exc)) from None


def _inputs(value, field, manifest, state):
    _object(value, field, ("args", "kwargs"))
    args, kwargs = value.get("args", []), _object(value.get("kwargs", {}), f"{field}.kwargs")
    if not isinstance(args, list):
        raise FieldError(f"{field}.args", f"must be a list, not {_show(args)}")
    if len(args) + len(kwargs) > MAX_INPUTS:
        raise FieldError(field, f"{len(args) + len(kwargs)} inputs (at most {MAX_INPUTS})")
    total = 0
    for where, desc in [(f"{field}.args[{i}]", d) for i, d in enumerate(args)] + \
                       [(f"{field}.kwargs.{_text(k, field, 100)}", d) for k, d in kwargs.items()]:
        total += _input(desc, where)
    memory = available_memory()
    if memory and total > memory // 2:
        raise FieldError(field, f"the example inputs need {size(total)}, and this machine has {size(memory)} available")


def _input(desc, field: str) -> int:
    """Bytes of one example input (0 for a plain value)."""
    if isinstance(desc, dict) and "value" in desc:
        _object(desc, field, ("value",))
        v = desc["value"]
        if not (v is None or isinstance(v, (bool, int, str)) or (isinstance(v, float) and math.isfinite(v))):
            raise FieldError(f"{field}.value", f"must be null, a boolean, a finite number or a string, not {_show(v)}")
        if isinstance(v, str):
            _text(v, f"{field}.value")
        return 0
    _object(desc, field, ("shape", "dtype"))
    shape, dtype = desc.get("shape"), desc.get("dtype")
    if dtype not in DTYPES:
        raise FieldError(f"{field}.dtype", f"must be one of {', '.join(DTYPES)}, not {_show(dtype)}")
    if not isinstance(shape, list) or len(shape) > MAX_NDIM:
        raise FieldError(f"{field}.shape", f"must be a list of at most {MAX_NDIM} sizes, not {_show(shape)}")
    for i, size in enumerate(shape):
        _count(size, f"{field}.shape[{i}]", 1, 2 ** 40)
    return math.prod(shape) * torch.empty((), dtype=DTYPES[dtype]).element_size()


def _aliases(value, field, manifest, state):
    for alias, target in _object(value, field).items():
        if not isinstance(target, str) or target not in state or alias in state:
            raise FieldError(f"{field}.{alias}", f"must name a tensor of the file ({_show(target)} is not one, or the "
                                                 "alias is a tensor itself)")


def _kept_groups(value, field, manifest, state):
    from ..engine.kinds import KINDS
    for name, entry in _object(value, field).items():
        where = f"{field}.{name}"
        _object(entry, where, ("kind", "groups", "kept"))
        if entry.get("kind") not in KINDS:
            raise FieldError(f"{where}.kind", f"must be one of {', '.join(KINDS)}, not {_show(entry.get('kind'))}")
        groups = _count(entry.get("groups"), f"{where}.groups", 1)
        _indices(entry.get("kept"), f"{where}.kept", groups)


def _kept_input_features(value, field, manifest, state):
    for name, kept in _object(value, field).items():
        if not name.isidentifier():
            raise FieldError(f"{field}.{name}", "must be named after an argument of the model's forward")
        if not _indices(kept, f"{field}.{name}"):
            raise FieldError(f"{field}.{name}", "keeps no feature")


def _dotted(name, field: str, what: str) -> str:
    """A dotted name of the model (``layers.0.mlp``), no part private or a dunder."""
    if not isinstance(name, str) or not IDENTIFIER_PATH.fullmatch(name) or any(p.startswith("_") for p in name.split(".")):
        raise FieldError(field, f"must be {what}, not {_show(name)}")
    return name


def _cut_attributes(value, field, manifest, state):
    for name, v in _object(value, field).items():
        _dotted(name, f"{field}.{name}", "a layer attribute's dotted name (module.attribute)")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise FieldError(f"{field}.{name}", f"must be a finite number >= 0 (a count or an epsilon), not {_show(v)}")


def _removed_branches(value, field, manifest, state):
    for name, spec in _object(value, field).items():
        _dotted(name, f"{field}.{name}", "a layer's dotted name")
        spec = _object(spec, f"{field}.{name}", ("as", "returns", "width"))
        if spec.get("as") not in ("bypass", "zeros"):
            raise FieldError(f"{field}.{name}.as", f"must be 'bypass' or 'zeros', not {_show(spec.get('as'))}")
        _count(spec.get("returns"), f"{field}.{name}.returns", 0, 64)
        if "width" in spec:
            _count(spec["width"], f"{field}.{name}.width", 1, 1 << 24)


def _centered_layernorms(value, field, manifest, state):
    if not isinstance(value, list):
        raise FieldError(field, f"must be a list of layer names, not {_show(value)}")
    for i, name in enumerate(value):
        _dotted(name, f"{field}[{i}]", "a LayerNorm's dotted name")


def _approximate_cut(value, field, manifest, state):
    """What a cut removed approximately (``shrink.APPROXIMATE_ATTR``): the sets, each narrowed LayerNorm's
    width before and after, and the output change measured (null where not measured)."""
    _object(value, field, ("sets", "layer_norms", "output_change"))
    sets = value.get("sets")
    if not isinstance(sets, list) or not all(isinstance(n, str) for n in sets):
        raise FieldError(f"{field}.sets", f"must be a list of group set names, not {_show(sets)}")
    for i, name in enumerate(sets):
        _text(name, f"{field}.sets[{i}]", 200)
    for name, sizes in _object(value.get("layer_norms"), f"{field}.layer_norms").items():
        _dotted(name, f"{field}.layer_norms.{name}", "a LayerNorm's dotted name")
        if not isinstance(sizes, list) or len(sizes) != 2:
            raise FieldError(f"{field}.layer_norms.{name}", f"must be [width, kept], not {_show(sizes)}")
        for i, n in enumerate(sizes):
            _count(n, f"{field}.layer_norms.{name}[{i}]", 1, 1 << 24)
    change = value.get("output_change")
    for name, v in (_object(change, f"{field}.output_change", ("example_inputs", "fresh_inputs")) if change is not None
                    else {}).items():
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0):
            raise FieldError(f"{field}.output_change.{name}", f"must be a finite number >= 0 or null, not {_show(v)}")


def _shapes(value, field, manifest, state):
    """Tensor name -> the shape the cut left it (at most MAX_NDIM sizes; the model bounds them)."""
    for name, shape in _object(value, field).items():
        _dotted(name, f"{field}.{name}", "a tensor's dotted name")
        if not isinstance(shape, list) or len(shape) > MAX_NDIM:
            raise FieldError(f"{field}.{name}", f"must be a list of at most {MAX_NDIM} sizes, not {_show(shape)}")
        for i, n in enumerate(shape):
            _count(n, f"{field}.{name}[{i}]", 0, 2 ** 40)


def _format(value, field, manifest, state):
    if value not in FORMATS:
        raise FieldError(field, f"must be one of {', '.join(FORMATS)}, not {_show(value)}")


def _version(value, field, manifest, state):
    if type(value) is int and value > FORMAT_VERSION:
        raise FieldError(field, f"{value}: written by a newer dgating-surgery; upgrade to read it")
    if type(value) is not int or value != FORMAT_VERSION:
        raise FieldError(field, f"{_show(value)} is not a format this dgating-surgery wrote (it reads {FORMAT_VERSION}); "
                                "write the checkpoint again with this version")


def _sha256(value, field, manifest, state):
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-f]{64}", value):
        raise FieldError(field, f"must be 64 hexadecimal digits, not {_show(value)}")


def _written_by(value, field, manifest, state):
    _text(value, field, 200)


COMMON = {"format": (_format, False), "version": (_version, False), "sha256": (_sha256, False),
          "model": (_model, False), "aliases": (_aliases, False), "written_by": (_written_by, False)}
# format -> field -> (check, may be null)
FIELDS = {
    "gated": {**COMMON, "recipe": (_recipe, False), "inputs": (_inputs, False)},
    "slim": {**COMMON, "recipe": (_recipe, True), "inputs": (_inputs, True), "kept_groups": (_kept_groups, True),
             "kept_input_features": (_kept_input_features, False), "cut_attributes": (_cut_attributes, False),
             "centered_layernorms": (_centered_layernorms, False),  # LayerNorms swapped for CenteredLayerNorm
             "removed_branches": (_removed_branches, False),  # layers of removed residual branches (``branches``)
             "approximate_cut": (_approximate_cut, False)},  # only after an approximate cut (``OPTIONAL``)
}
# fields a file may leave out: written only when they say something (a file without one reads as before)
OPTIONAL = {"approximate_cut"}
# The key a slim Hugging Face config.json carries (``plugins.transformers.CONFIG_KEY``): field -> check,
# the manifest's own where a field means what a manifest field means.
CONFIG_KEY_FIELDS = {"shapes": _shapes, "attributes": _cut_attributes, "centered_layernorms": _centered_layernorms,
                     "branches": _removed_branches, "approximate_cut": _approximate_cut}
# What a cut writes on a layer (``shrink.set_cut_attributes``), the only attributes a file may set: the counts
# the normalization rules record where no tensor shows a width (``rules.normalization``), and the rescaled
# epsilon of an RMS norm (a float attribute of a layer with a weight, whatever its name).
COUNT_ATTRIBUTES = ("num_features", "num_channels", "num_groups")
# checked before the checksum (which depends on them), in this order
HEADER = ("format", "version", "sha256")


def parse(text: str, state: dict[str, torch.Tensor], path, expected: str | None) -> dict:
    """The manifest stored with ``state``, every field checked; ``expected``: the format the caller
    reads (None: either). Raises ``CheckpointError`` naming ``path`` and the field."""
    try:
        manifest = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path}: its manifest is not valid JSON ({_show(str(exc))}); write the file again") \
            from None
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{path}: its manifest is {_show(manifest)}, not an object; write the file again")
    if _depth(manifest) > MAX_DEPTH:
        raise CheckpointError(f"{path}: its manifest is nested more than {MAX_DEPTH} levels deep; write the file again")
    try:
        for name in HEADER:
            if name not in manifest:
                raise FieldError(name, "is missing")
            FIELDS["slim"][name][0](manifest[name], name, manifest, state)
        if manifest["sha256"] != digest(manifest, state):
            raise CheckpointError(f"{path} is corrupt: its manifest or tensors do not match the checksum written with "
                                  "them; write it again")
        kind = manifest["format"]
        fields = FIELDS[kind]
        for name in manifest:
            if name not in fields:
                raise FieldError(name, f"unknown field for a {kind} checkpoint (known: {', '.join(sorted(fields))})")
        for name, (check, nullable) in fields.items():
            if name not in manifest and name in OPTIONAL:
                continue
            if name not in manifest:
                raise FieldError(name, "is missing")
            if name not in HEADER and not (nullable and manifest[name] is None):
                check(manifest[name], name, manifest, state)
    except FieldError as exc:
        raise CheckpointError(f"{path}: manifest field '{exc.field}': {exc}") from None
    if expected is not None and kind != expected:
        hint = ("load it with dg.load_slim; `dgate report`/`dgate shrink` take the gated file from `dgate convert`"
                if kind == "slim" else "it is still gated: load it with dg.load_gated, or cut it with `dgate shrink`")
        raise CheckpointError(f"{path} is a {kind} checkpoint, not a {expected} one: {hint}")
    return manifest


def check_config_key(spec, path, key: str) -> dict:
    """``spec``, the slim widths a config.json carries under ``key``, every field checked as a
    manifest's are (before anything is built); a problem is one ``CheckpointError`` naming ``path``
    and the field."""
    try:
        _object(spec, key, tuple(CONFIG_KEY_FIELDS))
        if _depth(spec) > MAX_DEPTH:
            raise FieldError(key, f"is nested more than {MAX_DEPTH} levels deep")
        for name, check in CONFIG_KEY_FIELDS.items():
            if name in spec:
                check(spec[name], f"{key}.{name}", spec, {})
    except FieldError as exc:
        raise CheckpointError(f"{path}: config field '{exc.field}': {exc}. dgating_surgery writes this key itself: save the "
                              "slim model again with save_pretrained (or delete the key and load a dense model)") \
            from None
    return spec


def cut_attribute_problem(model, name: str, value) -> str | None:
    """Why a file may not set layer attribute ``name`` of ``model`` to ``value`` (None: it may): only a
    count of ``COUNT_ATTRIBUTES`` that is an integer already, or the float epsilon of a layer with a
    weight, as a cut writes them."""
    from ..engine.tensors import owner
    try:
        module, attr = owner(model, name)
        current = getattr(module, attr)
    except AttributeError:
        return f"the rebuilt model has no count or epsilon of that name to set to {_show(value, 40)}"
    if attr in COUNT_ATTRIBUTES and type(current) is int and type(value) is int:
        return None
    if (current is None or type(current) is float) and not isinstance(value, bool) \
            and isinstance(getattr(module, "weight", None), torch.Tensor):
        return None
    return (f"the rebuilt model has no count or epsilon of that name to set to {_show(value, 40)}: a cut sets only "
            f"a norm's count ({', '.join(COUNT_ATTRIBUTES)}) or a normalizing layer's epsilon, not "
            f"{type(module).__name__}.{attr} (now {_show(current, 40)})")


def _depth(value) -> int:
    """How deeply JSON ``value`` nests (counted without recursion, up to MAX_DEPTH + 1)."""
    deepest, level = 0, [value]
    while level and deepest <= MAX_DEPTH:
        level = [v for node in level for v in (node.values() if isinstance(node, dict) else node)
                 if isinstance(v, (dict, list))]
        deepest += 1
    return deepest


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _show(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def size(nbytes: int) -> str:
    """Bytes for a message: 1.2 GB, 3.4 MB, 5.6 kB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:,.1f} {unit}"
    return f"{nbytes} bytes"


def available_memory() -> int | None:
    """Bytes of memory available now (Linux: MemAvailable), else the machine's physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None
