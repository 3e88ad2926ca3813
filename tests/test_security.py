"""Issue 18: a checkpoint is data, never code. Every attack of the review as a crafted checkpoint
(an honest file whose manifest is rewritten, its checksum computed again as an attacker would),
through every reader of manifests; the payload never runs and the refusal names the opt-in. Honest
checkpoints of each supported library load with no opt-in. Every manifest field is checked, sizes
are bounded before anything is allocated, bfloat16/float16 files round-trip, and writes are safe."""
import json
import os
import stat
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import dgating_surgery as dg
from dgating_surgery.checkpoints import checkpoint, manifest as mf, models as dg_models
from dgating_surgery.cli.common import installed_libraries_first

import models as M
from test_checkpoint import run
from test_cli import dgate, shell

TRUST = "--trust-code (trust_code=True in Python)"
PICKLE = "--allow-pickle (allow_pickle=True in Python)"


def read(path):
    """The tensors (aliases not included) and the manifest of a checkpoint, as stored."""
    with safe_open(str(path), framework="pt") as f:
        manifest = json.loads(f.metadata()[checkpoint.META_KEY])
    return load_file(path), manifest


def craft(source, target, edit, resign=True):
    """``source`` with its manifest edited in place by ``edit``; the checksum computed again
    (``resign``), as anyone who edits a file can."""
    tensors, manifest = read(source)
    edit(manifest)
    if resign:
        manifest["sha256"] = mf.digest(manifest, tensors)
    save_file(tensors, target, metadata={checkpoint.META_KEY: json.dumps(manifest)})
    return Path(target)


@pytest.fixture(scope="module")
def honest(tmp_path_factory):
    """A gated and a slim checkpoint of the tests' MLP, in their own folder inside a parent folder."""
    folder = tmp_path_factory.mktemp("parent") / "ckpt"
    folder.mkdir()
    x = torch.randn(4, 10)
    gated = dg.gate_model(M.MLP(), "mlp", x)
    dg.save_gated(gated, folder / "gated.safetensors", reference="models:MLP", example_inputs=x)
    M.kill(gated)
    kept = dg.kept_groups(gated)
    slim = dg.shrink(gated, example_inputs=x)
    dg.save_slim(slim, folder / "slim.safetensors", reference="models:MLP", example_inputs=x, kept=kept)
    return folder


