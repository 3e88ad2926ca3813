"""Training helpers: the D-Gating regularizer for any optimizer.

The paper's objective is L0 + (lambda / D) * (sum_j ||theta_j||^2 + sum_{j,d} gamma_{j,d}^2). PyTorch's
``weight_decay=wd`` adds ``wd * p`` to the gradient, which is the gradient of (wd / 2) * ||p||^2, so the
same objective is ``weight_decay = 2 * lambda / D`` on the gated primary weights (theta) and on the
gate factors (gamma). Decoupled decay (AdamW) is a different penalty; ``penalty`` adds the objective
to the loss and works with any optimizer.
"""
from __future__ import annotations

import torch
from torch import nn

from .gates import GateScale, gate_set


def gated_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(primary weights theta, gate factors) of a gated model. A theta is the stored ``original``
    of every parameter a gate scales; its entries outside any gated group (rare: a layer only part
    of whose channels are exactly removable) get the same decay."""
    dset = gate_set(model)
    if dset is None:
        raise ValueError(f"{type(model).__name__} is not gated: call dg.gate_model first")
    thetas = []
    for module in model.modules():
        for name, plist in getattr(module, "parametrizations", {}).items():
            if any(isinstance(p, GateScale) for p in plist):
                thetas.append(plist.original)
    return thetas, [g.factors for g in dset.values()]


def param_groups(model: nn.Module, lam: float | None = None, weight_decay: float = 0.0) -> list[dict]:
    """Parameter groups for any ``torch.optim`` optimizer: weight decay ``2 * lam / D`` on the gated
    primary weights and the gates (the paper's L_{2,2/D} objective), ``weight_decay`` on the rest.
    ``lam=None`` takes the recipe's lambda."""
    dset = gate_set(model)
    thetas, factors = gated_parameters(model)
    lam = dset.recipe.lam if lam is None else float(lam)
    D = dset.recipe.D
    gated_ids = {id(p) for p in thetas + factors}
    rest = [p for p in model.parameters() if id(p) not in gated_ids and p.requires_grad]
    groups = [{"params": thetas + factors, "weight_decay": 2.0 * lam / D, "name": "dgating"}]
    if rest:
        groups.append({"params": rest, "weight_decay": weight_decay, "name": "other"})
    return groups


def penalty(model: nn.Module, lam: float | None = None) -> torch.Tensor:
    """(lam / D) * (sum ||theta||^2 + sum gamma^2): the D-Gating regularizer as a loss term.
    ``lam=None`` takes the recipe's lambda."""
    dset = gate_set(model)
    thetas, factors = gated_parameters(model)
    lam = dset.recipe.lam if lam is None else float(lam)
    total = sum(p.pow(2).sum() for p in thetas + factors)
    return (lam / dset.recipe.D) * total
