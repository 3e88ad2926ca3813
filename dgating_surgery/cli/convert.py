"""``dgate convert``: gate a model and write the gated artefact."""
from __future__ import annotations

import click

from .common import check_output, load, main, model_options, spec_file


@main.command(short_help="Gate a model; write the gated artefact.")
@click.argument("model_spec", metavar="MODEL")
@model_options
@click.option("--output", "-o", required=True, help="The gated artefact to write (.safetensors).")
@click.option("--force", is_flag=True, help="Replace the output if it exists.")
def convert(model_spec, recipe, input_shape, input_dtype, weights, factory_args, allow_pickle, output, force):
    """Gate MODEL with the recipe and write the gated artefact, ready to train in Python
    (dg.load_gated) and to cut with `dgate shrink`."""
    from .. import display
    from ..checkpoints.checkpoint import save_gated, stored_reference
    from ..engine.gates import gate_model
    from ..checkpoints.models import Origin
    from ..engine.recipe import load_recipe
    from ..engine.report import sparsity
    out = check_output(output, force, inputs=(spec_file(model_spec), weights))
    model, ref, inputs = load(model_spec, input_shape, input_dtype, weights, factory_args, allow_pickle)
    stored_reference(ref, out)  # a file the checkpoint cannot name (outside its folder): an error before gating
    rec = load_recipe(recipe)
    args, kwargs = inputs.make()
    with display.console(stderr=True).status("tracing, finding groups, gating"):
        gated = gate_model(model, rec, args, kwargs)
    gated.dgate_origin = Origin(ref, inputs, rec.to_dict())
    save_gated(gated, out, replace=force)
    report = sparsity(gated)
    con = display.console()
    con.print(f"gated {type(model).__name__} ({ref}) with recipe {rec.source}: {len(report.rows)} gates, "
              f"{display.n(report.groups)} groups; network parameters {display.n(report.params_total)}")
    con.print(f"wrote [bold]{out}[/]. Train it in Python:\n"
              f"    model = dg.load_gated({str(out)!r})\n"
              f"    opt = torch.optim.SGD(dg.param_groups(model, lam={rec.lam:g}), lr=..., momentum=0.9)\n"
              f"    ... your training loop ...\n"
              f"    dg.save_gated(model, {str(out)!r})\n"
              f"then: dgate report {out}; dgate shrink {out} -o slim.safetensors")
