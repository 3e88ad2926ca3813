"""Recipes: which groups to gate and how (D, lambda, init, threshold), loaded from YAML or a dict.

A recipe is data, not code, so that a user can keep one per model family and share it. Every
field but ``D`` and ``groups`` has a default; unknown fields are errors, because a misspelt field
that is silently ignored is the worst kind of configuration bug. Errors in a YAML file name the
line of the field.
"""
from __future__ import annotations

import fnmatch
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import RecipeError
from .kinds import KINDS

INITS = ("balanced", "ones")


@dataclass(frozen=True)
class GroupSpec:
    """One entry of ``groups:``: a kind plus optional selectors on the producing modules."""

    kind: str
    modules: tuple[str, ...] = ()  # module class names, e.g. ("Conv2d",); empty: any
    names: tuple[str, ...] = ()  # fnmatch globs on module names; empty: any
    exclude: tuple[str, ...] = ()  # fnmatch globs on module names that are never gated
    lam: float | None = None  # this kind's lambda (None: the recipe's); see Recipe.lam_of
    # hidden only: centre a pre-LayerNorm residual stream and swap its LayerNorms for RMS norms first
    # (exact; dgating_surgery.engine.centering), so that its channels can be gated
    center_layernorm: bool = False
    # hidden only: "approximate" cuts the stream's channels under LayerNorm (its statistics then run over
    # the kept channels: an approximate cut, labelled, whose output change shrink measures); None: refused
    layernorm: str | None = None

    def matches(self, kind: str, module_names: list[str], module_types: list[str]) -> bool:
        """True when a group set of ``kind`` produced by these modules is selected by this spec."""
        if kind != self.kind:
            return False
        if any(fnmatch.fnmatchcase(n, g) for n in module_names for g in self.exclude):
            return False
        if self.modules and not any(t in self.modules for t in module_types):
            return False
        if self.names and not any(fnmatch.fnmatchcase(n, g) for n in module_names for g in self.names):
            return False
        return True

    def describe(self) -> str:
        parts = [f"kind: {self.kind}"]
        for name in ("modules", "names", "exclude"):
            if getattr(self, name):
                parts.append(f"{name}: {list(getattr(self, name))}")
        if self.lam is not None:
            parts.append(f"lam: {self.lam:g}")
        if self.layernorm is not None:
            parts.append(f"layernorm: {self.layernorm}")
        return "{" + ", ".join(parts) + "}"


