"""What the ``dgate`` commands share: the command group (``main``) that turns errors into one line,
the MODEL and artefact options, loading a MODEL, checking an output path, printing figures."""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import click

from ..errors import DGatingError, DGatingWarning

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


def one_line(text: str) -> str:
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
                raise click.ClickException(one_line(exc)) from None
            except OSError as exc:
                raise click.ClickException(one_line(f"{exc.filename or ''}: {exc.strerror or exc}")) from None
            except Exception as exc:
                if _out_of_memory(exc):
                    raise click.ClickException(
                        f"out of memory ({one_line(exc)[:200]}): pass a smaller --input-shape (a batch of 1 finds "
                        "the same groups), or run it on a machine with more memory") from None
                raise


class NonNegative(click.ParamType):
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


def model_options(f):
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


def artefact_options(f):
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


def load(model_spec, input_shape, input_dtype, weights, factory_args, allow_pickle):
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


def check_output(path: str, force: bool = False, inputs=(), also=()) -> Path:
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
        refuse_inputs(target, inputs)
        for other in targets[:i]:
            if other.resolve() == target.resolve():
                raise click.ClickException(f"cannot write {target}: the command writes {other} there already "
                                           "(name the output so that its exports get other names)")
        if os.path.lexists(target) and not force:
            raise click.ClickException(f"{target} exists: pass --force to replace it, or write to another file")
    return out


def refuse_inputs(target: Path, inputs) -> None:
    """``target`` must not be any of ``inputs`` (files the command reads, or None)."""
    for source in inputs:
        if source is not None and Path(source).exists() and _same_file(target, Path(source)):
            raise click.ClickException(f"cannot write {target}: it is the input {source}, which would be lost; "
                                       "write to another file")


def spec_file(model_spec: str) -> str | None:
    """The file a MODEL spec reads: itself, or a factory file's ``path/to/file.py`` part."""
    from ..checkpoints.trust import is_file_spec
    return model_spec.rpartition(":")[0] if ":" in model_spec and is_file_spec(model_spec) else model_spec


def emit(as_json: bool, data: dict, *renderables) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    from .. import display
    con = display.console()
    for r in renderables:
        con.print(r)




def installed_libraries_first() -> None:
    """``python -m dgating_surgery.cli`` puts the current directory first on the import path: move
    it last, so that a ``torchvision/`` folder there never replaces the library."""
    import sys
    here = {"", os.getcwd()}
    sys.path[:] = [p for p in sys.path if p not in here] + [p for p in sys.path if p in here]
