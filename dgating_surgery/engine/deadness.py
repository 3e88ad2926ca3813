"""Which groups have collapsed, and holding chosen groups at exactly zero.

Under SGD a group that D-Gating drives out falls below the recipe's absolute threshold (1e-5)
within a few hundred steps. Under Adam it does not: Adam's step is about ``lr`` whatever the
gradient's size, so the factors of a collapsed group keep bouncing around zero and its collapsed
norm wanders between 1e-9 and 1e-3 of its layer's largest (measured on the digits MLP; the log is
in the notes of the size-target work). Two consequences:

- "collapsed" is decided relative to the layer: a group is collapsed when its collapsed norm is
  below ``relative`` (default ``RELATIVE`` = 1e-3) times the largest in its gate. The ratio does not
  depend on the optimizer, on group size or on the layer's scale; under SGD it counts what the
  absolute threshold counts;
- a collapsed group is not exactly zero, so a cut would change the function a little. ``hold``
  sets the chosen groups' gate factors to exactly zero and keeps them there through training
  (gradient masked, optimizer state cleared, re-zeroed after every optimizer step), so that
  ``shrink``'s absolute test finds them dead and the cut stays exact.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..errors import LambdaError
from .gates import gate_set, group_sq_sums, require_gated
from .wrappers import unwrap_optimizer

RELATIVE = 1e-3  # a group is collapsed below this fraction of the largest collapsed norm in its gate


def check_relative(relative) -> float:
    """``relative`` as a float in (0, 1), or a ``LambdaError`` naming it."""
    try:
        value = float(relative)
    except (TypeError, ValueError):
        value = float("nan")
    if not 0.0 < value < 1.0:
        raise LambdaError(f"relative must be a fraction in (0, 1) (a group is collapsed below that fraction of the "
                          f"largest norm in its gate, e.g. 1e-3), got {relative!r}")
    return value


def scores(model: nn.Module, reference: dict[str, float] | None = None) -> dict[str, torch.Tensor]:
    """Each group's collapsed norm divided by the largest in its gate (1 for the strongest group):
    a scale-free figure that ranks groups of different sizes and layers against each other.
    ``reference``: gate key -> the norm to divide by instead (``reference_norms`` at some earlier
    step), so that groups shrinking together show as shrinking."""
    dset = require_gated(model, "collapsed groups")
    out = {}
    with torch.no_grad():
        for key, dgate in dset.items():
            norm = group_sq_sums(model, dgate, dtype=torch.float64).sqrt()
            top = norm.max() if reference is None else torch.tensor(reference[key], dtype=norm.dtype)
            out[key] = norm / top if top > 0 else torch.zeros_like(norm)
    return out


def reference_norms(model: nn.Module) -> dict[str, float]:
    """Gate key -> the largest collapsed norm of its groups now (a reference for ``scores``)."""
    dset = require_gated(model, "collapsed groups")
    with torch.no_grad():
        return {key: float(group_sq_sums(model, dgate, dtype=torch.float64).sqrt().max()) for key, dgate in dset.items()}


def typical_norms(model: nn.Module, relative: float = RELATIVE) -> dict[str, float]:
    """Gate key -> the root mean square of the collapsed norms of its groups that have not
    collapsed (norm at least ``relative`` times the gate's largest): the norm each surviving group
    of that layer would have if the layer's norm were spread evenly over them. ``scores(model,
    typical_norms(model))`` compares groups of different layers by how weak each is within its
    own layer. The largest norm is no such scale: one strong channel (the one a classifier reads
    most) makes all the others of its layer look weak. Nor is the median: where the penalty has
    pushed more than half of a layer down, the median sits among the dying groups and they look
    typical (ranked by it, tests/test_target.py's 64-32 MLP at a 90% target kept one neuron of
    its second layer and fell to 24% accuracy)."""
    relative = check_relative(relative)
    dset = require_gated(model, "collapsed groups")
    out = {}
    with torch.no_grad():
        for key, dgate in dset.items():
            norm = group_sq_sums(model, dgate, dtype=torch.float64).sqrt()
            alive = norm[norm >= relative * norm.max()]
            out[key] = float(alive.pow(2).mean().sqrt()) if alive.numel() else 0.0
    return out


def collapsed_groups(model: nn.Module, relative: float = RELATIVE) -> dict[str, torch.Tensor]:
    """Per gate key, a bool per group: collapsed (norm below ``relative`` times the largest in its
    gate). The strongest group of a gate is never collapsed (a cut keeps one group per gate)."""
    relative = check_relative(relative)
    return {key: s < relative for key, s in scores(model).items()}


@contextlib.contextmanager
def zeroed(model: nn.Module, masks: dict[str, torch.Tensor]):
    """Within the block the groups in ``masks`` have gate 0 (what a cut of them would see); the
    factors are restored afterwards. For "what would a cut of these groups remove" questions."""
    dset = require_gated(model, "zeroed")
    saved = {key: dset[key].factors.detach().clone() for key in masks}
    try:
        with torch.no_grad():
            for key, mask in masks.items():
                dset[key].factors[:, mask.to(dset[key].factors.device)] = 0
        yield model
    finally:
        with torch.no_grad():
            for key, value in saved.items():
                dset[key].factors.copy_(value)


class Hold:
    """Groups held at exactly zero: their gate factors are zero and stay zero while the model
    trains (see ``hold``). ``masks``: gate key -> bool per group; ``release()`` lets them train again."""

    def __init__(self, model: nn.Module, masks: dict[str, torch.Tensor], optimizer=None):
        self.model = model
        self.masks = {key: mask.detach().to(torch.bool).clone() for key, mask in masks.items() if bool(mask.any())}
        self.optimizer = unwrap_optimizer(optimizer) if optimizer is not None else None
        self._handles = []
        dset = require_gated(model, "dg.hold")
        unknown = sorted(set(self.masks) - set(dset))
        if unknown:
            raise LambdaError(f"dg.hold: no gate named {unknown[0]!r}; gate keys are {', '.join(dset)}")
        for key, mask in self.masks.items():
            factors = dset[key].factors
            if mask.shape != factors.shape[1:]:
                raise LambdaError(f"dg.hold: the mask of gate {key!r} has {mask.numel()} entries, the gate has "
                                  f"{factors.shape[1]} groups")
            keep = (~mask).to(factors.dtype).to(factors.device)
            if factors.requires_grad:  # frozen gates (a baseline's) have no gradient to mask
                self._handles.append(factors.register_hook(lambda grad, keep=keep: grad * keep))
        if self.optimizer is not None:
            self._handles.append(self.optimizer.register_step_post_hook(lambda *_: self.apply()))
        self.apply()

    def apply(self) -> None:
        """Zero the held factors and the optimizer's state for them (momentum, Adam's moments), so
        that the next step leaves them at zero too."""
        dset = gate_set(self.model)
        state = self.optimizer.state if self.optimizer is not None else {}
        with torch.no_grad():
            for key, mask in self.masks.items():
                factors = dset[key].factors
                where = mask.to(factors.device)
                factors[:, where] = 0
                for value in state.get(factors, {}).values():
                    if isinstance(value, torch.Tensor) and value.shape == factors.shape:
                        value[:, where] = 0

    @property
    def count(self) -> int:
        return sum(int(m.sum()) for m in self.masks.values())

    def release(self) -> None:
        """Stop holding (the factors stay at zero until training moves them)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def hold(model: nn.Module, masks: dict[str, torch.Tensor] | None = None, optimizer=None,
         relative: float = RELATIVE) -> Hold:
    """Hold groups at exactly zero for the rest of training: ``masks`` (gate key -> bool per
    group; default: the groups collapsed now, ``collapsed_groups(model, relative)``). With
    ``optimizer`` (the one that trains the model) its state for them is cleared and they are
    re-zeroed after each of its steps, so momentum and Adam's moments cannot move them; without
    it, call ``apply()`` after each step. A later ``dg.shrink`` cuts exactly these groups (plus any
    already below its absolute threshold)."""
    return Hold(model, collapsed_groups(model, relative) if masks is None else masks, optimizer)


__all__ = ["RELATIVE", "collapsed_groups", "scores", "reference_norms", "typical_norms", "zeroed", "hold", "Hold"]
