"""What loading a checkpoint may run: a checkpoint is data, and the caller decides what code runs.

A manifest names the architecture to rebuild. Without the caller's opt-in it may only name a model
constructor of a library we support, with arguments that can neither fetch nor run anything:

- ``torchvision.models:<name>`` (or the ``torchvision.models.<sub>`` module that defines it): a
  builder torchvision registers (``torchvision.models.get_model_builder``);
- ``timm:<name>``: a model timm registers (``timm.is_model``), built by ``timm.create_model``;
- kind "hf": a ``transformers`` model class (a ``PreTrainedModel``) built from its config class's
  ``from_dict``, never with remote code;
- this package's own demo model (``dgate demo --out`` writes it).

Their arguments (and a transformers config) must be plain JSON data: no string that is a path, a
URL or a hub name, and no key of ``FETCHING`` with a value that would download or read weights.

Anything else runs code chosen by whoever wrote the file. Another ``module:callable`` or a
``file.py:callable`` needs the caller's ``trust_code`` (and a file must lie inside the checkpoint's
folder even then); a pickle needs ``allow_pickle``, and so does a trusted callable that unpickles
(``torch:load`` with ``weights_only: false``); ``trust_remote_code`` is never taken from a file
(transformers requires it from its caller). ``trust_code`` does not imply ``allow_pickle``: each flag
grants one thing. Only the caller sets them; nothing in a file can.
"""
from __future__ import annotations

import functools
import importlib
import math
import os
import re
from pathlib import Path
from typing import Callable

TRUST_FLAG = "--trust-code (trust_code=True in Python)"
PICKLE_FLAG = "--allow-pickle (allow_pickle=True in Python)"
YOURSELF = "or pass the architecture yourself (--model on the command line; reference= or model= in Python)"
SAFE_LIBRARIES = "torchvision.models, timm and transformers"

# keys that make a model library download or read weights or configs: allowed with an inert value only
FETCHING = frozenset({
    "weights", "weights_backbone", "pretrained", "pretrained_backbone", "use_pretrained_backbone", "checkpoint_path",
    "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "pretrained_model_name_or_path", "backbone_checkpoint",
    "hf_hub_id", "url", "file", "model_dir", "local_dir", "repo_id", "revision", "token"})
# grants a file may never give itself, whoever trusts it: the library requires them from its caller
NEVER = {"trust_remote_code": "runs code from a model repository", "auto_map": "names code in a model repository"}
# callables that unpickle what they read (a pickle runs code stored in it): need allow_pickle even when trusted
UNPICKLERS = frozenset({"torch:load", "torch.serialization:load", "pickle:load", "pickle:loads", "_pickle:load",
                        "_pickle:loads", "dill:load", "dill:loads", "cloudpickle:load", "cloudpickle:loads",
                        "joblib:load", "pandas:read_pickle", "numpy:load"})
# arguments that make a trusted callable unpickle: (key, value that does)
UNPICKLING_ARGS = (("weights_only", False), ("allow_pickle", True))
# strings that name something to fetch or read: a path, a URL, a hub repository ("org/name", "hf-hub:...")
PATH_LIKE = re.compile(r"[/\\]|^~|^[A-Za-z][\w+.-]*:")
METADATA_KEYS = frozenset({"_name_or_path"})  # a transformers config's record of where it came from, never read
MAX_DEPTH, MAX_TEXT = 32, 1000
OWN_MODELS = frozenset({"dgating_surgery.demo:DigitsMLP"})


def self_granted(value, where: str = "", depth: int = 0) -> str | None:
    """The first grant of ``NEVER`` that ``value`` sets anywhere inside it, as a message (None: none)."""
    if depth > MAX_DEPTH:
        return f"{where} is nested more than {MAX_DEPTH} levels deep"
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        inner = f"{where}[{key}]" if isinstance(value, list) else f"{where}.{key}" if where else str(key)
        if key in NEVER and item not in (None, False):
            return f"{inner} is set: it {NEVER[key]}, an opt-in the library takes from its caller, never from a file"
        found = self_granted(item, inner, depth + 1)
        if found:
            return found
    return None


def plain_data_problem(value, where: str, depth: int = 0) -> str | None:
    """Why ``value`` is not plain data a file may hand a library (None if it is): JSON values only,
    finite numbers, short strings that name no path/URL/hub repository, no fetching key with a live
    value, no grant a file may not give (``self_granted``)."""
    if depth == 0 and (granted := self_granted(value, where)):
        return granted
    if depth > MAX_DEPTH:
        return f"{where} is nested more than {MAX_DEPTH} levels deep"
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return None if math.isfinite(value) else f"{where} is {value}, not a finite number"
    if isinstance(value, str):
        if len(value) > MAX_TEXT:
            return f"{where} is a string of {len(value)} characters (at most {MAX_TEXT})"
        return f"{where} is {value!r}, a path, URL or hub name (something to fetch)" if PATH_LIKE.search(value) else None
    if isinstance(value, list):
        return next((p for i, v in enumerate(value) if (p := plain_data_problem(v, f"{where}[{i}]", depth + 1))), None)
    if isinstance(value, dict):
        for key, item in value.items():
            inner = f"{where}.{key}" if where else str(key)
            if not isinstance(key, str):
                return f"{where} has a key {key!r} that is not a string"
            if key in FETCHING and not _inert(item):
                return f"{inner}={_short(repr(item))} would fetch or read weights (only None/false is accepted from a file)"
            if key in METADATA_KEYS and isinstance(item, str):
                continue
            problem = plain_data_problem(item, inner, depth + 1)
            if problem:
                return problem
        return None
    return f"{where} is a {type(value).__name__}, not JSON data"