# -- attacks ---------------------------------------------------------------------------------------
class Payload:
    """Unpickling this touches the marker file: what a malicious pickle does."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path(self.marker).touch, ())


BERT = {"model_type": "bert", "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
        "intermediate_size": 8, "vocab_size": 20}


def _attack_files(folder: Path, marker: Path) -> None:
    """What the attacks name: code beside the checkpoint, above it, a pickle, a model repository
    with remote code."""
    touch = f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n\ndef build():\n    return None\n"
    (folder / "payload.py").write_text(touch)
    (folder.parent / "evil.py").write_text(touch)
    torch.save(Payload(marker), folder / "payload.pt")
    repo = folder / "repo"
    repo.mkdir(exist_ok=True)
    (repo / "config.json").write_text(json.dumps({**BERT, "model_type": "evil", "auto_map": {
        "AutoConfig": "modeling_evil.EvilConfig", "AutoModel": "modeling_evil.EvilModel"}}))
    (repo / "modeling_evil.py").write_text(touch)


# name -> (the manifest's model reference, what the refusal must name, the opt-in it names)
ATTACKS = {
    "os.system": (lambda m: {"kind": "factory", "spec": "os:system", "kwargs": {"command": f"touch {m}"}},
                  "os:system(command='touch", TRUST),
    "subprocess.run": (lambda m: {"kind": "factory", "spec": "subprocess:run", "kwargs": {"args": ["touch", str(m)]}},
                       "subprocess:run(args=['touch'", TRUST),
    "file beside": (lambda m: {"kind": "factory", "spec": "payload.py:build"}, "payload.py:build()", TRUST),
    "../ escape": (lambda m: {"kind": "factory", "spec": "../evil.py:build"}, "outside the checkpoint's folder",
                   "refused even with --trust-code"),
    "absolute path": (lambda m: {"kind": "factory", "spec": f"{Path(m).parent}/ckpt/../evil.py:build"},
                      "outside the checkpoint's folder", "refused even with --trust-code"),
    "torch.load": (lambda m: {"kind": "factory", "spec": "torch:load",
                              "kwargs": {"f": "payload.pt", "weights_only": False}}, "torch:load(f='payload.pt'", TRUST),
    "pickle": (lambda m: {"kind": "pickle", "spec": "payload.pt"}, "payload.pt: unpickling runs code", PICKLE),
    "hf auto_map": (lambda m: {"kind": "hf", "spec": "BertModel", "config": {**BERT, "auto_map": {
        "AutoModel": "modeling_evil.EvilModel"}, "trust_remote_code": True}}, "transformers.BertModel",
                    "never from a file"),
    "trust_remote_code": (lambda m: {"kind": "factory", "spec": "transformers:AutoModel.from_pretrained",
                                     "kwargs": {"pretrained_model_name_or_path": "repo", "trust_remote_code": True}},
                          "transformers:AutoModel.from_pretrained(", "never from a file"),
    "torchvision weights": (lambda m: {"kind": "factory", "spec": "torchvision.models:resnet18",
                                       "kwargs": {"weights": "DEFAULT"}}, "weights='DEFAULT' would fetch", TRUST),
    "timm pretrained": (lambda m: {"kind": "factory", "spec": "timm:resnet18", "kwargs": {"pretrained": True}},
                        "pretrained=True would fetch", TRUST),
}
# what the caller's trust_code does not allow either
STILL_REFUSED = {"../ escape": "refused even with --trust-code", "absolute path": "refused even with --trust-code",
                 "torch.load": "which unpickles", "hf auto_map": "never from a file",
                 "trust_remote_code": "never from a file"}


def _python(entry, path, trust):
    def call():
        loader = dg.load_gated if entry == "load_gated" else dg.load_slim
        with pytest.raises(dg.UntrustedCodeError) as err:
            loader(path, trust_code=trust)
        return str(err.value)
    return call


def _cli(command, path, trust):
    def call():
        args = [command, path] + (["-o", path.with_name("out.safetensors")] if command == "shrink" else [])
        result = dgate(*args, *(["--trust-code"] if trust else []), ok=False)
        assert result.exit_code == 1 and not path.with_name("out.safetensors").exists()
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
        return lines[0]
    return call


ENTRIES = {"load_gated": ("gated", _python), "load_slim": ("slim", _python), "report": ("gated", _cli),
           "shrink": ("gated", _cli)}


@pytest.fixture
def attack_dir(honest, tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    marker = tmp_path / "PWNED"
    _attack_files(folder, marker)
    return folder, marker


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("attack", ATTACKS)
def test_a_crafted_checkpoint_runs_nothing(honest, attack_dir, monkeypatch, attack, entry):
    folder, marker = attack_dir
    monkeypatch.chdir(folder)  # the relative names of the attacks resolve here too
    fmt, make = ENTRIES[entry]
    reference, what, optin = ATTACKS[attack]
    path = craft(honest / f"{fmt}.safetensors", folder / "crafted.safetensors",
                 lambda m: m.update(model=reference(marker)))
    message = make(entry, path, False)()
    assert not marker.exists(), "the payload ran"
    assert "crafted.safetensors" in message and what in message and optin in message, message
    assert "\n" not in message
    if attack in STILL_REFUSED:
        message = make(entry, path, True)()
        assert not marker.exists(), "the payload ran with trust_code"
        assert STILL_REFUSED[attack] in message, message
    assert dg.read_manifest(path)["model"] == reference(marker)  # reading the manifest runs nothing
    assert not marker.exists()


def test_unpickling_needs_allow_pickle_and_trust_code_does_not_imply_it(honest, attack_dir):
    folder, marker = attack_dir
    torch.save(M.MLP(), folder / "model.pt")
    path = craft(honest / "slim.safetensors", folder / "pickled.safetensors",
                 lambda m: m.update(model={"kind": "pickle", "spec": "model.pt"}))
    with pytest.raises(dg.UntrustedCodeError, match="--allow-pickle"):
        dg.load_slim(path, trust_code=True)
    assert isinstance(dg.load_slim(path, allow_pickle=True), M.MLP)  # the caller's opt-in
    loader = craft(honest / "slim.safetensors", folder / "loader.safetensors", lambda m: m.update(
        model={"kind": "factory", "spec": "torch:load", "kwargs": {"f": "payload.pt", "weights_only": False}}))
    with pytest.raises(dg.UntrustedCodeError, match="--allow-pickle"):
        dg.load_slim(loader, trust_code=True)
    assert not marker.exists()


def test_shrink_does_not_carry_an_unsafe_reference_into_the_slim_file(honest, tmp_path):
    """shrink refuses before loading; with the opt-in, the slim file names what the gated one did
    and its own loading asks for the opt-in again."""
    gated = honest / "gated.safetensors"
    out = tmp_path / "slim.safetensors"
    assert "--trust-code" in dgate("shrink", gated, "-o", out, ok=False).stderr and not out.exists()
    dgate("shrink", gated, "-o", out, "--trust-code", "--verify")
    assert dg.read_manifest(out)["model"] == {"kind": "factory", "spec": "models:MLP"}
    with pytest.raises(dg.UntrustedCodeError, match="models:MLP"):
        dg.load_slim(out)


def test_a_shadowing_package_in_the_current_directory_never_runs(tmp_path):
    """A `torchvision/` folder next to an honest torchvision checkpoint: the console script uses the
    installed library (`python -m dgating_surgery.cli`: the next test)."""
    pytest.importorskip("torchvision")
    marker = tmp_path / "SHADOWED"
    (tmp_path / "torchvision").mkdir()
    (tmp_path / "torchvision" / "__init__.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\nraise SystemExit('shadowed')\n")
    model = dg.expose_weights(__import__("torchvision").models.squeezenet1_1(num_classes=4))
    x = torch.randn(1, 3, 32, 32)
    gated = dg.gate_model(model, "default", x)
    dg.save_gated(gated, tmp_path / "gated.safetensors", example_inputs=x, reference={
        "kind": "factory", "spec": "torchvision.models:squeezenet1_1", "kwargs": {"num_classes": 4}})
    done = shell("report", "gated.safetensors", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["groups"] == sum(g.num_groups for g in dg.gates(gated))
    assert not marker.exists()


def test_the_current_directory_and_factory_folders_come_after_the_libraries(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [str(tmp_path)] + [p for p in sys.path if p not in ("", str(tmp_path))])
    installed_libraries_first()  # what `python -m dgating_surgery.cli` does with the path Python gave it
    assert sys.path[-1] == str(tmp_path) and str(tmp_path) not in sys.path[:-1]
    monkeypatch.setattr(sys, "path", sys.path[:-1])
    dg_models._cwd_importable()
    assert sys.path[-1] == str(tmp_path) and str(tmp_path) not in sys.path[:-1]
    (tmp_path / "torchvision.py").write_text("import torch\n\ndef build():\n    return torch.nn.Linear(2, 2)\n")
    real = sys.modules.get("torchvision")
    model, ref = dg.load_model("./torchvision.py:build")
    assert isinstance(model, torch.nn.Linear) and sys.modules.get("torchvision") is real  # never stands in


# -- honest checkpoints load with no opt-in ---------------------------------------------------------
def _roundtrip(tmp_path, model, x, reference=None, recipe="default", **kwargs):
    """Gated and slim files of ``model``, loaded back with no opt-in: same outputs."""
    gated = dg.gate_model(model, recipe, x)
    path = dg.save_gated(gated, tmp_path / "gated.safetensors", reference=reference, example_inputs=x)
    resumed = dg.load_gated(path)
    assert torch.equal(run(resumed, x, **kwargs)[0], run(gated, x, **kwargs)[0])
    dg.kill_random_groups(gated, 0.3, seed=0)
    slim = dg.shrink(gated, example_inputs=x)
    path = dg.save_slim(slim, tmp_path / "slim.safetensors", reference=reference, example_inputs=x)
    loaded = dg.load_slim(path)
    assert type(loaded) is type(slim) and dg.model_params(loaded) == dg.model_params(slim)
    assert torch.equal(run(loaded, x, **kwargs)[0], run(slim, x, **kwargs)[0])


def test_honest_torchvision_timm_and_transformers_checkpoints_need_no_opt_in(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    timm = pytest.importorskip("timm")
    transformers = pytest.importorskip("transformers")
    x = torch.randn(1, 3, 32, 32)
    (tmp_path / "tv").mkdir()
    _roundtrip(tmp_path / "tv", dg.expose_weights(torchvision.models.squeezenet1_1(num_classes=4)), x,
               {"kind": "factory", "spec": "torchvision.models:squeezenet1_1", "kwargs": {"num_classes": 4}})
    (tmp_path / "timm").mkdir()
    _roundtrip(tmp_path / "timm", dg.expose_weights(timm.create_model("test_resnet", num_classes=4)), x,
               {"kind": "factory", "spec": "timm:test_resnet", "kwargs": {"num_classes": 4}})
    (tmp_path / "hf").mkdir()
    bert = transformers.BertModel(transformers.BertConfig(**BERT)).eval()
    _roundtrip(tmp_path / "hf", bert, torch.randint(0, 20, (1, 6)))


def test_an_honest_configs_auto_map_is_not_stored(tmp_path):
    """A config from a model repository may name remote code for Auto classes; the manifest names the
    class itself, so the map is dropped on writing and the file loads with no opt-in."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(**BERT)
    config.auto_map = {"AutoModel": "modeling_bert_custom.BertModel"}
    model = transformers.BertModel(config).eval()
    path = dg.save_slim(model, tmp_path / "slim.safetensors")
    assert "auto_map" not in dg.read_manifest(path)["model"]["config"]
    ids = torch.randint(0, 20, (1, 6))
    assert torch.equal(run(dg.load_slim(path), ids)[0], run(model, ids)[0])


