"""dgating-surgery: structured sparsity for any PyTorch model through D-Gating, then surgery that
physically removes the dead groups.

    import dgating_surgery as dg
    gated = dg.gate_model(model, "resnet", example_inputs=torch.randn(1, 3, 224, 224))
    ...train with dg.param_groups(gated, lam) or loss + dg.penalty(gated, lam)...
    slim = dg.shrink(gated, example_inputs=...)   # cuts `gated` in place and returns it

Importing the package is cheap: each public name is imported from its module (and torch with it)
on first use, so that ``dgate --help`` does not wait for torch.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

# public name -> the module that defines it
_HOME = {
    **dict.fromkeys(["kept_groups", "load_gated", "load_slim", "read_manifest", "save_gated", "save_slim"],
                    "checkpoints.checkpoint"),
    **dict.fromkeys(["CheckpointError", "DGatingError", "GatingError", "LambdaError", "ModelSpecError",
                     "NotGatedError", "RecipeError", "ShrinkError", "TraceError", "UntrustedCodeError",
                     "WrapperError"], "errors"),
    **dict.fromkeys(["max_rel_diff", "output_diff"], "engine.execution"),
    **dict.fromkeys(["DGate", "analyze", "apply_plan", "gate_model", "gates"], "engine.gates"),
    **dict.fromkeys(["gate_sides", "set_gate_side"], "engine.gate_modes"),
    **dict.fromkeys(["latency_ms", "macs", "macs_after_cut"], "engine.measure"),
    "load_model": "checkpoints.models",
    **dict.fromkeys(["GroupSpec", "Recipe", "load_recipe", "shipped_recipes"], "engine.recipe"),
    **dict.fromkeys(["model_params", "sparsity", "uniform_cost", "UniformCost"], "engine.report"),
    **dict.fromkeys(["SearchResult", "removed_fraction", "search_lambda"], "training.search"),
    **dict.fromkeys(["CutCheck", "expose_weights", "kill_random_groups", "random_cut_check"], "engine.selfcheck"),
    **dict.fromkeys(["plan_cut", "select_features", "shrink"], "engine.shrink"),
    **dict.fromkeys(["SparsityMonitor", "check_optimizer", "group_norms", "imbalance", "param_groups", "penalty",
                     "track"], "training.regularizer"),
    **dict.fromkeys(["LambdaScheduler", "set_lam"], "training.schedule"),
    **dict.fromkeys(["collapsed_groups", "hold"], "engine.deadness"),
    **dict.fromkeys(["full_params", "unwrap"], "engine.wrappers"),
    "convert_sync_batchnorm": "training.distributed",
}

# module paths the documentation names, from before the modules moved into folders -> where they are
_MODULES = {"distill": "training.distill", "report": "engine.report", "slim_layers": "engine.slim_layers"}

__all__ = [
    # gate, inspect, cut
    "gate_model", "analyze", "apply_plan", "gates", "DGate", "plan_cut", "shrink", "select_features",
    "set_gate_side", "gate_sides",
    # recipes
    "load_recipe", "shipped_recipes", "Recipe", "GroupSpec",
    # training
    "param_groups", "penalty", "check_optimizer", "track", "SparsityMonitor", "group_norms", "imbalance",
    "search_lambda", "SearchResult", "removed_fraction", "LambdaScheduler", "set_lam",
    "collapsed_groups", "hold",
    # wrapped models (DDP, FSDP2, torch.compile, SyncBatchNorm)
    "unwrap", "full_params", "convert_sync_batchnorm",
    # figures and checks
    "sparsity", "uniform_cost", "UniformCost", "model_params", "macs", "macs_after_cut", "latency_ms", "output_diff", "max_rel_diff",
    "random_cut_check", "CutCheck", "kill_random_groups", "expose_weights",
    # checkpoints and models
    "save_slim", "load_slim", "save_gated", "load_gated", "kept_groups", "read_manifest", "load_model",
    # errors
    "DGatingError", "RecipeError", "TraceError", "GatingError", "NotGatedError", "ShrinkError", "CheckpointError",
    "UntrustedCodeError", "ModelSpecError", "WrapperError", "LambdaError",
]


def __getattr__(name: str):
    """A public name (imported from its module on first use) or a submodule (``dg.engine``,
    ``dg.report``)."""
    home = _HOME.get(name)
    if home is not None:
        value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    if not name.startswith("__"):
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Moved(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``import dgating_surgery.distill`` (a module path of ``_MODULES``) gives the module where it
    lives now, the same object, under both names."""

    def find_spec(self, fullname, path=None, target=None):
        package, _, name = fullname.rpartition(".")
        if package != __name__ or name not in _MODULES:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        module = importlib.import_module(f"{__name__}.{_MODULES[spec.name.rpartition('.')[2]]}")
        spec.loader_state = module.__spec__  # the import system sets the alias's spec on it: put back below
        return module

    def exec_module(self, module):
        module.__spec__ = module.__spec__.loader_state


sys.meta_path.insert(0, _Moved())  # before an editable install's finder, which would look for the file

from .plugins import watch_transformers  # noqa: E402  (cheap: no torch import)

watch_transformers()
