"""Removing dead residual branches whole (the ``blocks`` kind; ``rules.branches`` finds them).

A residual branch ``x + f(x)`` is gated on the weights of its last layer, so a dead branch adds
exact zeros. Shrink then removes it by replacing layers, never by slicing them:

- a layer that holds only residual branches (a ResNet block, a ConvNeXt block, a transformer
  layer) and has lost all of them becomes a ``Bypass``: its input passes through;
- a dead branch in a layer that keeps another one has its last layer replaced by a ``ZeroBranch``
  (zeros of its input's shape) and the layers before it by ``Bypass``.

A library does better where it can: ``LAYER_DROPPERS`` take whole layers out of a layer list (a
Hugging Face decoder layer, with its config and KV-cache indices renumbered), ``ZERO_BRANCHES``
make a zero layer that keeps what its callers expect of it (a Hugging Face attention keeps the KV
cache's length). What was replaced is found again from the model (``replaced_layers``), so a
checkpoint records it and a loader replays it (``replace_layers``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..errors import ShrinkError


@dataclass(frozen=True)
class Branch:
    """What removing one residual branch replaces. ``block``: the layer made of this branch and
    ``siblings - 1`` others (None: none), bypassed once all of them are dead; ``zero``: the layer
    whose output is the branch's output, replaced by zeros when the branch dies alone (None: the
    branch is removed only with its block); ``bypass``: the other layers of the branch, bypassed, or
    replaced by zeros where they change the width. Layers are (path, returns, width): ``returns`` 0 for
    a layer returning a tensor, n for one returning an n-tuple whose first entry is that tensor (the
    others are read by nobody); ``width``: None for a layer that keeps its input's shape, else the
    size of the last dim of its output (a linear that widens or narrows)."""

    name: str
    block: tuple[str, int, None] | None
    siblings: int
    zero: tuple[str, int, int | None] | None
    bypass: tuple[tuple[str, int, int | None], ...] = ()


def narrowed(branches: list[Branch], gates: dict, dead: dict) -> list[Branch]:
    """``branches`` with the width of every zero layer that changes the width (a ``nn.Linear``, rows
    of its weight) reduced by the rows the other gates' cut removes (a neuron or hidden-size cut of
    that linear's outputs): the zeros then have the slim width. ``gates``/``dead``: the gated
    model's gates and ``plan_cut``'s dead masks, by key."""
    def width(path: str, full: int | None) -> int | None:
        if full is None:
            return None
        gone = torch.zeros(full, dtype=torch.bool)
        for key, dgate in gates.items():
            for cut in dgate.cuts if not dgate.branches else ():
                if cut.fqn == f"{path}.weight" and cut.dim == 0 and cut.index.numel() in (1, full):
                    along = cut.index.expand(full)
                    gone |= (along >= 0) & dead[key][along.clamp(min=0)]
        return full - int(gone.sum())
    return [Branch(b.name, b.block, b.siblings, b.zero and (b.zero[0], b.zero[1], width(b.zero[0], b.zero[2])),
                   tuple((p, r, width(p, w)) for p, r, w in b.bypass)) for b in branches]


def _first_input(args: tuple, kwargs: dict) -> torch.Tensor:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError("a removed residual branch was called without a tensor input")


class Bypass(nn.Module):
    """A removed layer whose input passes through: it returns its first tensor input (as the first
    entry of a ``returns``-tuple, the rest None, where the layer returned a tuple)."""

    def __init__(self, returns: int = 0):
        super().__init__()
        self.returns = returns

    def value(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward(self, *args, **kwargs):
        out = self.value(_first_input(args, kwargs))
        return (out,) + (None,) * (self.returns - 1) if self.returns else out

    def extra_repr(self) -> str:
        return f"returns={self.returns}" if self.returns else ""


class ZeroBranch(Bypass):
    """A layer of a removed residual branch: zeros of its first input's shape, or with ``width``
    entries along the last dim (the output of a linear that changed the width)."""

    def __init__(self, returns: int = 0, width: int | None = None):
        super().__init__(returns)
        self.width = width

    def value(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.width) if self.width is not None else torch.zeros_like(x)

    def extra_repr(self) -> str:
        return ", ".join(([super().extra_repr()] if self.returns else []) + ([f"width={self.width}"] if self.width else []))


# factories of library-specific zero layers: (layer, returns, width) -> a ZeroBranch, or None when not theirs
ZERO_BRANCHES: list[Callable[[nn.Module, int, int | None], ZeroBranch | None]] = []
# (model, paths of layers to remove whole) -> the paths it removed (taken out of a layer list)
LAYER_DROPPERS: list[Callable[[nn.Module, list[str]], list[str]]] = []
REPLACEMENTS = {"bypass": Bypass, "zeros": ZeroBranch}


def register_zero_branch(factory: Callable[[nn.Module, int, int | None], ZeroBranch | None]) -> None:
    if factory not in ZERO_BRANCHES:
        ZERO_BRANCHES.append(factory)


def register_layer_dropper(dropper: Callable[[nn.Module, list[str]], list[str]]) -> None:
    if dropper not in LAYER_DROPPERS:
        LAYER_DROPPERS.append(dropper)


def _replacement(layer: nn.Module, how: str, returns: int, width: int | None) -> nn.Module:
    if how == "bypass":
        return Bypass(returns)
    for factory in ZERO_BRANCHES:
        made = factory(layer, returns, width)
        if made is not None:
            return made
    return ZeroBranch(returns, width)


def _replace(model: nn.Module, targets: list[tuple[str, str, int, int | None]]) -> None:
    """Replace layers (path, "bypass" or "zeros", returns, width); every path is resolved first, so
    that no replacement moves another's."""
    resolved = []
    for path, how, returns, width in targets:
        parent_path, _, attr = path.rpartition(".")
        resolved.append((model.get_submodule(parent_path), attr, model.get_submodule(path), how, returns, width))
    for parent, attr, layer, how, returns, width in resolved:
        setattr(parent, attr, _replacement(layer, how, returns, width))


