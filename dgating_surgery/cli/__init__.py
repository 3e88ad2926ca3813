"""``dgate``: the D-Gating journey from a shell.

    dgate inspect torchvision.models:resnet18 --recipe resnet     # what the recipe would gate
    dgate convert torchvision.models:resnet18 --recipe resnet -o gated.safetensors
    ... train in Python: dg.load_gated("gated.safetensors"), then dg.save_gated(model, ...) ...
    dgate report gated.safetensors                                 # dead/alive groups, norms
    dgate shrink gated.safetensors -o slim.safetensors --verify    # the slim checkpoint
    dgate demo                                                     # all of it on a built-in model

Every expected failure (bad MODEL, recipe, file, path) is one ``Error: ...`` line on stderr and
exit code 1 (2 for bad command-line usage), never a traceback; ``--json`` prints the figures as
JSON for scripts. An output that exists is only replaced with ``--force``, and never the input.

torch and the engine are imported inside the commands, so that ``dgate --help`` is quick.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from collections import Counter
from pathlib import Path

import click

from ..errors import DGatingError, DGatingWarning, ShrinkError

PACKAGE_DIR = str(Path(__file__).resolve().parents[1])  # dgating_surgery/
# the names of inputs.DTYPES, here without importing torch (a test checks that they agree)
DTYPE_NAMES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "bool")


_SHOWN: set[str] = set()  # the warnings shown by this command


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """The package's own warnings (e.g. a recipe entry that matched nothing) as one line each, once;
    other libraries' warnings (tracer internals) are not the user's business here."""
    if (issubclass(category, DGatingWarning) or str(filename).startswith(PACKAGE_DIR)) and str(message) not in _SHOWN:
        _SHOWN.add(str(message))
        from .. import display
        display.console(stderr=True).print(f"[yellow]warning:[/] {message}")


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def _out_of_memory(exc: BaseException) -> bool:
    text = str(exc)
    return (isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"
            or (isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "not enough memory" in text)))


class _Group(click.Group):
    """Turns the package's errors, OS errors and running out of memory into click's one
    ``Error: ...`` line and exit code 1."""

    def invoke(self, ctx):
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = _show_warning
            _SHOWN.clear()
            try:
                return super().invoke(ctx)
            except DGatingError as exc:
                raise click.ClickException(_one_line(exc)) from None
            except OSError as exc:
                raise click.ClickException(_one_line(f"{exc.filename or ''}: {exc.strerror or exc}")) from None
            except Exception as exc:
                if _out_of_memory(exc):
                    raise click.ClickException(
                        f"out of memory ({_one_line(exc)[:200]}): pass a smaller --input-shape (a batch of 1 finds "
                        "the same groups), or run it on a machine with more memory") from None
                raise


class _NonNegative(click.ParamType):
    """A finite number >= 0 (a threshold, a tolerance): -1 or nan is a usage error, not a run
    that "succeeds" and cuts nothing."""

    name = "number"

    def __init__(self, what: str):
        self.what = what

    def convert(self, value, param, ctx):
        from ..engine.recipe import check_threshold
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        try:
            return check_threshold(number, self.what)
        except DGatingError as exc:  # click names the option already
            self.fail(str(exc).removeprefix(f"{self.what} "), param, ctx)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dgating-surgery")
def main():
    """Structured sparsity for any PyTorch model through D-Gating, and the surgery that cuts the
    dead structure out. Start with `dgate demo`.

    MODEL is a factory `package.module:callable` (e.g. torchvision.models:resnet18, with --weights
    and --arg KEY=VALUE), a Hugging Face config or model directory, or a torch.save(model) file
    (needs --allow-pickle: unpickling runs code from the file).
    """


def _model_options(f):
    options = [
        click.option("--recipe", "-r", default="default", show_default=True,
                     help="Shipped recipe name (default, resnet, mlp, ...) or a YAML file."),
        click.option("--input-shape", help="Example input shape, e.g. 1,3,224,224. Default: 1xCx224x224 for a "
                     "model starting with Conv2d, 1xN for Linear, token ids 1x16 for Hugging Face text models."),
        click.option("--input-dtype", type=click.Choice(list(DTYPE_NAMES)), help="Example input dtype (default float32; "
                     "int64 token ids for text models)."),
        click.option("--weights", help="Weights for a factory: a safetensors or torch.save(state_dict) file."),
        click.option("--arg", "factory_args", multiple=True, metavar="KEY=VALUE",
                     help="Keyword argument of the factory (value parsed as YAML), e.g. --arg num_classes=10."),
        click.option("--allow-pickle", is_flag=True, help="Allow loading a whole-model pickle (runs code from it)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _artefact_options(f):
    f = click.option("--trust-code", is_flag=True, help="Allow the file to name code of its own to rebuild the "
                     "model (a package.module:callable or a .py file beside it) rather than a torchvision, timm or "
                     "transformers constructor: it runs with your rights, so only for files you trust.")(f)
    f = click.option("--allow-pickle", is_flag=True, help="Allow rebuilding a model referenced as a pickle file "
                     "(unpickling runs code stored in it).")(f)
    f = click.option("--model", "reference", metavar="FACTORY",
                     help="Rebuild the architecture with this package.module:callable instead of the reference "
                     "stored in the file.")(f)
    return click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")(f)


def _factory_kwargs(items) -> dict:
    import yaml
    kwargs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise click.BadParameter(f"'{item}': write KEY=VALUE, e.g. num_classes=10", param_hint="--arg")
        kwargs[key] = yaml.safe_load(value)
    return kwargs


def _load(model_spec, input_shape, input_dtype, weights, factory_args, allow_pickle):
    """The user's model, its reference and the example-input spec, with a spinner while it loads."""
    from .. import display
    from ..checkpoints.inputs import default_inputs, parse_shape
    from ..checkpoints.models import load_model
    with display.console(stderr=True).status(f"loading {model_spec}"):
        model, ref = load_model(model_spec, weights, _factory_kwargs(factory_args), allow_pickle)
    inputs = default_inputs(model, parse_shape(input_shape) if input_shape else None, input_dtype)
    return model, ref, inputs


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


