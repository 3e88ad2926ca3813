"""`dgate` from a shell: every command through click's runner and the console script in a real
subprocess; the figures printed are those of the Python API; bad input is one clear error line,
a non-zero exit, no traceback and no file written."""
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from rich.console import Console

import dgating_surgery as dg
from dgating_surgery.cli import main
from dgating_surgery.demo import run_demo
from dgating_surgery.models import InputSpec

import models as M
from test_checkpoint import kill, run

TESTS = Path(__file__).resolve().parent
CNN = ["models:Residual", "--input-shape", "2,3,16,16"]


def dgate(*args, ok=True):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert "Traceback" not in result.output
    if ok:
        assert result.exit_code == 0, result.output
    return result


def shell(*args, cwd=None):
    """The installed console script, as a user runs it."""
    script = Path(sys.executable).with_name("dgate")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([str(script), *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=300)


def trained_gated(tmp_path):
    """convert -> load in Python -> a few SGD steps -> kill some groups (as long training would) -> save."""
    path = tmp_path / "gated.safetensors"
    dgate("convert", *CNN, "--recipe", "resnet", "-o", path)
    model = dg.load_gated(path)
    x = torch.randn(4, 3, 16, 16)
    opt = torch.optim.SGD(dg.param_groups(model, lam=1e-2), lr=0.05, momentum=0.9)
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 3])).backward()
        opt.step()
    dg.save_gated(kill(model, 0.5), path)
    return path


def test_inspect_matches_analyze():
    result = dgate("inspect", *CNN, "--recipe", "resnet", "--json")
    data = json.loads(result.stdout)
    x = torch.randn(2, 3, 16, 16)
    plan = dg.analyze(M.Residual(), x)
    assert [(s["name"], s["groups"], s["removable"]) for s in data["sets"]] == [
        (s.name, len(s.reasons), int(s.removable.sum())) for s in plan.sets]
    gated = dg.gate_model(M.Residual(), "resnet", x)
    assert data["gated_sets"] == len(dg.gates(gated))
    assert data["gated_groups"] == sum(g.num_groups for g in dg.gates(gated))
    assert data["params_total"] == dg.model_params(M.Residual())
    head = next(s for s in data["sets"] if s["name"] == "head")
    assert not head["gated"] and "reaches the model output" in head["not_removable"][0]["reason"]
    text = dgate("inspect", *CNN, "--recipe", "resnet").stdout
    assert "why not removable" in text and f"{data['params_covered']:,} of {data['params_total']:,}" in text


def test_convert_train_report_shrink_load(tmp_path):
    gated_path = trained_gated(tmp_path)
    assert dg.read_manifest(gated_path)["model"] == {"kind": "factory", "spec": "models:Residual"}
    model = dg.load_gated(gated_path)
    expected = dg.sparsity(model)
    assert expected.dead > 0

    data = json.loads(dgate("report", gated_path, "--json").stdout)
    assert [(r["name"], r["groups"], r["dead"], r["params_removable"]) for r in data["gates"]] == [
        (r.name, r.groups, r.dead, r.params_removable) for r in expected.rows]
    assert (data["params_total"], data["params_removable"]) == (expected.params_total, expected.params_removable)
    args, _ = InputSpec.from_dict(dg.read_manifest(gated_path)["inputs"]).make()
    assert data["macs_before"] == dg.macs(model, args) > data["macs_after"] > 0
    assert sum(b["count"] for b in data["histogram"]) == expected.groups
    text = dgate("report", gated_path).stdout
    assert f"{expected.params_removable:,} of {expected.params_total:,}" in text and "group norms" in text

    out = tmp_path / "slim.safetensors"
    data = json.loads(dgate("shrink", gated_path, "-o", out, "--verify", "--json").stdout)
    slim = dg.load_slim(out)
    assert data["params_after"] == dg.model_params(slim) == expected.params_total - expected.params_removable
    assert data["params_before"] == expected.params_total and data["groups_cut"] == expected.dead
    assert data["macs_after"] == dg.macs(slim, args) and data["latency_ms_after"] > 0
    reference = dg.shrink(dg.load_gated(gated_path), example_inputs=args)
    assert torch.equal(run(reference, *args), run(slim, *args))
    assert "parameters" in dgate("shrink", gated_path, "-o", out).stdout  # overwrites in place