def _inert(value) -> bool:
    return value is None or value is False or (isinstance(value, (str, list, dict)) and not value)


def _short(value, limit: int = 120) -> str:
    """``value`` (a string as it is, anything else as its repr) cut to ``limit`` characters."""
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- what is safe to call --------------------------------------------------------------------------
def _torchvision(module: str, name: str):
    if module != "torchvision.models" and not module.startswith("torchvision.models."):
        return None
    from torchvision import models
    if name not in models.list_models():
        return None
    builder = models.get_model_builder(name)
    return builder if (builder.__module__ + ".").startswith(module + ".") else None


def _timm(module: str, name: str):
    if module != "timm":
        return None
    import timm
    return functools.partial(timm.create_model, name) if timm.is_model(name) else None


def _own(module: str, name: str):
    return getattr(importlib.import_module(module), name) if f"{module}:{name}" in OWN_MODELS else None


# module predicate -> resolver (module, name) -> the constructor, or None when the library has no such model
LIBRARIES: tuple[tuple[Callable[[str], bool], Callable], ...] = (
    (lambda m: m.split(".")[0] == "torchvision", _torchvision),
    (lambda m: m == "timm", _timm),
    (lambda m: m.split(".")[0] == "dgating_surgery", _own),
)


def hf_class(name: str):
    """The transformers model class called ``name``, or None when there is no such PreTrainedModel."""
    if not name.isidentifier():
        return None
    try:
        import transformers
        cls = getattr(transformers, name)
    except Exception:  # noqa: BLE001 - no such name, or a class whose backend is missing
        return None
    return cls if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel) else None


def safe_constructor(ref) -> tuple[Callable | None, str]:
    """(the library constructor a reference names, "") when loading it runs only that constructor
    with plain arguments; else (None, why not)."""
    if ref.kind == "pickle":
        return None, "unpickling runs code stored in the file"
    if ref.kind == "hf":
        cls = hf_class(ref.spec)
        if cls is None:
            return None, f"transformers has no model class '{ref.spec}'"
        problem = plain_data_problem(ref.config or {}, "config")
        return (cls, "") if problem is None else (None, problem)
    module, _, name = ref.spec.rpartition(":")
    if is_file_spec(ref.spec):
        return None, "it is code in a Python file"
    resolver = next((r for applies, r in LIBRARIES if applies(module)), None)
    if resolver is None:
        return None, f"'{module}' is not a model library loading trusts ({SAFE_LIBRARIES})"
    try:
        target = resolver(module, name) if name.isidentifier() else None
    except ImportError as exc:
        return None, f"cannot import {exc.name or module}"
    if target is None:
        return None, f"{module} registers no model named '{name}'"
    problem = plain_data_problem(ref.kwargs, "")
    return (target, "") if problem is None else (None, f"argument {problem}")


def is_file_spec(spec: str) -> bool:
    """``path/to/file.py:callable`` rather than ``package.module:callable``."""
    module = spec.rpartition(":")[0]
    return module.endswith(".py") or "/" in module or "\\" in module or os.sep in module


def named_file(ref) -> str | None:
    """The file a reference names (a pickle, or a factory's .py file), or None."""
    if ref.kind == "pickle":
        return ref.spec
    if ref.kind == "factory" and is_file_spec(ref.spec):
        return ref.spec.rpartition(":")[0]
    return None


def outside(ref, folder) -> bool:
    """Whether the file ``ref`` names (relative to ``folder`` or absolute) lies outside ``folder``,
    symbolic links resolved: a manifest may not reach beyond its checkpoint's folder."""
    named = named_file(ref)
    if named is None:
        return False
    inside = Path(folder).resolve()
    target = (inside / Path(named).expanduser()).resolve()
    return inside not in target.parents


def refusal(ref, trust_code: bool, allow_pickle: bool, folder: Path | None = None) -> str | None:
    """Why loading may not build ``ref`` with the opt-ins given, and how to allow it (None: it may).
    ``folder``: the checkpoint's folder, which a file the reference names may not leave."""
    what = _short(str(ref), 200)
    named = named_file(ref)
    if folder is not None and outside(ref, folder):
        return (f"its manifest names the file {named}, outside the checkpoint's folder {Path(folder).resolve()}: "
                f"refused even with --trust-code; keep the file beside the checkpoint, {YOURSELF}")
    if ref.kind == "pickle":
        if allow_pickle:
            return None
        return (f"its manifest names the pickled model {named}: unpickling runs code stored in that file; if you trust "
                f"it, pass {PICKLE_FLAG}, {YOURSELF}")
    constructor, why = safe_constructor(ref)
    if constructor is not None:
        return None
    never = self_granted(ref.kwargs) or self_granted(ref.config)
    if never is not None:
        return f"its manifest asks to run {what}, and {never}: {YOURSELF}"
    if not trust_code:
        return f"its manifest asks to run {what} ({why}); if you trust whoever wrote the file, pass {TRUST_FLAG}, {YOURSELF}"
    unpickles = ref.spec in UNPICKLERS or any(k in ref.kwargs and ref.kwargs[k] is v for k, v in UNPICKLING_ARGS)
    if unpickles and not allow_pickle:
        return (f"its manifest asks to run {what}, which unpickles (runs code stored in the file it reads): pass "
                f"{PICKLE_FLAG} as well if you trust that file, {YOURSELF}")
    return None
