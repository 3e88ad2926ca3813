"""The ``blocks`` kind (issue 19 item 6): one gate per residual branch ``x + f(x)``; a dead branch is
removed whole (its parameters gone, its add left with the input), a Hugging Face decoder layer whose
branches are both dead leaves the layer list with its config and KV-cache indices renumbered, and
an attention-only or MLP-only removal keeps the layer running without that branch."""
import json
import os

import pytest
import torch
from torch import nn

import dgating_surgery as dg
from conftest import assert_exact_cut
from dgating_surgery.engine.branches import Bypass, ZeroBranch
from dgating_surgery.errors import CheckpointError, GatingError
from dgating_surgery.engine.gates import analyze

BLOCKS = {"D": 3, "groups": [{"kind": "blocks"}]}


def _params(model) -> dict[str, tuple]:
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def _cut(model, args, kwargs=None, unseen=None, fraction=0.3, seed=0, kill=None):
    """Gate the blocks of ``model`` on ``args``, zero a seeded random ``fraction`` of the gates (or
    the branches named in ``kill``), shrink, and check the invariant: gating keeps the output, the
    slim model gives the gated outputs on the example and on ``unseen`` inputs (1e-4 of the scale),
    and exactly the parameters under the dead branches' layers are gone. Returns (slim model, names
    of the dead branches)."""
    kwargs = dict(kwargs or {})
    dg.expose_weights(model.eval())
    before = _params(model)
    reference = model(*args, **kwargs)
    gated = dg.gate_model(model, BLOCKS, args, kwargs)
    (gate,) = dg.gates(gated)
    assert gate.kind == "blocks"
    assert _diff(reference, gated(*args, **kwargs)) <= 1e-4
    with torch.no_grad():
        if kill is None:
            dead = torch.randperm(gate.num_groups, generator=torch.Generator().manual_seed(seed))
            dead = dead[: max(1, int(fraction * gate.num_groups))]
        else:
            dead = torch.tensor([gate.modules.index(name) for name in kill])
        gate.factors[0, dead] = 0.0
    names = [gate.modules[int(j)] for j in dead]
    outputs = [gated(*a, **kwargs) for a in (args, *([unseen] if unseen else []))]
    dg.shrink(gated)
    assert not any(isinstance(m, dg.DGate) for m in gated.modules())
    for a, out in zip((args, *([unseen] if unseen else [])), outputs):
        assert _diff(out, gated(*a, **kwargs)) <= 1e-4
    return gated, names, before


def _diff(a, b) -> float:
    a, b = (getattr(t, "logits", t).detach() for t in (a, b))
    return float((a - b).abs().max() / a.abs().max())


def _gone(before: dict, slim) -> set[str]:
    after = _params(slim)
    assert all(before[name] == shape for name, shape in after.items())  # nothing else was narrowed
    return set(before) - set(after)


def _under(before: dict, prefixes) -> set[str]:
    return {name for name in before for p in prefixes if name.startswith(f"{p}.")}


def test_resnet18_blocks_removed_whole_and_downsample_blocks_refused():
    torchvision = pytest.importorskip("torchvision")
    x, unseen = torch.randn(2, 3, 64, 64), torch.randn(3, 3, 64, 64)
    model = torchvision.models.resnet18()
    reasons = {n: r for s in analyze(model, (x,)).sets if s.kind == "blocks" for n, r in zip(s.modules, s.reasons)}
    assert [n for n, r in reasons.items() if r is None] == ["layer1.0", "layer1.1", "layer2.1", "layer3.1", "layer4.1"]
    for stage in (2, 3, 4):
        assert reasons[f"layer{stage}.0"] == (
            f"block 'layer{stage}.0' adds layer 'layer{stage}.0.downsample.1' (BatchNorm2d) to its branch, not its "
            "input: the shortcut is not the identity, so removing the branch would not leave the input")
    slim, dead, before = _cut(model, (x,), unseen=(unseen,), kill=["layer1.1", "layer3.1"])
    assert isinstance(slim.layer1[1], Bypass) and isinstance(slim.layer3[1], Bypass)
    assert _gone(before, slim) == _under(before, dead)


