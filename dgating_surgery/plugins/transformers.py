"""Hugging Face transformers: its layers' shape attributes after a cut."""
from __future__ import annotations

from transformers.pytorch_utils import Conv1D

from ..fixers import register_module_fixer


def _conv1d(m: Conv1D) -> None:
    """GPT-2's Conv1D stores its weight (in, out) and keeps both sizes as nx, nf."""
    m.nx, m.nf = m.weight.shape


register_module_fixer(Conv1D, _conv1d)
