"""Checkpoints without pickle: one safetensors file holding the tensors, with a JSON manifest in
its metadata (key ``dgating_surgery``) that says how to rebuild the architecture.

- gated artefact (``save_gated``/``load_gated``, what ``dgate convert`` writes): the state_dict
  of a gated model plus the model reference, the recipe and the example-input spec. Loading builds
  a fresh model, gates it again with the same recipe and inputs (gating is deterministic for a
  given architecture) and loads the tensors strictly; the user resumes training from it.
- slim checkpoint (``save_slim``/``load_slim``): the state_dict of a shrunk model plus the
  reference, the recipe, the kept groups and ``kept_input_features``. Loading builds a fresh model,
  gives every tensor whose saved shape or dtype differs an empty tensor of that shape and dtype,
  re-derives the layers' shape attributes (``shrink.fix_attributes``, as ``shrink`` does) and loads
  strictly: the outputs are those of the model that was saved.

A checkpoint is data. Loading runs only what ``trust.py`` admits (a library's model constructor
with plain arguments) unless the caller opts in (``trust_code``, ``allow_pickle``) or passes the
architecture itself; ``manifest.py`` checks every field and a SHA-256 over the manifest and the
tensors; the model the manifest implies is bounded by the file and by the machine's memory while it
is built (``_bounded``). Files are written through ``writing.write_atomically``: a unique temporary
file in the destination folder, fsynced, renamed. A pickle (or factory file) the reference names is
stored relative to the checkpoint's folder and must stay inside it.
"""
from __future__ import annotations

import contextlib
import inspect
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.nn.modules import module as torch_module

from ..engine import centering
from ..engine.branches import replace_layers, replaced_layers
from ..errors import CheckpointError, DGatingError, ModelSpecError, UntrustedCodeError, one_line
from ..engine.fixers import fix_attributes
from ..engine.gates import gate_model, gate_set, require_gated
from .inputs import DTYPES, InputSpec
from .manifest import FORMAT_VERSION, available_memory, cut_attribute_problem, digest, parse, size
from .models import ModelRef, Origin, as_reference, build, dumps, mismatch, reference_of
from ..engine.recipe import load_recipe
from ..engine.shrink import APPROXIMATE_ATTR, plan_cut, set_cut_attributes
from ..engine.tensors import owner, replace_tensor, tied_holders
from .trust import named_file, outside
from ..engine.wrappers import accepts_wrapped
from .writing import write_atomically

META_KEY = "dgating_surgery"


# -- gated artefact --------------------------------------------------------------------------------
@accepts_wrapped(in_place="save_gated")
def save_gated(model: nn.Module, path, reference=None, example_inputs=None, example_kwargs=None, *,
               replace: bool = True) -> Path:
    """Write a gated model (as ``dgate convert`` does) so that it can be resumed with ``load_gated``.

    ``reference`` ("pkg.mod:factory", a ``ModelRef`` or its dict) says how to build the original
    architecture; ``example_inputs``/``example_kwargs`` are recorded as shapes and dtypes to gate it
    again. Both default to what ``model.dgate_origin`` recorded when it was loaded here.
    ``replace=False``: fail if ``path`` exists (created exclusively: of two writers, one succeeds).
    """
    dset = require_gated(model, "save_gated", "a shrunk model is saved with dg.save_slim")
    origin = _origin(model, reference, example_inputs, example_kwargs)
    if origin.inputs is None:
        raise CheckpointError("save_gated needs example_inputs (the batch the model was gated with): loading gates "
                              "a fresh model again on inputs of the same shape")
    state = model.state_dict()
    manifest = {"format": "gated", "model": stored_reference(origin.reference, path),
                "inputs": origin.inputs.to_dict(), "recipe": dset.recipe.to_dict()}
    return _write(path, state, manifest, replace)


