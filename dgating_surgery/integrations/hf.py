"""D-Gating with the Hugging Face ``Trainer`` (``pip install 'dgating-surgery[hf]'``).

The Trainer's default optimizer is AdamW with decoupled weight decay, which is not the L2 penalty
D-Gating needs (no group dies, silently). Build the optimizer from ``dg.param_groups`` and hand
it to the Trainer::

    gated = dg.gate_model(model, recipe, example_kwargs=...)
    args = TrainingArguments(output_dir, learning_rate=..., weight_decay=...)
    trainer = Trainer(model=gated, args=args, train_dataset=...,
                      optimizers=(dgating_optimizer(gated, args, lam=1e-3), None),
                      callbacks=[DGatingCallback(schedule={"warmup_steps": 200})])

``DGatingCallback`` checks the optimizer when training starts (a warning per problem, e.g. the
default AdamW), adds ``dgating/dead_groups``, ``dgating/params_removable``, ... to every log, and
steps a ``LambdaScheduler`` with the Trainer's global step when given ``schedule``.
"""
from __future__ import annotations

try:
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("dgating_surgery.integrations.hf needs transformers: pip install 'dgating-surgery[hf]'") from exc

import torch

from ..training import param_groups
from . import CallbackCore, CoreView, find_gated, missing_model_message


def dgating_optimizer(model, args=None, lam: float | None = None, optimizer_cls=torch.optim.Adam,
                      **kwargs) -> torch.optim.Optimizer:
    """An optimizer for ``Trainer(optimizers=(this, None))`` built from ``dg.param_groups`` of the
    gated module in ``model`` (the model itself or a submodule; the parameters around it join the
    undecayed-by-D-Gating group): coupled
    weight decay ``2*lam/D`` on the gated weights and gates, ``args.weight_decay`` on the rest, the
    learning rate ``args.learning_rate`` (``kwargs`` override both, and pass betas, momentum...).
    ``optimizer_cls``: any ``torch.optim`` class with coupled decay (Adam, SGD, RMSprop...); AdamW
    is refused, its decay is decoupled."""
    if issubclass(optimizer_cls, torch.optim.AdamW):
        raise TypeError("AdamW's weight decay is decoupled, not the L2 penalty D-Gating needs: use torch.optim.Adam "
                        "(coupled decay) or SGD")
    gated = find_gated(model)
    if gated is None:
        raise ValueError(missing_model_message("Trainer"))
    weight_decay = kwargs.pop("weight_decay", getattr(args, "weight_decay", 0.0) if args is not None else 0.0)
    if args is not None:
        kwargs.setdefault("lr", args.learning_rate)
    groups = param_groups(gated, lam, weight_decay=weight_decay)
    seen = {id(p) for g in groups for p in g["params"]}
    outside = [p for p in model.parameters() if p.requires_grad and id(p) not in seen]  # around the gated module
    if outside:
        if groups[-1]["name"] == "other":
            groups[-1]["params"] = groups[-1]["params"] + outside
        else:
            groups.append({"params": outside, "weight_decay": weight_decay, "name": "other"})
    return optimizer_cls(groups, **kwargs)


class DGatingCallback(CoreView, TrainerCallback):
    """Checks the optimizer, logs sparsity, ramps lambda; for ``Trainer(callbacks=[...])``.

    ``model``: the gated module (default: the Trainer's model, or its first gated submodule).
    ``lam``: the lambda to check and to schedule (default: what ``dg.param_groups`` recorded).
    ``schedule``: ``LambdaScheduler`` arguments, e.g. ``{"warmup_steps": 200}`` or ``{"target": 0.5,
    "by_step": 2000, "every": 50}``, or a ``LambdaScheduler``. ``threshold``: for the dead count.
    ``target`` (a fraction, or kind -> fraction) and ``metric`` ("params", "macs", "groups"): a size
    for the slim model, reached within this run (``LambdaScheduler.for_run`` over ``max_steps``:
    dense, penalty, recovery with the chosen groups held at zero); ``dg.shrink`` after training.
    ``distill``: the weight of a KL term to a frozen copy of the model taken when the penalty
    starts (``distill.Distiller``), added to the model's loss.

    The figures go into every log of the Trainer (``trainer.state.log_history``, the progress
    output, trainer_state.json). Report integrations (TensorBoard, W&B) run before the callbacks
    given to the Trainer; to have them receive the figures too, ``callback.attach(trainer)``
    instead of ``callbacks=[...]``.
    """

    def __init__(self, model=None, lam: float | None = None, schedule=None, threshold: float | None = None,
                 uses_penalty: bool = False, target=None, metric: str = "params", distill: float | None = None):
        self.core = CallbackCore(model, lam, schedule, threshold, uses_penalty, target=target, metric=metric,
                                 distill=distill)

    def attach(self, trainer) -> "DGatingCallback":
        """Put this callback first in ``trainer``'s list, before the report integrations."""
        trainer.callback_handler.callbacks.insert(0, self)
        return self

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.core.begin(model, optimizer, state.global_step, "Trainer", state.max_steps)

    def on_step_end(self, args, state, control, **kwargs):
        self.core.step(state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.core.model is None or logs is None:
            return
        figures = self.core.metrics()
        logs.update(figures)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(figures)
