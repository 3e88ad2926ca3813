"""Training frameworks: a callback for the Hugging Face ``Trainer`` (``integrations.hf``, extra
``hf``) and one for Lightning (``integrations.lightning``, extra ``lightning``). Neither framework
is imported until its module is; this module holds what both callbacks do, framework-free.

Each callback: checks the optimizer once training starts (the warnings of ``dg.check_optimizer``),
logs dead groups and removable parameters to the framework's logger (keys ``dgating/...``), and
can drive lambda with a ``LambdaScheduler`` (``schedule={"warmup_steps": 500}`` or
``{"target": 0.5, "by_step": 5000}``). ``target=0.5, metric="params"`` asks for a size with no
schedule to write: the run is split as ``LambdaScheduler.for_run`` does (dense, penalty, recovery
with the chosen groups held at zero), so a final ``dg.shrink`` gives the model of that size.
``distill=<weight>`` adds a KL term to a frozen copy of the model taken when the penalty starts
(``distill.Distiller``; the model must compute its own loss, as a Hugging Face model given labels).
"""
from __future__ import annotations

from torch import nn

from ..training.distill import Distiller
from ..engine.gates import gate_set
from ..engine.report import sparsity, uniform_cost
from ..training.schedule import LambdaScheduler, dgating_groups
from ..training.regularizer import LAM_KEY, optimizer_problems
from ..engine.wrappers import unwrap, unwrap_optimizer, warn_user

PREFIX = "dgating/"


def find_gated(root: nn.Module) -> nn.Module | None:
    """The gated module in ``root``: itself (inside any wrapper) or its first gated submodule
    (a LightningModule holding the network as ``self.model``, a Trainer's wrapped model)."""
    try:
        inner = unwrap(root, "find_gated")
    except Exception:  # a PEFT model: the dg functions give the real error
        inner = root
    if gate_set(inner) is not None:
        return inner
    for module in inner.modules():
        if gate_set(module) is not None:
            return module
    return None


def missing_model_message(framework: str) -> str:
    return (f"DGatingCallback: the {framework} model has no gated module: gate the network with dg.gate_model before "
            "training (or pass model= to the callback)")


class CoreView:
    """What a framework callback shows of its ``CallbackCore`` (``self.core``)."""

    @property
    def scheduler(self):
        return self.core.scheduler

    @property
    def problems(self) -> list[str]:
        return self.core.problems