def _check_output(path: str, force: bool = False, inputs=(), also=()) -> Path:
    """Fail before any work when the output could not be written, is one of the inputs (the slim
    model must never replace the trained gated one; a factory file is an input too), is another
    output of the same command, or exists and ``--force`` was not given. ``also``: further files
    the command writes beside it (exports)."""
    out = Path(path)
    if not out.parent.is_dir():
        raise click.ClickException(f"cannot write {out}: directory '{out.parent}' does not exist (create it first)")
    if out.is_dir():
        raise click.ClickException(f"cannot write {out}: it is a directory; name the output file")
    targets = [out, *also]
    for i, target in enumerate(targets):
        _refuse_inputs(target, inputs)
        for other in targets[:i]:
            if other.resolve() == target.resolve():
                raise click.ClickException(f"cannot write {target}: the command writes {other} there already "
                                           "(name the output so that its exports get other names)")
        if os.path.lexists(target) and not force:
            raise click.ClickException(f"{target} exists: pass --force to replace it, or write to another file")
    return out


def _refuse_inputs(target: Path, inputs) -> None:
    """``target`` must not be any of ``inputs`` (files the command reads, or None)."""
    for source in inputs:
        if source is not None and Path(source).exists() and _same_file(target, Path(source)):
            raise click.ClickException(f"cannot write {target}: it is the input {source}, which would be lost; "
                                       "write to another file")


def _spec_file(model_spec: str) -> str | None:
    """The file a MODEL spec reads: itself, or a factory file's ``path/to/file.py`` part."""
    from ..checkpoints.trust import is_file_spec
    return model_spec.rpartition(":")[0] if ":" in model_spec and is_file_spec(model_spec) else model_spec