@dataclass(frozen=True)
class Recipe:
    """A validated recipe. ``D``: gating depth (>= 2); ``lam``: the L_{2,2/D} strength;
    ``init``: "balanced" (factors equal, function unchanged) or "ones"; ``threshold``: absolute
    L2 norm under which a collapsed group counts as dead; ``round_to``: ``shrink`` keeps each cut
    layer's width a multiple of this by keeping the strongest dead groups (1: no rounding)."""

    D: int
    groups: tuple[GroupSpec, ...]
    lam: float = 1e-4
    init: str = "balanced"
    threshold: float = 1e-5
    round_to: int = 1
    name: str = ""
    source: str = "<dict>"

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain data (what ``load_recipe`` accepts), for manifests."""
        groups = []
        for g in self.groups:
            entry: dict[str, Any] = {"kind": g.kind}
            for key in ("modules", "names", "exclude"):
                if getattr(g, key):
                    entry[key] = list(getattr(g, key))
            if g.lam is not None:
                entry["lam"] = g.lam
            if g.center_layernorm:
                entry["center_layernorm"] = True
            if g.layernorm is not None:
                entry["layernorm"] = g.layernorm
            groups.append(entry)
        out: dict[str, Any] = {"D": self.D, "lam": self.lam, "init": self.init,
                               "threshold": self.threshold, "round_to": self.round_to, "groups": groups}
        if self.name:
            out["name"] = self.name
        return out

    def lam_of(self, kind: str) -> float:
        """The lambda of ``kind``: its ``groups`` entry's ``lam`` when one sets it, else ``lam``.
        A group pays lam * ||w_j||^(2/D); at equal per-weight scale ||w_j|| grows as sqrt(size), so
        the price grows as size^(1/D) (D=3: a 1,024-weight head pays 2.5x a 65-weight neuron) while
        what its removal costs the loss does not follow size. One lambda for both kinds therefore
        lands each kind at a sparsity nobody chose; per-kind lambdas (or per-kind targets of
        ``LambdaScheduler``, which set them) let each kind reach its own."""
        return next((g.lam for g in self.groups if g.kind == kind and g.lam is not None), self.lam)


_MEANING = {"threshold": "the collapsed L2 norm under which a group is dead, e.g. 1e-5",
            "lam": "the strength of the penalty, e.g. 1e-4",
            "rtol": "the largest output change allowed, relative to the largest output, e.g. 1e-4"}


def check_threshold(value, name: str = "threshold"):
    """``value`` as a float when it is a finite number >= 0 (a threshold, a tolerance, a lambda);
    ``None`` passes through (then the recipe's value is used). Anything else raises
    ``RecipeError``: a negative or NaN threshold would otherwise "succeed" and cut nothing."""
    if value is None:
        return None
    number = None
    if not isinstance(value, (bool, str, bytes)):
        try:
            number = float(value)
        except (TypeError, ValueError):
            pass
    if number is None or not math.isfinite(number) or number < 0:
        meaning = _MEANING.get(name.rsplit(".", 1)[-1].lstrip("-"))
        raise RecipeError(f"{name} must be a finite number >= 0{f' ({meaning})' if meaning else ''}, got {value!r}")
    return number


def check_round_to(value, fail=None) -> int:
    """``value`` as an int >= 1 (the multiple every cut layer's width is kept at; 1: no rounding), or a
    ``RecipeError`` (through ``fail(message)`` when given, which names the field and line)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        message = (f"must be an integer >= 1 (cut layers keep widths that are multiples of it, e.g. 8; 1: no "
                   f"rounding), got {value!r}")
        if fail is not None:
            fail(message)
        raise RecipeError(f"round_to {message}")
    return value


# YAML 1.1 (PyYAML) reads 1e-4 as a string (it wants 1.0e-4); a recipe may write either
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _number(value):
    """A number written in YAML, also one PyYAML left as a string (``lam: 1e-4``)."""
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        return float(value)
    return value


_TOP_FIELDS = {"D", "groups", "lam", "init", "threshold", "round_to", "name", "description"}
_GROUP_FIELDS = {"kind", "modules", "names", "exclude", "lam", "center_layernorm", "layernorm"}
LAYERNORM_MODES = ("approximate",)  # groups[].layernorm


def recipe_dir() -> Path:
    """Where the shipped recipes are: inside an installed wheel, or recipes/ of a source checkout."""
    here = Path(__file__).resolve().parents[1]  # the package folder
    installed = here / "recipes"
    return installed if installed.is_dir() else here.parent / "recipes"


def shipped_recipes() -> list[str]:
    """Names of the recipes that ship with the package (``load_recipe("resnet")``)."""
    return sorted(p.stem for p in recipe_dir().glob("*.yaml"))


def load_recipe(recipe: "str | os.PathLike | dict | Recipe") -> Recipe:
    """Load and validate a recipe from a path, a shipped recipe's name, a dict or a ``Recipe``.

    Raises ``RecipeError`` naming the file, the field and what to write instead.
    """
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return _from_dict(recipe, "<dict>")
    if not isinstance(recipe, (str, os.PathLike)):
        raise RecipeError(f"a recipe is a path, a shipped recipe name, a dict or a Recipe, not {type(recipe).__name__}")
    path = Path(recipe)
    if not path.exists() and isinstance(recipe, str) and os.sep not in recipe and not recipe.endswith((".yaml", ".yml")):
        shipped = recipe_dir() / f"{recipe}.yaml"
        if not shipped.is_file():
            raise RecipeError(
                f"no recipe file '{recipe}' and no shipped recipe of that name; shipped recipes: "
                f"{', '.join(shipped_recipes())}")
        return _from_text(shipped.read_text(), f"{recipe} (shipped)")
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    return _from_text(path.read_text(), str(path))


def _from_text(text: str, source: str) -> Recipe:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError(f"{source}: YAML syntax error{where}: {problem}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a YAML mapping with at least 'D' and 'groups', got {type(data).__name__}")
    return _from_dict(data, source, _field_lines(text))


def _field_lines(text: str) -> dict[str, int]:
    """The line (1-based) of every field of a YAML recipe, keyed as errors name them:
    ``lam``, ``groups``, ``groups[0]``, ``groups[0].modulez``."""
    lines: dict[str, int] = {}

    def walk(node, path: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                sub = f"{path}.{key.value}" if path else str(key.value)
                lines.setdefault(sub, key.start_mark.line + 1)
                walk(value, sub)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                sub = f"{path}[{i}]"
                lines.setdefault(sub, item.start_mark.line + 1)
                walk(item, sub)

    try:
        walk(yaml.compose(text, Loader=yaml.SafeLoader), "")
    except yaml.YAMLError:
        pass
    return lines


def _from_dict(data: dict, source: str, lines: dict[str, int] | None = None) -> Recipe:
    def fail(fieldname, msg: str):
        fieldname = str(fieldname)
        path = fieldname  # a missing field: the line of the entry that lacks it
        while lines and path not in lines and re.search(r"[.\[]", path):
            path = re.sub(r"(\.[^.\[]*|\[\d+\])$", "", path)
        line = f", line {lines[path]}" if lines and path in lines else ""
        raise RecipeError(f"{source}{line}: field '{fieldname}': {msg}")

    unknown = sorted(set(data) - _TOP_FIELDS, key=str)
    if unknown:
        fail(unknown[0], f"unknown field; valid fields are {', '.join(sorted(_TOP_FIELDS))}")
    if "D" not in data:
        fail("D", "missing; set the gating depth, e.g. 'D: 3' (D=2 is the group lasso, larger D is sparser)")
    D = data["D"]
    if isinstance(D, bool) or not isinstance(D, int) or D < 2:
        fail("D", f"must be an integer >= 2, got {D!r}")
    kwargs: dict[str, Any] = {"D": D, "source": source}
    def number(value, where: str, meaning: str) -> float:
        value = _number(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            fail(where, f"must be a finite number >= 0 ({_MEANING[meaning]}), got {value!r}")
        return float(value)

    for key, default in (("lam", 1e-4), ("threshold", 1e-5)):
        kwargs[key] = number(data.get(key, default), key, key)
    kwargs["round_to"] = check_round_to(data.get("round_to", 1), lambda msg: fail("round_to", msg))
    init = data.get("init", "balanced")
    if init not in INITS:
        fail("init", f"must be one of {', '.join(INITS)}, got {init!r}")
    kwargs["init"] = init
    name = data.get("name", "")
    if not isinstance(name, str):
        fail("name", f"must be a string, got {name!r}")
    kwargs["name"] = name
    groups = data.get("groups")
    if not isinstance(groups, list) or not groups:
        fail("groups", "must be a non-empty list, e.g. [{kind: channels}, {kind: neurons}]")
    specs = []
    for i, entry in enumerate(groups):
        where = f"groups[{i}]"
        if isinstance(entry, str):
            entry = {"kind": entry}
        if not isinstance(entry, dict):
            fail(where, f"must be a mapping with a 'kind', got {entry!r}")
        unknown = sorted(set(entry) - _GROUP_FIELDS, key=str)
        if unknown:
            fail(f"{where}.{unknown[0]}", f"unknown field; valid fields are {', '.join(sorted(_GROUP_FIELDS))}")
        kind = entry.get("kind")
        if "kind" not in entry:
            fail(f"{where}.kind", f"missing; each entry names a kind, one of {', '.join(KINDS)}")
        if kind not in KINDS:
            fail(f"{where}.kind", f"unknown kind {kind!r}; valid kinds are {', '.join(KINDS)}")
        lists = {}
        for key in ("modules", "names", "exclude"):
            value = entry.get(key, [])
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                fail(f"{where}.{key}", f"must be a list of strings, got {value!r}")
            lists[key] = tuple(value)
        lam = number(entry["lam"], f"{where}.lam", "lam") if "lam" in entry else None
        earlier = next((g.lam for g in specs if g.kind == kind and g.lam is not None), None)
        if lam is not None and earlier is not None and earlier != lam:
            fail(f"{where}.lam", f"{kind} already has lam {earlier:g} in an earlier entry: one lambda per kind "
                                 "(the optimizer has one param group per kind)")
        center = entry.get("center_layernorm", False)
        if not isinstance(center, bool) or (center and kind != "hidden"):
            fail(f"{where}.center_layernorm", "true or false, and only in a {kind: hidden} entry (it centres the "
                                              "residual stream so that its LayerNorms become RMS norms)")
        layernorm = entry.get("layernorm")
        if (layernorm is not None or "layernorm" in entry) and (layernorm not in LAYERNORM_MODES or kind != "hidden"
                                                                  or center):
            fail(f"{where}.layernorm", "'approximate', only in a {kind: hidden} entry and not with center_layernorm "
                                       "(it cuts the stream under LayerNorm approximately, its output change measured; "
                                       f"center_layernorm is the exact route), got {layernorm!r}")
        specs.append(GroupSpec(kind=kind, **lists, lam=lam, center_layernorm=center, layernorm=layernorm))
    kwargs["groups"] = tuple(specs)
    return Recipe(**kwargs)


__all__ = ["Recipe", "GroupSpec", "load_recipe", "shipped_recipes"]
