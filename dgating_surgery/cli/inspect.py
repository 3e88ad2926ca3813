"""``dgate inspect``: what a recipe would gate in a model, and what not and why."""
from __future__ import annotations

import math
from collections import Counter

import click

from ..errors import DGatingError
from .common import emit, load, main, model_options


@main.command(short_help="Show what a recipe would gate, and what not and why.")
@click.argument("model_spec", metavar="MODEL")
@model_options
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def inspect(model_spec, recipe, input_shape, input_dtype, weights, factory_args, allow_pickle, as_json):
    """Show the groups the recipe would gate, per layer and kind, with their sizes and the
    parameters they cover, and what cannot be gated and why."""
    from rich.table import Table

    from .. import display
    from ..engine.gates import analyze, select
    from ..engine.recipe import load_recipe
    from ..engine.report import model_params
    model, ref, inputs = load(model_spec, input_shape, input_dtype, weights, factory_args, allow_pickle)
    rec = load_recipe(recipe)
    args, kwargs = inputs.make()
    with display.console(stderr=True).status("tracing and analysing the graph"):
        plan = analyze(model, args, kwargs, rec)
    try:
        chosen, problem = select(plan, rec, type(model).__name__), None
    except DGatingError as exc:
        chosen, problem = [], exc
    covered, total_covered = _covered_params(model, plan, chosen)
    total = model_params(model)
    rows = []
    for k, gset in enumerate(plan.sets):
        removable = int(gset.removable.sum())
        selected = any(gset is c for c in chosen)
        why = Counter(r for r in gset.reasons if r is not None)
        rows.append({"name": gset.name, "kind": gset.kind, "modules": gset.modules, "groups": len(gset.reasons),
                     "removable": removable, "gated": selected, "params_covered": covered[k] if selected else 0,
                     "not_removable": [{"groups": c, "reason": r} for r, c in why.items()],
                     "approximate": gset.approximate})  # opt-in (layernorm: approximate): why the cut is not exact
    data = {"model": str(ref), "inputs": str(inputs), "recipe": rec.to_dict(), "sets": rows,
            "gated_sets": len(chosen), "gated_groups": sum(r["removable"] for r in rows if r["gated"]),
            "params_total": total, "params_covered": total_covered}
    table = Table(title=f"{type(model).__name__} ({ref}) on {inputs}: group sets, recipe {rec.source}",
                  title_justify="left")
    for name, justify in (("group set", "left"), ("kind", "left"), ("groups", "right"), ("removable", "right"),
                          ("gated", "center"), ("params covered", "right"), ("why not removable", "left")):
        table.add_column(name, justify=justify, overflow="fold")
    for r, gset in zip(rows, plan.sets):
        why = "; ".join(f"{w['groups']}: {w['reason']}" for w in r["not_removable"])
        gated = "[green]yes[/]" if r["gated"] else ("[dim]no[/]" if r["removable"] else "[red]-[/]")
        kind = f"{r['kind']} (approximate)" if gset.approximate else r["kind"]
        table.add_row(r["name"], kind, display.groups(gset.kind, r["groups"], gset.per_group),
                      display.n(r["removable"]), gated,
                      display.n(r["params_covered"]) if r["gated"] else "", why, style=None if r["gated"] else "dim")
    summary = (f"[bold]{data['gated_sets']}[/] group sets, [bold]{display.n(data['gated_groups'])}[/] groups gated; "
               f"they cover {display.n(total_covered)} of {display.n(total)} parameters "
               f"({display.pct(total_covered, total)}). `dgate convert` gates them.")
    emit(as_json, data, table, summary)
    if problem is not None:
        raise click.ClickException(str(problem))


def _covered_params(model, plan, chosen) -> tuple[list[int], int]:
    """Parameter entries tied to each set's exactly removable groups (what a cut of all of them
    would remove), and the union over the chosen sets (an entry can belong to two sets: a conv
    weight's output and input channel). Counted per dim, as a cut removes whole slices."""
    import numpy as np
    import torch

    from ..engine.groups import profile
    params = dict(model.named_parameters())
    set_of_root = np.full(plan.root_of.size, -1, dtype=np.int64)
    for k, gset in enumerate(plan.sets):
        set_of_root[gset.roots[gset.removable]] = k
    chosen_ids = {k for k, s in enumerate(plan.sets) if any(s is c for c in chosen)}
    lines: dict[tuple[int | None, str], dict[int, "torch.Tensor"]] = {}  # (set or None: chosen, tensor) -> dim -> owned
    for att in plan.attachments:
        if att.fqn not in params:
            continue
        roots = plan.roots(att.ids)
        owner = np.where(roots >= 0, set_of_root[np.clip(roots, 0, None)], -1)
        dim, along = profile(owner, att)
        along = along.expand(params[att.fqn].shape[dim])
        for k in np.unique(owner[owner >= 0]).tolist():
            for key in [(k, att.fqn)] + ([(None, att.fqn)] if k in chosen_ids else []):
                per_dim = lines.setdefault(key, {})
                per_dim[dim] = per_dim.get(dim, torch.zeros_like(along, dtype=torch.bool)) | (along == k)
    covered, union = [0] * len(plan.sets), 0
    for (k, fqn), per_dim in lines.items():
        shape = params[fqn].shape
        kept = math.prod(size - int(per_dim[d].sum()) if d in per_dim else size for d, size in enumerate(shape))
        if k is None:
            union += shape.numel() - kept
        else:
            covered[k] += shape.numel() - kept
    return covered, union
