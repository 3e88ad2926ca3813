"""The Hugging Face Trainer: the optimizer built from dg.param_groups, the callback that checks
it, logs dead groups and removable parameters into the Trainer's logs and ramps lambda; a tiny
in-memory data set, CPU."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dgating_surgery as dg
from dist_worker import RECIPE, data

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from dgating_surgery.integrations.hf import DGatingCallback, dgating_optimizer  # noqa: E402
from models import MLP  # noqa: E402

LAM, THRESHOLD = 0.05, 1e-3


class Classifier(nn.Module):
    """What the Trainer expects: keyword inputs, a dict with the loss. The network inside is gated."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        X, _ = data()
        self.net = dg.gate_model(MLP(), RECIPE, X[:4])
        self.temperature = nn.Parameter(torch.ones(()))  # a parameter outside the gated module

    def forward(self, x, labels=None):
        logits = self.net(x) * self.temperature
        return {"logits": logits} if labels is None else {"loss": F.cross_entropy(logits, labels), "logits": logits}


def dataset():
    X, y = data()
    return [{"x": a, "labels": b} for a, b in zip(X, y)]


def arguments(tmp_path, **kwargs):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=128, learning_rate=0.2, max_steps=80,
                logging_steps=20, report_to="none", use_cpu=True, save_strategy="no", lr_scheduler_type="constant",
                disable_tqdm=True, seed=0, weight_decay=1e-3)
    return transformers.TrainingArguments(**{**base, **kwargs})


def trainer_for(model, args, optimizer=None, callbacks=()):
    return transformers.Trainer(model=model, args=args, train_dataset=dataset(), callbacks=list(callbacks),
                                optimizers=(optimizer, None))


def test_trainer_with_the_dgating_optimizer_logs_sparsity_and_ramps_lambda(tmp_path):
    model = Classifier()
    args = arguments(tmp_path)
    opt = dgating_optimizer(model, args, lam=LAM, optimizer_cls=torch.optim.SGD, momentum=0.9)
    assert [len(g["params"]) for g in opt.param_groups] == [6, 3]  # 4 thetas + 2 gates; fc3 and the temperature
    callback = DGatingCallback(schedule={"warmup_steps": 40}, threshold=THRESHOLD)
    trainer = trainer_for(model, args, opt, [callback])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert [str(w.message) for w in caught if "gated" in str(w.message)] == [] and callback.problems == []
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logs] == [20, 40, 60, 80]
    assert [entry["dgating/lam"] for entry in logs] == pytest.approx([LAM / 2, LAM, LAM, LAM])
    assert opt.param_groups[0]["weight_decay"] == pytest.approx(2 * LAM / 3)
    report = dg.sparsity(model.net, THRESHOLD)
    assert logs[-1]["dgating/dead_groups"] == report.dead > 0
    assert logs[-1]["dgating/groups"] == 35
    assert logs[-1]["dgating/params_removable"] == report.params_removable > 0
    assert logs[0]["dgating/dead_groups"] <= logs[-1]["dgating/dead_groups"]


@pytest.mark.parametrize("weight_decay, expected", [
    (0.0, "Trainer: gated parameters have weight_decay=0, but lam=0.0001, D=3 needs 2*lam/D=6.66667e-05: nothing "
          "regularizes the gates"),
    (0.01, "Trainer: AdamW applies decoupled weight decay (0.01) to gated parameters"),
])
def test_the_trainers_default_adamw_is_reported(tmp_path, weight_decay, expected):
    callback = DGatingCallback()
    trainer = trainer_for(Classifier(), arguments(tmp_path, max_steps=2, weight_decay=weight_decay), None, [callback])
    with pytest.warns(UserWarning) as caught:
        trainer.train()
    assert any(str(w.message).startswith(expected) for w in caught)
    # the default splits parameters into decayed and undecayed (biases) groups: a problem for each
    assert any(p.startswith(expected.removeprefix("Trainer: ")) for p in callback.problems)
    with pytest.raises(TypeError, match="AdamW's weight decay is decoupled"):
        dgating_optimizer(Classifier(), optimizer_cls=torch.optim.AdamW)


def test_attach_puts_the_callback_before_the_report_integrations(tmp_path):
    trainer = trainer_for(Classifier(), arguments(tmp_path, max_steps=1))
    callback = DGatingCallback().attach(trainer)
    assert trainer.callback_handler.callbacks[0] is callback


def test_trainer_checkpoint_and_resume(tmp_path):
    def run(resume=None, max_steps=40):
        model = Classifier()
        args = arguments(tmp_path, max_steps=max_steps, save_strategy="steps", save_steps=20)
        opt = dgating_optimizer(model, args, lam=LAM, optimizer_cls=torch.optim.SGD, momentum=0.9)
        trainer = trainer_for(model, args, opt, [DGatingCallback(schedule={"warmup_steps": 30})])
        trainer.train(resume_from_checkpoint=resume)
        return model, opt

    whole, _ = run()
    resumed, opt = run(resume=str(tmp_path / "checkpoint-20"))
    for a, b in zip(dg.gates(whole.net), dg.gates(resumed.net)):
        torch.testing.assert_close(a.factors, b.factors)
    assert opt.param_groups[0]["dgating_lam"] == pytest.approx(LAM)


