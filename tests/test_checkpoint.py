"""Checkpoints without pickle: the gated artefact resumes, the slim checkpoint reloads to the same
outputs, and every broken or mismatched file is a clear error that leaves nothing half-written."""
import copy
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import dgating_surgery as dg
from dgating_surgery.checkpoints import checkpoint
from dgating_surgery.checkpoints.models import ModelRef, load_model, mismatch

import models as M


def run(model, *args, **kwargs):
    args, kwargs = dg.select_features(model, args, kwargs)
    model.eval()
    with torch.no_grad():
        return model(*args, **kwargs)


def slim_roundtrip(tmp_path, model, x, recipe="default", **gate_kwargs):
    gated = M.kill(dg.gate_model(model, recipe, x, **gate_kwargs))
    kept = dg.kept_groups(gated)
    slim = dg.shrink(gated, example_inputs=x, **gate_kwargs)
    path = dg.save_slim(slim, tmp_path / "slim.safetensors", example_inputs=x, kept=kept, recipe=recipe)
    loaded = dg.load_slim(path, trust_code=True)
    return slim, loaded, path


@pytest.mark.parametrize("make, shape", [(M.Residual, (2, 3, 16, 16)), (M.Grouped, (2, 3, 16, 16)),
                                         (M.Concat, (2, 3, 16, 16)), (M.FlattenLinear, (2, 3, 16, 16))])
def test_slim_roundtrip_is_identical(tmp_path, make, shape):
    x = torch.randn(*shape)
    slim, loaded, path = slim_roundtrip(tmp_path, make(), x)
    assert type(loaded) is make
    assert dg.report.model_params(loaded) == dg.report.model_params(slim) < dg.report.model_params(make())
    assert torch.equal(run(slim, x), run(loaded, x))
    assert not loaded.training
    for a, b in zip(slim.modules(), loaded.modules()):  # shape attributes re-derived, conv groups included
        for attr in ("in_channels", "out_channels", "groups", "in_features", "out_features", "num_features"):
            assert getattr(a, attr, None) == getattr(b, attr, None), (a, attr)
    manifest = dg.read_manifest(path)
    assert manifest["format"] == "slim" and manifest["model"] == {"kind": "factory",
                                                                   "spec": f"models:{make.__name__}"}
    assert manifest["recipe"]["groups"] == [{"kind": "channels"}, {"kind": "neurons"}, {"kind": "heads"}]
    assert all(len(g["kept"]) <= g["groups"] for g in manifest["kept_groups"].values())


def test_input_features_are_kept_and_selected(tmp_path):
    x = torch.randn(4, 10)
    recipe = {"D": 3, "groups": [{"kind": "features"}]}
    slim, loaded, _ = slim_roundtrip(tmp_path, M.MLP(), x, recipe)
    assert torch.equal(loaded.kept_input_features["x"], slim.kept_input_features["x"])
    assert loaded.fc1.in_features == len(slim.kept_input_features["x"]) < 10
    assert torch.equal(run(slim, x), run(loaded, x))


