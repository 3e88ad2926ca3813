"""Bad input gets a clear error that names the problem and says what to do."""
import copy
import importlib
import re
import signal
import warnings

import pytest
import torch
from torch import nn

import dgating_surgery as dg

import models as M
from test_cli import USERNET, dgate, one_error_line, shell
from test_gate_sides import _llama


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: neither tracer can follow it
            return self.fc(x)
        return -self.fc(x)


def test_untraceable_model_names_module_and_both_reasons():
    with pytest.raises(dg.TraceError) as err:
        dg.gate_model(Untraceable(), "mlp", torch.randn(2, 4))
    assert re.fullmatch(r"could not capture Untraceable as a graph: its forward branches on a tensor's value at "
                        r".*test_errors\.py:\d+ in forward \(`if x\.sum\(\) > 0: .*`\), which neither "
                        r"torch\.fx\.symbolic_trace nor torch\.export can follow\. Make that code independent of "
                        r"tensor values \(e\.g\. torch\.where instead of if\), or gate a submodule that does not "
                        r"contain it", str(err.value))


def test_wrong_input_shape_names_the_layer():
    with pytest.raises(dg.TraceError) as err:
        dg.gate_model(M.MLP(), "mlp", torch.randn(2, 7))
    msg = str(err.value)
    assert "layer 'fc1' (Linear)" in msg and "example_inputs" in msg


def test_missing_example_inputs():
    with pytest.raises(dg.TraceError, match="needs example_inputs"):
        dg.gate_model(M.MLP(), "mlp")


def test_recipe_matching_nothing_names_entry_and_alternatives():
    recipe = {"D": 3, "groups": [{"kind": "neurons", "names": ["decoder.*"]}]}
    with pytest.raises(dg.GatingError) as err:
        dg.gate_model(M.MLP(), recipe, torch.randn(2, 10))
    msg = str(err.value)
    assert "groups[0]" in msg and "decoder.*" in msg and "fc1" in msg and "dgate inspect" in msg


def test_recipe_without_any_match():
    with pytest.raises(dg.GatingError, match="has no exactly removable channels"):
        dg.gate_model(M.MLP(), {"D": 3, "groups": ["channels"]}, torch.randn(2, 10))


def test_unknown_kind():
    with pytest.raises(dg.RecipeError) as err:
        dg.gate_model(M.MLP(), {"D": 3, "groups": [{"kind": "filters"}]}, torch.randn(2, 10))
    assert "groups[0].kind" in str(err.value) and "channels, neurons, heads, query_heads, hidden, features, blocks" in str(err.value)


def test_already_gated_and_not_gated():
    x = torch.randn(2, 10)
    gated = dg.gate_model(M.MLP(), "mlp", x)
    with pytest.raises(dg.GatingError, match="already gated"):
        dg.gate_model(gated, "mlp", x)
    with pytest.raises(dg.NotGatedError, match="not gated"):
        dg.shrink(M.MLP())


def test_a_recipe_entry_that_matches_nothing_warns_at_the_users_line():
    recipe = {"D": 3, "groups": [{"kind": "channels"}, {"kind": "neurons"}]}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dg.gate_model(M.Residual(), recipe, torch.randn(2, 3, 8, 8))  # its one Linear is the output
    found = [w for w in caught if "matched nothing" in str(w.message)]
    assert len(found) == 1 and found[0].filename == __file__, [(w.filename, str(w.message)) for w in caught]


def test_verification_catches_a_cut_that_changes_the_function():
    x = torch.randn(4, 10)
    gated = dg.gate_model(M.MLP(), "mlp", x)
    with pytest.raises(dg.ShrinkError, match="differs from the gated model"):
        dg.shrink(gated, threshold=1.0, example_inputs=x)  # kills live neurons


def test_a_failed_verification_leaves_the_model_gated_and_a_retry_works():
    x = torch.randn(4, 10)
    gated = dg.gate_model(M.MLP(), "mlp", x)
    with torch.no_grad():
        dg.gates(gated)[0].factors[0, :3] = 0
    before = gated(x)
    state = {k: v.clone() for k, v in gated.state_dict().items() if isinstance(v, torch.Tensor)}
    with pytest.raises(dg.ShrinkError, match="the cut was undone and the model is still gated"):
        dg.shrink(gated, threshold=1.0, example_inputs=x)
    assert len(dg.gates(gated)) == 2 and gated.fc1.out_features == 20
    assert torch.equal(gated(x), before)
    assert all(torch.equal(v, state[k]) for k, v in gated.state_dict().items() if isinstance(v, torch.Tensor))
    slim = dg.shrink(gated, example_inputs=x)  # the exact cut still works afterwards
    assert slim.fc1.out_features == 17 and dg.max_rel_diff(before, slim(x)) < 1e-6