def test_a_file_factory_loads_with_trust_code(tmp_path):
    (tmp_path / "net.py").write_text("import torch\n\ndef build():\n    return torch.nn.Sequential("
                                     "torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))\n")
    path = tmp_path / "gated.safetensors"
    dgate("convert", f"{tmp_path}/net.py:build", "-r", "mlp", "-o", path)
    assert dg.read_manifest(path)["model"] == {"kind": "factory", "spec": "net.py:build"}
    with pytest.raises(dg.UntrustedCodeError, match=r"net.py:build\(\) \(it is code in a Python file\)"):
        dg.load_gated(path)
    model = dg.load_gated(path, trust_code=True)
    assert len(dg.gates(model)) == 1
    assert json.loads(dgate("report", path, "--trust-code", "--json").stdout)["groups"] == 8


def test_a_reference_outside_the_checkpoints_folder_is_not_written(tmp_path):
    (tmp_path / "net.py").write_text("import torch\n\ndef build():\n    return torch.nn.Linear(4, 2)\n")
    (tmp_path / "out").mkdir()
    model = torch.nn.Linear(4, 2)
    with pytest.raises(dg.CheckpointError, match=r"outside the checkpoint's folder"):
        dg.save_slim(model, tmp_path / "out" / "slim.safetensors", reference=f"{tmp_path}/net.py:build")
    assert list((tmp_path / "out").iterdir()) == []
    result = dgate("convert", f"{tmp_path}/net.py:build", "-r", "mlp", "-o", tmp_path / "out" / "g.safetensors",
                   ok=False)
    assert result.exit_code == 1 and "outside the checkpoint's folder" in result.stderr
    assert list((tmp_path / "out").iterdir()) == []


