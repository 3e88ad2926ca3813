"""Models as users train them: wrapped in ``DistributedDataParallel``/``DataParallel``, compiled
with ``torch.compile``, sharded with FSDP2's ``fully_shard``; optimizers wrapped by Lightning or
accelerate. (Converting a gated model to ``SyncBatchNorm`` is ``training.distributed``.)

Every public function that takes a gated model goes through ``accepts_wrapped``: it finds the
gated module inside the wrappers, gathers FSDP2 shards where a function reads whole tensors (a
collective: every rank must call it), and refuses, with the sequence to use, what cannot be done
in place under a live wrapper (cutting a model that DDP or FSDP2 still holds).

``check_gateable`` is what ``gate_model`` refuses before it traces: a wrapped model (gate first,
then wrap), PEFT adapters and existing parametrizations (weight_norm), each with the order to use.
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys
import warnings

import torch
from torch import nn

from ..errors import DGatingWarning, GatingError, WrapperError

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # dgating_surgery/


# -- warnings that point at the user's line ----------------------------------------------------------
def warn_user(message: str, category=DGatingWarning) -> None:
    """``warnings.warn`` attributed to the first frame outside this package (the user's line, or
    the framework's for a callback), however deep inside the package it is raised."""
    frame, level = sys._getframe(1), 2
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_DIR + os.sep):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


# -- what wraps a model ------------------------------------------------------------------------------
def _is_compiled(model) -> bool:
    return hasattr(model, "_orig_mod") and type(model).__name__ == "OptimizedModule"


def _is_data_parallel(model) -> bool:
    return isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel))


def _is_fsdp1(model) -> bool:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(model, FullyShardedDataParallel)


def _fsdp2_module_class():
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without distributed or before 2.6
        return None
    return FSDPModule


def _dtensor_class():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return None
    return DTensor


def is_dtensor(t) -> bool:
    cls = _dtensor_class()
    return cls is not None and isinstance(t, cls)