def load_gated(path, allow_pickle: bool = False, reference=None, *, trust_code: bool = False) -> nn.Module:
    """The gated model saved at ``path``, in train mode, ready to resume training (its reference
    and example inputs are kept in ``model.dgate_origin`` for ``save_gated`` and ``shrink``).

    The file may only name a model constructor of torchvision, timm or transformers with plain
    arguments; anything else (your own factory, a file, a pickle) runs code from the file's author
    and needs ``trust_code=True`` (a pickle: ``allow_pickle=True``), else ``UntrustedCodeError``.
    ``reference`` overrides the architecture the file names (your choice: it is trusted)."""
    state, manifest = _read(path, "gated")
    chosen = reference is not None
    ref = as_reference(reference) if chosen else _manifest_ref(manifest, path)
    inputs = InputSpec.from_dict(manifest["inputs"])
    model = _build(ref, path, state, allow_pickle, trust_code or chosen, inputs)
    _match_dtypes(model, state)
    args, kwargs = inputs.make()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # convert already showed the recipe's warnings
            gate_model(model, manifest["recipe"], args, kwargs)
    except DGatingError as exc:
        raise CheckpointError(f"{path}: gating a fresh {ref} again failed: {exc}") from None
    _load_strict(model, state, path, ref)
    model.dgate_origin = Origin(ref, inputs, manifest["recipe"])
    return model.train()


# -- slim checkpoint -------------------------------------------------------------------------------
def save_slim(model: nn.Module, path, reference=None, example_inputs=None, example_kwargs=None, recipe=None,
              kept: dict | None = None, *, replace: bool = True) -> Path:
    """Write a shrunk model as safetensors plus the manifest ``load_slim`` rebuilds it from.

    ``reference``: how to build the original architecture (default: ``model.dgate_origin``, else
    derived from the class, see ``models.reference_of``). ``example_inputs``, ``recipe`` and
    ``kept`` (from ``kept_groups`` before the cut) are recorded for the record and for checks.
    A reference that would not rebuild this model (e.g. an ``nn.Sequential``, whose class called
    without arguments is empty) is an error here, not when loading: pass ``reference=``.
    ``replace=False``: fail if ``path`` exists (created exclusively: of two writers, one succeeds).
    """
    if gate_set(model) is not None:
        raise CheckpointError(f"{type(model).__name__} still has gates: dg.shrink it first (or save it with "
                              "dg.save_gated to resume training)")
    origin = _origin(model, reference, example_inputs, example_kwargs)
    recipe = load_recipe(recipe).to_dict() if recipe is not None else origin.recipe
    state = model.state_dict()
    if getattr(model, "dgate_origin", None) is None or reference is not None:
        _check_rebuilds(origin.reference, state, model, derived=reference is None)
    manifest = {"format": "slim", "model": stored_reference(origin.reference, path), "recipe": recipe,
                "inputs": origin.inputs.to_dict() if origin.inputs is not None else None, "kept_groups": kept,
                "kept_input_features": {k: v.tolist() for k, v in getattr(model, "kept_input_features", {}).items()},
                "cut_attributes": getattr(model, "cut_attributes", {}),
                "centered_layernorms": getattr(model, centering.SWAPPED_ATTR, []),
                "removed_branches": replaced_layers(model)}
    if getattr(model, APPROXIMATE_ATTR, None):  # an approximate cut (opt-in): a loader must know (``shrink``)
        manifest["approximate_cut"] = getattr(model, APPROXIMATE_ATTR)
    return _write(path, state, manifest, replace)


def load_slim(path, model: nn.Module | None = None, reference=None, allow_pickle: bool = False, *,
              trust_code: bool = False) -> nn.Module:
    """The slim model saved at ``path``, in eval mode, computing what the saved model computed.

    The architecture is rebuilt from the reference in the file (or ``reference``), or taken from
    ``model``: a fresh, unpruned instance of the original architecture, which is cut to the saved
    shapes in place. A file that does not fit the architecture raises ``CheckpointError``. As for
    ``load_gated``, a file that names anything but a library's model constructor needs
    ``trust_code=True`` (a pickle: ``allow_pickle=True``) unless you pass ``model`` or ``reference``.
    """
    state, manifest = _read(path, "slim")
    inputs = InputSpec.from_dict(manifest["inputs"]) if manifest["inputs"] else None
    if model is not None:
        if gate_set(model) is not None:
            raise CheckpointError("load_slim needs a fresh model of the original architecture, not a gated one")
        ref = reference_of_or_none(model)
        label = ref or type(model).__name__
    else:
        chosen = reference is not None
        ref = as_reference(reference) if chosen else _manifest_ref(manifest, path)
        model, label = _build(ref, path, state, allow_pickle, trust_code or chosen), ref
    _replay_centering(model, manifest["centered_layernorms"], path)
    _replay_branches(model, manifest["removed_branches"], path)
    _resize(model, state, path, label)
    _set_cut_attributes(model, manifest["cut_attributes"], path)
    fix_attributes(model)
    _load_strict(model, state, path, label)
    if manifest["kept_input_features"]:
        _check_kept_features(model, manifest["kept_input_features"], inputs, path)
        model.kept_input_features = {k: torch.tensor(v, dtype=torch.long)
                                     for k, v in manifest["kept_input_features"].items()}
    if manifest.get("approximate_cut"):
        setattr(model, APPROXIMATE_ATTR, manifest["approximate_cut"])
    if ref is not None:
        model.dgate_origin = Origin(ref, inputs, manifest["recipe"])
    return model.eval()


