"""Hugging Face transformers: its layers' attributes after a cut.

After attention heads are cut, the forward of each attention class reads a few attributes that
must agree with the projections' new widths; they are re-derived here from the module's own
tensors, one row per class. A class is registered once its modeling module has been imported
(``refresh``), so that this plugin imports no model code itself.
"""
from __future__ import annotations

import sys

import torch
from transformers.pytorch_utils import Conv1D

from ..fixers import MODEL_FIXERS, MODULE_FIXERS, fix_attributes, register_model_fixer, register_module_fixer
from ..rules import register_rms_norm
from ..shrink import set_cut_attributes
from ..tensors import owner, replace_tensor


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


RMS_NORMS = {(f"transformers.models.{name}.modeling_{name}", f"{prefix}RMSNorm"): "variance_epsilon"
             for name, prefix in (("llama", "Llama"), ("qwen2", "Qwen2"), ("mistral", "Mistral"), ("qwen3", "Qwen3"))}


def refresh() -> None:
    """Register the fixers (and RMS norms) of the model classes whose modules are imported by now."""
    for (module, name), eps in RMS_NORMS.items():
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None:
            register_rms_norm(cls, eps)
    if "transformers.modeling_utils" in sys.modules:
        _register_model_fixer()
        install_loader()
    for (module, name), fix in ATTRIBUTE_FIXERS.items():
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and cls not in MODULE_FIXERS:
            register_module_fixer(cls, fix)


register_module_fixer(Conv1D, _conv1d)


# -- save_pretrained / from_pretrained of a slim model ----------------------------------------------
# Per-layer widths differ after D-Gating, which a Hugging Face config cannot express. The config of a
# slim model carries them (``config.dgating_surgery``: the shape of every tensor a cut changed, and the
# layer attributes no tensor shows); with dgating_surgery imported, from_pretrained gives the freshly
# built (meta-device) model those shapes before it loads the weights. Without dgating_surgery the
# weights do not fit and transformers refuses to load them.
CONFIG_KEY = "dgating_surgery"


def _record_widths(model) -> None:
    """Model-level fixer: write the slim widths into the config (``save_pretrained`` saves them)."""
    with torch.device("meta"):
        default = type(model)(type(model.config).from_dict({k: v for k, v in model.config.to_dict().items()
                                                            if k != CONFIG_KEY}))
    full = default.state_dict()
    shapes = {k: list(v.shape) for k, v in model.state_dict().items() if k in full and full[k].shape != v.shape}
    attributes = dict(getattr(model, "cut_attributes", {}))
    if shapes or attributes:
        setattr(model.config, CONFIG_KEY, {"shapes": shapes, "attributes": attributes})


def restore_widths(model) -> None:
    """Give a model built from a slim config the saved widths (its tensors are still empty)."""
    spec = getattr(model.config, CONFIG_KEY, None)
    if not spec:
        return
    for name, shape in spec.get("shapes", {}).items():
        module, attr = owner(model, name)
        old = getattr(module, attr)
        replace_tensor(module, attr, torch.empty(shape, dtype=old.dtype, device=old.device))
    set_cut_attributes(model, spec.get("attributes", {}))
    fix_attributes(model)


def install_loader() -> None:
    """Wrap ``PreTrainedModel._load_pretrained_model`` (transformers' loader, which from_pretrained
    calls on the model it has just built) so that a slim checkpoint's widths are restored first."""
    from transformers.modeling_utils import PreTrainedModel
    load = PreTrainedModel._load_pretrained_model
    if getattr(load, "_dgating_surgery", False):
        return

    def load_slim_aware(model, *args, **kwargs):
        restore_widths(model)
        return load(model, *args, **kwargs)
    load_slim_aware._dgating_surgery = True
    PreTrainedModel._load_pretrained_model = staticmethod(load_slim_aware)


def _register_model_fixer() -> None:
    from transformers.modeling_utils import PreTrainedModel
    if PreTrainedModel not in MODEL_FIXERS:
        register_model_fixer(PreTrainedModel, _record_widths)
