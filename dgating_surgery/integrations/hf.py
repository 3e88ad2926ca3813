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

import json
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..training.regularizer import param_groups
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
                 uses_penalty: bool = False, target=None, metric: str = "params", distill: float | None = None, uniform: bool = False):
        self.core = CallbackCore(model, lam, schedule, threshold, uses_penalty, target=target, metric=metric,
                                 distill=distill, uniform=uniform)

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


def from_pretrained_gated(path, recipe, example_inputs=None, example_kwargs=None, model_class=None):
    """A gated model written by ``save_pretrained`` (or a Trainer checkpoint of one), ready to train
    on. ``from_pretrained`` refuses such a directory: its weights are D-Gating factors and primary
    weights, which no ungated model has. This builds the class its config names (``model_class``
    overrides it), gates it with ``recipe`` (the one it was gated with) on the example inputs
    (default: what ``dgate`` uses, e.g. token ids of shape 1x16 with ``use_cache=False``), and loads
    the weights; a weight it does not find, or one it has no place for, is an error."""
    import transformers

    from ..engine.gates import gate_model
    from ..checkpoints.inputs import default_inputs
    config = transformers.AutoConfig.from_pretrained(path)
    if model_class is None:
        name = (getattr(config, "architectures", None) or [None])[0]
        model_class = getattr(transformers, name, None) if name else None
        if model_class is None:
            raise CheckpointError(f"{path}: its config names no transformers class ({name!r}); pass model_class=")
    state = _saved_weights(Path(path))
    model = model_class(config).to(next(v.dtype for v in state.values() if v.is_floating_point()))
    if example_inputs is None and not example_kwargs:
        example_inputs, example_kwargs = default_inputs(model).make()
    gate_model(model, recipe, example_inputs, example_kwargs)
    own = model.state_dict(keep_vars=True)
    missing, unexpected = model.load_state_dict(state, strict=False)
    loaded = {id(own[k]) for k in state if k in own}
    missing = [k for k in missing if id(own[k]) not in loaded]  # save_pretrained keeps one name of a tied weight
    if missing or unexpected:
        raise CheckpointError(f"{path} does not fit {model_class.__name__} gated with recipe {recipe!r}: "
                              f"{len(missing)} weights missing ({', '.join(missing[:3])}), {len(unexpected)} unexpected "
                              f"({', '.join(unexpected[:3])}); gate it with the recipe it was gated with")
    return model.train()


def _saved_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a ``save_pretrained`` directory (one file or shards; safetensors or torch)."""
    from safetensors.torch import load_file
    for name in ("model.safetensors", "pytorch_model.bin"):
        index = folder / f"{name}.index.json"
        files = ([folder / f for f in dict.fromkeys(json.loads(index.read_text())["weight_map"].values())]
                 if index.exists() else [folder / name] if (folder / name).exists() else [])
        if files:
            state = {}
            for file in files:
                state.update(load_file(file) if file.suffix == ".safetensors" else torch.load(file, weights_only=True))
            return state
    raise CheckpointError(f"{folder}: no model.safetensors or pytorch_model.bin (nor a sharded index) to load")