def read_manifest(path) -> dict:
    """The manifest of a checkpoint written here (format, model reference, recipe, inputs...),
    checked field by field and against its checksum; reading it runs nothing."""
    return _read(path, None)[1]


@accepts_wrapped()
def kept_groups(model: nn.Module, threshold: float | None = None, uniform: bool = False) -> dict:
    """Per gate of a gated model: its kind, group count and the indices of the groups a cut at
    ``threshold`` (``uniform``: with uniform widths) keeps (positions among the gate's groups), for
    ``save_slim(kept=...)``."""
    plan = plan_cut(model, threshold, uniform=uniform)
    return {dgate.name: {"kind": dgate.kind, "groups": dgate.num_groups,
                         "kept": (~plan.dead[key]).nonzero().reshape(-1).tolist()}
            for key, dgate in gate_set(model).items()}


def reference_of_or_none(model: nn.Module) -> ModelRef | None:
    try:
        return reference_of(model)
    except ModelSpecError:
        return None


# -- helpers ---------------------------------------------------------------------------------------
def _manifest_ref(manifest: dict, path) -> ModelRef:
    """The reference a manifest stores, its relative file (a pickle) resolved against the checkpoint."""
    return ModelRef.from_dict(manifest["model"]).resolved(Path(path).parent)


def stored_reference(ref: ModelRef, path) -> dict:
    """The reference as a manifest stores it: a file it names relative to the checkpoint's folder,
    which the file may not leave (loading would refuse it, with --trust-code too); a transformers
    config without ``auto_map`` (only Auto classes read it, and loading refuses it from a file: the
    manifest names the class itself)."""
    folder = Path(path).parent
    if outside(ref, folder):
        raise CheckpointError(f"cannot write {path}: its model reference {ref} names {named_file(ref)}, outside the "
                              f"checkpoint's folder, which loading refuses: write the checkpoint beside that file, or "
                              "pass reference='package.module:factory'")
    stored = ref.relative_to(folder).to_dict()
    if ref.kind == "hf":
        stored["config"] = {k: v for k, v in stored["config"].items() if k != "auto_map"}
    return stored


def _check_rebuilds(ref: ModelRef, state: dict, model: nn.Module, derived: bool) -> None:
    """``load_slim`` will build ``ref`` and fit the saved tensors into it: check now that it can
    (every tensor present, none larger than in the rebuilt model), on the meta device when the
    factory allows it, so that no file is written that cannot be loaded."""
    if ref.kind != "factory":
        return  # a transformers config or a pickle rebuilds the model it came from
    how = (f"its class called without arguments ({ref.spec.replace(':', '.')}())" if derived
           else f"the reference {ref}")
    fix = ("pass reference='package.module:factory' naming a callable that builds the unpruned architecture "
           "without arguments (e.g. a function in your package that returns this model before the cut)")
    try:
        with torch.device("meta"):
            fresh = build(ref, trust_code=True)  # the caller's own model or reference
    except Exception:  # a factory that computes on its tensors fails on meta: build it for real
        try:
            fresh = build(ref, trust_code=True)
        except ModelSpecError as exc:
            raise ModelSpecError(f"save_slim: {type(model).__name__} could not be rebuilt from {how} ({exc}); "
                                 f"{fix}") from None
    replace_layers(fresh, replaced_layers(model))  # the layers of removed residual branches, as load_slim does
    own = fresh.state_dict()
    problem = _mismatch_keys(own, state)
    if problem is None:
        bigger = [k for k, v in state.items() if own[k].ndim != v.ndim
                  or any(s > o for s, o in zip(v.shape, own[k].shape))]
        if bigger:
            problem = (f"tensor '{bigger[0]}' is {tuple(state[bigger[0]].shape)} here but "
                       f"{tuple(own[bigger[0]].shape)} in the rebuilt model")
    if problem is not None:
        raise ModelSpecError(f"save_slim: {how} builds a {type(fresh).__name__} that does not fit this "
                             f"{type(model).__name__} ({problem}), so load_slim could not load the file; {fix}")


