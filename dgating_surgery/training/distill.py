"""Distillation from the dense model while groups die: a KL term that keeps the gated model's
predictions close to a frozen copy of itself taken when the penalty starts.

``Distiller(model, weight=1.0, temperature=1.0)``; ``start()`` takes the copy (the gates multiplied
into the weights: the same function at the cost of the dense original). Then either add
``distiller.loss(student_logits, *inputs, **kwargs)`` to your loss, or ``attach()`` it: while the
model trains, a forward hook runs the teacher on the same inputs and adds the term to the output's
``loss`` (a Hugging Face model given ``labels``), which is what the callbacks' ``distill=`` does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LambdaError
from ..engine.gates import require_gated
from ..engine.wrappers import unwrap


def logits_of(output) -> torch.Tensor:
    """The logits of a model's output: the tensor itself, ``.logits`` or ``["logits"]``."""
    if isinstance(output, torch.Tensor):
        return output
    found = getattr(output, "logits", None)
    if found is None and isinstance(output, dict):
        found = output.get("logits")
    if found is None:
        raise LambdaError(f"distillation needs logits: the model returned {type(output).__name__} without a tensor, "
                          "'.logits' or ['logits']")
    return found


class Distiller:
    """KL(teacher || student) on softened logits (``temperature``), times ``weight`` and T^2 (the
    usual scaling, so that the gradient's size does not depend on T); the teacher is the gated
    model as it was at ``start()``, frozen, in eval mode."""

    def __init__(self, model: nn.Module, weight: float = 1.0, temperature: float = 1.0):
        self.model = unwrap(model, "Distiller")
        require_gated(self.model, "Distiller")
        if not weight > 0 or not temperature > 0:
            raise LambdaError(f"distillation weight and temperature must be > 0, got {weight} and {temperature}")
        self.weight, self.temperature = float(weight), float(temperature)
        self.teacher: nn.Module | None = None
        self._handle = None

    def start(self) -> "Distiller":
        """Freeze a copy of the model now (call it when the penalty starts)."""
        from ..engine.measure import collapsed

        self.teacher = collapsed(self.model).eval().requires_grad_(False)
        return self

    def loss(self, student_logits: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The KL term for one batch: the teacher is run on ``args``/``kwargs`` (``labels`` dropped)."""
        if self.teacher is None:
            raise LambdaError("Distiller.loss before start(): take the teacher when the penalty starts")
        kwargs = {k: v for k, v in kwargs.items() if k != "labels"}
        with torch.no_grad():
            teacher_logits = logits_of(self.teacher(*args, **kwargs))
        t = self.temperature
        student = F.log_softmax(student_logits.float() / t, dim=-1).reshape(-1, student_logits.shape[-1])
        teacher = F.log_softmax(teacher_logits.float() / t, dim=-1).reshape(-1, student_logits.shape[-1])
        return self.weight * t * t * F.kl_div(student, teacher, log_target=True, reduction="batchmean")

    def attach(self) -> "Distiller":
        """Add the term to the model's own ``loss`` on every training forward (a model that computes
        its loss, as a Hugging Face model given labels)."""
        if self._handle is None:
            self._handle = self.model.register_forward_hook(self._hook, with_kwargs=True)
        return self

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _hook(self, module, args, kwargs, output):
        if not module.training or self.teacher is None:
            return output
        term = self.loss(logits_of(output), *args, **kwargs)
        if getattr(output, "loss", None) is not None:
            output.loss = output.loss + term
        elif isinstance(output, dict) and output.get("loss") is not None:
            output["loss"] = output["loss"] + term
        else:
            raise LambdaError("Distiller.attach: the model's output has no loss to add the term to; add "
                              "distiller.loss(logits, *inputs) to your loss instead")
        return output


__all__ = ["Distiller"]
