"""Models as users train them, in one process: torch.compile and DataParallel wrappers, what
gate_model refuses (wrapped models, existing parametrizations), a clear error for an ungated
state_dict, SyncBatchNorm on a gated model. DDP and FSDP2 with two processes: test_distributed.py."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dgating_surgery as dg
from dgating_surgery.training.regularizer import gated_parameters
from models import MLP, Residual

pytestmark = pytest.mark.usefixtures("one_thread")
RECIPE = {"D": 3, "groups": [{"kind": "neurons"}]}


def gated_mlp():
    torch.manual_seed(0)
    return dg.gate_model(MLP(), RECIPE, torch.randn(4, 10))


def compiled(model):
    return torch.compile(model, backend="eager")  # dynamo's capture without a compiler: fast on CPU


WRAPPERS = {"compile": compiled, "DataParallel": nn.DataParallel,
            "DataParallel(compile)": lambda m: nn.DataParallel(compiled(m))}


@pytest.mark.parametrize("wrap", list(WRAPPERS))
def test_dg_functions_see_through_wrappers(wrap):
    model = gated_mlp()
    wrapped = WRAPPERS[wrap](model)
    assert dg.unwrap(wrapped) is model
    assert [id(p) for g in dg.param_groups(wrapped, 0.01) for p in g["params"]] == \
        [id(p) for g in dg.param_groups(model, 0.01) for p in g["params"]]
    assert torch.equal(dg.penalty(wrapped, 0.01), dg.penalty(model, 0.01))
    assert str(dg.sparsity(wrapped)) == str(dg.sparsity(model))
    assert [g.name for g in dg.gates(wrapped)] == ["fc1", "fc2"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = torch.optim.SGD(dg.param_groups(wrapped, 0.01), lr=0.1)
        assert dg.check_optimizer(wrapped, opt) == []
        entry = dg.track(wrapped, optimizer=opt).step(0)
    assert entry["groups"] == {"neurons": 35}


def test_compiled_training_equals_eager_and_has_no_graph_break():
    X, y = torch.randn(32, 10), torch.randint(0, 5, (32,))
    eager, model = gated_mlp(), gated_mlp()
    explained = torch._dynamo.explain(model)(X)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    runner = compiled(model)
    for net, target in ((eager, eager), (runner, model)):
        opt = torch.optim.SGD(dg.param_groups(net, 0.05), lr=0.1)
        for _ in range(3):
            loss = F.cross_entropy(net(X), y) 
            opt.zero_grad()
            loss.backward()
            opt.step()
    for a, b in zip(dg.gates(eager), dg.gates(runner)):
        assert torch.equal(a.factors, b.factors)
    assert not torch.equal(dg.gates(model)[0].factors, dg.gates(gated_mlp())[0].factors)


def test_save_gated_of_a_compiled_model_loads_back(tmp_path):
    model = gated_mlp()
    with torch.no_grad():
        dg.gates(model)[0].factors.mul_(0.5)
    runner = compiled(model)
    x = torch.randn(4, 10)
    path = dg.save_gated(runner, tmp_path / "g.safetensors", reference="models:MLP", example_inputs=x)
    loaded = dg.load_gated(path, trust_code=True)
    assert sorted(loaded.state_dict()) == sorted(model.state_dict())
    assert not any(k.startswith("_orig_mod.") for k in loaded.state_dict())
    assert torch.equal(loaded(x), model(x))


def test_shrink_of_a_compiled_model_returns_the_cut_module():
    model = gated_mlp()
    x = torch.randn(8, 10)
    dg.kill_random_groups(model, 0.4)
    runner = compiled(model)
    expected = model(x).detach()
    slim = dg.shrink(runner, example_inputs=x)
    assert slim is model and not hasattr(slim, "dgates")
    assert slim.fc1.out_features == 20 - 8 and slim.fc2.out_features == 15 - 6
    torch.testing.assert_close(compiled(slim)(x), expected)


def test_shrink_refuses_a_live_data_parallel_wrapper():
    model = gated_mlp()
    with pytest.raises(dg.ShrinkError, match=r"live DataParallel wrapper: cutting its module in place .* slim = "
                                             r"dg.shrink\(model.module, ...\)"):
        dg.shrink(nn.DataParallel(model))
    assert hasattr(model, "dgates")  # nothing was cut


@pytest.mark.parametrize("wrap", list(WRAPPERS))
def test_gate_model_refuses_a_wrapped_model(wrap):
    with pytest.raises(dg.GatingError, match="gate the plain model first, then wrap it"):
        dg.gate_model(WRAPPERS[wrap](MLP()), RECIPE, torch.randn(4, 10))


def test_gate_model_refuses_existing_parametrizations_and_names_the_way_out():
    from torch.nn.utils import parametrizations, parametrize
    model = MLP()
    parametrizations.weight_norm(model.fc1)
    x = torch.randn(4, 10)
    with pytest.raises(dg.GatingError, match=r"existing parametrizations \('fc1': weight \(_WeightNorm\)\).*"
                                             r"remove_parametrizations\(module, 'weight'\)"):
        dg.gate_model(model, RECIPE, x)
    expected = model(x)
    parametrize.remove_parametrizations(model.fc1, "weight")  # keeps the function
    gated = dg.gate_model(model, RECIPE, x)
    torch.testing.assert_close(gated(x), expected)
    assert [g.num_groups for g in dg.gates(gated)] == [20, 15]

    old_style = MLP()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.nn.utils.weight_norm is deprecated
        torch.nn.utils.weight_norm(old_style.fc2)
    with pytest.raises(dg.GatingError, match=r"'fc2': weight \(WeightNorm hook\).*remove_weight_norm"):
        dg.gate_model(old_style, RECIPE, x)


def test_loading_an_ungated_state_dict_into_a_gated_model_is_a_clear_error():
    pretrained = MLP().state_dict()
    model = gated_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    for strict in (True, False):
        with pytest.raises(dg.CheckpointError, match=r"this state_dict is the ungated model's: it holds 'fc1.bias' "
                                                     r"\(and 3 more gated tensors\).*'fc1.parametrizations.bias.original'"
                                                     r".*Load pretrained weights before gating"):
            model.load_state_dict(pretrained, strict=strict)
    after = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    assert all(torch.equal(before[k], after[k]) for k in before)
    # through a wrapper too (keys with its prefix), and a gated state_dict still loads
    with pytest.raises(dg.CheckpointError, match="ungated model's"):
        nn.DataParallel(model).load_state_dict({f"module.{k}": v for k, v in pretrained.items()})
    other = gated_mlp()
    with torch.no_grad():
        dg.gates(other)[1].factors.mul_(3)
    model.load_state_dict(other.state_dict())
    assert torch.equal(dg.gates(model)[1].factors, dg.gates(other)[1].factors)
    # the order that works: load, then gate
    fresh = MLP()
    fresh.load_state_dict(pretrained)
    x = torch.randn(4, 10)
    reference = MLP()
    reference.load_state_dict(pretrained)
    torch.testing.assert_close(dg.gate_model(fresh, RECIPE, x)(x), reference(x))


def test_convert_sync_batchnorm_on_a_gated_model():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    model = dg.gate_model(Residual(), "default", x).eval()
    expected = model(x)
    ids = {id(p) for p in model.parameters()}
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    converted = dg.convert_sync_batchnorm(model)
    assert converted is model
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in model.modules()) == n_bn > 0
    assert not any(type(m) is nn.BatchNorm2d or isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert {id(p) for p in model.parameters()} == ids  # an optimizer built before keeps working
    assert {id(p) for p in sum(gated_parameters(model), [])} <= ids
    torch.testing.assert_close(model(x), expected)  # eval: SyncBatchNorm is BatchNorm
    dg.kill_random_groups(model, 0.3)
    expected = model(x)
    slim = dg.shrink(model, example_inputs=x)
    bns = [m for m in slim.modules() if isinstance(m, nn.SyncBatchNorm)]
    assert len(bns) == n_bn and type(bns[0]) is nn.SyncBatchNorm
    assert all(m.num_features == m.weight.shape[0] for m in bns)
    assert sum(m.num_features for m in bns) < sum(m.num_features for m in Residual().modules()
                                                  if isinstance(m, nn.BatchNorm2d))
    torch.testing.assert_close(slim(x), expected)
