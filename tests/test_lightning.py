"""Lightning: the callback checks the optimizer from configure_optimizers, logs dead groups and
removable parameters to the trainer's logger (a CSV file here) and ramps lambda; its schedule
state is saved in Lightning checkpoints."""
import csv
import warnings

import pytest
import torch
import torch.nn.functional as F

import dgating_surgery as dg
from dist_worker import RECIPE, data

L = pytest.importorskip("lightning.pytorch")
from dgating_surgery.integrations.lightning import DGatingCallback  # noqa: E402
from models import MLP  # noqa: E402

LAM, THRESHOLD = 0.05, 1e-3


class Module(L.LightningModule):
    def __init__(self, optimizer="param_groups"):
        super().__init__()
        torch.manual_seed(0)
        X, _ = data()
        self.net = dg.gate_model(MLP(), RECIPE, X[:4])
        self.optimizer = optimizer

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        if self.optimizer == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=0.01, weight_decay=0.01)
        return torch.optim.SGD(dg.param_groups(self.net, lam=LAM, weight_decay=1e-3), lr=0.2, momentum=0.9)


def loader():
    X, y = data()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=128)


def trainer(tmp_path, callback, epochs, **kwargs):
    return L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=L.loggers.CSVLogger(tmp_path),
                     callbacks=[callback], enable_progress_bar=False, enable_model_summary=False,
                     log_every_n_steps=1, **kwargs)


def read_metrics(tmp_path):
    (path,) = tmp_path.glob("lightning_logs/version_*/metrics.csv")
    with open(path) as f:
        return list(csv.DictReader(f))


def test_callback_logs_sparsity_and_ramps_lambda(tmp_path):
    module = Module()
    callback = DGatingCallback(schedule={"warmup_steps": 40}, threshold=THRESHOLD, every_n_steps=10)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, callback, epochs=40, enable_checkpointing=False).fit(module, loader())
    assert [str(w.message) for w in caught if "gated" in str(w.message)] == [] and callback.problems == []
    rows = read_metrics(tmp_path)
    epochs = [r for r in rows if r.get("dgating/dead_groups")]
    steps = [r for r in rows if r.get("dgating/lam_step")]
    assert len(epochs) == 40 and [int(r["step"]) for r in steps] == list(range(9, 80, 10))
    assert [float(r["dgating/lam_step"]) for r in steps[:4]] == pytest.approx([LAM / 4, LAM / 2, 3 * LAM / 4, LAM])
    report = dg.sparsity(module.net, THRESHOLD)
    assert float(epochs[-1]["dgating/dead_groups"]) == report.dead > 0
    assert float(epochs[-1]["dgating/params_removable"]) == report.params_removable
    assert float(epochs[-1]["dgating/groups"]) == 35
    # logged with pl_module.log_dict: ModelCheckpoint and early stopping can monitor them
    assert module.trainer.callback_metrics["dgating/dead_fraction"].item() == pytest.approx(report.dead / 35)


def test_adamw_from_configure_optimizers_is_reported(tmp_path):
    callback = DGatingCallback()
    with pytest.warns(UserWarning, match=r"Lightning: AdamW applies decoupled weight decay \(0.01\) to gated parameters"):
        trainer(tmp_path, callback, epochs=1, enable_checkpointing=False).fit(Module("adamw"), loader())
    assert len(callback.problems) == 1


def test_schedule_state_survives_a_checkpoint(tmp_path):
    callback = DGatingCallback(schedule={"target": 0.5, "by_step": 60, "every": 10}, threshold=THRESHOLD)
    fit = trainer(tmp_path / "a", callback, epochs=10, enable_checkpointing=True,
                  default_root_dir=tmp_path / "a")
    fit.fit(Module(), loader())
    (ckpt,) = (tmp_path / "a").glob("lightning_logs/version_*/checkpoints/*.ckpt")
    state = callback.scheduler.state_dict()
    assert state["last_step"] == 20 and state["scale"]["all"] != 1  # the controller moved lambda
    resumed = DGatingCallback(schedule={"target": 0.5, "by_step": 60, "every": 10}, threshold=THRESHOLD)
    again = trainer(tmp_path / "b", resumed, epochs=11, enable_checkpointing=False)
    again.fit(Module(), loader(), ckpt_path=str(ckpt))
    assert resumed.scheduler.measured[: len(state["measured"])] == [tuple(m) for m in state["measured"]]
    assert resumed.scheduler.last_step == 22


def test_callback_with_a_size_target(tmp_path):
    """DGatingCallback(target=..., metric="params") lays the run out over the trainer's steps and
    lands on the target; the held groups are what the cut removes."""
    module = Module()
    module.configure_optimizers = lambda: torch.optim.Adam(dg.param_groups(module.net, lam=1e-2), lr=0.01)
    callback = DGatingCallback(target=0.5, metric="params")
    trainer(tmp_path, callback, epochs=80, enable_checkpointing=False).fit(module, loader())
    sched = callback.scheduler
    assert (sched.start_step, sched.by_step) == (40, 100) and sched.recovering
    assert abs(dg.removed_fraction(module.net, "params") - 0.5) <= 0.03
    held = sum(int(m.sum()) for m in sched.held_masks.values())
    assert sum(int(d.sum()) for d in dg.plan_cut(module.net).dead.values()) == held > 0
    assert float(read_metrics(tmp_path)[-1]["dgating/held_groups"]) == held