# -- every manifest field --------------------------------------------------------------------------
def _set(*keys, value):
    def edit(manifest):
        node = manifest
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value
    return edit


def _drop(key):
    return lambda manifest: manifest.pop(key)


# (file, edit, the field the error names, what else it says)
FIELDS = {
    "version 0": ("slim", _set("version", value=0), "version", "not a format"),
    "version -7": ("slim", _set("version", value=-7), "version", "not a format"),
    "version 1.9": ("slim", _set("version", value=1.9), "version", "not a format"),
    "version '2'": ("slim", _set("version", value="2"), "version", "not a format"),
    "version true": ("slim", _set("version", value=True), "version", "not a format"),
    "version 1": ("slim", _set("version", value=1), "version", "write the checkpoint again"),
    "version 99": ("slim", _set("version", value=99), "version", "newer dgating-surgery"),
    "format": ("slim", _set("format", value="fat"), "format", "one of gated, slim"),
    "missing": ("slim", _drop("recipe"), "recipe", "is missing"),
    "unknown": ("slim", _set("payload", value=1), "payload", "unknown field"),
    "written_by": ("slim", _set("written_by", value=5), "written_by", "string"),
    "model kind": ("slim", _set("model", "kind", value="exe"), "model", "field 'kind' is 'exe'"),
    "model spec": ("slim", _set("model", "spec", value=5), "model", "field 'spec'"),
    "model kwargs": ("slim", _set("model", "kwargs", value=[1]), "model", "field 'kwargs'"),
    "model field": ("slim", _set("model", "code", value="x"), "model", "unknown field 'code'"),
    "recipe D": ("gated", _set("recipe", "D", value="three"), "recipe", "'D'"),
    "recipe threshold": ("gated", _set("recipe", "threshold", value=-1), "recipe", "threshold"),
    "recipe round_to": ("gated", _set("recipe", "round_to", value=0), "recipe", "round_to"),
    "inputs zero": ("gated", _set("inputs", "args", 0, "shape", value=[0, 10]), "inputs.args[0].shape[0]", ">= 1"),
    "inputs negative": ("gated", _set("inputs", "args", 0, "shape", value=[-1, 10]), "inputs.args[0].shape[0]", ""),
    "inputs text": ("gated", _set("inputs", "args", 0, "shape", value=["a"]), "inputs.args[0].shape[0]", ""),
    "inputs ndim": ("gated", _set("inputs", "args", 0, "shape", value=[1] * 9), "inputs.args[0].shape", "at most 8"),
    "inputs dtype": ("gated", _set("inputs", "args", 0, "dtype", value="float128"), "inputs.args[0].dtype",
                     "bfloat16"),
    "inputs huge": ("gated", _set("inputs", "args", 0, "shape", value=[10 ** 6, 10 ** 7]), "inputs",
                    "GB available"),
    "inputs field": ("gated", _set("inputs", "args", 0, "code", value=1), "inputs.args[0].code", "unknown"),
    "inputs null": ("gated", _set("inputs", value=None), "inputs", "must be an object"),
    "aliases": ("slim", _set("aliases", value={"x.weight": "nowhere"}), "aliases.x.weight", "must name a tensor"),
    "kept unsorted": ("slim", _set("kept_groups", "fc1", "kept", value=[3, 1]), "kept_groups.fc1.kept",
                      "sorted and unique"),
    "kept range": ("slim", _set("kept_groups", "fc1", "kept", value=[0, 99]), "kept_groups.fc1.kept[1]",
                   "below 20"),
    "kept kind": ("slim", _set("kept_groups", "fc1", "kind", value="filters"), "kept_groups.fc1.kind", "neurons"),
    "features unsorted": ("slim", _set("kept_input_features", value={"x": [2, 1]}), "kept_input_features.x",
                          "sorted"),
    "features negative": ("slim", _set("kept_input_features", value={"x": [-1]}), "kept_input_features.x[0]", ""),
    "features text": ("slim", _set("kept_input_features", value={"x": ["a"]}), "kept_input_features.x[0]", ""),
    "attribute name": ("slim", _set("cut_attributes", value={"fc1.__class__": 1}), "cut_attributes.fc1.__class__",
                       "dotted name"),
    "attribute value": ("slim", _set("cut_attributes", value={"fc1.in_features": "ten"}),
                        "cut_attributes.fc1.in_features", "finite number"),
    "attribute bool": ("slim", _set("cut_attributes", value={"fc1.in_features": True}),
                       "cut_attributes.fc1.in_features", "finite number"),
    "sha256": ("slim", _set("sha256", value="xyz"), "sha256", "64 hexadecimal digits"),
}
# fields whose value is checked against the rebuilt model (the file's own reference: trust_code)
LOADED = {
    "features range": ("slim", _set("kept_input_features", value={"x": [0, 1, 99]}), "kept_input_features.x",
                       "beyond the 10 features"),
    "features name": ("slim", _set("kept_input_features", value={"y": [0, 1]}), "kept_input_features.y",
                      "no argument 'y'"),
    "attribute unknown": ("slim", _set("cut_attributes", value={"fc1.nothing": 3}), "cut_attributes.fc1.nothing",
                          "no count or epsilon"),
    "attribute type": ("slim", _set("cut_attributes", value={"fc1.in_features": 2.5}), "cut_attributes.fc1.in_features",
                       "no count or epsilon"),
}


