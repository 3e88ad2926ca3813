"""Training helpers: the D-Gating regularizer for any optimizer, a sparsity monitor for any loop,
and a check that an optimizer really optimizes the paper's objective.

The paper's objective is L0 + (lambda / D) * (sum_j ||theta_j||^2 + sum_{j,d} gamma_{j,d}^2). PyTorch's
``weight_decay=wd`` adds ``wd * p`` to the gradient, which is the gradient of (wd / 2) * ||p||^2, so the
same objective is ``weight_decay = 2 * lambda / D`` on the gated primary weights (theta) and on the
gate factors (gamma). Decoupled decay (AdamW) is a different penalty; ``penalty`` adds the objective
to the loss and works with any optimizer.

Every function here takes the gated model also inside ``DistributedDataParallel``, ``torch.compile``
or FSDP2 (``wrappers.accepts_wrapped``); under FSDP2 ``penalty`` is computed on the shards (correct
gradient per shard, global value) and the read-only figures on gathered parameters (collective).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import LambdaError
from ..engine.gate_modes import GateScale
from ..engine.gates import frozen_gates, group_sq_sums, require_gated
from ..engine.precision import LOW_PRECISION, rounding
from ..engine.report import sparsity
from ..engine.wrappers import accepts_wrapped, full_params, is_dtensor, unwrap, unwrap_optimizer, warn_user

LAM_KEY, D_KEY, SCHEDULED_KEY = "dgating_lam", "dgating_D", "dgating_scheduled"  # in the optimizer's param group
KIND_KEY = "dgating_kind"  # in the optimizer's param group: the kind of groups whose weights and gates it holds


def gated_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(primary weights theta, gate factors) of a gated model. A theta is the stored ``original``
    of every parameter a gate scales; its entries outside any gated group (rare: a layer only part
    of whose channels are exactly removable) get the same decay."""
    per_kind = parameters_by_kind(model)
    return [p for thetas, _ in per_kind.values() for p in thetas], [f for _, fs in per_kind.values() for f in fs]


def parameters_by_kind(model: nn.Module) -> dict[str, tuple[list[nn.Parameter], list[nn.Parameter]]]:
    """kind -> (primary weights, gate factors), kinds in the order of the model's gates. A primary
    weight scaled by gates of several kinds (a first layer whose input features and neurons are
    both gated) goes with the kind of lower lambda (``Recipe.lam_of``): a parameter has one decay,
    and the lower one never pushes a kind harder than asked."""
    dset = require_gated(model, "D-Gating training")
    out: dict[str, tuple[list, list]] = {}
    for dgate in dset.values():
        out.setdefault(dgate.kind, ([], []))[1].append(dgate.factors)
    seen = set()  # a tied weight's primary is parametrized in every layer using it: listed once
    for module in model.modules():
        for name, plist in getattr(module, "parametrizations", {}).items():
            kinds = {s.kind for p in plist if isinstance(p, GateScale) for s in p.sources}
            if kinds and id(plist.original) not in seen:
                seen.add(id(plist.original))
                out[min(kinds, key=lambda k: (dset.recipe.lam_of(k), list(out).index(k)))][0].append(plist.original)
    return out


def check_lam(lam, what: str = "lam") -> float:
    """``lam`` as a float, or a ``LambdaError``: the D-Gating strength is a finite number >= 0 (a
    negative one is a negative weight decay, which makes the weights grow)."""
    try:
        value = float(lam)
    except (TypeError, ValueError):
        raise LambdaError(f"{what} must be a number, got {lam!r}") from None
    if not math.isfinite(value) or value < 0:
        raise LambdaError(f"{what}={lam!r}: the D-Gating strength must be a finite number >= 0 (it sets weight decay "
                          "2*lam/D on the gated weights; a negative one makes them grow instead of letting groups die)")
    return value


def kind_lams(model: nn.Module, lam: "float | dict[str, float] | None") -> dict[str, float]:
    """Lambda per kind of the model's gates: ``lam`` a number (every kind), a dict (kind -> lam; kinds
    it leaves out take the recipe's), or None (the recipe's: a ``groups`` entry's ``lam``, else the
    top-level one)."""
    dset = require_gated(model, "D-Gating training")
    kinds = list(dict.fromkeys(g.kind for g in dset.values()))
    if isinstance(lam, dict):
        unknown = sorted(set(lam) - set(kinds))
        if unknown:
            raise LambdaError(f"lam names kind {unknown[0]!r}, which the model's gates do not have; its kinds are "
                              f"{', '.join(kinds)}")
        return {k: check_lam(lam[k], f"lam[{k!r}]") if k in lam else dset.recipe.lam_of(k) for k in kinds}
    return {k: dset.recipe.lam_of(k) if lam is None else check_lam(lam) for k in kinds}


