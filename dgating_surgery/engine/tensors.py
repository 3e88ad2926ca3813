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


def replace_tensor(module: nn.Module, attr: str, value: torch.Tensor, like: torch.Tensor | None = None,
                   tied: list[tuple[nn.Module, str]] = ()) -> torch.Tensor:
    """Put ``value`` in place of the parameter or buffer ``attr`` of ``module``: a Parameter stays a
    Parameter (with ``like``'s requires_grad, default the old one's), a buffer a buffer. ``tied``:
    the other (module, attribute) pairs holding the same tensor (``tied_holders``) get the new one
    too, so that a tied weight stays one tensor. Returns the new tensor."""
    like = like if like is not None else getattr(module, attr)
    value = value.detach()
    if isinstance(like, nn.Parameter) or attr in module._parameters:
        new = module._parameters[attr] = nn.Parameter(value, requires_grad=like.requires_grad)
    else:
        new = module._buffers[attr] = value
    for other, name in tied:
        (other._parameters if name in other._parameters else other._buffers)[name] = new
    return new


def tied_holders(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """For every tensor that several modules hold (tied weights: a language model's embedding and
    output layer), by ``id``: each (module, attribute) holding it, the first name's holder first."""
    holders: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for attr, tensor in [*module._parameters.items(), *module._buffers.items()]:
            if tensor is not None:
                holders.setdefault(id(tensor), []).append((module, attr))
    return {key: found for key, found in holders.items() if len(found) > 1}


def along(vector, dim: int, ndim: int) -> torch.Tensor:
    """A 1-D vector (tensor or numpy array) shaped to lie along ``dim`` of an ``ndim``-D tensor."""
    t = torch.from_numpy(vector) if isinstance(vector, np.ndarray) else torch.as_tensor(vector)
    shape = [1] * ndim
    shape[dim] = -1
    return t.reshape(shape)
