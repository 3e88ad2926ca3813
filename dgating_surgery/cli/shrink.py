"""``dgate shrink``: cut the dead groups and write the slim checkpoint (and its exports)."""
from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import click

from ..errors import ShrinkError
from .common import artefact_options, check_output, emit, main, NonNegative, one_line, refuse_inputs


@main.command(name="shrink", short_help="Cut the dead groups; write the slim checkpoint.")
@click.argument("gated_path", metavar="GATED")
@click.option("--output", "-o", required=True, help="The slim checkpoint to write (.safetensors); not GATED.")
@click.option("--threshold", "-t", type=NonNegative("--threshold"),
              help="Dead-group threshold (absolute L2 norm); default: the recipe's.")
@click.option("--rtol", type=NonNegative("--rtol"), default=None,
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
@artefact_options
def shrink_cmd(gated_path, output, threshold, rtol, verify, round_to, uniform, exports, force, reference, allow_pickle,
               trust_code, as_json):
    """Cut the dead groups out of GATED and write the slim checkpoint; prints parameters, MACs and
    latency before and after (interleaved runs, with their spread). The slim model is always
    checked against the gated one on the example inputs; GATED is left as it is."""
    from .. import display
    from ..checkpoints.checkpoint import kept_groups, load_gated, save_slim
    from ..engine.measure import collapsed, compare_latency, macs
    from ..engine.report import model_params, sparsity
    from ..engine.shrink import APPROXIMATE_ATTR, describe_approximate, shrink
    also = [_export_target(output, f) for f in exports]
    out = check_output(output, force, inputs=(gated_path,), also=also)
    model = load_gated(gated_path, allow_pickle, reference, trust_code=trust_code)
    for target in (out, *also):  # nor the file the model is built from (a factory's source, a pickle)
        refuse_inputs(target, [_named_file(model)])
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
        raise click.ClickException(one_line(str(exc).replace("pass a larger rtol", "pass a larger --rtol")) + (
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
    approximate = getattr(slim, APPROXIMATE_ATTR, None)
    if approximate:  # opt-in (layernorm: approximate): the slim model computes a slightly different function
        data["approximate_cut"] = approximate
        note += f" Not exact: {describe_approximate(approximate)}."
    if uniform:
        note += (f" Uniform widths kept {display.n(data['uniform_cost']['params'])} parameters and "
                 f"{display.n(data['uniform_cost']['macs'])} MACs more than the per-layer cut.")
    emit(as_json, data, display.before_after_table(rows, f"{gated_path} -> {out}"), note)


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
        raise click.ClickException(f"{fmt} export of the slim model failed ({one_line(exc)}); the slim "
                                   f"checkpoint {out} was written and is usable") from None
    return target