@accepts_wrapped()
def param_groups(model: nn.Module, lam: "float | dict[str, float] | None" = None,
                 weight_decay: float = 0.0) -> list[dict]:
    """Parameter groups for any ``torch.optim`` optimizer: weight decay ``2 * lam / D`` on the gated
    primary weights and the gates (the paper's L_{2,2/D} objective), ``weight_decay`` on the rest.
    One D-Gating group per kind (named ``dgating/<kind>``), with that kind's lambda: ``lam`` a
    number (all kinds), a dict kind -> lam, or None (the recipe's, per kind: ``kind_lams``). Each
    D-Gating group records ``lam``, ``D`` and its kind (keys ``dgating_lam``, ``dgating_D``,
    ``dgating_kind``), which ``check_optimizer``, ``track`` and ``LambdaScheduler`` read.

    Why 2*lam/D: coupled ``weight_decay=wd`` is the gradient of (wd/2)||p||^2, and the paper's
    penalty is (lam/D)||p||^2 on every theta and gamma. Give the rest some decay too when the gated
    layer is followed by a positively homogeneous activation (ReLU): otherwise the network can move
    a group's scale into the next, unpenalized layer instead of letting the group die.
    """
    lams, D = kind_lams(model, lam), require_gated(model, "D-Gating training").recipe.D
    groups = [{"params": thetas + factors, "weight_decay": 2.0 * lams[kind] / D, "name": f"dgating/{kind}",
               LAM_KEY: lams[kind], D_KEY: D, KIND_KEY: kind}
              for kind, (thetas, factors) in parameters_by_kind(model).items()]
    gated_ids = {id(p) for g in groups for p in g["params"]}
    rest = [p for p in model.parameters() if id(p) not in gated_ids and p.requires_grad]
    if rest:
        groups.append({"params": rest, "weight_decay": weight_decay, "name": "other"})
    return groups


@accepts_wrapped()
def penalty(model: nn.Module, lam: "float | dict[str, float] | None" = None) -> torch.Tensor:
    """(lam / D) * (sum ||theta||^2 + sum gamma^2): the D-Gating regularizer as a loss term, with
    each kind's lambda (``lam`` as for ``param_groups``; a ``LambdaScheduler``'s ``lam`` fits).
    ``lam=None`` takes the recipe's lambdas. Under FSDP2 each rank sums its own shards and the
    sums are all-reduced (every rank must call it): the value is the global penalty and the
    gradient of each shard is its own, ``2 * lam / D * p``, as FSDP expects."""
    lams, D = kind_lams(model, lam), require_gated(model, "D-Gating training").recipe.D
    total = None
    for kind, (thetas, factors) in parameters_by_kind(model).items():
        for p in thetas + factors:
            sq = (p.float() if p.dtype in LOW_PRECISION else p).pow(2).sum()
            if is_dtensor(sq):
                sq = sq.full_tensor()  # sum over the shards; backward leaves each shard its own gradient
            term = (lams[kind] / D) * sq
            total = term if total is None else total + term
    return total


@accepts_wrapped(gather=True)
def group_norms(model: nn.Module, of: str = "weights") -> dict[str, torch.Tensor]:
    """L2 norm of every group, per gate key (differentiable). ``of="weights"``: the collapsed
    weights w_j (what the threshold compares); ``of="theta"``: the primary weights alone."""
    if of not in ("weights", "theta"):
        raise ValueError(f"of must be 'weights' or 'theta', got {of!r}")
    dset = require_gated(model, "group_norms")
    return {key: group_sq_sums(model, dgate, of).sqrt() for key, dgate in dset.items()}


