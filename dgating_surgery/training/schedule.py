"""Lambda within one run: a warm-up ramp, a constant, or a size target reached in the same run.

``LambdaScheduler`` is stepped like a learning-rate scheduler, once per optimizer step. It sets
the weight decay of the D-Gating param groups (those from ``dg.param_groups``, one per kind) to
``2 * lam / D`` and records ``lam`` in each group, so that ``check_optimizer`` and ``track`` check
the schedule's current value. With ``dg.penalty`` instead of weight decay, pass
``scheduler.lam`` to it each step.

A size target (``target=0.9, metric="params", by_step=S``) runs in three phases:

1. dense until ``start_step`` (lambda 0; optionally a ``warmup_steps`` ramp after it);
2. penalty: every ``every`` steps the controller ranks the groups by collapsed norm relative to
   a typical surviving group of their gate (``deadness.typical_norms``, so that layers compare by
   how weak a group is within its own layer) and finds the weakest ones whose cut would remove
   the target fraction; the largest of their norms relative to the largest in their gate (the
   target quantile, ``deadness.scores``) must fall to ``relative`` by ``by_step``. Deaths lag lambda by hundreds of steps, so the controller steers
   the pace of that leading figure: lambda is multiplied by (the pace still needed / the pace
   observed since the last measurement), clipped to [1/factor, factor] (the decay that kills a
   group is proportional to lambda), and kept within [MIN_SCALE, MAX_SCALE] times its starting
   value (``max_lam`` sets another ceiling). A guard brakes when the strongest group of every gate
   shrinks (the whole network collapsing: lambda is past the range where the loss defends what it
   needs), checked five times per measurement interval;
3. recovery: as soon as the collapsed groups (score below ``relative``) reach the target, or at
   ``by_step`` at the latest, the weakest groups that make the target are held at exactly zero
   (``deadness.hold``), lambda goes to 0 and the remaining steps train the alive weights. A final
   ``dg.shrink`` removes exactly the held groups, so the size lands on the target by construction
   (to one group) and the cut is exact.

Per-kind targets (``target={"heads": 0.5, "neurons": 0.7}``) run one controller per kind on that
kind's lambda (the optimizer needs one param group per kind, as ``dg.param_groups`` builds it).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..engine.deadness import RELATIVE, Hold, check_relative, reference_norms, scores, typical_norms, zeroed
from ..errors import LambdaError
from ..engine.execution import as_tuple, on_device_of
from ..engine.tensors import get_tensor
from .regularizer import D_KEY, KIND_KEY, LAM_KEY, SCHEDULED_KEY, check_lam, kind_lams
from ..engine.wrappers import unwrap, unwrap_optimizer

BASE_KEY = "dgating_base_lam"  # in a param group: the lam dg.param_groups recorded, before a schedule changed it
METRICS = ("groups", "params", "macs")
ALL = "all"  # the controller key of a whole-model target
SURVIVOR_FLOOR = 0.7  # below this fraction of its norm at the start, a gate's strongest group says: lambda too high
MIN_SCALE = 1e-3  # the controller never takes lambda below this fraction of its starting value
# ... nor above this multiple of it (the default ``max_lam``). Measured on LeNet-300-100 (paper_target.py,
# notes/mlp10.md): uncapped, the controller took lambda to 25-90x its start and still held at by_step;
# the survivors paid for it (validation accuracy at 10% of the parameters 96.8 against 97.2 capped at 3x;
# test, paired against magnitude pruning, -0.56 against +0.07).
MAX_SCALE = 3.0
# The split of a run with a size target (``LambdaScheduler.for_run``, the callbacks): dense for the
# first quarter, the penalty until 5/8, recovery after. Measured (notes/target.md, paper_target.py
# --splits): on a small MLP from a fresh init the penalty from step 0 collapsed 2 of 4 SGD runs
# (chance accuracy) where a dense quarter gave 95-99%; on LeNet-300-100 the split made no
# difference beyond the noise.
DENSE_FRACTION, PENALTY_END_FRACTION = 0.25, 0.625


def dgating_groups(optimizer) -> list[dict]:
    """The param groups of ``optimizer`` that ``dg.param_groups`` made (they record lam and D)."""
    return [g for g in unwrap_optimizer(optimizer).param_groups if LAM_KEY in g and D_KEY in g]


def set_lam(optimizer, lam: "float | dict[str, float]", scheduled: bool = True) -> None:
    """Set lambda of the D-Gating param groups: weight decay ``2 * lam / D``, lam recorded. ``lam``:
    one number for every group, or kind -> lam (groups of other kinds are left alone)."""
    groups = dgating_groups(optimizer)
    if not groups:
        raise LambdaError("the optimizer has no D-Gating param group: build it from dg.param_groups(model, lam) "
                          "(or drive dg.penalty(model, scheduler.lam) and pass no optimizer to the scheduler)")
    for group in groups:
        if isinstance(lam, dict):
            if group.get(KIND_KEY) not in lam:
                continue
            value = check_lam(lam[group[KIND_KEY]], f"lam[{group[KIND_KEY]!r}]")
        else:
            value = check_lam(lam)
        group.setdefault(BASE_KEY, group[LAM_KEY])  # what dg.param_groups was given: a resumed schedule starts there
        group["weight_decay"] = 2.0 * value / group[D_KEY]
        group[LAM_KEY] = value
        group[SCHEDULED_KEY] = scheduled


class LambdaScheduler:
    """Lambda as a function of the optimizer step, within one run.

    - constant: ``LambdaScheduler(opt, lam)``;
    - warm-up: ``LambdaScheduler(opt, lam, warmup_steps=1000, start_step=0)``: 0 until
      ``start_step``, then a linear ramp to ``lam`` over ``warmup_steps``;
    - size target: ``LambdaScheduler(opt, model=gated, target=0.9, metric="params", by_step=S)``:
      the cut removes ``target`` of the ``metric`` ("groups": of the gated groups; "params": of the
      network's parameters; "macs": of the MACs of a forward pass on the example inputs); a dict
      ``{kind: fraction}`` sets one target per kind (of that kind's groups or of its own
      parameters; "macs" is a whole-model figure). Reached at ``by_step`` at the latest, then the
      chosen groups are held at exactly zero and lambda is 0 (the module docstring has the phases).
      ``every``: steps between measurements; ``factor``: the most lambda changes per measurement;
      ``relative``: a group is collapsed below this fraction of the largest norm in its gate
      (``deadness.RELATIVE``); ``example_inputs``/``example_kwargs``: for "macs" (default: the
      ones ``dg.gate_model`` was given).

    ``lam``: the starting value, a number or kind -> lam (None: what the optimizer's groups record,
    else the recipe's). ``max_lam`` caps it (default ``MAX_SCALE = 3`` times the largest starting lam).
    ``optimizer``: its D-Gating groups get ``weight_decay = 2*lam/D`` at construction and at every
    ``step()``; ``None``: nothing is written, use ``dg.penalty(model, scheduler.lam)``.
    ``state_dict``/``load_state_dict`` resume a run (held groups included).
    """

    def __init__(self, optimizer=None, lam: "float | dict[str, float] | None" = None, *,
                 model: nn.Module | None = None, warmup_steps: int = 0, start_step: int = 0,
                 target: "float | dict[str, float] | None" = None, metric: str = "groups",
                 by_step: int | None = None, every: int = 100, factor: float = 3.0, max_lam: float | None = None,
                 relative: float = RELATIVE, example_inputs=None, example_kwargs: dict | None = None):
        self.optimizer = optimizer
        self.model = unwrap(model, "LambdaScheduler") if model is not None else None
        self.base = self._starting_lams(lam)
        if warmup_steps < 0 or start_step < 0:
            raise LambdaError(f"warmup_steps and start_step must be >= 0, got {warmup_steps} and {start_step}")
        self.warmup_steps, self.start_step = int(warmup_steps), int(start_step)
        self.every, self.factor, self.relative = int(every), float(factor), check_relative(relative)
        self.metric, self.by_step = metric, by_step
        self.targets = self._check_target(target, example_inputs, example_kwargs)
        biggest = max(self.base.values())
        self.max_lam = check_lam(max_lam, "max_lam") if max_lam is not None else biggest * MAX_SCALE
        self.last_step = 0
        self.scale = dict.fromkeys([*self.targets, ALL], 1.0)  # controller key -> what it multiplied lambda by
        self.reference: dict[str, float] | None = None  # gate key -> its largest norm when the penalty started
        self.chosen_count: dict[str, int] = {}  # key -> how many groups the last measurement chose
        self.previous: dict[str, tuple[int, float]] = {}  # key -> (step, target quantile's score) last measured
        self.held: dict[str, dict[str, torch.Tensor]] = {}  # controller key -> gate key -> bool per group held
        self._hold: Hold | None = None
        self.measured: list[tuple] = []  # (step, key, fraction the chosen groups' cut removes, their largest score, lam)
        if not any(g.get(SCHEDULED_KEY) for g in (dgating_groups(optimizer) if optimizer is not None else [])):
            self._apply()  # a resumed optimizer keeps what its schedule wrote, for resume() to read

    @classmethod
    def for_run(cls, optimizer, model: nn.Module, target, total_steps: int, metric: str = "params",
                dense: float = DENSE_FRACTION, penalty_end: float = PENALTY_END_FRACTION, **kwargs) -> "LambdaScheduler":
        """A size target laid out over a run of ``total_steps``: dense until ``dense`` of it, the
        penalty until ``penalty_end``, recovery after; a measurement every 1/50 of the run."""
        if not 0 <= dense < penalty_end <= 1 or total_steps < 1:
            raise LambdaError(f"a run with a target needs 0 <= dense < penalty_end <= 1 and total_steps >= 1, got "
                              f"dense={dense}, penalty_end={penalty_end}, total_steps={total_steps}")
        start, by = int(dense * total_steps), max(int(penalty_end * total_steps), int(dense * total_steps) + 1)
        kwargs.setdefault("every", max(total_steps // 50, 1))
        return cls(optimizer, kwargs.pop("lam", None), model=model, target=target, metric=metric, start_step=start,
                   by_step=by, **kwargs)

    # -- construction ----------------------------------------------------------------------------------
    def _starting_lams(self, lam) -> dict[str, float]:
        """Starting lambda per kind (or under ALL when the kinds are unknown: no model, no optimizer)."""
        recorded = dgating_groups(self.optimizer) if self.optimizer is not None else []
        if self.model is not None:
            lams = kind_lams(self.model, lam)
            if lam is None or isinstance(lam, dict):
                for group in recorded:  # what dg.param_groups was given, unless lam names the kind
                    kind = group.get(KIND_KEY)
                    if kind in lams and not (isinstance(lam, dict) and kind in lam):
                        lams[kind] = float(group.get(BASE_KEY, group[LAM_KEY]))
            return lams
        if recorded and all(KIND_KEY in g for g in recorded):
            lams = {g[KIND_KEY]: float(g.get(BASE_KEY, g[LAM_KEY])) for g in recorded}
            if isinstance(lam, dict):
                lams.update({k: check_lam(v, f"lam[{k!r}]") for k, v in lam.items()})
            elif lam is not None:
                lams = dict.fromkeys(lams, check_lam(lam, "lam"))
            return lams
        if lam is None or isinstance(lam, dict):
            raise LambdaError("LambdaScheduler needs lam, an optimizer from dg.param_groups, or the model")
        return {ALL: check_lam(lam, "lam")}

    def _check_target(self, target, example_inputs, example_kwargs) -> dict[str, float]:
        """The targets per controller key (empty: no target), checked; MACs' example inputs kept."""
        if target is None:
            return {}
        if self.metric not in METRICS:
            raise LambdaError(f"metric must be one of {', '.join(METRICS)}, got {self.metric!r}")
        if self.model is None:
            raise LambdaError("a target schedule measures sparsity: pass model=the gated model")
        if self.by_step is None or self.by_step <= self.start_step:
            raise LambdaError(f"a target needs by_step > start_step ({self.start_step}), got {self.by_step!r}")
        if self.every < 1 or not self.factor > 1:
            raise LambdaError(f"every must be >= 1 and factor > 1, got {self.every} and {self.factor}")
        targets = dict(target) if isinstance(target, dict) else {ALL: target}
        for key, value in targets.items():
            if key != ALL and key not in self.base:
                raise LambdaError(f"target names kind {key!r}, which the model's gates do not have; its kinds are "
                                  f"{', '.join(self.base)}")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < float(value) < 1:
                raise LambdaError(f"target{'' if key == ALL else f'[{key!r}]'} must be a fraction in (0, 1), "
                                  f"got {value!r}")
            if min(self.base.values() if key == ALL else [self.base[key]]) == 0:
                raise LambdaError("a target schedule multiplies lambda: give it a starting lam > 0")
        if isinstance(target, dict) and self.metric == "macs":
            raise LambdaError("per-kind targets count groups or parameters (metric='groups' or 'params'); a MACs "
                              "target is for the whole model: target=<fraction>")
        if self.optimizer is not None and isinstance(target, dict):
            kinds = {g.get(KIND_KEY) for g in dgating_groups(self.optimizer)}
            missing = sorted(set(targets) - kinds)
            if missing:
                raise LambdaError(f"per-kind targets need one optimizer param group per kind; {missing[0]} has none: "
                                  "build the optimizer from dg.param_groups(model, lam)")
        if self.metric == "macs":
            from ..engine.gates import gate_set
            kept = gate_set(self.model).examples
            if example_inputs is not None or example_kwargs:
                self._count_macs(as_tuple(example_inputs), dict(example_kwargs or {}))
            elif kept is not None:
                self._count_macs(*on_device_of(kept, self.model))
            else:
                raise LambdaError("metric='macs' measures a forward pass: pass example_inputs (or gate the model "
                                  "with example inputs)")
        return {key: float(value) for key, value in targets.items()}

    # -- the schedule --------------------------------------------------------------------------------
    def ramp(self, step: int) -> float:
        """The warm-up multiplier at ``step``: 0 before ``start_step``, then linear to 1."""
        if step < self.start_step:
            return 0.0
        if self.warmup_steps == 0:
            return 1.0
        return min(1.0, (step - self.start_step) / self.warmup_steps)

    def _key(self, kind: str) -> str:
        """The controller of ``kind``: its own target's, else the whole model's (ALL; scale 1 when
        there is no whole-model target)."""
        return kind if kind in self.targets else ALL

    @property
    def lams(self) -> dict[str, float]:
        """Lambda per kind for the current step (0 for a kind whose target is held)."""
        ramp = self.ramp(self.last_step)
        return {kind: 0.0 if self._key(kind) in self.held else
                min(base * self.scale[self._key(kind)], self.max_lam) * ramp for kind, base in self.base.items()}

    @property
    def lam(self) -> "float | dict[str, float]":
        """Lambda for the current step: one number when every kind has the same, else kind -> lam
        (``dg.penalty`` takes either)."""
        lams = self.lams
        values = set(lams.values())
        return values.pop() if len(values) == 1 else lams

    @property
    def recovering(self) -> bool:
        """Every target is reached: its groups are held at zero and lambda is 0."""
        return bool(self.targets) and set(self.held) == set(self.targets)

    # -- measuring -----------------------------------------------------------------------------------
    def _ranking(self, key: str) -> list[tuple[float, str, int, float]]:
        """(rank, gate key, group, score) of the groups a target may hold, weakest first; each
        gate's strongest group is left out (a cut keeps one group per gate). ``score``: the norm
        relative to the largest in the gate (collapsed below ``relative``; the controller steers
        its pace). ``rank``: the norm relative to a typical surviving group of the gate
        (``deadness.typical_norms``), what groups of different layers are compared by: relative
        to the largest, one strong group makes the rest of its layer look weak (on the digits CNN
        the last conv layer's strongest channel is 3x its median, 1.2-1.3x in the other layers;
        ranked that way the last layer lost 29 of its 32 channels at 25% of the MACs)."""
        from ..engine.gates import gate_set

        dset = gate_set(self.model)
        ranks = scores(self.model, typical_norms(self.model, self.relative))
        out = []
        for gate_key, score in scores(self.model).items():
            if key != ALL and dset[gate_key].kind != key:
                continue
            strongest, rank = int(score.argmax()), ranks[gate_key].tolist()
            out.extend((rank[j], gate_key, j, s) for j, s in enumerate(score.tolist()) if j != strongest)
        return sorted(out)

    def _masks(self, chosen) -> dict[str, torch.Tensor]:
        from ..engine.gates import gate_set

        dset = gate_set(self.model)
        masks = {}
        for _, gate_key, j, _ in chosen:
            masks.setdefault(gate_key, torch.zeros(dset[gate_key].num_groups, dtype=torch.bool))[j] = True
        return masks

    def removed(self, key: str, masks: dict[str, torch.Tensor]) -> float:
        """The fraction of ``key``'s metric a cut of the groups in ``masks`` (and the ones already
        dead) removes: of the whole model for ALL, of the kind's groups or own parameters per kind."""
        from ..engine.gates import gate_set
        from ..engine.report import group_params
        from .search import removed_fraction

        dset = gate_set(self.model)
        if key != ALL or self.metric == "groups":
            gate_keys = [k for k, g in dset.items() if key == ALL or g.kind == key]
            if self.metric == "groups":
                per_gate = {k: torch.ones(dset[k].num_groups, dtype=torch.long) for k in gate_keys}
            else:
                per_gate = {k: group_params(self.model, dset[k]) for k in gate_keys}
            total = sum(int(v.sum()) for v in per_gate.values())
            hit = sum(int(v[masks[k]].sum()) for k, v in per_gate.items() if k in masks)
            return hit / max(total, 1)
        with zeroed(self.model, masks):
            if self.metric == "params":
                return removed_fraction(self.model, self.metric)
            from ..engine.shrink import plan_cut

            plan = plan_cut(self.model)
        removed = 0.0
        for fqn, per_entry in self.macs_per_entry.items():
            if fqn in plan.removed:
                shape = get_tensor(self.model, fqn).shape
                removed += per_entry * (shape.numel() - torch.Size(plan.kept_shape(fqn, shape)).numel())
        return removed / max(self.macs_total, 1)

    def _count_macs(self, args, kwargs) -> None:
        """MACs of one forward pass, and for every weight a cut can slice whose layer's MACs are
        proportional to it (a conv or linear layer: weight entries times output positions) the
        MACs per weight entry. Measured once; a cut's saving is then the removed entries times
        that, with no forward pass (MACs of products between activations, as attention scores,
        count as kept)."""
        from torch.utils.flop_counter import FlopCounterMode

        from ..engine.gates import gate_set
        from ..engine.measure import forward

        with FlopCounterMode(display=False) as counter:
            forward(self.model, args, kwargs)
        per_module = counter.get_flop_counts()
        self.macs_total = int(counter.get_total_flops()) // 2
        root = type(self.model).__name__
        self.macs_per_entry = {}
        for dgate in gate_set(self.model).values():
            for cut in dgate.cuts:
                module_name, _, attr = cut.fqn.rpartition(".")
                module = self.model.get_submodule(module_name)
                inner = [name for name, _ in module.named_children() if name != "parametrizations"]
                if attr != "weight" or inner:  # a layer with sublayers: its MACs are not its weight's
                    continue
                flops = sum(per_module.get(f"{root}.{module_name}" if module_name else root, {}).values())
                if flops:
                    self.macs_per_entry[cut.fqn] = flops / 2 / get_tensor(self.model, cut.fqn).numel()

    def choose(self, key: str) -> tuple[list, float]:
        """The weakest groups whose cut removes the fraction closest to ``key``'s target (the fewest
        such when two are equally close), and that fraction. The removed fraction grows with every
        group added, so a search on the ranking: galloping out from the count chosen last time
        (it moves little between measurements), then bisecting; each probe is one cut plan."""
        ranking, target = self._ranking(key), self.targets[key]
        cache: dict[int, float] = {}

        def f(k: int) -> float:
            if k not in cache:
                cache[k] = self.removed(key, self._masks(ranking[:k]))
            return cache[k]

        n = len(ranking)
        guess = min(max(self.chosen_count.get(key, n // 2), 1), n)
        step = 1
        if f(guess) >= target:  # find lo below the target: removed(first lo) < target <= removed(first hi)
            hi, lo = guess, max(guess - step, 0)
            while lo > 0 and f(lo) >= target:
                hi, step = lo, step * 2
                lo = max(lo - step, 0)
        else:
            lo, hi = guess, min(guess + step, n)
            while hi < n and f(hi) < target:
                lo, step = hi, step * 2
                hi = min(hi + step, n)
            if f(hi) < target:
                return ranking, f(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if f(mid) >= target:
                hi = mid
            else:
                lo = mid
        k = hi if f(hi) - target <= target - f(lo) else lo
        self.chosen_count[key] = k
        return ranking[:k], f(k)

    def strength(self, key: str) -> float:
        """The largest over ``key``'s gates of the ratio of the gate's largest norm now to that at
        the start of the penalty: below 1 when every layer shrinks, the network as a whole. When the strongest groups shrink too, lambda is past the range where
        the loss defends what it needs: the controller then only lowers it."""
        from ..engine.gates import gate_set

        dset = gate_set(self.model)
        now = reference_norms(self.model)
        ratios = sorted(now[k] / self.reference[k] for k in now if (key == ALL or dset[k].kind == key) and self.reference[k] > 0)
        return ratios[-1] if ratios else 1.0

    def wanted_rate(self, key: str, quantile: float) -> float:
        """How fast (in log score per step) ``key``'s target quantile must fall to reach
        ``relative`` at ``by_step``: an even pace over the steps that remain."""
        remaining = max(self.by_step - self.last_step, 1)
        return (math.log(max(quantile, 1e-30)) - math.log(self.relative)) / remaining

    # -- stepping ------------------------------------------------------------------------------------
    def step(self, step: int | None = None) -> "float | dict[str, float]":
        """Advance one optimizer step (or to ``step``, a framework's global step); returns lambda.
        Under FSDP2 a target schedule's measurement is a collective: call it on every rank."""
        self.last_step = self.last_step + 1 if step is None else int(step)
        if self.targets and self.last_step >= self.start_step:
            if self.reference is None:
                self.reference = reference_norms(self.model)
            due = not self.previous or self.last_step % self.every == 0 or self.last_step >= self.by_step
            for key in self.targets:
                if key in self.held:
                    continue
                if due:
                    self._control(key)
                elif self.last_step % max(self.every // 5, 1) == 0 and self.strength(key) < SURVIVOR_FLOOR:
                    self.scale[key] = max(self.scale[key] / self.factor, MIN_SCALE)  # brake between measurements
        if self._hold is not None:
            self._hold.apply()  # without an optimizer hook (penalty mode) this keeps them at zero
        self._apply()
        return self.lam

    def _control(self, key: str) -> None:
        """One measurement of ``key``: hold its groups when the target is reached or due; else
        steer lambda so that the target quantile falls at the pace ``wanted_rate`` asks. The pace
        observed since the last measurement responds to lambda roughly in proportion (the decay
        that kills a group is lam times the learning rate), so lambda is multiplied by wanted /
        observed pace, at most by ``factor`` either way (by ``factor`` when it did not fall)."""
        chosen, removed = self.choose(key)
        quantile = max(max((c[3] for c in chosen), default=0.0), 1e-30)
        previous = self.previous.get(key)
        if quantile < self.relative or (self.last_step >= self.by_step and previous is not None):
            self._hold_groups(key, self._masks(chosen))
        elif previous is not None and self.last_step > previous[0]:
            observed = (math.log(previous[1]) - math.log(quantile)) / (self.last_step - previous[0])
            wanted = self.wanted_rate(key, quantile)
            change = self.factor if observed <= 0 else min(max(wanted / observed, 1 / self.factor), self.factor)
            strength = self.strength(key)
            if strength < SURVIVOR_FLOOR:
                change = 1 / self.factor
            elif strength < SURVIVOR_FLOOR ** 0.5:
                change = min(change, 1.0)
            ceiling = self.max_lam / max(self.base[k] for k in self.base if key in (ALL, k))
            self.scale[key] = min(max(self.scale[key] * change, MIN_SCALE), ceiling)
        self.previous[key] = (self.last_step, quantile)
        lam = self.lams
        self.measured.append((self.last_step, key, removed, quantile, lam.get(key, next(iter(lam.values())))))

    def _hold_groups(self, key: str, masks: dict[str, torch.Tensor]) -> None:
        """Hold ``masks`` at exactly zero from now on (with every group held before)."""
        self.held[key] = masks
        merged: dict[str, torch.Tensor] = {}
        for held in self.held.values():
            for gate_key, mask in held.items():
                merged[gate_key] = merged.get(gate_key, torch.zeros_like(mask)) | mask
        if self._hold is not None:
            self._hold.release()
        self._hold = Hold(self.model, merged, self.optimizer)

    @property
    def held_masks(self) -> dict[str, torch.Tensor]:
        """Gate key -> bool per group: every group held at zero (what the final cut removes)."""
        return dict(self._hold.masks) if self._hold is not None else {}

    def resume(self, step: int) -> "float | dict[str, float]":
        """Continue a run at ``step``, after the optimizer's state was loaded: the warm-up is a
        function of the step; a target schedule's lambdas are read back from what it last wrote in
        the optimizer's groups (``state_dict`` restores them, and the held groups, too); a target
        whose lambda was written as 0 holds the groups whose gates are exactly zero."""
        self.last_step = int(step)
        if self.targets and self.optimizer is not None:
            ramp = self.ramp(self.last_step)
            for group in dgating_groups(self.optimizer):
                key = self._key(group.get(KIND_KEY, ALL))
                if not group.get(SCHEDULED_KEY) or ramp == 0 or key not in self.targets:
                    continue
                if group[LAM_KEY] == 0 and key not in self.held:
                    ranking = self._ranking(key)
                    self._hold_groups(key, self._masks([c for c in ranking if c[3] == 0.0]))
                elif group[LAM_KEY] > 0:
                    self.scale[key] = float(group[LAM_KEY]) / (self.base[group.get(KIND_KEY, ALL)] * ramp)
        self._apply()
        return self.lam

    def _apply(self) -> None:
        if self.optimizer is not None:
            set_lam(self.optimizer, self.lams if ALL not in self.base else self.lams[ALL])

    # -- resume --------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"last_step": self.last_step, "scale": dict(self.scale), "base": dict(self.base),
                "previous": dict(self.previous), "reference": self.reference, "measured": [list(m) for m in self.measured],
                "held": {key: {g: m.clone() for g, m in masks.items()} for key, masks in self.held.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.last_step = int(state["last_step"])
        self.scale.update(state["scale"])
        self.base.update(state.get("base", {}))
        self.previous = {k: tuple(v) for k, v in state.get("previous", {}).items()}
        self.reference = state.get("reference")
        self.measured = [tuple(m) for m in state.get("measured", [])]
        for key, masks in state.get("held", {}).items():
            self._hold_groups(key, masks)
        self._apply()

    def __repr__(self) -> str:
        lam = self.lam
        shown = f"{lam:.4g}" if not isinstance(lam, dict) else "{" + ", ".join(f"{k}: {v:.4g}" for k, v in lam.items()) + "}"
        if self.targets:
            goal = self.targets.get(ALL, self.targets)
            mode = f"target={goal} of {self.metric} by_step={self.by_step}{' (recovering)' if self.recovering else ''}"
        else:
            mode = f"warmup_steps={self.warmup_steps}" if self.warmup_steps else "constant"
        return f"LambdaScheduler(lam={shown} at step {self.last_step}, {mode})"
