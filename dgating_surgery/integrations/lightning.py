"""D-Gating with Lightning (``pip install 'dgating-surgery[lightning]'``; ``lightning`` or
``pytorch_lightning``).

Build the optimizer from ``dg.param_groups`` in ``configure_optimizers`` and add the callback::

    class Module(L.LightningModule):
        def __init__(self, gated):
            super().__init__()
            self.net = gated
        def configure_optimizers(self):
            return torch.optim.SGD(dg.param_groups(self.net, lam=1e-3, weight_decay=5e-4), lr=0.05, momentum=0.9)

    trainer = L.Trainer(callbacks=[DGatingCallback(schedule={"warmup_steps": 200})])

``DGatingCallback`` checks the optimizer when training starts (a warning per problem), logs
``dgating/dead_groups``, ``dgating/params_removable``, ... with ``pl_module.log_dict`` at the end
of every epoch (so every logger sees them and ``ModelCheckpoint`` can monitor them) and, with
``every_n_steps``, every n optimizer steps (keys ending in ``_step``); with ``schedule`` it steps a ``LambdaScheduler`` with
the trainer's global step, and its state is saved in Lightning checkpoints.
"""
from __future__ import annotations

try:
    from lightning.pytorch import Callback
except ImportError:  # pragma: no cover - depends on the environment
    try:
        from pytorch_lightning import Callback
    except ImportError as exc:
        raise ImportError("dgating_surgery.integrations.lightning needs Lightning: pip install "
                          "'dgating-surgery[lightning]'") from exc

from . import CallbackCore, CoreView


class DGatingCallback(CoreView, Callback):
    """Checks the optimizer, logs sparsity, ramps lambda; for ``Trainer(callbacks=[...])``.

    ``model``: the gated module (default: the LightningModule's first gated submodule).
    ``lam``: the lambda to check and to schedule (default: what ``dg.param_groups`` recorded).
    ``schedule``: ``LambdaScheduler`` arguments (``{"warmup_steps": 200}``, ``{"target": 0.5,
    "by_step": 2000}``) or a ``LambdaScheduler``. ``every_n_steps``: also log every n steps.
    ``target`` and ``metric``: a size for the slim model reached within this run (as the Hugging
    Face callback: over ``trainer.estimated_stepping_batches``); ``dg.shrink`` after training.
    ``distill``: as the Hugging Face callback's (the gated module must compute its own loss).
    Under DDP/FSDP2 every rank computes the same figures (FSDP2: gathered, a collective).
    """

    def __init__(self, model=None, lam: float | None = None, schedule=None, threshold: float | None = None,
                 uses_penalty: bool = False, every_n_steps: int | None = None, target=None, metric: str = "params",
                 distill: float | None = None, uniform: bool = False):
        self.core = CallbackCore(model, lam, schedule, threshold, uses_penalty, target=target, metric=metric,
                                 distill=distill, uniform=uniform)
        self.every_n_steps = every_n_steps

    def on_train_start(self, trainer, pl_module):
        total = trainer.estimated_stepping_batches
        self.core.begin(pl_module, list(trainer.optimizers), trainer.global_step, "Lightning",
                        int(total) if total is not None and total != float("inf") else None)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.core.step(trainer.global_step)
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            pl_module.log_dict({f"{k}_step": v for k, v in self.core.metrics().items()}, on_step=True, on_epoch=False)

    def on_train_epoch_end(self, trainer, pl_module):
        pl_module.log_dict(self.core.metrics(), on_step=False, on_epoch=True)

    def state_dict(self) -> dict:
        return self.core.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.core.load_state_dict(state_dict)