def test_shrink_verifies_on_the_inputs_gate_model_was_given():
    x = torch.randn(4, 10)
    gated = dg.gate_model(M.MLP(), "mlp", x)
    before = gated(x)
    with pytest.raises(dg.ShrinkError, match="differs from the gated model"):
        dg.shrink(gated, threshold=1.0)  # kills live neurons; no example inputs given to shrink
    assert len(dg.gates(gated)) == 2 and torch.equal(gated(x), before)
    slim = dg.shrink(gated, threshold=1.0, verify=False)  # the user's explicit choice
    assert slim.fc1.out_features < 20 and not hasattr(slim, "dgates")


def _resnet():
    torchvision = pytest.importorskip("torchvision")
    return dg.expose_weights(torchvision.models.resnet18(num_classes=10)), (torch.randn(2, 3, 32, 32),), {}, "default"


@pytest.mark.parametrize("make", [_resnet, _llama], ids=["torchvision resnet18", "transformers llama"])
def test_shrink_verifies_real_architectures_on_the_kept_inputs(make):
    """Positional inputs (a CNN) and keyword inputs (a decoder with use_cache=False) kept by
    gate_model: an exact cut passes the check, a cut of live groups is undone."""
    model, args, kwargs, recipe = make()
    gated = dg.gate_model(model.eval(), recipe, args, kwargs)
    dg.kill_random_groups(gated, 0.3, seed=0)
    with pytest.raises(dg.ShrinkError, match="differs from the gated model"):
        dg.shrink(copy.deepcopy(gated), threshold=1e9)  # every group but the strongest of each gate is live
    before = dg.model_params(gated)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        slim = dg.shrink(gated)
    assert not [w for w in caught if "not verified" in str(w.message)]  # the kept inputs ran
    assert dg.model_params(slim) < before


class SizeAsLiteral(nn.Module):
    """``view(p.size())`` ties the layer's outputs to p's features, but torch.export (which captures
    it: symbolic_trace fails on the Python ``if``) writes the size as numbers, so the engine cannot
    see the tie: cutting an input feature leaves the view a size the slim model's tensor lacks."""

    def __init__(self):
        super().__init__()
        self.f, self.head = nn.Linear(3, 3), nn.Conv1d(3, 4, 1)

    def forward(self, x):
        p = x.mean(2, keepdim=True)
        h = self.f(p.flatten(1)).view(p.size())
        if h.dim() == 3:
            h = h * 2
        return self.head(h).mean(2)


def test_shrink_without_example_inputs_refuses_a_slim_model_that_does_not_run():
    x = torch.randn(2, 3, 5)
    gated = dg.gate_model(SizeAsLiteral(), {"D": 3, "groups": [{"kind": "features"}]}, x)
    with torch.no_grad():
        dg.gates(gated)[0].factors[0, 1] = 0
    before = gated(x)
    with pytest.raises(dg.ShrinkError, match=r"does not run on the example inputs: the forward of SizeAsLiteral itself fails: a size its "
                                              r"forward uses did not follow the cut of 'x' \(features\) \(RuntimeError: shape"):
        dg.shrink(gated)
    assert torch.equal(gated(x), before) and gated.f.in_features == 3


def test_shrink_skips_kept_inputs_the_model_no_longer_runs_on_and_says_so():
    x = torch.randn(4, 10)
    gated = dg.gate_model(M.MLP(), "mlp", x).double()  # the kept inputs are float32
    with torch.no_grad():
        dg.gates(gated)[0].factors[0, :3] = 0
    before = gated(x.double())
    with pytest.warns(UserWarning, match=r"not verified on the example inputs dg.gate_model was given: the gated "
                                         r"model does not run on them now \(RuntimeError: .*Pass example_inputs"):
        slim = dg.shrink(gated)
    assert slim.fc1.out_features == 17 and dg.max_rel_diff(before, slim(x.double())) < 1e-12


def test_tolerance_follows_the_output_dtype():
    x = torch.randn(64, 10)
    model = M.MLP(hidden=(64, 64)).to(torch.bfloat16)
    gated = dg.gate_model(model, "mlp", x.to(torch.bfloat16))
    with torch.no_grad():
        for gate in dg.gates(gated):
            gate.factors[0, ::3] = 0
    reference = gated(x.to(torch.bfloat16))
    from dgating_surgery.engine.execution import tolerance
    assert tolerance(reference) == 4 * torch.finfo(torch.bfloat16).eps  # a bfloat16 model rounds every layer
    assert tolerance(torch.randn(3)) == 1e-4
    slim = dg.shrink(gated, example_inputs=x.to(torch.bfloat16))
    assert dg.output_diff(reference, slim(x.to(torch.bfloat16))) <= tolerance(reference)


