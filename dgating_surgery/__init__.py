"""dgating-surgery: structured sparsity for any PyTorch model through D-Gating, then surgery that
physically removes the dead groups.

    import dgating_surgery as dg
    gated = dg.gate_model(model, "resnet", example_inputs=torch.randn(1, 3, 224, 224))
    ...train with dg.param_groups(gated, lam) or loss + dg.penalty(gated, lam)...
    slim = dg.shrink(gated, example_inputs=...)
"""
from .checkpoint import kept_groups, load_gated, load_slim, read_manifest, save_gated, save_slim
from .errors import (CheckpointError, DGatingError, GatingError, LambdaError, ModelSpecError, NotGatedError,
                     RecipeError, ShrinkError, TraceError, WrapperError)
from .execution import max_rel_diff, output_diff
from .gates import DGate, analyze, apply_plan, gate_model, gates
from .measure import latency_ms, macs, macs_after_cut
from .models import load_model
from .recipe import GroupSpec, Recipe, load_recipe, shipped_recipes
from .report import model_params, sparsity
from .search import SearchResult, removed_fraction, search_lambda
from .selfcheck import CutCheck, expose_weights, kill_random_groups, random_cut_check
from .shrink import plan_cut, select_features, shrink
from .training import (SparsityMonitor, check_optimizer, group_norms, imbalance, param_groups, penalty,
                       track)
from .schedule import LambdaScheduler, set_lam
from .wrappers import convert_sync_batchnorm, full_params, unwrap

__version__ = "0.1.0"

__all__ = [
    # gate, inspect, cut
    "gate_model", "analyze", "apply_plan", "gates", "DGate", "plan_cut", "shrink", "select_features",
    # recipes
    "load_recipe", "shipped_recipes", "Recipe", "GroupSpec",
    # training
    "param_groups", "penalty", "check_optimizer", "track", "SparsityMonitor", "group_norms", "imbalance",
    "search_lambda", "SearchResult", "removed_fraction", "LambdaScheduler", "set_lam",
    # wrapped models (DDP, FSDP2, torch.compile, SyncBatchNorm)
    "unwrap", "full_params", "convert_sync_batchnorm",
    # figures and checks
    "sparsity", "model_params", "macs", "macs_after_cut", "latency_ms", "output_diff", "max_rel_diff",
    "random_cut_check", "CutCheck", "kill_random_groups", "expose_weights",
    # checkpoints and models
    "save_slim", "load_slim", "save_gated", "load_gated", "kept_groups", "read_manifest", "load_model",
    # errors
    "DGatingError", "RecipeError", "TraceError", "GatingError", "NotGatedError", "ShrinkError", "CheckpointError",
    "ModelSpecError", "WrapperError", "LambdaError",
]