def _mismatch_keys(own: dict, state: dict) -> str | None:
    missing = [k for k in state if k not in own]
    extra = [k for k in own if k not in state]
    parts = []
    for label, keys in (("not in the rebuilt model", missing), ("only in the rebuilt model", extra)):
        if keys:
            parts.append(f"{label}: {', '.join(keys[:3])}{f' (+{len(keys) - 3} more)' if len(keys) > 3 else ''}")
    return "; ".join(parts) or None


def _origin(model, reference, example_inputs, example_kwargs) -> Origin:
    recorded = getattr(model, "dgate_origin", None)
    ref = as_reference(reference) if reference is not None else reference_of(model)
    if example_inputs is not None or example_kwargs:
        inputs = InputSpec.of(example_inputs, example_kwargs)
    else:
        inputs = recorded.inputs if recorded is not None else None
    return Origin(ref, inputs, recorded.recipe if recorded is not None else None)


class _TooLarge(CheckpointError):
    """The model a manifest implies is larger than the file or the machine allows."""


def _build(ref: ModelRef, path, state: dict, allow_pickle: bool, trust_code: bool,
           inputs: InputSpec | None = None) -> nn.Module:
    """The fresh model a checkpoint is loaded into, built only as ``trust.py`` admits and bounded
    in size: first on the meta device (nothing allocated) to measure its parameters and, given
    ``inputs``, the activations a forward on them makes; then for real, bounded again."""
    try:
        with _bounded(path, ref, state) as built:
            meta = None
            if ref.kind != "pickle":  # a pickle is the size of its file; loading it twice would run it twice
                try:
                    with torch.device("meta"):
                        meta = build(ref, allow_pickle, trust_code, Path(path).parent)
                except (UntrustedCodeError, _TooLarge):
                    raise
                except Exception:  # noqa: BLE001 - a factory that computes on its tensors: bounded below
                    meta = None
            if meta is not None and inputs is not None:
                _check_activations(meta, inputs, state, built[1], path, ref)
            built[:] = [0, 0]
            return build(ref, allow_pickle, trust_code, Path(path).parent)
    except UntrustedCodeError as exc:
        raise UntrustedCodeError(f"{path}: {exc}") from None
    except _TooLarge:
        raise
    except ModelSpecError as exc:
        raise CheckpointError(f"{path}: cannot rebuild its model {ref}: {exc}") from None


@contextlib.contextmanager
def _bounded(path, ref: ModelRef, state: dict):
    """While a model is built: count the tensors and bytes its modules register, and stop it as
    soon as it has more tensors than a model this file fits can have (the file holds them all) or
    more bytes than the machine has available. Yields [tensors, bytes] so far."""
    limit, memory = 4 * len(state) + 1024, available_memory()
    built = [0, 0]

    def count(module, name, tensor):
        if tensor is None:
            return
        built[0] += 1
        built[1] += tensor.numel() * tensor.element_size()
        if built[0] > limit:
            raise _TooLarge(f"{path}: manifest field 'model' ({_brief(ref)}) builds a model of more than {limit:,} "
                            f"tensors, and the file holds {len(state):,}: it does not describe this file's model")
        if memory and built[1] > memory:
            raise _TooLarge(f"{path}: manifest field 'model' ({_brief(ref)}) builds a model of more than "
                            f"{size(built[1])} of parameters, and this machine has {size(memory)} available: load it "
                            "on a larger machine")
    handles = [torch_module.register_module_parameter_registration_hook(count),
               torch_module.register_module_buffer_registration_hook(count)]
    try:
        yield built
    finally:
        for handle in handles:
            handle.remove()