@pytest.mark.parametrize("case", [*FIELDS, *LOADED])
def test_every_edited_manifest_field_is_one_line_naming_the_file_and_field(honest, tmp_path, case):
    fmt, edit, field, detail = FIELDS.get(case) or LOADED[case]
    path = craft(honest / f"{fmt}.safetensors", tmp_path / "edited.safetensors", edit, resign=case != "sha256")
    loader = dg.load_gated if fmt == "gated" else dg.load_slim
    with pytest.raises(dg.CheckpointError) as err:
        loader(path, trust_code=True)
    message = str(err.value)
    assert message.startswith(str(path)) and "\n" not in message, message
    assert f"field '{field}'" in message and detail in message, message
    if case in FIELDS:  # checked before anything is built: reading the manifest alone refuses it
        with pytest.raises(dg.CheckpointError, match=f"field '{field}'".replace("[", r"\[").replace(".", r"\.")):
            dg.read_manifest(path)
        result = dgate("report", path, "--trust-code", ok=False)
        assert result.exit_code == 1 and f"field '{field}'" in result.stderr


@pytest.mark.parametrize("fmt, edit", [("gated", _set("recipe", "threshold", value=1e-4)),
                                       ("slim", _set("cut_attributes", value={"fc1.eps": 1e3})),
                                       ("slim", _set("kept_input_features", value={"x": [0, 1]}))])