def test_callback_with_a_size_target_holds_the_chosen_groups_and_shrink_cuts_them(tmp_path):
    """DGatingCallback(target=..., metric="params"): the run is laid out over max_steps (dense,
    penalty, recovery); the slim model removes the target's share of the parameters."""
    model = Classifier()
    args = arguments(tmp_path, max_steps=160, learning_rate=0.1)
    opt = dgating_optimizer(model, args, lam=1e-3, optimizer_cls=torch.optim.SGD, momentum=0.9)
    callback = DGatingCallback(target=0.5, metric="params")
    trainer = trainer_for(model, args, opt, [callback])
    trainer.train()
    sched = callback.scheduler
    assert (sched.start_step, sched.by_step) == (40, 100) and sched.recovering
    assert opt.param_groups[0]["weight_decay"] == 0.0
    assert abs(dg.removed_fraction(model.net, "params") - 0.5) <= 0.03
    held = sum(int(m.sum()) for m in sched.held_masks.values())
    assert sum(int(d.sum()) for d in dg.plan_cut(model.net).dead.values()) == held > 0
    logged = [entry for entry in trainer.state.log_history if "dgating/held_groups" in entry]
    assert logged[-1]["dgating/held_groups"] == held and logged[-1]["dgating/lam"] == 0.0
    X, _ = data()
    removable, before = dg.sparsity(model.net).params_removable, dg.model_params(model.net)
    slim = dg.shrink(model.net, example_inputs=X[:16])
    assert before - dg.model_params(slim) == removable


def test_callback_distills_from_the_penalty_start(tmp_path):
    """distill=<weight>: a frozen copy taken at the penalty's start teaches the model; its KL term
    is in the loss the Trainer minimizes."""
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=4, intermediate_size=64, use_cache=False)
    torch.manual_seed(0)
    ids = (torch.randint(0, 32, (16, 1)) + torch.arange(12)) % 32
    model = dg.gate_model(transformers.LlamaForCausalLM(config), {"D": 3, "groups": [{"kind": "neurons"}]},
                          example_kwargs={"input_ids": ids[:1]})
    args = arguments(tmp_path, max_steps=16, learning_rate=3e-3, per_device_train_batch_size=8, logging_steps=4)
    opt = dgating_optimizer(model, args, lam=1e-3)
    callback = DGatingCallback(target=0.5, distill=1.0)
    data = [{"input_ids": row, "labels": row} for row in ids]
    transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[callback],
                         optimizers=(opt, None)).train()
    distiller = callback.core.distiller
    assert callback.scheduler.start_step == 4 and distiller.teacher is not None
    model.train()
    with_term = model(input_ids=ids[:4], labels=ids[:4])
    distiller.detach()
    plain = model(input_ids=ids[:4], labels=ids[:4])
    torch.testing.assert_close(with_term.loss, plain.loss + distiller.loss(plain.logits, input_ids=ids[:4]))
    assert float((with_term.loss - plain.loss).detach()) > 0


def _tied_llama(tie: bool):
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=96, tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(config).eval()


def test_tie_weights_on_a_gated_model_with_a_gated_tied_embedding():
    """transformers' tie_weights looks the tied weight up as a parameter; gating puts it under a
    parametrization in both uses, over one primary tensor. On a gated model it finds the pair tied and
    leaves the model as it is; a pair the config says to tie but that is two tensors is a clear error."""
    from dgating_surgery.engine.gates import primary
    torch.manual_seed(0)
    ids = torch.randint(0, 100, (1, 8))
    gated = dg.gate_model(dg.expose_weights(_tied_llama(True)), "llama", ids, {"use_cache": False})
    dg.kill_random_groups(gated, 0.3, seed=0)
    before = gated(ids, use_cache=False).logits
    gated.tie_weights()
    assert primary(gated, "lm_head.weight") is primary(gated, "model.embed_tokens.weight")
    assert torch.equal(gated(ids, use_cache=False).logits, before)
    slim = dg.shrink(gated)
    slim.tie_weights()  # the slim model is an ordinary one again: transformers' own tie_weights
    assert slim.lm_head.weight is slim.model.embed_tokens.weight
    assert dg.max_rel_diff(before, slim(ids, use_cache=False).logits) < 1e-4
    untied = dg.gate_model(_tied_llama(False), "llama", ids, {"use_cache": False})
    untied.config.tie_word_embeddings = True
    with pytest.raises(dg.GatingError, match=r"LlamaForCausalLM.tie_weights: 'lm_head.weight' and "
                                             r"'model.embed_tokens.weight' of this gated model are not one tensor"):
        untied.tie_weights()