def _check_activations(meta: nn.Module, inputs: InputSpec, state: dict, param_bytes: int, path, ref) -> None:
    """Refuse example inputs whose forward (loading gates the model on them) would not fit in
    memory: the outputs of every leaf module, measured by a forward on the meta device."""
    _match_dtypes(meta, state)
    args = tuple(_on_meta(a) for a in inputs.args)
    kwargs = {k: _on_meta(v) for k, v in inputs.kwargs.items()}
    total = [0]

    def leaf_output(module, _args, output):
        if not module._modules:
            total[0] += sum(t.numel() * t.element_size() for t in torch.utils._pytree.tree_leaves(output)
                            if isinstance(t, torch.Tensor))
    handle = torch_module.register_module_forward_hook(leaf_output)
    try:
        with torch.no_grad():
            meta(*args, **kwargs)
    except Exception:  # noqa: BLE001 - a model that does not run on meta: its parameters were bounded
        return
    finally:
        handle.remove()
    memory = available_memory()
    if memory and param_bytes + total[0] > memory:
        raise _TooLarge(f"{path}: manifest field 'inputs' ({inputs}) makes {_brief(ref)} compute about "
                        f"{size(total[0])} of activations besides {size(param_bytes)} of parameters, and this machine "
                        f"has {size(memory)} available: load it on a larger machine")


def _on_meta(desc: dict):
    return desc["value"] if "value" in desc else torch.empty(desc["shape"], dtype=DTYPES[desc["dtype"]], device="meta")


def _brief(ref: ModelRef) -> str:
    text = str(ref)
    return text if len(text) <= 120 else text[:117] + "..."


def _saved(state: dict, key: str) -> torch.Tensor | None:
    """The file's tensor for a fresh model's ``key``; a gated file names a gated weight by its
    parametrization (``fc.parametrizations.weight.original``)."""
    if key in state:
        return state[key]
    module, _, attr = key.rpartition(".")
    return state.get(f"{module}{'.' if module else ''}parametrizations.{attr}.original")


def _match_dtypes(model: nn.Module, state: dict) -> None:
    """Give every tensor of a fresh model the dtype it has in the file (a bfloat16 checkpoint
    rebuilds a bfloat16 model, on which its recorded inputs run); tied tensors stay tied."""
    tied = tied_holders(model)
    for key, tensor in model.state_dict(keep_vars=True).items():
        saved = _saved(state, key)
        if saved is None or saved.dtype == tensor.dtype:
            continue
        module, attr = owner(model, key)
        replace_tensor(module, attr, tensor.detach().to(saved.dtype), tied=tied.get(id(tensor), ()))


def _resize(model: nn.Module, state: dict, path, ref) -> None:
    """Give every tensor whose saved shape or dtype differs an empty tensor of that shape and dtype:
    a cut only shrinks dims, so a saved tensor larger than the fresh one means another architecture."""
    own = model.state_dict()
    tied = tied_holders(model)
    for key, saved in state.items():
        if key not in own or (tuple(own[key].shape) == tuple(saved.shape) and own[key].dtype == saved.dtype):
            continue  # a missing key is reported by the strict load
        if own[key].ndim != saved.ndim or any(s > o for s, o in zip(saved.shape, own[key].shape)):
            raise CheckpointError(f"{path} does not fit {ref}: tensor '{key}' has shape {tuple(saved.shape)} in the "
                                  f"file but {tuple(own[key].shape)} in the rebuilt model, so it is not a cut of "
                                  "this architecture")
        module, attr = owner(model, key)
        old = getattr(module, attr)
        if tuple(old.shape) == tuple(saved.shape) and old.dtype == saved.dtype:
            continue  # a tied weight, resized already under its first name
        replace_tensor(module, attr, torch.empty(saved.shape, dtype=saved.dtype), tied=tied.get(id(old), ()))


def _replay_branches(model: nn.Module, record: dict, path, field: str = "removed_branches",
                     source: str = "manifest field") -> None:
    """The layers of the residual branches the saved model had removed (``branches``). ``source`` and
    ``field``: where the file states them (the manifest, or a config.json's key)."""
    try:
        replace_layers(model, record)
    except (AttributeError, ValueError) as exc:
        raise CheckpointError(f"{path}: {source} '{field}': {one_line(exc)}") from None


