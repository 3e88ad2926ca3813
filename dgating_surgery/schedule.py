"""Lambda within one run: a warm-up ramp, a constant, or a controller that reaches a target
sparsity by a given step (as torch.ao.pruning's schedulers, OTO's ``target_group_sparsity`` and
Torch-Pruning's iterative steps offer).

``LambdaScheduler`` is stepped like a learning-rate scheduler, once per optimizer step. It sets
the weight decay of the D-Gating param groups (those from ``dg.param_groups``) to ``2 * lam / D``
and records ``lam`` in the group, so that ``check_optimizer`` and ``track`` check the schedule's
current value. With ``dg.penalty`` instead of weight decay, read ``scheduler.lam`` each step.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .errors import LambdaError
from .training import D_KEY, LAM_KEY, SCHEDULED_KEY, check_lam
from .wrappers import unwrap, unwrap_optimizer

BASE_KEY = "dgating_base_lam"  # in a param group: the lam dg.param_groups recorded, before a schedule changed it

def dgating_groups(optimizer) -> list[dict]:
    """The param groups of ``optimizer`` that ``dg.param_groups`` made (they record lam and D)."""
    return [g for g in unwrap_optimizer(optimizer).param_groups if LAM_KEY in g and D_KEY in g]


def set_lam(optimizer, lam: float, scheduled: bool = True) -> None:
    """Set lambda of every D-Gating param group: weight decay ``2 * lam / D``, lam recorded."""
    lam = check_lam(lam)
    groups = dgating_groups(optimizer)
    if not groups:
        raise LambdaError("the optimizer has no D-Gating param group: build it from dg.param_groups(model, lam) "
                          "(or drive dg.penalty(model, scheduler.lam) and pass no optimizer to the scheduler)")
    for group in groups:
        group.setdefault(BASE_KEY, group[LAM_KEY])  # what dg.param_groups was given: a resumed schedule starts there
        group["weight_decay"] = 2.0 * lam / group[D_KEY]
        group[LAM_KEY] = lam
        group[SCHEDULED_KEY] = scheduled


class LambdaScheduler:
    """Lambda as a function of the optimizer step, within one run.

    - constant: ``LambdaScheduler(opt, lam)``;
    - warm-up: ``LambdaScheduler(opt, lam, warmup_steps=1000, start_step=0)``: 0 until
      ``start_step``, then a linear ramp to ``lam`` over ``warmup_steps`` (let the network learn
      before groups start dying);
    - target: ``LambdaScheduler(opt, lam, model=gated, target=0.5, by_step=5000, every=100)``:
      drives the fraction ``target`` of the groups dead by ``by_step``. Deaths lag lambda, so it
      steers by a leading figure: the collapsed norm of the group at the target quantile (the
      k-th smallest, k = target * groups), which should fall on a straight line in log scale from
      its value at ``start_step`` to the threshold at ``by_step``. Every ``every`` steps: above the
      line, lambda is multiplied by ``factor``; below it, divided (not below ``lam / 100``); after
      ``by_step``, once the target is dead, lambda is lowered while more than the target is (dead
      groups do not come back; a lower lambda slows further deaths). ``lam`` is the starting value,
      ``max_lam`` caps it (default ``1e4 * lam``).

    ``optimizer``: its D-Gating groups (from ``dg.param_groups``) get ``weight_decay = 2*lam/D``
    at construction and at every ``step()``; ``None``: nothing is written, use
    ``dg.penalty(model, scheduler.lam)``. ``lam=None``: the lambda the groups record, else the
    model's recipe. ``state_dict``/``load_state_dict`` resume a run.
    """

    def __init__(self, optimizer=None, lam: float | None = None, *, model: nn.Module | None = None,
                 warmup_steps: int = 0, start_step: int = 0, target: float | None = None, by_step: int | None = None,
                 every: int = 100, factor: float = 1.2, max_lam: float | None = None,
                 threshold: float | None = None):
        self.optimizer = optimizer
        self.model = unwrap(model, "LambdaScheduler") if model is not None else None
        if lam is None:
            recorded = dgating_groups(optimizer) if optimizer is not None else []
            if recorded:
                lam = recorded[0].get(BASE_KEY, recorded[0][LAM_KEY])
            elif self.model is not None:
                from .gates import require_gated
                lam = require_gated(self.model, "LambdaScheduler").recipe.lam
            else:
                raise LambdaError("LambdaScheduler needs lam, an optimizer from dg.param_groups, or the model")
        self.base_lam = check_lam(lam, "lam")
        if self.base_lam == 0 and target is not None:
            raise LambdaError("a target schedule multiplies lambda: give it a starting lam > 0")
        if warmup_steps < 0 or start_step < 0:
            raise LambdaError(f"warmup_steps and start_step must be >= 0, got {warmup_steps} and {start_step}")
        if target is not None:
            if not 0 < float(target) < 1:
                raise LambdaError(f"target must be a fraction in (0, 1), got {target!r}")
            if by_step is None or by_step <= start_step:
                raise LambdaError(f"a target needs by_step > start_step ({start_step}), got {by_step!r}")
            if self.model is None:
                raise LambdaError("a target schedule measures sparsity: pass model=the gated model")
            if every < 1 or not factor > 1:
                raise LambdaError(f"every must be >= 1 and factor > 1, got {every} and {factor}")
        self.warmup_steps, self.start_step = int(warmup_steps), int(start_step)
        self.target, self.by_step = (None if target is None else float(target)), by_step
        self.every, self.factor, self.threshold = int(every), float(factor), threshold
        self.max_lam = check_lam(max_lam, "max_lam") if max_lam is not None else self.base_lam * 1e4
        self.last_step = 0
        self.scale = 1.0  # what the target controller has multiplied lambda by
        self.start_norm: float | None = None  # the target quantile's norm when the schedule started
        self.measured: list[tuple[int, float, float, float]] = []  # (step, dead fraction, quantile norm, lam)
        if not any(g.get(SCHEDULED_KEY) for g in (dgating_groups(optimizer) if optimizer is not None else [])):
            self._apply()  # a resumed optimizer keeps what its schedule wrote, for resume() to read

    # -- the schedule --------------------------------------------------------------------------------
    def ramp(self, step: int) -> float:
        """The warm-up multiplier at ``step``: 0 before ``start_step``, then linear to 1."""
        if step < self.start_step:
            return 0.0
        if self.warmup_steps == 0:
            return 1.0
        return min(1.0, (step - self.start_step) / self.warmup_steps)

    @property
    def lam(self) -> float:
        """Lambda for the current step."""
        return min(self.base_lam * self.scale, self.max_lam) * self.ramp(self.last_step)

    def measure(self) -> tuple[float, float]:
        """(dead fraction, collapsed norm of the group at the target quantile) now."""
        from .shrink import plan_cut

        plan = plan_cut(self.model, self.threshold)
        norms = torch.cat([n.reshape(-1) for n in plan.norms.values()]).sort().values
        dead = sum(int(d.sum()) for d in plan.dead.values()) / max(norms.numel(), 1)
        k = min(max(math.ceil(self.target * norms.numel()), 1), norms.numel())
        return dead, float(norms[k - 1])

    def wanted_norm(self, step: int) -> float:
        """Where the target quantile's norm should be at ``step``: log-linear from its value at
        ``start_step`` down to the threshold at ``by_step``."""
        done = min(max((step - self.start_step) / (self.by_step - self.start_step), 0.0), 1.0)
        start = max(self.start_norm, self._threshold * 1.0000001)
        return math.exp(math.log(start) + (math.log(self._threshold) - math.log(start)) * done)

    def step(self, step: int | None = None) -> float:
        """Advance one optimizer step (or to ``step``, a framework's global step); returns lambda.
        Under FSDP2 a target schedule's measurement is a collective: call it on every rank."""
        self.last_step = self.last_step + 1 if step is None else int(step)
        if self.target is not None and self.last_step >= self.start_step and (
                self.start_norm is None or self.last_step % self.every == 0):
            dead, norm = self.measure()
            if self.start_norm is None:
                self.start_norm = norm
            elif dead >= self.target:  # reached: brake hard, groups on their way down follow for a while
                self.scale = max(self.scale / self.factor ** 3, 1e-2)
            elif norm > self.wanted_norm(self.last_step):
                self.scale = min(self.scale * self.factor, self.max_lam / self.base_lam)
            else:
                self.scale = max(self.scale / self.factor, 1e-2)
            self.measured.append((self.last_step, dead, norm, self.lam))
        self._apply()
        return self.lam

    @property
    def _threshold(self) -> float:
        from .gates import require_gated

        return float(self.threshold) if self.threshold is not None else require_gated(self.model, "schedule").recipe.threshold

    def resume(self, step: int) -> float:
        """Continue a run at ``step``, after the optimizer's state was loaded: the warm-up is a
        function of the step; a target schedule's lambda is read back from what it last wrote in
        the optimizer's groups (``state_dict`` restores it too)."""
        self.last_step = int(step)
        if self.target is not None and self.optimizer is not None:
            written = [g for g in dgating_groups(self.optimizer) if g.get(SCHEDULED_KEY)]
            ramp = self.ramp(self.last_step)
            if written and ramp > 0:
                self.scale = float(written[0][LAM_KEY]) / (self.base_lam * ramp)
        self._apply()
        return self.lam

    def _apply(self) -> None:
        if self.optimizer is not None:
            set_lam(self.optimizer, self.lam)

    # -- resume --------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"last_step": self.last_step, "scale": self.scale, "base_lam": self.base_lam,
                "start_norm": self.start_norm, "measured": [list(m) for m in self.measured]}

    def load_state_dict(self, state: dict) -> None:
        self.last_step, self.scale = int(state["last_step"]), float(state["scale"])
        self.base_lam = float(state.get("base_lam", self.base_lam))
        self.start_norm = state.get("start_norm")
        self.measured = [tuple(m) for m in state.get("measured", [])]
        self._apply()

    def __repr__(self) -> str:
        mode = (f"target={self.target:g} by_step={self.by_step}" if self.target is not None else
                f"warmup_steps={self.warmup_steps}" if self.warmup_steps else "constant")
        return f"LambdaScheduler(lam={self.lam:.4g} at step {self.last_step}, {mode})"