def test_shrink_of_a_model_on_the_meta_device():
    gated = dg.gate_model(M.MLP(), "mlp", torch.randn(2, 10)).to("meta")
    with pytest.raises(dg.ShrinkError, match=r"meta device .*to_empty"):
        dg.shrink(gated)


# -- issue 11, item 7: one `Error:` line where there was a traceback --------------------------------


@pytest.fixture
def userdir(tmp_path):
    """A user's directory: a module with a model, a factory that raises and one on the meta device."""
    (tmp_path / "usernet.py").write_text(USERNET)
    return tmp_path


def test_factory_that_raises_shows_its_message_and_where(userdir):
    line = one_error_line(shell("inspect", "usernet:broken", cwd=userdir))
    assert "factory 'usernet:broken' raised ValueError: num_classes must be set" in line
    assert "usernet.py:17 in broken" in line


def test_factory_given_as_a_file(userdir):
    done = shell("convert", "./usernet.py:Net", "-r", "mlp", "-o", "gated.safetensors", cwd=userdir)
    assert done.returncode == 0, done.stderr
    # the manifest names the file relative to the checkpoint: it loads from any directory
    assert dg.read_manifest(userdir / "gated.safetensors")["model"]["spec"] == "usernet.py:Net"
    model = dg.load_gated(userdir / "gated.safetensors", trust_code=True)  # code in a file: the caller's opt-in
    assert type(model).__name__ == "Net" and len(dg.gates(model)) == 1
    line = one_error_line(shell("inspect", "./nowhere.py:Net", cwd=userdir))
    assert "file 'nowhere.py' not found" in line


def test_huge_input_shape_is_refused_before_allocating(userdir):
    line = one_error_line(shell("inspect", "usernet:Net", "--input-shape", "1000000,4000000", cwd=userdir))
    assert "needs 16,000.0 GB for the input alone" in line and "--input-shape" in line


def test_out_of_memory_anywhere_is_one_line(monkeypatch):
    gates = importlib.import_module("dgating_surgery.engine.gates")  # the module: dg.gates is the function

    def exhausted(*args, **kwargs):
        raise getattr(torch, "OutOfMemoryError", RuntimeError)(
            "DefaultCPUAllocator: can't allocate memory: you tried to allocate 60211200000 bytes.")
    monkeypatch.setattr(gates, "analyze", exhausted)
    result = dgate("inspect", "models:MLP", ok=False)
    assert result.exit_code == 1 and "Error: out of memory" in result.stderr and "--input-shape" in result.stderr


def test_meta_device_model(userdir):
    line = one_error_line(shell("inspect", "usernet:on_meta", cwd=userdir))
    assert "meta device" in line and "to_empty" in line
    with torch.device("meta"):
        model = M.MLP()
    x = torch.randn(2, 10)
    with pytest.raises(dg.TraceError, match=r"meta device \('fc1.weight' and 5 more\).*to_empty"):
        dg.gate_model(model, "mlp", x)
    with pytest.raises(dg.TraceError, match="example inputs .* are on the meta device"):
        dg.gate_model(M.MLP(), "mlp", torch.empty(2, 10, device="meta"))
    model.to_empty(device="cpu")  # the fix the message names
    model.load_state_dict(M.MLP().state_dict())
    assert len(dg.gates(dg.gate_model(model, "mlp", x))) == 2


def test_wrong_input_shape_is_one_line_without_torch_logs(userdir):
    """The real message was buried under 30-70 lines of torch's fake-tensor log."""
    line = one_error_line(shell("inspect", "usernet:Net", "--input-shape", "2,5", cwd=userdir))
    assert "layer 'fc1' (Linear)" in line and "mat1 and mat2 shapes cannot be multiplied" in line


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs POSIX file-size limits")
def test_full_disk_is_one_line_and_leaves_nothing(userdir):
    import resource

    def small_disk():  # the child may write 4 KB per file: like a disk that fills up
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    done = shell("convert", "usernet:Net", "-r", "mlp", "--input-shape", "1,4", "-o", "gated.safetensors", cwd=userdir)
    assert done.returncode == 0  # fits
    big = shell("convert", "models:Residual", "-r", "resnet", "--input-shape", "1,3,16,16", "-o", "big.safetensors",
                cwd=userdir, preexec_fn=small_disk)
    line = one_error_line(big)
    assert "cannot write big.safetensors: File too large (is the disk full?); nothing was written" in line
    assert sorted(p.name for p in userdir.iterdir() if p.name != "__pycache__") == ["gated.safetensors", "usernet.py"]