def _replay_centering(model: nn.Module, names: list, path, field: str = "centered_layernorms",
                      source: str = "manifest field") -> None:
    """The LayerNorms the saved model computed as RMS norms of a centred stream (``centering``)."""
    try:
        centering.replay(model, names)
    except (AttributeError, DGatingError) as exc:
        raise CheckpointError(f"{path}: {source} '{field}': {one_line(exc)}") from None


def _set_cut_attributes(model: nn.Module, values: dict, path, field: str = "cut_attributes",
                        source: str = "manifest field") -> None:
    """The file's layer attributes (counts, epsilons), each only where a cut writes one
    (``manifest.cut_attribute_problem``)."""
    for name, value in values.items():
        problem = cut_attribute_problem(model, name, value)
        if problem is not None:
            raise CheckpointError(f"{path}: {source} '{field}.{name}': {problem}")
    set_cut_attributes(model, values)


def _check_kept_features(model: nn.Module, kept: dict, inputs: InputSpec | None, path) -> None:
    """Each input the manifest narrows is an argument of the forward, and its kept features exist."""
    names = list(inspect.signature(model.forward).parameters)
    for name, indices in kept.items():
        if name not in names:
            raise CheckpointError(f"{path}: manifest field 'kept_input_features.{name}': {type(model).__name__}."
                                  f"forward has no argument '{name}' (it takes {', '.join(names)})")
        desc = None
        if inputs is not None:
            position = names.index(name)
            desc = inputs.args[position] if position < len(inputs.args) else inputs.kwargs.get(name)
        width = desc["shape"][1] if desc and len(desc.get("shape", ())) > 1 else None
        if width is not None and indices[-1] >= width:
            raise CheckpointError(f"{path}: manifest field 'kept_input_features.{name}': feature {indices[-1]} is "
                                  f"beyond the {width} features of the recorded input")


def _load_strict(model: nn.Module, state: dict, path, ref) -> None:
    problem = mismatch(model, state)
    if problem:
        raise CheckpointError(f"{path} does not fit {ref} ({problem}): it was written for another architecture "
                              "(or another version of it)")
    model.load_state_dict(state, strict=True)


def _dedupe(state: dict) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors refuses tensors that share memory (tied weights): keep one, record the rest as
    aliases; a partial overlap is stored as a copy."""
    tensors, aliases, seen, storages = {}, {}, {}, set()
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"state_dict entry '{key}' is a {type(value).__name__}, not a tensor: only tensors "
                                  "can be saved without pickle")
        t = value.detach().cpu()
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        view = (ptr, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if ptr is not None and view in seen:
            aliases[key] = seen[view]
            continue
        shared = ptr is not None and ptr in storages
        tensors[key] = t.clone().contiguous() if shared or not t.is_contiguous() else t
        if ptr is not None:
            seen[view] = key
            storages.add(ptr)
    return tensors, aliases


def _write(path, state: dict, manifest: dict, replace: bool = True) -> Path:
    tensors, aliases = _dedupe(state)
    import dgating_surgery
    manifest = {**manifest, "version": FORMAT_VERSION, "aliases": aliases,
                "written_by": f"dgating-surgery {dgating_surgery.__version__}, torch {torch.__version__}"}
    dumps(manifest)  # plain JSON data, or a clear error
    manifest["sha256"] = digest(manifest, tensors)
    text = dumps(manifest)
    return write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata={META_KEY: text}), replace)


def _read(path, expected: str | None) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and the checked manifest of the checkpoint at ``path`` (``manifest.parse``)."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint: name the .safetensors file in it")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors' errors are of several types
        raise CheckpointError(f"{path} is not a readable safetensors file: it is truncated or corrupt "
                              f"({one_line(exc)}); write it again") from None
    if META_KEY not in metadata:
        raise CheckpointError(f"{path} has no dgating-surgery manifest: it holds plain weights (load them with "
                              "--weights or safetensors.torch.load_file)")
    manifest = parse(metadata[META_KEY], state, path, expected)
    for alias, target in manifest["aliases"].items():
        state[alias] = state[target]
    return state, manifest
