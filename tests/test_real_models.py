"""The invariant beyond torchvision: timm (symbolic tracing through timm's own layers) and Hugging
Face transformers (torch.export), where the exactly removable groups are the MLP neurons."""
import pytest
import torch

from conftest import assert_exact_cut
from dgating_surgery.engine.tracing import capture

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0", "vit_tiny_patch16_224", "convnext_atto"])
def test_timm(name):
    model = timm.create_model(name, pretrained=False)
    assert_exact_cut(model, torch.randn(1, 3, 224, 224), "default", min_groups=100)


def _tiny(config_cls, model_cls, **extra):
    config = config_cls(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                        vocab_size=100, **extra)
    return model_cls(config)


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_transformers_mlp_neurons(kind):
    T = transformers
    ids = torch.randint(0, 100, (1, 12))
    kwargs = {}
    if kind == "bert":
        model = _tiny(T.BertConfig, T.BertModel)
    elif kind == "gpt2":
        model = T.GPT2LMHeadModel(T.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_inner=128, vocab_size=100))
        kwargs = {"use_cache": False}
    else:
        model = _tiny(T.LlamaConfig, T.LlamaForCausalLM, num_key_value_heads=2)
        kwargs = {"use_cache": False}
    assert capture(model.eval(), (ids,), kwargs).frontend == "export"
    check = assert_exact_cut(model, (ids,), "default", example_kwargs=kwargs, min_groups=2 * 128)
    assert type(model).__name__ in ("BertModel", "GPT2LMHeadModel", "LlamaForCausalLM")
    assert check.groups_cut > 0
