"""Hugging Face transformers: its layers' attributes after a cut.

After attention heads are cut, the forward of each attention class reads a few attributes that
must agree with the projections' new widths; they are re-derived here from the module's own
tensors, one row per class. A class is registered once its modeling module has been imported
(``refresh``), so that this plugin imports no model code itself.
"""
from __future__ import annotations

import sys

from transformers.pytorch_utils import Conv1D

from ..fixers import MODULE_FIXERS, register_module_fixer


def _conv1d(m: Conv1D) -> None:
    """GPT-2's Conv1D stores its weight (in, out) and keeps both sizes as nx, nf."""
    m.nx, m.nf = m.weight.shape


def _rows(layer) -> int:
    """Output width of a projection (a Linear, or a Conv1D stored (in, out))."""
    return layer.weight.shape[1] if isinstance(layer, Conv1D) else layer.weight.shape[0]


def _bert(m) -> None:
    m.num_attention_heads = _rows(m.query) // m.attention_head_size
    m.all_head_size = m.num_attention_heads * m.attention_head_size


def _vit(m) -> None:
    m.num_attention_heads = _rows(m.q_proj) // m.head_dim


def _grouped_query(m) -> None:
    """Llama-style attention: key/value heads serve ``num_key_value_groups`` query heads each."""
    m.num_key_value_groups = _rows(m.q_proj) // _rows(m.k_proj)


def _gpt2(m) -> None:
    if getattr(m, "is_cross_attention", False):
        return
    m.num_heads = m.c_proj.weight.shape[0] // m.head_dim  # c_proj reads the heads as its input rows
    m.split_size = m.num_heads * m.head_dim


def _t5(m) -> None:
    m.n_heads = _rows(m.q) // m.key_value_proj_dim
    m.inner_dim = m.n_heads * m.key_value_proj_dim


def _gated_mlp(m) -> None:
    m.intermediate_size = _rows(m.gate_proj)


# (modeling module, class) -> fixer
ATTRIBUTE_FIXERS = {
    ("transformers.models.bert.modeling_bert", "BertSelfAttention"): _bert,
    ("transformers.models.vit.modeling_vit", "ViTAttention"): _vit,
    ("transformers.models.gpt2.modeling_gpt2", "GPT2Attention"): _gpt2,
    ("transformers.models.t5.modeling_t5", "T5Attention"): _t5,
    **{(f"transformers.models.{name}.modeling_{name}", f"{prefix}Attention"): _grouped_query
       for name, prefix in (("llama", "Llama"), ("qwen2", "Qwen2"), ("mistral", "Mistral"), ("qwen3", "Qwen3"))},
    **{(f"transformers.models.{name}.modeling_{name}", f"{prefix}MLP"): _gated_mlp
       for name, prefix in (("llama", "Llama"), ("qwen2", "Qwen2"), ("mistral", "Mistral"), ("qwen3", "Qwen3"))},
}


def refresh() -> None:
    """Register the fixers of the model classes whose modules are imported by now."""
    for (module, name), fix in ATTRIBUTE_FIXERS.items():
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and cls not in MODULE_FIXERS:
            register_module_fixer(cls, fix)


register_module_fixer(Conv1D, _conv1d)
