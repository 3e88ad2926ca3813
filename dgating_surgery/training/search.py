"""Lambda search: find the D-Gating strength that removes a target fraction of the model, so that
nobody tunes lambda by hand. Sparsity grows monotonically (up to training noise) with log(lambda),
so a safeguarded bisection on log(lambda), one short training run per trial, finds it in a few
trials.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from ..engine.measure import macs, macs_after_cut
from ..engine.report import sparsity

METRICS = ("groups", "params", "macs")


def removed_fraction(model: nn.Module, metric: str = "groups", threshold: float | None = None,
                     example_inputs=None) -> float:
    """Fraction a cut at ``threshold`` would remove: of the gated groups ("groups"), of the
    network's parameters ("params"), or of the MACs of a forward pass ("macs", needs example_inputs;
    measured on a cut copy, see ``measure.macs``)."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if metric == "macs":
        if example_inputs is None:
            raise ValueError("metric='macs' needs example_inputs to measure the layers' output sizes")
        return 1.0 - macs_after_cut(model, example_inputs, threshold=threshold) / max(macs(model, example_inputs), 1)
    report = sparsity(model, threshold)
    if metric == "groups":
        return report.dead / max(report.groups, 1)
    return report.params_removable / max(report.params_total, 1)


@dataclass
class SearchResult:
    """The trial closest to the target: its lambda, what it removed, and the trained model.
    ``trials`` lists every (lambda, removed fraction) tried, in order."""

    lam: float
    removed: float
    target: float
    model: nn.Module
    trials: list[tuple[float, float]] = field(default_factory=list)
    tol: float = 0.02

    @property
    def reached(self) -> bool:
        """Whether the returned trial is within ``tol`` of the target."""
        return abs(self.removed - self.target) <= self.tol


def search_lambda(make_model: Callable[[], nn.Module], train: Callable[[nn.Module, float], object],
                  target: float, metric: str = "groups", lam_range: tuple[float, float] = (1e-5, 1.0),
                  tol: float = 0.02, max_trials: int = 8, threshold: float | None = None, example_inputs=None,
                  verbose: bool = False) -> SearchResult:
    """Find lambda so that training removes ``target`` (a fraction in (0, 1)) of the ``metric``.

    ``make_model()`` returns a fresh gated model (same seed each time, so that trials differ only
    in lambda); ``train(model, lam)`` trains it in place with that lambda (e.g. an optimizer built
    from ``dg.param_groups(model, lam)``). Each trial is one training run; the search interpolates
    log(lambda) between the closest trials below and above the target (bisecting when they are
    unknown or interpolation stalls) and stops within ``tol`` or after ``max_trials``.
    """
    if not 0.0 < target < 1.0:
        raise ValueError(f"target is a fraction to remove, in (0, 1); got {target!r}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    lo, hi = (math.log(v) for v in lam_range)
    if not lo < hi:
        raise ValueError(f"lam_range must be (low, high) with 0 < low < high, got {lam_range!r}")
    below: tuple[float, float] | None = None  # (log lam, removed) of the best trial under target
    above: tuple[float, float] | None = None
    best = None
    trials: list[tuple[float, float]] = []
    for i in range(max_trials):
        a = below[0] if below else lo
        b = above[0] if above else hi
        x = 0.5 * (a + b)
        if below and above and above[1] > below[1]:
            t = (target - below[1]) / (above[1] - below[1])
            x = a + min(max(t, 0.2), 0.8) * (b - a)  # stay inside: interpolation alone can stall at one end
        model = make_model()
        train(model, math.exp(x))
        removed = removed_fraction(model, metric, threshold, example_inputs)
        trials.append((math.exp(x), removed))
        if verbose:
            print(f"trial {i + 1}: lam={math.exp(x):.3g} removed {removed:.1%} of {metric} (target {target:.1%})")
        if best is None or abs(removed - target) < abs(best[1] - target):
            best = (math.exp(x), removed, model)
        if abs(removed - target) <= tol:
            break
        if removed < target:
            below = (x, removed)
        else:
            above = (x, removed)
    return SearchResult(lam=best[0], removed=best[1], target=target, model=best[2], trials=trials, tol=tol)