def _emit(as_json: bool, data: dict, *renderables) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    from .. import display
    con = display.console()
    for r in renderables:
        con.print(r)


# -- inspect ---------------------------------------------------------------------------------------
@main.command(short_help="Show what a recipe would gate, and what not and why.")
@click.argument("model_spec", metavar="MODEL")
@_model_options
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def inspect(model_spec, recipe, input_shape, input_dtype, weights, factory_args, allow_pickle, as_json):
    """Show the groups the recipe would gate, per layer and kind, with their sizes and the
    parameters they cover, and what cannot be gated and why."""
    from rich.table import Table

    from .. import display
    from ..engine.gates import analyze, select
    from ..engine.recipe import load_recipe
    from ..engine.report import model_params
    model, ref, inputs = _load(model_spec, input_shape, input_dtype, weights, factory_args, allow_pickle)
    rec = load_recipe(recipe)
    args, kwargs = inputs.make()
    with display.console(stderr=True).status("tracing and analysing the graph"):
        plan = analyze(model, args, kwargs)
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
                     "not_removable": [{"groups": c, "reason": r} for r, c in why.items()]})
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
        table.add_row(r["name"], r["kind"], display.groups(gset.kind, r["groups"], gset.per_group),
                      display.n(r["removable"]), gated,
                      display.n(r["params_covered"]) if r["gated"] else "", why, style=None if r["gated"] else "dim")
    summary = (f"[bold]{data['gated_sets']}[/] group sets, [bold]{display.n(data['gated_groups'])}[/] groups gated; "
               f"they cover {display.n(total_covered)} of {display.n(total)} parameters "
               f"({display.pct(total_covered, total)}). `dgate convert` gates them.")
    _emit(as_json, data, table, summary)
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


# -- convert ---------------------------------------------------------------------------------------
@main.command(short_help="Gate a model; write the gated artefact.")
@click.argument("model_spec", metavar="MODEL")
@_model_options
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
    out = _check_output(output, force, inputs=(_spec_file(model_spec), weights))
    model, ref, inputs = _load(model_spec, input_shape, input_dtype, weights, factory_args, allow_pickle)
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


# -- report ----------------------------------------------------------------------------------------
@main.command(short_help="Dead/alive groups, removable params and MACs.")
@click.argument("gated_path", metavar="GATED")
@click.option("--threshold", "-t", type=_NonNegative("--threshold"),
              help="Dead-group threshold (absolute L2 norm); default: the recipe's.")
@click.option("--uniform", is_flag=True, help="Figures of a cut with uniform widths (`dgate shrink --uniform`), "
              "and what uniformity costs against the per-layer cut.")