def test_shrink_exports_and_features(tmp_path):
    onnx = pytest.importorskip("onnx")
    gated = tmp_path / "mlp.safetensors"
    recipe = tmp_path / "features.yaml"
    recipe.write_text("D: 3\ngroups:\n  - kind: features\n")
    dgate("convert", "models:MLP", "--recipe", recipe, "-o", gated)
    dg.save_gated(kill(dg.load_gated(gated), 0.5), gated)
    out = tmp_path / "slim.safetensors"
    dgate("shrink", gated, "-o", out, "--export", "onnx", "--export", "torch.export")
    slim = dg.load_slim(out)
    x = torch.randn(1, 10)
    assert slim.fc1.in_features == len(slim.kept_input_features["x"]) < 10
    onnx.checker.check_model(onnx.load(tmp_path / "slim.onnx"))
    program = torch.export.load(tmp_path / "slim.pt2")
    (narrow,), _ = dg.select_features(slim, (x,))
    assert torch.allclose(program.module()(narrow), run(slim, x), atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["features.yaml", "mlp.safetensors", "slim.onnx", "slim.pt2",
                                                         "slim.safetensors"]


def test_demo_in_python_removes_neurons_and_keeps_accuracy(tmp_path):
    result = run_demo(tmp_path, console=Console(file=io.StringIO()))
    assert result.neurons_after < 0.5 * result.neurons_before
    assert result.params_after < 0.2 * result.params_before and result.macs_after < 0.2 * result.macs_before
    assert result.accuracy_after == result.accuracy_before > 0.95
    assert dg.report.model_params(dg.load_slim(result.checkpoint)) == result.params_after
    assert result.seconds < 120


def test_console_script_demo_and_errors(tmp_path):
    done = shell("demo", "--out", tmp_path)
    assert done.returncode == 0, done.stderr
    assert "before" in done.stdout and "test accuracy" in done.stdout and "outputs identical" in done.stdout
    assert (tmp_path / "digits_slim.safetensors").is_file()
    torch.save(M.MLP(), tmp_path / "model.pt")
    done = shell("inspect", tmp_path / "model.pt")
    assert done.returncode == 1 and "--allow-pickle" in done.stderr and "Traceback" not in done.stderr
    done = shell("inspect", "model.pt", "--allow-pickle", "--json", cwd=tmp_path)
    assert done.returncode == 0 and json.loads(done.stdout)["gated_groups"] == 20 + 15
    done = subprocess.run([sys.executable, "-m", "dgating_surgery.cli", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "demo" in done.stdout


# -- bad input -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    (root / "syntax.yaml").write_text("D: 3\ngroups:\n\t- kind: channels\n")
    (root / "unknown.yaml").write_text("D: 3\ngroups:\n  - kind: neurons\n    modulez: [Linear]\n")
    (root / "nothing.yaml").write_text("D: 3\ngroups:\n  - kind: channels\n")
    gated = root / "gated.safetensors"
    dgate("convert", "models:MLP", "-r", "mlp", "-o", gated)
    data = gated.read_bytes()
    (root / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    dgate("shrink", gated, "-o", root / "slim.safetensors")
    torch.save(M.MLP(), root / "model.pt")
    return root


@pytest.mark.parametrize("args, message", [
    (["inspect", "missing.pt"], "no such file or directory"),
    (["convert", "models:MLP", "-r", "{root}/syntax.yaml", "-o", "{root}/out.safetensors"],
     "YAML syntax error at line 3"),
    (["convert", "models:MLP", "-r", "{root}/unknown.yaml", "-o", "{root}/out.safetensors"],
     "field 'groups[0].modulez': unknown field"),
    (["convert", "models:MLP", "-r", "{root}/nothing.yaml", "-o", "{root}/out.safetensors"],
     "matched nothing in MLP"),
    (["inspect", "models:MLP", "-r", "{root}/nothing.yaml"], "matched nothing in MLP"),
    (["convert", "{root}/model.pt", "-o", "{root}/out.safetensors"], "pass --allow-pickle"),
    (["report", "{root}/truncated.safetensors"], "truncated or corrupt"),
    (["shrink", "{root}/truncated.safetensors", "-o", "{root}/out.safetensors"], "truncated or corrupt"),
    (["report", "{root}/gated.safetensors", "--model", "models:Residual"], "gated.safetensors: gating a fresh"),
    (["report", "{root}/slim.safetensors"], "is a slim checkpoint, not a gated one"),
    (["convert", "models:MLP", "-o", "{root}/missing/out.safetensors"], "directory '{root}/missing' does not exist"),
    (["shrink", "{root}/gated.safetensors", "-o", "{root}/missing/out.safetensors"], "does not exist"),
    (["inspect", "models:MLP", "--input-shape", "1,a"], "write positive sizes"),
    (["inspect", "models:Nope"], "module 'models' has no attribute 'Nope'"),
    (["report", "{root}/none.safetensors"], "checkpoint not found"),
])
def test_bad_input_is_a_clear_error(files, args, message):
    before = sorted(p.name for p in files.iterdir())
    result = dgate(*[a.format(root=files) for a in args], ok=False)
    assert result.exit_code == 1, result.output
    assert "Error: " in result.stderr and message.format(root=files) in result.stderr, result.stderr
    assert sorted(p.name for p in files.iterdir()) == before  # nothing written, no temporary left


def test_usage_errors_exit_2():
    assert dgate("inspect", "models:MLP", "--arg", "oops", ok=False).exit_code == 2
    assert dgate("shrink", "x.safetensors", ok=False).exit_code == 2  # -o is required
