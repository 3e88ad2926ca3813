"""PEFT: LoRA and D-Gating do not train together (LoRA freezes the gate factors, its update bypasses
the gates, merging it into a gated layer drops it). Every dg entry point refuses the combination
with the two orders that work, and the orders work."""
import warnings

import pytest
import torch

import dgating_surgery as dg
from models import MLP

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")
RECIPE = {"D": 3, "groups": [{"kind": "neurons"}]}
LORA = dict(target_modules=r"fc[12]", r=2)  # a regex: the layers, not dgates.fc1
ORDER = r"merge the adapters first .*merge_and_unload\(\).* then dg.gate_model; or train D-Gating, dg.shrink, and add LoRA"


def lora_on(model):
    wrapped = peft.get_peft_model(model, peft.LoraConfig(**LORA))
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_()  # an adapter that changes the function
    return wrapped


def test_lora_on_a_gated_model_is_refused_by_every_dg_function():
    x = torch.randn(4, 10)
    torch.manual_seed(0)
    gated = dg.gate_model(MLP(), RECIPE, x)
    wrapped = lora_on(gated)
    factors = [p for name, p in gated.named_parameters() if name.endswith("factors")]
    assert len(factors) == 2 and not any(p.requires_grad for p in factors)  # why: PEFT froze the gates
    calls = {"param_groups": lambda: dg.param_groups(wrapped, 0.01), "penalty": lambda: dg.penalty(wrapped),
             "sparsity": lambda: dg.sparsity(wrapped), "track": lambda: dg.track(wrapped),
             "shrink": lambda: dg.shrink(wrapped), "check_optimizer": lambda: dg.check_optimizer(
                 wrapped, torch.optim.SGD(wrapped.parameters(), lr=0.1))}
    for name, call in calls.items():
        with pytest.raises(dg.WrapperError, match=rf"it is a PEFT PeftModel \(adapters on a gated model\)\. LoRA and "
                                                  rf"D-Gating do not train together.*{ORDER}"):
            call()
    # LoRA layers injected into the gated model itself (no PeftModel around it)
    torch.manual_seed(0)
    injected = peft.inject_adapter_in_model(peft.LoraConfig(**LORA), dg.gate_model(MLP(), RECIPE, x))
    with pytest.raises(dg.WrapperError, match=r"'fc1' is a PEFT Linear\. LoRA and D-Gating do not train together"):
        dg.param_groups(injected)


def test_merging_lora_into_a_gated_model_is_caught_by_the_frozen_gates():
    """PEFT's merge writes into a computed weight and the adapter is lost; the factors it froze
    stay frozen, which check_optimizer and shrink report."""
    x = torch.randn(4, 10)
    torch.manual_seed(0)
    gated = dg.gate_model(MLP(), RECIPE, x)
    merged = lora_on(gated).merge_and_unload()
    assert merged is gated
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        problems = dg.check_optimizer(merged, torch.optim.SGD(dg.param_groups(merged, 0.01), lr=0.1))
        dg.shrink(merged)
    texts = [str(w.message) for w in caught]
    assert any(p.startswith("The factors of 2 of 2 gates are frozen (requires_grad=False") for p in problems)
    assert any(t.startswith("dg.shrink: the factors of 2 of 2 gates are frozen") and "silently dropped" in t
               for t in texts)
    assert all(w.filename == __file__ for w in caught if "frozen" in str(w.message))


def test_the_orders_that_work():
    x = torch.randn(4, 10)
    # 1. adapters merged first, then gated: the function is the adapted one
    torch.manual_seed(0)
    adapted = lora_on(MLP())
    expected = adapted(x).detach()
    with pytest.raises(dg.GatingError, match=rf"gate_model: it is a PEFT PeftModel \(adapters on the model\).*{ORDER}"):
        dg.gate_model(adapted, RECIPE, x)
    gated = dg.gate_model(adapted.merge_and_unload(), RECIPE, x)
    torch.testing.assert_close(gated(x), expected)
    assert all(g.factors.requires_grad for g in dg.gates(gated))
    # 2. D-Gating, cut, then LoRA on the slim model (no gates left to freeze or bypass)
    dg.kill_random_groups(gated, 0.5)
    slim = dg.shrink(gated, example_inputs=x)
    tuned = lora_on(slim)
    assert tuned.base_model.model.fc1.base_layer.out_features == 10
    trainable = {n for n, p in tuned.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