@_artefact_options
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
                                   f"inputs: {where} ({type(exc).__name__}: {_one_line(exc)[:200]}); exclude those sets "
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
    _emit(as_json, data, display.sparsity_table(rep, f"{gated_path}: groups per gate"),
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


# -- shrink ----------------------------------------------------------------------------------------
@main.command(name="shrink", short_help="Cut the dead groups; write the slim checkpoint.")
@click.argument("gated_path", metavar="GATED")
@click.option("--output", "-o", required=True, help="The slim checkpoint to write (.safetensors); not GATED.")
@click.option("--threshold", "-t", type=_NonNegative("--threshold"),
              help="Dead-group threshold (absolute L2 norm); default: the recipe's.")
@click.option("--rtol", type=_NonNegative("--rtol"), default=None,
              help="Largest output change allowed, relative to the largest output (default 1e-4); a threshold above "
              "exact zero needs a larger one, which `dgate report -t` shows.")
@click.option("--verify", is_flag=True, help="Reload the written checkpoint (dg.load_slim) and check that its outputs "
              "are identical to the slim model's.")
@click.option("--round-to", "round_to", type=click.IntRange(min=1), default=None, metavar="N",
              help="Keep each cut layer's width a multiple of N (e.g. 8) by keeping its strongest dead groups; "
              "default: the recipe's round_to (1: no rounding).")
@click.option("--uniform", is_flag=True, help="Give every layer of a width set (the layers a Hugging Face config "
              "states one width for) the same width, the largest any keeps, so that the config states them and "
              "save_pretrained writes an ordinary checkpoint; prints what that costs against the per-layer cut.")
@click.option("--export", "exports", multiple=True, type=click.Choice(["onnx", "torch.export"]),
              help="Also write a deployment export beside the checkpoint (.onnx, or .pt2 from torch.export).")
@click.option("--force", is_flag=True, help="Replace the output (and exports) if they exist.")
@_artefact_options
def shrink_cmd(gated_path, output, threshold, rtol, verify, round_to, uniform, exports, force, reference, allow_pickle,
               trust_code, as_json):
    """Cut the dead groups out of GATED and write the slim checkpoint; prints parameters, MACs and
    latency before and after (interleaved runs, with their spread). The slim model is always
    checked against the gated one on the example inputs; GATED is left as it is."""
    from .. import display
    from ..checkpoints.checkpoint import kept_groups, load_gated, save_slim
    from ..engine.measure import collapsed, compare_latency, macs
    from ..engine.report import model_params, sparsity
    from ..engine.shrink import shrink
    also = [_export_target(output, f) for f in exports]
    out = _check_output(output, force, inputs=(gated_path,), also=also)
    model = load_gated(gated_path, allow_pickle, reference, trust_code=trust_code)
    for target in (out, *also):  # nor the file the model is built from (a factory's source, a pickle)
        _refuse_inputs(target, [_named_file(model)])
    if round_to is not None:  # through the recipe, so that every figure and the manifest's kept groups follow it
        model.dgates.recipe = dataclasses.replace(model.dgates.recipe, round_to=round_to)
    inputs = model.dgate_origin.inputs
    args, kwargs = inputs.make()
    before = {"params": model_params(model), "macs": macs(model, args, kwargs)}
    kept = kept_groups(model, threshold, uniform=uniform)
    dead = sparsity(model, threshold, uniform=uniform).dead
    uncut = collapsed(model)  # the gated function at the dense cost: timed against the slim model, interleaved
    if uniform:  # what uniform widths cost: the per-layer cut, measured on a copy
        import copy
        per_layer = shrink(copy.deepcopy(model), threshold, verify=False)
        per_layer = {"params": model_params(per_layer), "macs": macs(per_layer, args, kwargs)}
    try:
        slim = shrink(model, threshold, args, kwargs, uniform=uniform, **({} if rtol is None else {"rtol": rtol}))
    except ShrinkError as exc:
        raise click.ClickException(_one_line(str(exc).replace("pass a larger rtol", "pass a larger --rtol")) + (
            f" `dgate report {gated_path} -t T` shows the output change a threshold makes.")) from None
    timing = compare_latency(uncut, slim, args, kwargs)
    after = {"params": model_params(slim), "macs": macs(slim, args, kwargs)}
    save_slim(slim, out, kept=kept, replace=force)
    if verify:
        _verify_reload(slim, out, allow_pickle, trust_code or reference is not None, args, kwargs)
    written = [str(out)] + [str(_export(slim, out, fmt, args, kwargs, force)) for fmt in exports]
    data = {"output": written, "groups_cut": dead, "verified_reload": verify,
            **{f"{k}_before": v for k, v in before.items()}, **{f"{k}_after": v for k, v in after.items()},
            "latency_ms_before": timing.before_ms, "latency_ms_after": timing.after_ms, "latency": timing.to_dict()}
    if uniform:
        data["uniform_cost"] = {k: after[k] - per_layer[k] for k in ("params", "macs")}
    rows = [("parameters", display.n(before["params"]), display.n(after["params"]),
             display.ratio(before["params"], after["params"])),
            ("MACs", display.n(before["macs"]), display.n(after["macs"]), display.ratio(before["macs"], after["macs"])),
            (f"latency (ms, median and IQR of {timing.rounds} interleaved runs)",
             display.ms_spread(timing.before_ms, timing.before_iqr), display.ms_spread(timing.after_ms, timing.after_iqr),
             display.latency_change(timing))]
    note = (f"cut {display.n(dead)} groups; slim model checked against the gated one on {inputs}"
            f"{'; reloaded from disk: outputs identical' if verify else ''}. Wrote {', '.join(written)}. "
            f"Load it with dg.load_slim({str(out)!r}).")
    if uniform:
        note += (f" Uniform widths kept {display.n(data['uniform_cost']['params'])} parameters and "
                 f"{display.n(data['uniform_cost']['macs'])} MACs more than the per-layer cut.")
    _emit(as_json, data, display.before_after_table(rows, f"{gated_path} -> {out}"), note)


def _export_target(output: str, fmt: str) -> Path:
    return Path(output).with_suffix(".onnx" if fmt == "onnx" else ".pt2")


def _named_file(model) -> str | None:
    from ..checkpoints.trust import named_file
    return named_file(model.dgate_origin.reference)


def _verify_reload(slim, out: Path, allow_pickle: bool, trust_code: bool, args, kwargs) -> None:
    """Outputs of the checkpoint as loaded from disk must equal the in-memory slim model's exactly."""
    from ..checkpoints.checkpoint import load_slim
    from ..engine.execution import output_diff
    from ..engine.measure import forward
    reloaded = load_slim(out, allow_pickle=allow_pickle, trust_code=trust_code)
    if output_diff(forward(slim, args, kwargs), forward(reloaded, args, kwargs)) != 0.0:
        out.unlink()
        raise click.ClickException(f"{out}: the reloaded checkpoint's outputs differ from the slim model's; the file "
                                   "was removed. Please report the model.")


def _export(slim, out: Path, fmt: str, args, kwargs, force: bool) -> Path:
    """A deployment export of the slim model, written like the checkpoint (``write_atomically``:
    a unique temporary name that keeps the suffix torch.export insists on)."""
    import torch

    from ..checkpoints.writing import write_atomically
    from ..engine.execution import evaluating
    from ..engine.shrink import select_features
    target = _export_target(str(out), fmt)
    sel_args, sel_kwargs = select_features(slim, args, kwargs)

    def write(tmp: str) -> None:
        with evaluating(slim), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if fmt == "onnx":
                torch.onnx.export(slim, sel_args, tmp, kwargs=sel_kwargs, dynamo=True, external_data=False,
                                  verbose=False)
            else:
                torch.export.save(torch.export.export(slim, sel_args, sel_kwargs, strict=False), tmp)
    try:
        write_atomically(target, write, replace=force)
    except Exception as exc:
        raise click.ClickException(f"{fmt} export of the slim model failed ({_one_line(exc)}); the slim "
                                   f"checkpoint {out} was written and is usable") from None
    return target


# -- demo ------------------------------------------------------------------------------------------
@main.command(short_help="The whole journey on a built-in model (~10 s).")
@click.option("--out", type=click.Path(file_okay=False), help="Keep the slim checkpoint in this directory "
              "(default: a temporary one).")
@click.option("--epochs", default=100, show_default=True, type=click.IntRange(1))
@click.option("--lam", default=7e-3, show_default=True, type=_NonNegative("--lam"), help="D-Gating strength.")
@click.option("--seed", default=0, show_default=True, type=int)
def demo(out, epochs, lam, seed):
    """The whole journey on a built-in model and scikit-learn's digits: gate, train (progress
    bar), report, cut, save, reload, check; ends with a before/after table (about 10 s)."""
    from ..demo import run_demo
    run_demo(out, epochs, lam, seed)


def _installed_libraries_first() -> None:
    """``python -m dgating_surgery.cli`` puts the current directory first on the import path: move
    it last, so that a ``torchvision/`` folder there never replaces the library."""
    import sys
    here = {"", os.getcwd()}
    sys.path[:] = [p for p in sys.path if p not in here] + [p for p in sys.path if p in here]
