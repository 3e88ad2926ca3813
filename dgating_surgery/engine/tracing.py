"""Stage 1: capture a model as an FX graph and record what every node produces on example inputs.

``torch.fx.symbolic_trace`` is tried first (fast, keeps ``nn`` modules as ``call_module`` nodes and
sees shape arithmetic as graph nodes, so the analysis can tell a literal size from a computed one);
``torch.export`` (non-strict) is the fallback for models symbolic tracing cannot follow, such as
Hugging Face transformers. Either way the result is a ``GraphModule`` whose ``get_attr`` targets
are the user's own parameter names, so later stages edit the user's modules, never the graph.
"""
from __future__ import annotations

import contextlib
import io
import logging
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.utils import _pytree as pytree

from ..errors import DGatingError, TraceError, one_line
from .execution import as_tuple, evaluating, fresh, training_mode
from .wrappers import warn_user


@dataclass(frozen=True)
class TensorInfo:
    """What the analysis needs to know of a tensor a node produced."""

    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass
class Capture:
    """A traced model: its graph, how it was captured, and each node's recorded output."""

    model: nn.Module
    gm: torch.fx.GraphModule
    frontend: str  # "fx" (symbolic_trace) or "export"
    values: dict[torch.fx.Node, Any] = field(default_factory=dict)
    args: tuple = ()  # the example inputs it was captured on (a graph pass may run the model on them)
    kwargs: dict = field(default_factory=dict)

    def module(self, node: torch.fx.Node) -> nn.Module:
        return self.gm.get_submodule(node.target)