@accepts_wrapped(gather=True)
def imbalance(model: nn.Module, threshold: float | None = None) -> float:
    """Mean over alive groups of log(max / min) of the D factor magnitudes (||theta_j||,
    |gamma_j,1|, ..., |gamma_j,D-1|). 0 is perfectly balanced: only then does the smooth objective
    equal the L_{2,2/D} penalty (AM-GM), and under weight decay it shrinks geometrically."""
    dset = require_gated(model, "imbalance")
    threshold = dset.recipe.threshold if threshold is None else float(threshold)
    with torch.no_grad():
        thetas, weights = group_norms(model, "theta"), group_norms(model, "weights")
        values = []
        for key, dgate in dset.items():
            mags = torch.cat([thetas[key][None], dgate.factors.detach().abs()]).clamp(min=1e-30).log()
            alive = weights[key] >= threshold
            values.append((mags.max(0).values - mags.min(0).values)[alive])
        spread = torch.cat(values) if values else torch.zeros(0)
    return float(spread.mean()) if spread.numel() else 0.0


@accepts_wrapped()
def check_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, lam: "float | dict[str, float] | None" = None,
                    uses_penalty: bool = False) -> list[str]:
    """Warn where an optimizer silently does not optimize the D-Gating objective; returns the
    messages (each warning points at the caller's line). ``uses_penalty=True``: the loss already
    contains ``dg.penalty`` (then gated parameters must have no weight decay, else they are
    regularized twice).

    The lambda checked is, per param group: the one a ``LambdaScheduler`` set last (ramps and
    targets are understood), else ``lam`` when given (a number or kind -> lam), else the one
    ``dg.param_groups`` recorded, else the recipe's for the parameter's kind. Also warns when gated weights are stored in bfloat16/float16, where the
    decay rounds away (see ``precision``)."""
    problems = optimizer_problems(model, optimizer, lam, uses_penalty)
    for message in problems:
        warn_user(message)
    return problems


def optimizer_problems(model: nn.Module, optimizer, lam: "float | dict[str, float] | None" = None,
                       uses_penalty: bool = False) -> list[str]:
    """What ``check_optimizer`` warns about, without warning (for callbacks that log it)."""
    model = unwrap(model, "dg.check_optimizer")
    optimizer = unwrap_optimizer(optimizer)
    thetas, factors = gated_parameters(model)
    dset = require_gated(model, "D-Gating training")
    D = dset.recipe.D
    lams = kind_lams(model, lam)
    kind_of = {id(p): kind for kind, (ts, fs) in parameters_by_kind(model).items() for p in ts + fs}
    where = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            where[id(p)] = group
    problems = []
    named = {id(p): n for n, p in model.named_parameters()}
    missing = [named.get(id(p), "?") for p in thetas + factors if id(p) not in where]
    if missing:
        problems.append(f"{len(missing)} gated parameters are not in the optimizer (e.g. {missing[0]}): they never "
                        "train or decay, so their groups cannot die. Build the optimizer from dg.param_groups(model, "
                        "lam) or model.parameters() after dg.gate_model.")
    decoupled = isinstance(optimizer, torch.optim.AdamW)
    seen = set()
    for p in thetas + factors:
        group = where.get(id(p))
        if group is None or id(group) in seen:
            continue
        seen.add(id(group))
        if group.get(SCHEDULED_KEY) or (lam is None and LAM_KEY in group):
            group_lam = float(group[LAM_KEY])
        else:
            group_lam = lams[kind_of[id(p)]]
        want = 0.0 if uses_penalty else 2.0 * group_lam / D
        wd = float(group.get("weight_decay", 0.0))
        if wd and (decoupled or group.get("decoupled_weight_decay", False)):
            problems.append(f"{type(optimizer).__name__} applies decoupled weight decay ({wd:g}) to gated parameters: "
                            "that is not the L2 penalty D-Gating needs (its sparsity guarantee is lost). Use coupled "
                            "decay (SGD, Adam with decoupled_weight_decay=False) via dg.param_groups, or set "
                            "weight_decay=0 on them and add dg.penalty(model, lam) to the loss.")
        elif not math.isclose(wd, want, rel_tol=1e-6, abs_tol=1e-12):
            if uses_penalty:
                hint = "the loss already has dg.penalty, so set weight_decay=0 on them"
            elif wd == 0:
                hint = ("nothing regularizes the gates, so no group will die; use dg.param_groups(model, lam) or add "
                        "dg.penalty(model, lam) to the loss (and pass uses_penalty=True here)")
            else:
                hint = "use dg.param_groups(model, lam)"
            problems.append(f"gated parameters have weight_decay={wd:g}, but lam={group_lam:g}, D={D} needs 2*lam/D="
                            f"{want:g}: {hint}.")
    if (message := frozen_gates(model)) is not None:
        problems.append(message[0].upper() + message[1:])
    problems.extend(precision_problems(model, optimizer, where))
    return problems