def test_the_checksum_covers_the_manifest(honest, tmp_path, fmt, edit):
    """An edit of the threshold or of cut_attributes went unnoticed: the checksum covered the tensors only."""
    path = craft(honest / f"{fmt}.safetensors", tmp_path / "edited.safetensors", edit, resign=False)
    with pytest.raises(dg.CheckpointError, match=r"is corrupt: its manifest or tensors do not match the checksum"):
        dg.read_manifest(path)


def test_a_flipped_bit_in_the_threshold(honest, tmp_path):
    """The review's edit: one bit ('5' -> '4') moved the threshold from 1e-05 to 1e-04 unnoticed."""
    data = (honest / "gated.safetensors").read_bytes()
    before = b'threshold\\": 1e-05'  # JSON text inside the safetensors header's JSON
    assert data.count(before) == 1
    edited = tmp_path / "flipped.safetensors"
    edited.write_bytes(data.replace(before, before[:-1] + bytes([before[-1] ^ 1])))
    with pytest.raises(dg.CheckpointError, match="checksum"):
        dg.load_gated(edited, trust_code=True)


@pytest.mark.parametrize("text, message", [
    ("{", "not valid JSON"), ('{"version": NaN}', "not valid JSON"), ("[1, 2]", "not an object"),
    ("[" * 100000, "not valid JSON"), ('{"a": ' * 40 + "1" + "}" * 40, "nested more than 32 levels"),
    ('{"format": "slim"}', "field 'version': is missing")])
def test_a_manifest_that_is_not_json_or_not_an_object(honest, tmp_path, text, message):
    path = tmp_path / "bad.safetensors"
    save_file(load_file(honest / "slim.safetensors"), path, metadata={checkpoint.META_KEY: text})
    with pytest.raises(dg.CheckpointError, match=message) as err:
        dg.load_slim(path)
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


def test_corrupt_tensor_files_and_folders(honest, tmp_path):
    data = (honest / "slim.safetensors").read_bytes()
    cases = {"truncated": data[:-50], "short": data[:5], "header": data[:8] + b"\xff" * 40 + data[48:],
             "empty": b"", "tensor": data[:-4] + bytes(b ^ 1 for b in data[-4:])}
    for name, content in cases.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(content)
        with pytest.raises(dg.CheckpointError) as err:
            dg.load_slim(path, trust_code=True)
        message = str(err.value)
        assert str(path) in message and "\n" not in message, message
        assert ("checksum" if name == "tensor" else "truncated or corrupt") in message, message
    result = dgate("report", tmp_path, ok=False)
    assert result.exit_code == 1 and f"Error: {tmp_path} is a folder, not a checkpoint" in result.stderr
    with pytest.raises(dg.CheckpointError, match="is a folder"):
        dg.read_manifest(tmp_path)