def test_gated_artefact_resumes_training(tmp_path):
    x = torch.randn(8, 10)
    gated = dg.gate_model(M.MLP(), "mlp", x)
    path = dg.save_gated(gated, tmp_path / "gated.safetensors", example_inputs=x)
    resumed = dg.load_gated(path, trust_code=True)
    assert resumed.training and torch.equal(run(gated, x), run(resumed, x))
    assert [g.num_groups for g in dg.gates(resumed)] == [g.num_groups for g in dg.gates(gated)]
    opt = torch.optim.SGD(dg.param_groups(resumed, lam=0.1), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        resumed(x).pow(2).mean().backward()
        opt.step()
    dg.save_gated(resumed, path)  # reference and inputs recorded by load_gated
    again = dg.load_gated(path, trust_code=True)
    assert torch.equal(run(resumed, x), run(again, x))
    assert not torch.equal(run(gated, x), run(again, x))


def test_tied_weights_are_saved_once_and_reloaded(tmp_path):
    model = Tied()
    state = model.state_dict()
    assert state["emb.weight"].data_ptr() == state["head.weight"].data_ptr()
    path = dg.save_slim(model, tmp_path / "tied.safetensors", reference="test_checkpoint:Tied")
    assert dg.read_manifest(path)["aliases"] == {"head.weight": "emb.weight"}
    loaded = dg.load_slim(path, trust_code=True)
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(run(model, ids), run(loaded, ids))


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.head = nn.Linear(6, 11, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(self.emb(ids))


def test_transformers_slim_roundtrip(tmp_path):
    T = pytest.importorskip("transformers")
    config = T.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
                          vocab_size=60)
    config.save_pretrained(tmp_path / "bert")
    model, ref = load_model(str(tmp_path / "bert"))
    assert ref.kind == "hf" and ref.spec == "BertModel"
    ids = torch.randint(0, 60, (1, 8))
    slim, loaded, path = slim_roundtrip(tmp_path, model, ids)
    assert type(loaded) is T.BertModel
    assert loaded.encoder.layer[0].intermediate.dense.out_features < 48
    assert torch.equal(run(slim, ids).last_hidden_state, run(loaded, ids).last_hidden_state)


# -- bad files -------------------------------------------------------------------------------------
@pytest.fixture
def slim_file(tmp_path):
    x = torch.randn(2, 10)
    return slim_roundtrip(tmp_path, M.MLP(), x, "mlp")[2]


def test_wrong_architecture_names_file_and_keys(slim_file):
    with pytest.raises(dg.CheckpointError) as err:
        dg.load_slim(slim_file, model=M.Residual())
    msg = str(err.value)
    assert str(slim_file) in msg and "missing: stem.0.weight" in msg and "unexpected: fc1.bias" in msg
    with pytest.raises(dg.CheckpointError, match="not a cut of this architecture"):
        dg.load_slim(slim_file, reference={"kind": "factory", "spec": "models:MLP", "kwargs": {"hidden": [4, 4]}})
    with pytest.raises(dg.CheckpointError, match="cannot import module 'nowhere'"):
        dg.load_slim(slim_file, reference="nowhere:Net")


def test_truncated_and_corrupted_files(slim_file, tmp_path):
    data = slim_file.read_bytes()
    cut = tmp_path / "truncated.safetensors"
    cut.write_bytes(data[: len(data) - 100])
    with pytest.raises(dg.CheckpointError, match="truncated or corrupt"):
        dg.load_slim(cut)
    flipped = tmp_path / "flipped.safetensors"
    flipped.write_bytes(data[:-8] + bytes(b ^ 0xFF for b in data[-8:]))
    with pytest.raises(dg.CheckpointError, match="checksum"):
        dg.load_slim(flipped)
    with pytest.raises(dg.CheckpointError, match="checkpoint not found"):
        dg.load_slim(tmp_path / "nope.safetensors")


def test_plain_safetensors_and_wrong_format(slim_file, tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.ones(2)}, plain)
    with pytest.raises(dg.CheckpointError, match="no dgating-surgery manifest"):
        dg.load_slim(plain)
    with pytest.raises(dg.CheckpointError, match="is a slim checkpoint, not a gated one"):
        dg.load_gated(slim_file)
    newer = tmp_path / "newer.safetensors"
    tensors, manifest = checkpoint._read(slim_file, "slim")
    save_file(tensors, newer, metadata={checkpoint.META_KEY: json.dumps({**manifest, "version": 99})})
    with pytest.raises(dg.CheckpointError, match="newer dgating-surgery"):
        dg.load_slim(newer)