def precision_problems(model: nn.Module, optimizer=None, where: dict | None = None) -> list[str]:
    """A warning when gated weights are stored in bfloat16/float16: the weight decay that makes
    groups die changes a weight by ``lr * wd`` of itself per SGD step, which rounds away."""
    thetas, factors = gated_parameters(model)
    low = [p for p in thetas + factors if p.dtype in LOW_PRECISION]
    if not low:
        return []
    named = {id(p): n for n, p in model.named_parameters()}
    dtype = low[0].dtype
    name = str(dtype).replace("torch.", "")
    limit = rounding(dtype)
    group = where.get(id(low[0])) if where else None
    step = float(group.get("lr", 0.0)) * float(group.get("weight_decay", 0.0)) if group is not None else None
    if step is not None and 0 < step < limit:
        effect = (f"an SGD weight-decay step changes a weight by lr*wd = {step:.2g} of itself, below {name}'s "
                  f"resolution ({limit:.2g}): p - lr*wd*p rounds back to p, so no group ever dies")
    else:
        effect = (f"any update smaller than {limit:.2g} of a weight rounds back to it in {name}, so the slow decay "
                  "that makes groups die is lost")
    return [f"{len(low)} gated parameters are stored in {name} (e.g. {named.get(id(low[0]), '?')}): {effect}. Keep "
            "the weights in float32 and compute in low precision with torch.autocast(device_type, dtype="
            f"torch.{name}) (or FSDP2's MixedPrecisionPolicy(param_dtype=torch.{name})), so that the optimizer "
            "updates float32 weights."]


class SparsityMonitor:
    """Follows sparsity during training from any loop (``dg.track(model, optimizer)``): call
    ``step(epoch)`` once per epoch (it reads the weights; no forward pass). Each step appends to
    ``history`` a dict with dead/total groups per kind, collapsed groups per kind (``deadness``:
    what Adam leaves near zero, shown when more than the dead), the removable parameter fraction and the
    factor ``imbalance``. With an ``optimizer``, the first step also runs ``check_optimizer`` on it
    (without one, it still warns about bfloat16/float16 gated weights). Takes the model inside
    DDP/compile wrappers; under FSDP2 ``step`` is a collective (every rank calls it)."""

    def __init__(self, model: nn.Module, optimizer=None, threshold: float | None = None, lam: float | None = None,
                 uses_penalty: bool = False, verbose: bool = False):
        model = unwrap(model, "dg.track")
        require_gated(model, "dg.track")
        self.model, self.threshold, self.verbose = model, threshold, verbose
        kind_lams(model, lam)  # a bad lam is refused here, not at the first step
        self._check = (optimizer, lam, uses_penalty)
        self.history: list[dict] = []

    def step(self, epoch: int | None = None) -> dict:
        if self._check is not None:
            optimizer, lam, uses_penalty = self._check
            self._check = None
            problems = (optimizer_problems(self.model, optimizer, lam, uses_penalty) if optimizer is not None
                        else precision_problems(self.model))
            for message in problems:
                warn_user(message)
        with full_params(self.model):
            report = sparsity(self.model, self.threshold)
            balance = imbalance(self.model, self.threshold)
        kinds = report.by_kind()
        entry = {
            "epoch": len(self.history) if epoch is None else epoch,
            "dead": {k: v["dead"] for k, v in kinds.items()},
            "collapsed": {k: v["collapsed"] for k, v in kinds.items()},
            "groups": {k: v["groups"] for k, v in kinds.items()},
            "dead_fraction": report.dead / max(report.groups, 1),
            "params_removable": report.params_removable,
            "params_removable_fraction": report.params_removable / max(report.params_total, 1),
            "imbalance": balance,
        }
        self.history.append(entry)
        if self.verbose:
            print(self.format(entry))
        return entry

    @staticmethod
    def format(entry: dict) -> str:
        collapsed = entry.get("collapsed", {})
        kinds = " ".join(f"{k} {entry['dead'][k]}/{entry['groups'][k]} dead"
                         + (f" ({collapsed[k]} collapsed)" if collapsed.get(k, 0) > entry["dead"][k] else "")
                         for k in entry["groups"])
        return (f"epoch {entry['epoch']}: {kinds}; params removable {entry['params_removable_fraction']:.1%}; "
                f"imbalance {entry['imbalance']:.3f}")


track = SparsityMonitor  # dg.track(model, optimizer): the name the training loop reads best