@pytest.mark.parametrize("seed", [0, 1])
def test_resnet18_random_30_percent(seed):
    torchvision = pytest.importorskip("torchvision")
    slim, dead, before = _cut(torchvision.models.resnet18(), (torch.randn(2, 3, 64, 64),),
                              unseen=(torch.randn(2, 3, 64, 64),), seed=seed)
    assert len(dead) == 1 and _gone(before, slim) == _under(before, dead)


def test_convnext_blocks_bypassed():
    cnblock = pytest.importorskip("torchvision.models.convnext").CNBlock
    model = nn.Sequential(nn.Conv2d(3, 16, 4, 4), *[cnblock(16, 1e-6, 0.0) for _ in range(5)],
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))
    slim, dead, before = _cut(model, (torch.randn(2, 3, 32, 32),), unseen=(torch.randn(4, 3, 48, 48),), fraction=0.4)
    assert len(dead) == 2
    assert all(isinstance(slim.get_submodule(name), Bypass) for name in dead)
    assert _gone(before, slim) == _under(before, dead)  # the layer scale too


def test_timm_vit_attention_and_mlp_branches():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=4,
                              num_classes=5)
    slim, dead, before = _cut(model, (torch.randn(2, 3, 32, 32),), unseen=(torch.randn(3, 3, 32, 32),), seed=3)
    assert len(dead) == 2
    norm = {"attn": "norm1", "mlp": "norm2"}  # each branch's pre-norm goes with it
    expected = _under(before, dead + [f"{n.rpartition('.')[0]}.{norm[n.rpartition('.')[2]]}" for n in dead])
    assert _gone(before, slim) == expected
    assert all(isinstance(slim.get_submodule(name), ZeroBranch) for name in dead)


class _Inline(nn.Module):
    """Two residual branches written in one forward (OPT's and BERT's MLPs): each one's layers widen
    and narrow the last dim, so a removed one's layers become zeros of their output's width."""

    def __init__(self, d=8):
        super().__init__()
        self.fc1, self.fc2, self.fc3, self.fc4 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d), nn.Linear(d, 4 * d), \
            nn.Linear(4 * d, d)

    def forward(self, x):
        x = x + self.fc2(torch.relu(self.fc1(x)))
        return x + self.fc4(torch.relu(self.fc3(x)))


class _Leaky(nn.Module):
    """A branch whose hidden activation is also read after the add, and one that ends in a ReLU."""

    def __init__(self, d=8):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        h = self.fc1(x)
        x = x + self.fc2(torch.relu(h))
        x = x + torch.relu(self.fc3(x))
        return x * h.sigmoid()


def _reasons(model, x) -> list:
    return [r for s in analyze(model, (x,)).sets if s.kind == "blocks" for r in s.reasons]


def test_inline_branches_that_change_the_width():
    model = nn.Sequential(nn.Linear(4, 8), _Inline(), nn.Linear(8, 3))
    slim, dead, before = _cut(model, (torch.randn(3, 4),), unseen=(torch.randn(5, 2, 4),), kill=["1.fc4"])
    assert [(type(m).__name__, m.width) for m in (slim[1].fc3, slim[1].fc4)] == [("ZeroBranch", 32), ("ZeroBranch", 8)]
    assert _gone(before, slim) == _under(before, ["1.fc3", "1.fc4"])


def test_refusals_say_why():
    x = torch.randn(3, 8)
    leaky = _reasons(_Leaky(), x)
    assert "layer 'fc1' (Linear) in the branch" in leaky[0] and "outside the branch" in leaky[0]
    assert "ends in" in leaky[1] and "whose output no parameter scales" in leaky[1]
    with pytest.raises(GatingError, match="no exactly removable blocks"):
        dg.gate_model(_Leaky(), BLOCKS, (x,))


