"""``dgate report``: a gated artefact's dead and alive groups, removable parameters and MACs."""
from __future__ import annotations

import math

import click

from .common import artefact_options, emit, main, NonNegative, one_line


@main.command(short_help="Dead/alive groups, removable params and MACs.")
@click.argument("gated_path", metavar="GATED")
@click.option("--threshold", "-t", type=NonNegative("--threshold"),
              help="Dead-group threshold (absolute L2 norm); default: the recipe's.")
@click.option("--uniform", is_flag=True, help="Figures of a cut with uniform widths (`dgate shrink --uniform`), "
              "and what uniformity costs against the per-layer cut.")
@artefact_options
def report(gated_path, threshold, uniform, reference, allow_pickle, trust_code, as_json):
    """Dead and alive groups per layer, parameters and MACs a cut at the threshold removes, the
    output change that cut would make on the example inputs, and the histogram of group norms
    (where the threshold falls). Any threshold can be explored: nothing is cut or written."""
    import copy

    import torch

    from .. import display
    from ..checkpoints.checkpoint import load_gated
    from ..engine.execution import output_diff, tolerance
    from ..engine.measure import forward, macs
    from ..engine.report import sparsity
    from ..engine.shrink import plan_cut, select_features, sets_by_layer, shrink, where_it_fails
    model = load_gated(gated_path, allow_pickle, reference, trust_code=trust_code)
    rep = sparsity(model, threshold, uniform=uniform)
    inputs = model.dgate_origin.inputs
    args, kwargs = inputs.make()
    norms = torch.cat(list(plan_cut(model, threshold).norms.values()))
    bins = display.histogram(norms, rep.threshold)
    macs_before = macs(model, args, kwargs)
    cut = shrink(copy.deepcopy(model), threshold, verify=False, uniform=uniform)  # what `dgate shrink -t` gives
    reference = forward(model, args, kwargs)
    try:
        macs_after = macs(cut, args, kwargs)
        change = output_diff(reference, forward(cut, args, kwargs))
    except Exception as exc:
        where = where_it_fails(cut, *select_features(cut, args, kwargs), sets_by_layer(model))
        raise click.ClickException(f"a cut at threshold {rep.threshold:g} gives a model that does not run on the example "
                                   f"inputs: {where} ({type(exc).__name__}: {one_line(exc)[:200]}); exclude those sets "
                                   "from the recipe") from None
    rtol = tolerance(reference)
    data = {"threshold": rep.threshold, "groups": rep.groups, "dead": rep.dead, "params_total": rep.params_total,
            "params_removable": rep.params_removable, "macs_before": macs_before, "macs_after": macs_after,
            "macs_removable": macs_before - macs_after,
            "output_change": change if math.isfinite(change) else None,
            "rtol_needed": _rtol_needed(change, rtol),
            "gates": [{"key": r.key, "name": r.name, "kind": r.kind, "groups": r.groups, "alive": r.alive,
                       "dead": r.dead, "params_removable": r.params_removable} for r in rep.rows],
            "histogram": bins}
    if uniform:  # against the per-layer cut, measured on a copy
        per_layer_macs = macs(shrink(copy.deepcopy(model), threshold, verify=False), args, kwargs)
        data["uniform_cost"] = {"params": rep.params_uniform_padding, "macs": macs_after - per_layer_macs}
    summary = (f"at threshold {rep.threshold:g}: {display.n(rep.dead)} of {display.n(rep.groups)} groups dead; a cut "
               f"removes {display.n(rep.params_removable)} of {display.n(rep.params_total)} parameters "
               f"({display.pct(rep.params_removable, rep.params_total)}) and {display.n(macs_before - macs_after)} of "
               f"{display.n(macs_before)} MACs ({display.pct(macs_before - macs_after, macs_before)}) per forward on "
               f"{inputs}")
    if uniform:
        summary += (f"; uniform widths keep {display.n(rep.params_uniform_padding)} parameters and "
                    f"{display.n(data['uniform_cost']['macs'])} MACs the per-layer cut removes")
    emit(as_json, data, display.sparsity_table(rep, f"{gated_path}: groups per gate"),
          display.histogram_table(bins, rep.threshold), summary, _describe_change(change, rtol, rep.threshold))


def _rtol_needed(change: float, rtol: float) -> float | None:
    """The --rtol `dgate shrink` needs to accept an output change (one significant digit, rounded
    up), or None when the default suffices or the change cannot be measured."""
    if not math.isfinite(change) or change <= rtol:
        return None
    value = change * 1.01  # room for a different order of floating-point operations in shrink's own check
    exponent = math.floor(math.log10(value))
    return math.ceil(value / 10.0 ** exponent) * 10.0 ** exponent


def _describe_change(change: float, rtol: float, threshold: float) -> str:
    if not math.isfinite(change):
        return ("expected output change: cannot be measured on the example inputs (the gated output is all zeros or "
                "not finite, or the cut changes its shape)")
    if change == 0:
        return "expected output change on the example inputs: none (the groups cut are exactly zero)"
    text = f"expected output change on the example inputs: {change:.3g} of the largest output"
    needed = _rtol_needed(change, rtol)
    if needed is None:
        return f"{text}, within `dgate shrink`'s tolerance ({rtol:g})"
    return f"{text}; `dgate shrink -t {threshold:g}` needs --rtol {needed:.0e} to cut there (default {rtol:g})"