def remove_branches(model: nn.Module, dead: list[Branch]) -> None:
    """Remove dead branches (``Branch`` records of a gated model's blocks gates): whole layers
    first where all their branches are dead, else each branch's own layers. Called by shrink after
    the tensors are cut and before the attribute fixers run."""
    if not dead:
        return
    per_block: dict[tuple[str, int], list[Branch]] = {}
    for branch in dead:
        if branch.block is not None:
            per_block.setdefault(branch.block, []).append(branch)
    whole = {block for block, found in per_block.items() if len(found) == found[0].siblings}
    targets = []
    for branch in dead:
        if branch.block in whole:
            continue
        if branch.zero is None:  # the rule gates such a branch only when it is its block's only one
            raise ShrinkError(f"residual branch '{branch.name}' can only be removed with the rest of its block")
        targets += [(path, "bypass" if width is None else "zeros", returns, width)
                    for path, returns, width in branch.bypass]
        targets.append((branch.zero[0], "zeros", *branch.zero[1:]))
    _replace(model, targets)
    paths = sorted(path for path, _, _ in whole)
    for dropper in LAYER_DROPPERS:
        done = dropper(model, paths)
        paths = [p for p in paths if p not in done]
    _replace(model, [(path, "bypass", returns, None) for path, returns, _ in whole if path in paths])
    _forget_attributes(model)


def _forget_attributes(model: nn.Module) -> None:
    """Cut attributes recorded for layers that are gone (a rescaled norm inside a removed branch)."""
    recorded = getattr(model, "cut_attributes", None)
    if not recorded:
        return
    kept = {}
    for name, value in recorded.items():
        try:
            layer = model.get_submodule(name.rpartition(".")[0])
        except AttributeError:
            continue
        if not isinstance(layer, Bypass):
            kept[name] = value
    model.cut_attributes = kept


def replaced_layers(model: nn.Module) -> dict[str, dict]:
    """Every layer a removed branch left in ``model``: path -> {"as": "bypass" or "zeros",
    "returns": n} (and "width": n for zeros of another width), what ``replace_layers`` rebuilds it from."""
    return {name: {"as": "zeros" if isinstance(m, ZeroBranch) else "bypass", "returns": m.returns,
                   **({"width": m.width} if getattr(m, "width", None) is not None else {})}
            for name, m in model.named_modules() if isinstance(m, Bypass)}


def replace_layers(model: nn.Module, record: dict[str, dict]) -> None:
    """Replay ``replaced_layers`` of a slim model on a fresh model of its architecture."""
    targets = []
    for path, spec in record.items():
        how, returns, width = spec.get("as"), spec.get("returns"), spec.get("width")
        if how not in REPLACEMENTS or type(returns) is not int or returns < 0 or not (
                width is None or type(width) is int and width > 0 and how == "zeros"):
            raise ValueError(f"removed branch '{path}': 'as' must be one of {', '.join(REPLACEMENTS)}, 'returns' a "
                             f"count >= 0 and 'width' (zeros only) a count > 0, got {spec!r}")
        model.get_submodule(path)  # an AttributeError names a layer the model does not have
        targets.append((path, how, returns, width))
    _replace(model, targets)