class _Residual(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.norm, self.mlp = nn.LayerNorm(d), nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        return x + self.mlp(self.norm(x))


def test_every_branch_dead_and_gradients_reach_the_gates():
    """All branches but one die (every gate keeps its strongest group); training steps move the gates."""
    model = nn.Sequential(nn.Linear(4, 8), *[_Residual() for _ in range(4)], nn.Linear(8, 3))
    x = torch.randn(5, 4)
    gated = dg.gate_model(model, BLOCKS, (x,))
    loss = gated(x).square().mean() + dg.penalty(gated, 1e-2)
    loss.backward()
    (gate,) = dg.gates(gated)
    assert gate.factors.grad is not None and gate.factors.grad.abs().sum() > 0
    with torch.no_grad():
        gate.factors[0, :3] = 0.0
    out = gated(x)
    report = dg.sparsity(gated)
    dg.shrink(gated)
    assert _diff(out, gated(x)) <= 1e-4
    assert [type(m).__name__ for m in gated] == ["Linear", "Bypass", "Bypass", "Bypass", "_Residual", "Linear"]
    assert report.params_removable == 3 * sum(p.numel() for p in _Residual().parameters())


def test_save_slim_round_trip_and_manifest_checked(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    x = torch.randn(2, 3, 64, 64)
    slim, dead, _ = _cut(torchvision.models.resnet18(), (x,), kill=["layer2.1"])
    path = tmp_path / "slim.safetensors"
    dg.save_slim(slim, path, reference="torchvision.models:resnet18")
    loaded = dg.load_slim(path)
    assert isinstance(loaded.layer2[1], Bypass)
    assert torch.equal(loaded(x), slim(x))
    manifest = dg.read_manifest(path)
    assert manifest["removed_branches"] == {"layer2.1": {"as": "bypass", "returns": 0}}


@pytest.mark.parametrize("bad, message", [
    ({"layer2.1": {"as": "delete", "returns": 0}}, "removed_branches.layer2.1.as': must be 'bypass' or 'zeros'"),
    ({"layer9.1": {"as": "bypass", "returns": 0}}, "removed_branches': .*layer9"),
])
def test_manifest_removed_branches_validated(tmp_path, bad, message):
    from dgating_surgery.checkpoints.manifest import digest
    torchvision = pytest.importorskip("torchvision")
    x = torch.randn(1, 3, 64, 64)
    slim, _, _ = _cut(torchvision.models.resnet18(), (x,), kill=["layer2.1"])
    path = tmp_path / "slim.safetensors"
    dg.save_slim(slim, path, reference="torchvision.models:resnet18")
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(path, framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    key = next(k for k, v in meta.items() if v.startswith("{"))
    manifest = json.loads(meta[key])
    manifest["removed_branches"] = bad
    manifest["sha256"] = digest(manifest, state)
    save_file(state, os.fspath(path), metadata={**meta, key: json.dumps(manifest)})
    with pytest.raises(CheckpointError, match=message):
        dg.load_slim(path)


def _decoder(name):
    """(model, its layer list's path, the names of its attention/MLP branches and their pre-norms)."""
    T = pytest.importorskip("transformers")
    small = dict(vocab_size=100, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=48)
    if name == "llama":
        return T.LlamaForCausalLM(T.LlamaConfig(num_key_value_heads=2, **small)), "model.layers", \
            ("self_attn", "input_layernorm"), ("mlp", "post_attention_layernorm")
    if name == "qwen2":  # a config with per-layer lists (layer_types)
        return T.Qwen2ForCausalLM(T.Qwen2Config(num_key_value_heads=2, **small)), "model.layers", \
            ("self_attn", "input_layernorm"), ("mlp", "post_attention_layernorm")
    return T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_layer=4, n_head=4, vocab_size=100)), "transformer.h", \
        ("attn", "ln_1"), ("mlp", "ln_2")


@pytest.mark.parametrize("name", ["llama", "gpt2", "qwen2"])
def test_decoder_layers_dropped_and_branches_removed(name, tmp_path):
    """Layer 1 loses both branches (it leaves the layer list), layer 0 its attention (the KV cache's
    length is read from layer 0), layer 2 its MLP: exact on unseen padded inputs, generate with the
    KV cache gives the gated model's tokens, and the save_pretrained directory loads back."""
    model, layers, (attn, attn_norm), (mlp, mlp_norm) = _decoder(name)
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    unseen = torch.randint(0, 100, (3, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(unseen)
    mask[0, :4] = 0  # left padding
    layer_types = getattr(model.config, "layer_types", None)
    kill = [f"{layers}.0.{attn}", f"{layers}.1.{attn}", f"{layers}.1.{mlp}", f"{layers}.2.{mlp}"]
    dg.expose_weights(model.eval())
    before = _params(model)
    gated = dg.gate_model(model, BLOCKS, (ids,), {"use_cache": False})
    (gate,) = dg.gates(gated)
    with torch.no_grad():
        gate.factors[0, [gate.modules.index(n) for n in kill]] = 0.0
        expected = gated(unseen, attention_mask=mask, use_cache=False).logits
        tokens = gated.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    dg.shrink(gated)
    gone = _under(before, [f"{layers}.1", f"{layers}.0.{attn}", f"{layers}.0.{attn_norm}", f"{layers}.2.{mlp}",
                           f"{layers}.2.{mlp_norm}"])
    assert sum(map(_numel, before.values())) - sum(p.numel() for p in gated.parameters()) == \
        sum(_numel(before[n]) for n in gone)
    stack = gated.get_submodule(layers)
    assert gated.config.num_hidden_layers == len(stack) == 3
    if layer_types is not None:
        assert gated.config.layer_types == [layer_types[i] for i in (0, 2, 3)]
    assert isinstance(getattr(stack[0], attn), ZeroBranch) and isinstance(getattr(stack[1], mlp), ZeroBranch)
    assert [getattr(layer, attn).layer_idx for layer in stack] == [0, 1, 2]  # the KV-cache indices
    with torch.no_grad():
        assert _diff(expected, gated(unseen, attention_mask=mask, use_cache=False).logits) <= 1e-4
        assert torch.equal(tokens, gated.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5,
                                                  do_sample=False))
        # decoding on the KV cache without positions: they come from the cache's length, which layer 0 keeps
        longer = torch.cat([ids, unseen[:2, :3]], 1)
        cache = gated(ids, use_cache=True).past_key_values
        step = gated(longer[:, -3:], cache=cache, use_cache=True).logits
        assert _diff(gated(longer, use_cache=False).logits[:, -3:], step) <= 1e-4
    gated.save_pretrained(tmp_path)
    loaded = type(gated).from_pretrained(tmp_path).eval()
    assert loaded.config.num_hidden_layers == 3
    with torch.no_grad():
        assert _diff(expected, loaded(unseen, attention_mask=mask, use_cache=False).logits) <= 1e-4
        assert torch.equal(tokens, loaded.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5,
                                                   do_sample=False))


def _numel(shape) -> int:
    return int(torch.Size(shape).numel())


def test_blocks_with_the_other_kinds():
    """A branch's gate scales its last layer whole, composed with the gates of the groups inside it (a
    ResNet block's last BatchNorm carries the residual stream's channels; a Llama's o_proj the heads'
    columns and the hidden size's rows): every kind at once, still exact."""
    torchvision = pytest.importorskip("torchvision")
    T = pytest.importorskip("transformers")
    check = assert_exact_cut(torchvision.models.resnet18(), (torch.randn(2, 3, 64, 64),),
                             {"D": 3, "groups": [{"kind": "channels"}, {"kind": "blocks"}]}, fraction=0.4, seed=1)
    assert check.groups_gated > 5
    llama = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                             num_key_value_heads=2, intermediate_size=48))
    kinds = [{"kind": k} for k in ("heads", "neurons", "hidden", "blocks")]
    assert_exact_cut(llama, (torch.randint(0, 100, (2, 8)),), {"D": 3, "groups": kinds}, fraction=0.5,
                     example_kwargs={"use_cache": False})
    assert llama.config.num_hidden_layers == len(llama.model.layers) < 4


def test_zero_widths_follow_the_other_cuts():
    """A removed branch's zero layers that change the width take the slim width: the rows the neuron
    cuts of the same linears remove (its hidden neurons, the stream it writes) are not in their zeros."""
    model = nn.Sequential(nn.Linear(4, 8), _Inline(), nn.Linear(8, 3))
    x = torch.randn(3, 4)
    gated = dg.gate_model(dg.expose_weights(model.eval()), {"D": 3, "groups": [{"kind": "neurons"}, {"kind": "blocks"}]},
                          (x,))
    with torch.no_grad():
        for gate in dg.gates(gated):
            if gate.kind == "blocks":
                gate.factors[0, gate.modules.index("1.fc4")] = 0.0
            else:
                gate.factors[0, :2] = 0.0
        out = gated(x)
    names = {g.name.split(" ")[0] for g in dg.gates(gated)}
    assert {"0", "1.fc3"} <= names  # the stream (written by 0, fc2, fc4) and fc3's neurons are cut too
    dg.shrink(gated)
    assert _diff(out, gated(x)) <= 1e-4
    assert (gated[1].fc3.width, gated[1].fc4.width) == (30, 6) == (32 - 2, gated[2].in_features)