def test_writes_are_atomic(slim_file, monkeypatch, tmp_path):
    before = slim_file.read_bytes()
    model = dg.load_slim(slim_file, trust_code=True)

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")
    monkeypatch.setattr(checkpoint, "save_file", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        dg.save_slim(model, slim_file)
    assert slim_file.read_bytes() == before
    assert sorted(os.listdir(slim_file.parent)) == [slim_file.name]  # no temporary file left behind
    with pytest.raises(dg.CheckpointError, match="does not exist"):
        dg.save_slim(model, tmp_path / "missing" / "slim.safetensors")


def test_saving_needs_the_right_state(tmp_path):
    x = torch.randn(2, 10)
    gated = dg.gate_model(M.MLP(), "mlp", x)
    with pytest.raises(dg.CheckpointError, match="still has gates"):
        dg.save_slim(gated, tmp_path / "s.safetensors")
    with pytest.raises(dg.CheckpointError, match="needs example_inputs"):
        dg.save_gated(gated, tmp_path / "g.safetensors")
    with pytest.raises(dg.NotGatedError, match="is not gated"):
        dg.save_gated(M.MLP(), tmp_path / "g.safetensors", example_inputs=x)

    class Local(nn.Linear):
        pass
    with pytest.raises(dg.ModelSpecError, match="reference='package.module:factory'"):
        dg.save_slim(Local(2, 2), tmp_path / "s.safetensors")


# -- MODEL specs -----------------------------------------------------------------------------------
def test_pickle_needs_the_flag(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(M.MLP(), path)
    with pytest.raises(dg.ModelSpecError) as err:
        load_model(str(path))
    assert "--allow-pickle" in str(err.value) and "arbitrary code" in str(err.value)
    model, ref = load_model(str(path), allow_pickle=True)
    assert isinstance(model, M.MLP) and ref == ModelRef("pickle", str(path.resolve()))
    weights = tmp_path / "weights.pt"
    torch.save(model.state_dict(), weights)
    with pytest.raises(dg.ModelSpecError, match="holds weights"):
        load_model(str(weights))


def test_factory_with_weights_and_kwargs(tmp_path):
    source = M.MLP(hidden=(7, 5))
    save_file(source.state_dict(), tmp_path / "w.safetensors")
    torch.save({"state_dict": source.state_dict()}, tmp_path / "w.pt")
    for name in ("w.safetensors", "w.pt"):
        model, ref = load_model("models:MLP", tmp_path / name, {"hidden": [7, 5]})
        assert mismatch(model, source.state_dict()) is None
        assert torch.equal(model.fc1.weight, source.fc1.weight) and ref.kwargs == {"hidden": [7, 5]}
    with pytest.raises(dg.ModelSpecError) as err:
        load_model("models:MLP", tmp_path / "w.safetensors")
    assert "w.safetensors does not fit MLP" in str(err.value) and "fc1.weight (7, 10) vs (20, 10)" in str(err.value)
    for spec, message in [("models:Nope", "has no attribute 'Nope'"), ("nowhere.mod:fn", "cannot import module"),
                          ("missing.pt", "no such file")]:
        with pytest.raises(dg.ModelSpecError, match=message):
            load_model(spec)


# -- issue 11 ---------------------------------------------------------------------------------------
def sequential(hidden=(20, 15)):
    """A factory for the architecture below: what `reference=` names."""
    return nn.Sequential(nn.Linear(10, hidden[0]), nn.ReLU(), nn.Linear(*hidden), nn.ReLU(), nn.Linear(hidden[1], 5))


def test_save_slim_refuses_a_file_load_slim_could_not_load(tmp_path):
    """Item 6: an nn.Sequential saved without reference= was written, and load_slim failed on it."""
    x = torch.randn(4, 10)
    slim = dg.shrink(M.kill(dg.gate_model(sequential(), "mlp", x)), example_inputs=x)
    path = tmp_path / "slim.safetensors"
    with pytest.raises(dg.ModelSpecError) as err:
        dg.save_slim(slim, path)
    msg = str(err.value)
    assert "torch.nn.modules.container.Sequential()" in msg and "not in the rebuilt model: 0.weight" in msg
    assert "pass reference='package.module:factory'" in msg
    assert os.listdir(tmp_path) == []  # nothing written
    narrow = {"kind": "factory", "spec": "test_checkpoint:sequential", "kwargs": {"hidden": [2, 2]}}
    with pytest.raises(dg.ModelSpecError, match=r"tensor '0.weight' is \(\d+, 10\) here but \(2, 10\)"):
        dg.save_slim(slim, path, reference=narrow)
    with pytest.raises(dg.ModelSpecError, match="rejected its arguments"):
        dg.save_slim(slim, path, reference={**narrow, "kwargs": {"width": 4}})
    with pytest.raises(dg.ModelSpecError, match="not in the rebuilt model: 0.weight"):
        dg.save_slim(slim, path, reference="models:MLP")
    assert os.listdir(tmp_path) == []
    dg.save_slim(slim, path, reference="test_checkpoint:sequential")  # what the message says to do
    assert torch.equal(run(dg.load_slim(path, trust_code=True), x), run(slim, x))


def test_shrink_works_in_place(tmp_path):
    """Item 10: `slim = dg.shrink(gated)` reads like a copy; it is the same model, cut. README says so."""
    x = torch.randn(4, 10)
    gated = M.kill(dg.gate_model(M.MLP(), "mlp", x))
    kept = copy.deepcopy(gated)
    slim = dg.shrink(gated, example_inputs=x)
    assert slim is gated and slim.fc1.out_features < 20 and not hasattr(slim, "dgates")
    assert kept.fc1.weight.shape[0] == 20 and len(dg.gates(kept)) == 2  # the README's way to keep it
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "works **in place**" in readme and "copy.deepcopy(gated)" in readme
