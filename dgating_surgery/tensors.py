"""Named parameters and buffers of a model: read one, replace one. Gating, shrink and the
checkpoint loader change tensors by name; they all go through here so that a replaced tensor
stays what it was (a Parameter with its requires_grad, or a buffer)."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


def owner(model: nn.Module, fqn: str) -> tuple[nn.Module, str]:
    """The module holding tensor ``fqn`` and the tensor's attribute name on it."""
    module_name, _, attr = fqn.rpartition(".")
    return model.get_submodule(module_name), attr


def get_tensor(model: nn.Module, fqn: str) -> torch.Tensor:
    """Tensor ``fqn`` as the forward sees it (a gated parameter: theta times its gate)."""
    module, attr = owner(model, fqn)
    return getattr(module, attr)


def replace_tensor(module: nn.Module, attr: str, value: torch.Tensor, like: torch.Tensor | None = None) -> None:
    """Put ``value`` in place of the parameter or buffer ``attr`` of ``module``: a Parameter stays a
    Parameter (with ``like``'s requires_grad, default the old one's), a buffer a buffer."""
    like = like if like is not None else getattr(module, attr)
    value = value.detach()
    if isinstance(like, nn.Parameter) or attr in module._parameters:
        module._parameters[attr] = nn.Parameter(value, requires_grad=like.requires_grad)
    else:
        module._buffers[attr] = value


def along(vector, dim: int, ndim: int) -> torch.Tensor:
    """A 1-D vector (tensor or numpy array) shaped to lie along ``dim`` of an ``ndim``-D tensor."""
    t = torch.from_numpy(vector) if isinstance(vector, np.ndarray) else torch.as_tensor(vector)
    shape = [1] * ndim
    shape[dim] = -1
    return t.reshape(shape)