def _summarize(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return TensorInfo(tuple(value.shape), value.dtype)
    if isinstance(value, (tuple, list)):
        return [_summarize(v) for v in value]  # namedtuples too: only the items matter
    if isinstance(value, dict):
        return {k: _summarize(v) for k, v in value.items()}
    return value


def describe_node(gm: torch.fx.GraphModule, node: torch.fx.Node) -> str:
    """A node as a user would name it: the layer and its class, or the function or method."""
    if node.op == "call_module":
        return f"layer '{node.target}' ({type(gm.get_submodule(node.target)).__name__})"
    if node.op == "call_method":
        return f"method '.{node.target}()' at node '{node.name}'"
    if node.op == "call_function":
        name = getattr(node.target, "__name__", str(node.target))
        return f"function '{name}' at node '{node.name}'"
    return f"{node.op} '{node.target}'"


class _Recorder(torch.fx.Interpreter):
    """Runs the graph once and keeps a summary (shapes, small Python values) of every node."""

    def __init__(self, gm: torch.fx.GraphModule, advice):
        super().__init__(gm)
        self.extra_traceback = False  # our message names the node; torch's would add the graph and a URL
        self.advice = advice  # exception -> what to change in the example inputs
        self.values: dict[torch.fx.Node, Any] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except TraceError:
            raise
        except Exception as exc:  # the user's model failed on the user's inputs: say where
            raise TraceError(f"the model failed on the example inputs at {describe_node(self.module, n)}: "
                             f"{one_line(exc)}. {self.advice(exc)}") from exc
        self.values[n] = _summarize(result)
        return result


_SHAPE_ADVICE = ("Pass example_inputs shaped like a real batch for this model (for an image model e.g. "
                "torch.randn(1, 3, 224, 224); from the shell: --input-shape 1,3,224,224)")


def _dtype_advice(model: nn.Module, args: tuple, kwargs: dict, exc: Exception) -> str | None:
    """What to change when the example inputs' dtype is what the model failed on, else None: token
    ids given as floats to an embedding, or floating inputs of a dtype none of the weights has."""
    text = str(exc)
    floats = {t.dtype for t in pytree.tree_leaves((args, kwargs))
              if isinstance(t, torch.Tensor) and t.is_floating_point()}
    if floats and "'indices'" in text:
        return ("The model looks its inputs up in an embedding, which takes integer token ids: pass e.g. "
                "torch.randint(0, vocab_size, (1, 16)) (from the shell: --input-dtype int64)")
    weights = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if floats and weights and not floats & weights and "type" in text.lower():
        given, wanted = (", ".join(sorted(str(d).removeprefix("torch.") for d in ds)) for ds in (floats, weights))
        return (f"The example inputs are {given} but the model's weights are {wanted}: pass inputs of the weights' "
                f"dtype (x.to(torch.{wanted.split(', ')[0]}); from the shell: --input-dtype {wanted.split(', ')[0]}), "
                f"or cast the model to {given} first")
    return None


class _Tracer(torch.fx.Tracer):
    """``symbolic_trace``'s tracer, also keeping as one ``call_module`` node every layer that
    ``is_leaf`` says has an op rule of its own (a library layer registered by a plugin)."""

    def __init__(self, is_leaf):
        super().__init__()
        self.is_leaf = is_leaf

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return self.is_leaf(m) or super().is_leaf_module(m, module_qualified_name)


def _symbolic_trace(model: nn.Module, is_leaf) -> torch.fx.GraphModule:
    tracer = _Tracer(is_leaf)
    graph = tracer.trace(model)
    return torch.fx.GraphModule(tracer.root, graph, type(model).__name__)


def capture(model: nn.Module, example_inputs=None, example_kwargs: dict | None = None,
            is_leaf=lambda m: False) -> Capture:
    """Trace ``model`` and record every node's output on the example inputs.

    Symbolic tracing runs in train mode so that train-only branches (auxiliary classifiers) are in
    the graph; the recording run is in eval mode and restores every buffer afterwards, so that
    BatchNorm statistics are not touched.
    """
    args = as_tuple(example_inputs)
    kwargs = dict(example_kwargs or {})
    if not args and not kwargs:
        raise TraceError(f"gating {type(model).__name__} needs example_inputs (a batch the model accepts, "
                         "e.g. torch.randn(1, 3, 224, 224)) to trace and check it")
    check_not_meta(model, "gating", (args, kwargs))
    with quiet_torch_logs():
        return _capture(model, args, kwargs, is_leaf)


def _capture(model: nn.Module, args: tuple, kwargs: dict, is_leaf) -> Capture:
    try:
        with training_mode(model, True):
            gm = _symbolic_trace(model, is_leaf)
        frontend = "fx"
    except Exception as fx_exc:  # not symbolically traceable: fall back to torch.export
        gm, frontend = _export(model, args, kwargs, fx_exc), "export"
    try:
        values = _record(model, gm, frontend, args, kwargs)
    except TraceError as fx_run_exc:
        if frontend != "fx":
            raise
        gm, frontend, values = _after_failed_run(model, args, kwargs, fx_run_exc, is_leaf)
    return Capture(model=model, gm=gm, frontend=frontend, values=values, args=args, kwargs=kwargs)


def _after_failed_run(model: nn.Module, args: tuple, kwargs: dict, fx_run_exc: TraceError, is_leaf):
    """The symbolically traced train-mode graph did not run on the inputs. A train-only branch (an
    auxiliary classifier) may not fit them: try the eval graph. The graph itself may not run where
    the model does (a wrapped function that mutates its arguments): try torch.export. If neither
    runs, the inputs are wrong, and the first error names the layer."""
    with training_mode(model, False):
        eval_gm = _symbolic_trace(model, is_leaf)
    try:
        values = _record(model, eval_gm, "fx", args, kwargs)
    except TraceError:
        pass
    else:
        warn_user(f"{type(model).__name__}: the train-mode graph failed on the example inputs ({fx_run_exc}); "
                  "traced the eval-mode graph instead, so train-only branches (auxiliary classifiers) are "
                  "not analysed and the slim model will only run in eval mode")
        return eval_gm, "fx", values
    try:
        gm = _export(model, args, kwargs, fx_run_exc)
        return gm, "export", _record(model, gm, "export", args, kwargs)
    except TraceError:
        raise fx_run_exc from None


def _export(model: nn.Module, args: tuple, kwargs: dict, fx_exc: Exception) -> torch.fx.GraphModule:
    try:
        # torch.export prints the partial graph of a failed capture to stderr: the error says where instead
        with evaluating(model), contextlib.redirect_stderr(io.StringIO()):
            return torch.export.export(model, args, kwargs, strict=False).module()
    except Exception as export_exc:
        advice = _dtype_advice(model, args, kwargs, export_exc)
        why = (f"torch.export failed ({one_line(export_exc)}). {advice}" if advice
               else _why_not_captured(fx_exc, export_exc))
        raise TraceError(f"could not capture {type(model).__name__} as a graph: {why}") from export_exc


# what torch.export's failure means, in the user's terms: (test on the exception, what to say and do)
_EXPORT_FAILURES = (
    (lambda exc: "Cache" in str(exc).split("\n")[0] and "not a known type" in str(exc),
     lambda exc: "it returns a key/value cache, which torch.export cannot capture: pass "
                 "example_kwargs={'use_cache': False}"),
    (lambda exc: "data-dependent" in str(exc).split("\n")[0],
     lambda exc: f"its forward branches on a tensor's value{_user_frame(exc)}, which neither torch.fx.symbolic_trace "
                 "nor torch.export can follow. Make that code independent of tensor values (e.g. torch.where "
                 "instead of if), or gate a submodule that does not contain it"),
)


def _why_not_captured(fx_exc: Exception, export_exc: Exception) -> str:
    for applies, say in _EXPORT_FAILURES:
        if applies(export_exc):
            return say(export_exc)
    return (f"torch.fx.symbolic_trace failed ({one_line(fx_exc)}); torch.export (non-strict) failed "
            f"({one_line(export_exc)}). Make the forward traceable (no Python control flow on tensor values), or "
            "pass example_inputs/example_kwargs that torch.export accepts")


def _user_frame(exc: Exception) -> str:
    """Where in the user's code torch.export's error happened (its message quotes the line), or ''."""
    found = re.search(r'File "([^"]+)", line (\d+), in (\S+)\n\s+(.+)', str(exc))
    return f" at {found[1]}:{found[2]} in {found[3]} (`{found[4].strip()}`)" if found else ""


def _record(model: nn.Module, gm: torch.fx.GraphModule, frontend: str, args: tuple, kwargs: dict) -> dict:
    recorder = _Recorder(gm, lambda exc: _dtype_advice(model, args, kwargs, exc) or _SHAPE_ADVICE)
    args, kwargs = fresh((args, kwargs))  # the user's tensors stay as they were, whatever the forward writes
    with evaluating(model), _buffers_restored(model):
        if frontend == "export":
            recorder.run(*pytree.tree_flatten((args, kwargs))[0])
        else:
            _run_with_kwargs(recorder, gm, args, kwargs, model)
    return recorder.values


@contextlib.contextmanager
def _buffers_restored(model: nn.Module):
    """A graph traced in train mode may bake in BatchNorm updates (functional batch_norm with
    training=True, ``num_batches_tracked.add_``): the recording run must leave no trace on them."""
    saved = [(buf, buf.detach().clone()) for buf in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)


def _run_with_kwargs(recorder: _Recorder, gm: torch.fx.GraphModule, args: tuple, kwargs: dict, model) -> None:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    values = list(args)
    for node in placeholders[len(args):]:
        name = node.target.lstrip("*")
        if name in kwargs:
            values.append(kwargs.pop(name))
        elif node.args:
            values.append(node.args[0])  # the forward's default value
        else:
            raise TraceError(f"{type(model).__name__}.forward needs argument '{name}': pass it in example_inputs "
                             "or example_kwargs")
    if kwargs:
        raise TraceError(f"{type(model).__name__}.forward has no argument(s) {sorted(kwargs)} "
                         f"(it takes {[n.target for n in placeholders]})")
    if len(values) > len(placeholders):
        raise TraceError(f"{type(model).__name__}.forward takes {len(placeholders)} input(s) "
                         f"({[n.target for n in placeholders]}), example_inputs has {len(values)}")
    recorder.run(*values)


def check_not_meta(model: nn.Module, doing: str, example=None, error: type[DGatingError] = TraceError) -> None:
    """Raise ``error`` when the model's parameters or buffers (or the example inputs) are on the
    meta device: they have shapes but no values, so nothing can run them or read their norms."""
    meta = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta:
        more = f" and {len(meta) - 1} more" if len(meta) > 1 else ""
        raise error(f"{type(model).__name__} has tensors on the meta device ('{meta[0]}'{more}): they have shapes but "
                    f"no values, so {doing} cannot use them. Load real weights first: "
                    "model.to_empty(device='cpu') then model.load_state_dict(state_dict), or build it outside a "
                    "meta-device context (torch.device('meta'), device_map='meta', init_empty_weights)")
    if example is not None and any(isinstance(t, torch.Tensor) and t.is_meta for t in pytree.tree_leaves(example)):
        raise error(f"the example inputs for {doing} {type(model).__name__} are on the meta device: pass real tensors, "
                    "e.g. torch.randn(1, 3, 224, 224)")


# torch's own loggers write tracebacks (fake-tensor errors, export's graph breaks) to stderr while
# a capture attempt fails; the attempt's failure reaches the user as one TraceError instead
_QUIET = logging.CRITICAL + 1


@contextlib.contextmanager
def quiet_torch_logs():
    """Silence every ``torch`` logger for the block (levels restored afterwards)."""
    manager = logging.Logger.manager
    names = ["torch"] + [n for n in list(manager.loggerDict) if n.startswith("torch.")]
    saved = []
    for name in names:
        logger = logging.getLogger(name)
        saved.append((logger, logger.level))
        logger.setLevel(_QUIET)
    try:
        yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)