def is_fsdp2(model: nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to ``model`` or to one of its submodules."""
    cls = _fsdp2_module_class()
    return cls is not None and any(isinstance(m, cls) for m in model.modules())


def _peft_reason(model: nn.Module) -> str | None:
    """Where PEFT put adapters into ``model`` (a PeftModel, or LoRA layers injected in place)."""
    if type(model).__module__.startswith("peft."):
        return f"it is a PEFT {type(model).__name__} (adapters on {'a gated' if hasattr(model, 'dgates') else 'the'} model)"
    if any(type(m).__module__.startswith("peft.tuners") for m in model.modules()):
        name, module = next((n, m) for n, m in model.named_modules() if type(m).__module__.startswith("peft.tuners"))
        return f"'{name}' is a PEFT {type(module).__name__}"
    return None


PEFT_ORDER = ("LoRA and D-Gating do not train together: PEFT freezes every non-adapter parameter (the gate factors "
              "too, so no group can die), the adapter's update bypasses the gates (a cut would remove rows it still "
              "uses), and merging an adapter into a gated layer silently drops it. Use one of the two orders: merge "
              "the adapters first (model = peft_model.merge_and_unload()) and then dg.gate_model; or train D-Gating, "
              "dg.shrink, and add LoRA to the slim model, which has no gates")


def unwrap(model: nn.Module, what: str = "this function") -> nn.Module:
    """The module inside ``torch.compile``, ``DistributedDataParallel`` and ``DataParallel``
    wrappers (in any nesting); an FSDP2 model is its own module. PEFT models and FSDP (v1)
    wrappers are refused with what to do instead."""
    seen = 0
    while True:
        if _is_compiled(model):
            model = model._orig_mod
        elif _is_data_parallel(model):
            model = model.module
        elif _is_fsdp1(model):
            raise WrapperError(f"{what} got a FullyShardedDataParallel (FSDP1) wrapper, whose flattened parameters hide "
                               "the gates: shard with FSDP2 instead (torch.distributed.fsdp.fully_shard), or pass a "
                               "plain gated model")
        else:
            break
        seen += 1
        if seen > 16:  # pragma: no cover - a wrapper that wraps itself
            break
    reason = _peft_reason(model)
    if reason is not None:
        raise WrapperError(f"{what}: {reason}. {PEFT_ORDER}.")
    return model


def live_wrapper(model: nn.Module, what: str = "this function") -> str | None:
    """Name of the distributed wrapper around (or inside) ``model`` that a cut in place would
    break, or None."""
    while _is_compiled(model):
        model = model._orig_mod
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return "DistributedDataParallel"
    if isinstance(model, nn.DataParallel):
        return "DataParallel"
    inner = unwrap(model, what)
    if is_fsdp2(inner):
        return "FSDP2 (fully_shard)"
    return None


# -- FSDP2: whole tensors for the functions that read them --------------------------------------------
def _managed_params(module: nn.Module, fsdp_cls):
    """The parameters one FSDP2 module manages: its own, down to the next nested FSDP2 module."""
    stack = [module]
    while stack:
        m = stack.pop()
        yield from m.parameters(recurse=False)
        stack.extend(c for c in m.children() if not isinstance(c, fsdp_cls))


@contextlib.contextmanager
def full_params(model: nn.Module):
    """Inside, every FSDP2 module of ``model`` whose parameters are sharded holds them unsharded
    (all-gathered, in FSDP's ``param_dtype``); they are sharded again on exit. A collective: under
    FSDP2 every rank must enter it. Modules already unsharded (the root after a forward) are left
    as they are. Not for gradients: compute differentiable terms on the shards (``dg.penalty`` does)."""
    fsdp_cls = _fsdp2_module_class()
    gathered = []
    if fsdp_cls is not None:
        for module in model.modules():
            if isinstance(module, fsdp_cls) and any(is_dtensor(p) for p in _managed_params(module, fsdp_cls)):
                module.unshard()
                gathered.append(module)
    try:
        yield model
    finally:
        for module in reversed(gathered):
            module.reshard()


def accepts_wrapped(gather: bool = False, in_place: str | None = None):
    """Decorator for a public function whose first argument is a gated model: it receives the
    model inside any wrapper (``unwrap``). ``gather``: under FSDP2, run it on unsharded parameters
    (``full_params``; every rank must call it). ``in_place``: the function changes the model or
    needs whole tensors to write them; it refuses a live DDP/DataParallel/FSDP2 wrapper with the
    sequence to use (the text of ``in_place`` names the action, e.g. "shrink")."""

    def decorate(fn):
        @functools.wraps(fn)
        def inner(model, *args, **kwargs):
            if in_place is not None:
                refuse_live_wrapper(model, in_place)
            inner_model = unwrap(model, f"dg.{fn.__name__}")
            if gather and is_fsdp2(inner_model):
                with full_params(inner_model):
                    return fn(inner_model, *args, **kwargs)
            return fn(inner_model, *args, **kwargs)

        inner.__wrapped_accepts__ = True
        return inner

    return decorate


def refuse_live_wrapper(model: nn.Module, action: str) -> None:
    from ..errors import CheckpointError, ShrinkError

    wrapper = live_wrapper(model, f"dg.{action}")
    if wrapper is None:
        return
    error = CheckpointError if action.startswith("save") else ShrinkError
    if wrapper.startswith("FSDP2"):
        raise error(
            f"dg.{action} cannot work on an FSDP2-sharded model: each rank holds only shards. On every rank, gather "
            "the full state (a collective): state = torch.distributed.checkpoint.state_dict.get_model_state_dict("
            "model, options=StateDictOptions(full_state_dict=True)); load it into a plain gated copy: plain = "
            "dg.gate_model(make_model(), recipe, example_inputs); plain.load_state_dict(state); then "
            f"dg.{action}(plain, ...). See docs/training.md, 'Distributed training'.")
    if action.startswith("save"):
        return  # saving reads the module; only the FSDP2 shards are a problem
    raise error(
        f"dg.{action} got a live {wrapper} wrapper: cutting its module in place replaces the sliced parameters, and "
        f"the wrapper keeps syncing the old ones, so the replicas silently diverge. On every rank: slim = "
        f"dg.{action}(model.module, ...); then drop the wrapper and wrap again (model = DistributedDataParallel(slim, "
        "...)), and build a new optimizer for the new parameters. See docs/training.md, 'Distributed training'.")


# -- what gate_model refuses ---------------------------------------------------------------------------
def check_gateable(model: nn.Module) -> None:
    """Refuse, before tracing, a model that gating would get wrong, each with the order to use:
    a wrapper (gate first, then wrap), PEFT adapters, existing parametrizations or weight_norm hooks."""
    if _is_compiled(model) or _is_data_parallel(model) or _is_fsdp1(model) or is_fsdp2(model):
        kind = ("torch.compile" if _is_compiled(model) else type(model).__name__ if not is_fsdp2(model)
                else "FSDP2 (fully_shard)")
        raise GatingError(f"gate_model got a model already wrapped by {kind}: gate the plain model first, then wrap "
                          "it (gated = dg.gate_model(model, recipe, x); then DistributedDataParallel(gated) / "
                          "fully_shard(gated) / torch.compile(gated))")
    reason = _peft_reason(model)
    if reason is not None:
        raise GatingError(f"gate_model: {reason}. {PEFT_ORDER}.")
    from torch.nn.utils import parametrize
    from torch.nn.utils.weight_norm import WeightNorm

    found = []
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module):
            kinds = ", ".join(f"{attr} ({type(plist[0]).__name__})" for attr, plist in module.parametrizations.items())
            found.append(f"'{name}': {kinds}")
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, WeightNorm) or type(hook).__name__ == "SpectralNorm":
                found.append(f"'{name}': {hook.name} ({type(hook).__name__} hook)")
    if found:
        raise GatingError(
            f"gate_model: the model has existing parametrizations ({'; '.join(found[:4])}"
            f"{' ...' if len(found) > 4 else ''}). D-Gating is itself a parametrization of the weights and cannot "
            "compose with another one (weight_norm, spectral_norm, orthogonal): remove them first, keeping the "
            "function: torch.nn.utils.parametrize.remove_parametrizations(module, 'weight') (or "
            "torch.nn.utils.remove_weight_norm for the old hook), then gate. D-Gating's factorization takes the "
            "place of weight_norm's.")


def unwrap_optimizer(optimizer):
    """The ``torch.optim`` optimizer inside Lightning's ``LightningOptimizer`` or accelerate's
    ``AcceleratedOptimizer``."""
    for _ in range(8):
        inner = getattr(optimizer, "_optimizer", None) or getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer or not hasattr(inner, "param_groups"):
            return optimizer
        optimizer = inner
    return optimizer


def memory_format(t: torch.Tensor) -> torch.memory_format:
    """The memory format a new tensor made from ``t`` should keep (channels_last for a 4-D tensor
    stored that way, channels_last_3d for 5-D; otherwise contiguous)."""
    if t.ndim == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if t.ndim == 5 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format
