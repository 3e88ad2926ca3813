"""dgating-surgery: structured sparsity for any PyTorch model through D-Gating, then surgery that
physically removes the dead groups.

    import dgating_surgery as dg
    gated = dg.gate_model(model, "resnet", example_inputs=torch.randn(1, 3, 224, 224))
    ...train with dg.param_groups(gated, lam) or loss + dg.penalty(gated, lam)...
    slim = dg.shrink(gated, example_inputs=...)
"""
from .checkpoint import CheckpointError, kept_groups, load_gated, load_slim, read_manifest, save_gated, save_slim
from .errors import DGatingError, GatingError, RecipeError, ShrinkError, TraceError
from .gates import DGate, analyze, gate_model, gates
from .models import ModelSpecError, load_model
from .recipe import GroupSpec, Recipe, load_recipe, shipped_recipes
from .report import sparsity
from .shrink import plan_cut, shrink
from .search import SearchResult, count_macs, removed_fraction, search_lambda
from .training import (SparsityMonitor, check_optimizer, group_norms, imbalance, param_groups, penalty,
                       track)

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "ModelSpecError", "kept_groups", "load_gated", "load_model", "load_slim", "read_manifest",
    "save_gated", "save_slim",
    "DGate", "DGatingError", "GatingError", "GroupSpec", "Recipe", "RecipeError", "ShrinkError", "TraceError",
    "analyze", "gate_model", "gates", "load_recipe", "param_groups", "penalty", "plan_cut", "shipped_recipes",
    "shrink", "sparsity",
    "SearchResult", "SparsityMonitor", "check_optimizer", "count_macs", "group_norms", "imbalance",
    "removed_fraction", "search_lambda", "track",
]
