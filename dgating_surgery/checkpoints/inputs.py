"""Example inputs as data: shape and dtype per tensor, so that a checkpoint's manifest can record the
inputs a model was gated on and make them again (seeded noise, token ids of ones), and the guess the
command line makes when it is given none (``default_inputs``, ``--input-shape``, ``--input-dtype``).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ModelSpecError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
          "int64": torch.int64, "int32": torch.int32, "bool": torch.bool}
HF_TEXT_SHAPE = (1, 16)  # default token-id input of a Hugging Face text model


@dataclass
class InputSpec:
    """Example inputs as data (shape and dtype per tensor; JSON scalars for other keyword
    arguments), so that a manifest can regenerate them: floats are seeded normal noise, integers
    (token ids) and booleans are ones."""

    args: list = field(default_factory=list)
    kwargs: dict = field(default_factory=dict)

    @classmethod
    def of(cls, example_inputs, example_kwargs=None) -> "InputSpec":
        if isinstance(example_inputs, torch.Tensor):
            example_inputs = (example_inputs,)
        return cls([_describe(v, f"example_inputs[{i}]") for i, v in enumerate(example_inputs or ())],
                   {k: _describe(v, k) for k, v in (example_kwargs or {}).items()})

    def make(self, seed: int = 0) -> tuple[tuple, dict]:
        gen = torch.Generator().manual_seed(seed)
        return tuple(_make(a, gen) for a in self.args), {k: _make(v, gen) for k, v in self.kwargs.items()}

    def to_dict(self) -> dict:
        return {"args": self.args, "kwargs": self.kwargs}

    @classmethod
    def from_dict(cls, data: dict) -> "InputSpec":
        return cls(list(data.get("args", [])), dict(data.get("kwargs", {})))

    def __str__(self) -> str:
        parts = [f"{'x'.join(map(str, a['shape']))} {a['dtype']}" for a in self.args]
        parts += [f"{k}={v['shape'] if 'shape' in v else v['value']}" for k, v in self.kwargs.items()]
        return ", ".join(parts)


def _describe(value, where: str) -> dict:
    if isinstance(value, torch.Tensor):
        name = next((n for n, d in DTYPES.items() if d == value.dtype), None)
        if name is None:
            raise ModelSpecError(f"{where}: dtype {value.dtype} cannot be recorded; use one of {', '.join(DTYPES)}")
        return {"shape": list(value.shape), "dtype": name}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    raise ModelSpecError(f"{where}: only tensors and plain values (bool, int, float, str) can be recorded as "
                         f"example inputs, not {type(value).__name__}")


def _make(desc: dict, gen: torch.Generator):
    if "value" in desc:
        return desc["value"]
    dtype = DTYPES[desc["dtype"]]
    if dtype.is_floating_point:
        return torch.randn(desc["shape"], generator=gen).to(dtype)
    return torch.ones(desc["shape"], dtype=dtype)


def parse_shape(text: str) -> tuple[int, ...]:
    """"1,3,224,224" (or "1x3x224x224") -> (1, 3, 224, 224)."""
    try:
        shape = tuple(int(p) for p in text.replace("x", ",").split(",") if p.strip())
    except ValueError:
        shape = ()
    if not shape or any(s <= 0 for s in shape):
        raise ModelSpecError(f"input shape {text!r}: write positive sizes separated by commas, e.g. 1,3,224,224")
    return shape


def is_hf(model: nn.Module) -> bool:
    """A transformers model (its class, or the class a parametrization wrapped)."""
    return any(c.__module__.startswith("transformers.") for c in type(model).__mro__)


def default_inputs(model: nn.Module, shape: tuple[int, ...] | None = None, dtype: str | None = None) -> InputSpec:
    """Example inputs when none are given. Hugging Face: token ids of shape 1x16 (pixel values
    1 x num_channels x image_size^2 for vision configs), with ``use_cache=False`` where the model
    has a cache. Otherwise the first Conv/Linear/Embedding layer decides: 1xCx224x224 for Conv2d
    (1xCx224 for Conv1d, 1xCx16x112x112 for Conv3d), 1 x in_features for Linear, 1x16 token ids
    for Embedding. ``shape``/``dtype`` override the guess."""
    kwargs = {}
    guess, guess_dtype = None, "float32"
    config = getattr(model, "config", None)
    if is_hf(model) and config is not None:
        if getattr(config, "use_cache", None) is not None:
            kwargs["use_cache"] = {"value": False}
        if hasattr(config, "image_size") and hasattr(config, "num_channels"):
            size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
            guess = (1, config.num_channels, size, size)
        else:
            guess, guess_dtype = HF_TEXT_SHAPE, "int64"
    else:
        for module in model.modules():
            if isinstance(module, nn.modules.conv._ConvNd):
                spatial = {1: (224,), 2: (224, 224), 3: (16, 112, 112)}[len(module.kernel_size)]
                guess = (1, module.in_channels, *spatial)
                break
            if isinstance(module, nn.Linear):
                guess = (1, module.in_features)
                break
            if isinstance(module, nn.Embedding):
                guess, guess_dtype = HF_TEXT_SHAPE, "int64"
                break
    shape = shape or guess
    if shape is None:
        raise ModelSpecError(f"cannot guess an input shape for {type(model).__name__}: pass --input-shape, "
                             "e.g. 1,3,224,224")
    dtype = dtype or guess_dtype  # a text model's ids stay integers whatever their shape
    if dtype not in DTYPES:
        raise ModelSpecError(f"input dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    _check_size(shape, dtype)
    return InputSpec([{"shape": list(shape), "dtype": dtype}], kwargs)


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _check_size(shape: tuple[int, ...], dtype: str) -> None:
    """Refuse an example input that alone would fill half the machine's memory (the activations
    need many times more): an error now instead of an allocation failure or the OOM killer."""
    nbytes = math.prod(shape) * torch.empty((), dtype=DTYPES[dtype]).element_size()
    memory = _memory_bytes()
    if memory and nbytes > memory // 2:
        raise ModelSpecError(f"input shape {'x'.join(map(str, shape))} {dtype} needs {nbytes / 1e9:,.1f} GB for the "
                             f"input alone, and this machine has {memory / 1e9:,.1f} GB of memory: pass a smaller "
                             "--input-shape (a batch of 1 finds the same groups)")