class CallbackCore:
    """What the framework callbacks share: find the gated model, check the optimizer, step the
    lambda schedule with the framework's global step, compute the figures to log."""

    def __init__(self, model: nn.Module | None = None, lam: float | None = None, schedule: dict | None = None,
                 threshold: float | None = None, uses_penalty: bool = False, check: bool = True,
                 target=None, metric: str = "params", distill: float | None = None, uniform: bool = False):
        self.uniform = uniform
        self.model, self.lam, self.threshold, self.uses_penalty, self.check = model, lam, threshold, uses_penalty, check
        self.distill, self.distiller = distill, None
        if schedule is not None and not isinstance(schedule, (dict, LambdaScheduler)):
            raise TypeError("schedule must be a dict of LambdaScheduler arguments (e.g. {'warmup_steps': 500}) or a "
                            "LambdaScheduler")
        if target is not None and schedule is not None:
            raise TypeError("give target (the run is laid out for it) or schedule, not both")
        self.schedule = schedule
        self.target, self.metric = target, metric
        self.scheduler: LambdaScheduler | None = schedule if isinstance(schedule, LambdaScheduler) else None
        self.optimizer = None
        self.problems: list[str] = []
        self._scheduler_state: dict | None = None

    def begin(self, root: nn.Module, optimizers, step: int, framework: str, total_steps: int | None = None) -> None:
        gated = find_gated(self.model if self.model is not None else root)
        if gated is None:
            raise ValueError(missing_model_message(framework))
        self.model = gated
        optimizers = [o for o in (optimizers if isinstance(optimizers, (list, tuple)) else [optimizers])
                      if o is not None]
        self.optimizer = self._optimizer_of(optimizers)
        if self.optimizer is not None and self.check:
            self.problems = optimizer_problems(gated, self.optimizer, self.lam, self.uses_penalty)
            for message in self.problems:
                warn_user(f"{framework}: {message}")
        target_opt = None if self.uses_penalty else self.optimizer
        if isinstance(self.schedule, dict):
            self.scheduler = LambdaScheduler(target_opt, self.lam, model=gated, **self.schedule)
        elif self.target is not None and self.scheduler is None:
            if not total_steps or total_steps < 1:
                raise ValueError(f"DGatingCallback(target=...): the {framework} run has no known length; set max_steps "
                                 "(or pass schedule={'target': ..., 'by_step': ...})")
            self.scheduler = LambdaScheduler.for_run(target_opt, gated, self.target, total_steps, self.metric,
                                                     lam=self.lam)
        if self.scheduler is not None:
            if self._scheduler_state is not None:
                self.scheduler.load_state_dict(self._scheduler_state)
            elif step > 0:
                self.scheduler.resume(step)
            else:
                self.scheduler.step(step)
        if self.distill:
            self.distiller = Distiller(gated, self.distill)
            self._start_distilling(step)

    def _start_distilling(self, step: int) -> None:
        """From the step the penalty starts, a frozen copy of the model teaches it (``distill``)."""
        start = self.scheduler.start_step if self.scheduler is not None else 0
        if self.distiller is not None and self.distiller.teacher is None and step >= start:
            self.distiller.start().attach()

    def _optimizer_of(self, optimizers):
        """The optimizer that holds the gated parameters (else the first)."""
        if not optimizers:
            return None
        gated = {id(p) for p in self.model.parameters()}
        for opt in optimizers:
            inner = unwrap_optimizer(opt)
            if any(id(p) in gated for g in inner.param_groups for p in g["params"]):
                return inner
        return unwrap_optimizer(optimizers[0])

    def step(self, global_step: int) -> None:
        if self.scheduler is not None:
            self.scheduler.step(global_step)
        self._start_distilling(global_step)

    @property
    def current_lam(self) -> float | None:
        if self.scheduler is not None:
            return self.scheduler.lam
        groups = dgating_groups(self.optimizer) if self.optimizer is not None else []
        return float(groups[0][LAM_KEY]) if groups else self.lam

    def metrics(self) -> dict[str, float]:
        """Dead and total groups (all kinds and per kind), the dead fraction, the parameters a cut
        removes (count and fraction), the collapsed groups (``deadness``: what Adam leaves near
        zero), the groups a size target holds at zero, lambda (per kind when kinds differ), and with
        ``uniform`` the dead groups and parameters a uniform cut would keep (``dg.uniform_cost``)."""
        report = sparsity(self.model, self.threshold)
        out = {f"{PREFIX}dead_groups": float(report.dead), f"{PREFIX}groups": float(report.groups),
               f"{PREFIX}dead_fraction": report.dead / max(report.groups, 1),
               f"{PREFIX}params_removable": float(report.params_removable),
               f"{PREFIX}params_removable_fraction": report.params_removable / max(report.params_total, 1)}
        out[f"{PREFIX}collapsed_groups"] = float(report.collapsed)
        if self.scheduler is not None and self.scheduler.targets:
            out[f"{PREFIX}held_groups"] = float(sum(int(m.sum()) for m in self.scheduler.held_masks.values()))
        if self.uniform:  # what a uniform cut (stock-loadable widths) would keep back now, to steer toward it
            cost = uniform_cost(self.model, self.threshold)
            out[f"{PREFIX}uniform_padding_groups"] = float(cost.groups)
            out[f"{PREFIX}uniform_padding_params"] = float(cost.params)
        kinds = report.by_kind()
        if len(kinds) > 1:
            out.update({f"{PREFIX}dead_{kind}": float(v["dead"]) for kind, v in kinds.items()})
        lam = self.current_lam
        if isinstance(lam, dict):
            out.update({f"{PREFIX}lam_{kind}": float(v) for kind, v in lam.items()})
        elif lam is not None:
            out[f"{PREFIX}lam"] = float(lam)
        return out

    def state_dict(self) -> dict:
        return {"scheduler": self.scheduler.state_dict()} if self.scheduler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        self._scheduler_state = state.get("scheduler")


__all__ = ["CallbackCore", "find_gated", "PREFIX"]