# -- sizes are bounded before they are allocated ----------------------------------------------------
@pytest.fixture(scope="module")
def bert_files(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("bert")
    ids = torch.randint(0, 20, (1, 6))
    gated = dg.gate_model(transformers.BertModel(transformers.BertConfig(**BERT)).eval(), "mlp", ids)
    dg.save_gated(gated, folder / "gated.safetensors", example_inputs=ids)
    return folder


@pytest.mark.parametrize("key, value, message", [
    ("num_hidden_layers", 10 ** 6, "builds a model of more than"),
    ("hidden_size", 10 ** 8, "GB of parameters"), ("intermediate_size", 10 ** 12, "GB of parameters")])
def test_a_manifest_that_implies_a_huge_model_is_refused_before_allocating(bert_files, tmp_path, key, value, message):
    path = craft(bert_files / "gated.safetensors", tmp_path / "huge.safetensors",
                 lambda m: m["model"]["config"].update({key: value}))
    with pytest.raises(dg.CheckpointError, match=message) as err:
        dg.load_gated(path)  # no opt-in: a transformers class from its config is safe to build
    assert "field 'model'" in str(err.value) and str(path) in str(err.value)


def test_activations_of_the_recorded_inputs_are_bounded(honest, tmp_path, monkeypatch):
    """Parameters fit, the forward on the recorded inputs would not: refused before gating."""
    path = craft(honest / "gated.safetensors", tmp_path / "wide.safetensors",
                 _set("inputs", "args", 0, "shape", value=[1000, 10]))
    for module in (checkpoint, mf):
        monkeypatch.setattr(module, "available_memory", lambda: 100_000)
    with pytest.raises(dg.CheckpointError, match=r"field 'inputs' \(1000x10 float32\) makes .* of activations"):
        dg.load_gated(path, trust_code=True)
    monkeypatch.setattr(checkpoint, "available_memory", lambda: 1000)
    with pytest.raises(dg.CheckpointError, match="kB of parameters"):
        dg.load_slim(honest / "slim.safetensors", trust_code=True)


# -- bfloat16 and float16 -------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoints_round_trip_with_their_dtypes(tmp_path, dtype):
    x = torch.randn(4, 10).to(dtype)
    gated = dg.gate_model(M.MLP().to(dtype), "mlp", x)
    path = dg.save_gated(gated, tmp_path / "gated.safetensors", reference="models:MLP", example_inputs=x)
    resumed = dg.load_gated(path, trust_code=True)
    assert {k: v.dtype for k, v in resumed.state_dict().items()} == {k: v.dtype for k, v in gated.state_dict().items()}
    assert torch.equal(run(resumed, x), run(gated, x))
    M.kill(gated)
    slim = dg.shrink(gated, example_inputs=x)
    path = dg.save_slim(slim, tmp_path / "slim.safetensors", reference="models:MLP", example_inputs=x)
    loaded = dg.load_slim(path, trust_code=True)
    assert {k: v.dtype for k, v in loaded.state_dict().items()} == {k: v.dtype for k, v in slim.state_dict().items()}
    assert all(v.dtype == dtype for v in loaded.state_dict().values())
    assert torch.equal(run(loaded, x), run(slim, x))


# -- writes ----------------------------------------------------------------------------------------
@pytest.fixture
def slim_model(honest):
    return dg.load_slim(honest / "slim.safetensors", trust_code=True)


def test_temporary_files_are_unique_in_the_destination_folder_and_fsynced_before_the_rename(
        slim_model, tmp_path, monkeypatch):
    events, real_save, real_fsync, real_replace = [], checkpoint.save_file, os.fsync, os.replace

    def save(tensors, name, metadata):
        events.append(("write", name))
        real_save(tensors, name, metadata=metadata)

    def fsync(fd):  # which written file the descriptor is open on (the folder's fsync matches none)
        written = [n for kind, n in events if kind == "write" and os.path.exists(n)]
        events.append(("fsync", next((n for n in written if os.path.samestat(os.stat(n), os.fstat(fd))), fd)))
        real_fsync(fd)

    def replace(a, b):
        events.append(("rename", a))
        real_replace(a, b)
    monkeypatch.setattr(checkpoint, "save_file", save)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    for _ in range(2):
        dg.save_slim(slim_model, tmp_path / "slim.safetensors")
    names = [name for kind, name in events if kind == "write"]
    assert len(set(names)) == 2 and all(Path(n).parent == tmp_path for n in names)
    assert all(Path(n).name.startswith(".slim.safetensors.") for n in names)
    for name in names:
        kinds = [kind for kind, n in events if n == name]
        assert kinds == ["write", "fsync", "rename"], events
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slim.safetensors"]


def test_permissions_are_kept_and_symlinks_never_followed(slim_model, tmp_path):
    out = tmp_path / "slim.safetensors"
    out.write_bytes(b"old")
    out.chmod(0o600)
    dg.save_slim(slim_model, out)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600 and dg.read_manifest(out)["format"] == "slim"
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    link = tmp_path / "link.safetensors"
    link.symlink_to(victim)
    dg.save_slim(slim_model, link)
    assert victim.read_text() == "precious" and not link.is_symlink() and dg.read_manifest(link)["format"] == "slim"
    fresh = tmp_path / "new.safetensors"
    dg.save_slim(slim_model, fresh)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o666 & ~umask


def test_cli_force_keeps_a_private_file_private(honest, tmp_path):
    out = tmp_path / "slim.safetensors"
    out.write_bytes(b"old")
    out.chmod(0o600)
    dgate("shrink", honest / "gated.safetensors", "-o", out, "--force", "--trust-code")
    assert stat.S_IMODE(out.stat().st_mode) == 0o600 and dg.read_manifest(out)["format"] == "slim"


def test_the_export_uses_the_safe_writer(honest, tmp_path, monkeypatch):
    """The export wrote `.slim.tmp.pt2`, a fixed name: a symbolic link planted there was followed."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / ".slim.tmp.pt2").symlink_to(victim)
    out = tmp_path / "slim.safetensors"
    dgate("shrink", honest / "gated.safetensors", "-o", out, "--export", "torch.export", "--trust-code")
    assert victim.read_text() == "precious" and torch.export.load(tmp_path / "slim.pt2") is not None

    def broken(*args, **kwargs):
        raise RuntimeError("exporter crashed")
    monkeypatch.setattr(torch.export, "save", broken)
    result = dgate("shrink", honest / "gated.safetensors", "-o", tmp_path / "other.safetensors", "--export",
                   "torch.export", "--trust-code", ok=False)
    assert result.exit_code == 1 and "exporter crashed" in result.stderr and "was written and is usable" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [".slim.tmp.pt2", "other.safetensors", "slim.pt2",
                                                         "slim.safetensors", "victim.txt"]


def test_an_output_that_is_an_input_or_another_output_is_refused(honest, tmp_path, monkeypatch):
    source = "import torch\n\ndef build():\n    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))\n"
    (tmp_path / "x.py").write_text(source)
    monkeypatch.chdir(tmp_path)
    result = dgate("convert", "./x.py:build", "-o", "x.py", "--force", ok=False)
    assert result.exit_code == 1 and "cannot write x.py: it is the input ./x.py" in result.stderr
    assert (tmp_path / "x.py").read_text() == source
    out = tmp_path / "slim.pt2"
    result = dgate("shrink", honest / "gated.safetensors", "-o", out, "--export", "torch.export", "--trust-code",
                   ok=False)
    assert result.exit_code == 1 and f"the command writes {out} there already" in result.stderr
    assert not out.exists()
    copy = tmp_path / "ckpt"
    copy.mkdir()
    (copy / "gated.safetensors").write_bytes((honest / "gated.safetensors").read_bytes())
    (copy / "net.py").write_text("from models import MLP\n\ndef build():\n    return MLP()\n")
    gated = craft(copy / "gated.safetensors", copy / "gated.safetensors",
                  lambda m: m.update(model={"kind": "factory", "spec": "net.py:build"}))
    result = dgate("shrink", gated, "-o", copy / "net.py", "--force", "--trust-code", ok=False)
    assert result.exit_code == 1 and "it is the input" in result.stderr and "MLP()" in (copy / "net.py").read_text()


def test_two_commands_writing_one_output_do_not_both_succeed(honest, tmp_path, monkeypatch):
    """Without --force an output is created exclusively: the command that finishes second fails
    and the first one's file stays."""
    out = tmp_path / "slim.safetensors"
    real_save = checkpoint.save_file

    def other_command_finishes_first(tensors, name, metadata):
        if not out.exists():
            out.write_bytes(b"the other command's slim model")
        real_save(tensors, name, metadata=metadata)
    monkeypatch.setattr(checkpoint, "save_file", other_command_finishes_first)
    result = dgate("shrink", honest / "gated.safetensors", "-o", out, "--trust-code", ok=False)
    assert result.exit_code == 1 and "exists (another command wrote it meanwhile)" in result.stderr
    assert out.read_bytes() == b"the other command's slim model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slim.safetensors"]
    monkeypatch.setattr(checkpoint, "save_file", real_save)
    with pytest.raises(dg.CheckpointError, match="exists"):
        dg.save_slim(dg.load_slim(honest / "slim.safetensors", trust_code=True), out, replace=False)
    dg.save_slim(dg.load_slim(honest / "slim.safetensors", trust_code=True), out)  # replace=True: the default
    assert dg.read_manifest(out)["format"] == "slim"
