"""Running a model for a check or a measurement: one mode context, one way to pass example
inputs, one comparison of outputs. Tracing, shrink's verification, the self-check, the CLI and the
measurements all use these, so "same outputs" means one thing everywhere."""
from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.utils import _pytree as pytree


def as_tuple(example_inputs) -> tuple:
    """Example inputs as positional arguments: None, one tensor, or a sequence of them."""
    if example_inputs is None:
        return ()
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


def detached(structure):
    """``structure`` with every tensor detached (the same storage: no copy)."""
    return pytree.tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, structure)


def fresh(structure):
    """``structure`` with every tensor copied: a model may write into its inputs in place
    (``x.chunk(2, 1)[1].mul_(2)``), so each run of a comparison gets its own copy of them."""
    return pytree.tree_map(lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t, structure)


def on_device_of(structure, model: nn.Module):
    """``structure`` with every tensor on the device of ``model``'s first parameter (a model moved
    after its example inputs were recorded)."""
    param = next(model.parameters(), None)
    if param is None:
        return structure
    return pytree.tree_map(lambda t: t.to(param.device) if isinstance(t, torch.Tensor) else t, structure)


@contextlib.contextmanager
def training_mode(model: nn.Module, training: bool):
    """Every submodule in train (or eval) mode for the block; each one's own flag is restored
    afterwards (a user may keep some submodules in eval mode on purpose)."""
    flags = [(m, m.training) for m in model.modules()]
    model.train(training)
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


@contextlib.contextmanager
def evaluating(model: nn.Module):
    """Eval mode and no autograd, as for inference; every submodule's flag is restored after."""
    with training_mode(model, False), torch.no_grad():
        yield


def run(model: nn.Module, example_inputs=None, example_kwargs: dict | None = None):
    """One eval-mode forward pass on fresh copies of the example inputs (``fresh``)."""
    args, kwargs = fresh((as_tuple(example_inputs), dict(example_kwargs or {})))
    with evaluating(model):
        return model(*args, **kwargs)


def output_tensors(output) -> list[torch.Tensor]:
    """The tensors of a model output (a tensor, tuples, dicts, Hugging Face ModelOutputs), in order."""
    if hasattr(output, "to_tuple") and callable(output.to_tuple):  # a ModelOutput: its set fields
        output = output.to_tuple()
    return [t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor)]


def max_rel_diff(reference: torch.Tensor, other: torch.Tensor) -> float:
    """max |a - b| / max |a|: the comparison used for every equivalence check. A reference that is
    all zeros or not finite cannot show a difference, so it compares as infinitely different."""
    reference, other = _wide(reference), _wide(other)
    if not _informative(reference):
        return float("inf")
    return float((reference - other).abs().max() / reference.abs().max())


def output_diff(reference, other) -> float:
    """The largest ``max_rel_diff`` over two models' outputs. ``inf`` when their structure or shapes
    differ, or when no reference tensor can show a difference (all zeros or not finite); such a
    tensor beside informative ones must match exactly."""
    ref, got = output_tensors(reference), output_tensors(other)
    if len(ref) != len(got) or any(r.shape != g.shape for r, g in zip(ref, got)):
        return float("inf")
    informative = [(r, g) for r, g in zip(ref, got) if _informative(_wide(r))]
    if not informative or not all(torch.equal(r, g) for r, g in zip(ref, got) if not _informative(_wide(r))):
        return float("inf")
    return max(max_rel_diff(r, g) for r, g in informative)


def _wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 or wider: a float64 output compared in float32 would lose its last digits and
    call a tensor of values below 1e-38 all zeros."""
    return t.detach().to(torch.promote_types(t.dtype, torch.float32))


def _informative(reference: torch.Tensor) -> bool:
    return reference.numel() > 0 and bool(torch.isfinite(reference).all()) and bool(reference.abs().max() > 0)


def tolerance(reference, rtol: float = 1e-4) -> float:
    """The relative difference an exact cut may show on these outputs: ``rtol``, or four units in the
    last place of the lowest-precision floating output (a bfloat16 model rounds every layer)."""
    eps = [torch.finfo(t.dtype).eps for t in output_tensors(reference) if t.is_floating_point()]
    return max([rtol] + [4 * e for e in eps])


def describe_mismatch(reference, other) -> str | None:
    """Why two outputs cannot be compared (count, shape, a degenerate reference), or None."""
    ref, got = output_tensors(reference), output_tensors(other)
    if len(ref) != len(got):
        return f"the output has {len(got)} tensors, the reference {len(ref)}"
    for i, (r, g) in enumerate(zip(ref, got)):
        if r.shape != g.shape:
            return f"output {i} has shape {tuple(g.shape)}, the reference {tuple(r.shape)}"
        if not torch.isfinite(r).all():
            return f"output {i} of the reference is not finite, so it cannot show a difference"
    if not any(r.abs().max() > 0 for r in ref if r.numel()):
        return "the reference output is all zeros, so it cannot show a difference"
    return None
