"""Checkpoints without pickle: one safetensors file holding the tensors, with a JSON manifest in
its metadata (key ``dgating_surgery``) that says how to rebuild the architecture.

- gated artefact (``save_gated``/``load_gated``, what ``dgate convert`` writes): the state_dict
  of a gated model plus the model reference, the recipe and the example-input spec. Loading builds
  a fresh model, gates it again with the same recipe and inputs (gating is deterministic for a
  given architecture) and loads the tensors strictly; the user resumes training from it.
- slim checkpoint (``save_slim``/``load_slim``): the state_dict of a shrunk model plus the
  reference, the recipe, the kept groups and ``kept_input_features``. Loading builds a fresh model,
  gives every tensor whose saved shape differs an empty tensor of that shape, re-derives the
  layers' shape attributes (``shrink.fix_attributes``, as ``shrink`` does) and loads strictly: the
  outputs are those of the model that was saved.

Files are written to a temporary file beside the target and renamed (atomic); the manifest holds a
SHA-256 of the tensors so that a corrupted file is an error, not a silently different model. A
pickle (or factory file) the reference names is stored relative to the checkpoint's directory.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .errors import CheckpointError, DGatingError, ModelSpecError
from .fixers import fix_attributes
from .gates import gate_model, gate_set, require_gated
from .inputs import InputSpec
from .models import ModelRef, Origin, as_reference, build, dumps, mismatch, reference_of
from .recipe import load_recipe
from .shrink import plan_cut, set_cut_attributes
from .tensors import owner, replace_tensor
from .wrappers import accepts_wrapped

META_KEY = "dgating_surgery"
FORMAT_VERSION = 1


# -- gated artefact --------------------------------------------------------------------------------
@accepts_wrapped(in_place="save_gated")
def save_gated(model: nn.Module, path, reference=None, example_inputs=None, example_kwargs=None) -> Path:
    """Write a gated model (as ``dgate convert`` does) so that it can be resumed with ``load_gated``.

    ``reference`` ("pkg.mod:factory", a ``ModelRef`` or its dict) says how to build the original
    architecture; ``example_inputs``/``example_kwargs`` are recorded as shapes and dtypes to gate it
    again. Both default to what ``model.dgate_origin`` recorded when it was loaded here.
    """
    dset = require_gated(model, "save_gated", "a shrunk model is saved with dg.save_slim")
    origin = _origin(model, reference, example_inputs, example_kwargs)
    if origin.inputs is None:
        raise CheckpointError("save_gated needs example_inputs (the batch the model was gated with): loading gates "
                              "a fresh model again on inputs of the same shape")
    state = model.state_dict()
    manifest = {"format": "gated", "model": origin.reference.relative_to(Path(path).parent).to_dict(),
                "inputs": origin.inputs.to_dict(), "recipe": dset.recipe.to_dict()}
    return _write(path, state, manifest)


def load_gated(path, allow_pickle: bool = False, reference=None) -> nn.Module:
    """The gated model saved at ``path``, in train mode, ready to resume training (its reference
    and example inputs are kept in ``model.dgate_origin`` for ``save_gated`` and ``shrink``).
    ``reference`` overrides the architecture the file names."""
    state, manifest = _read(path, "gated")
    ref = as_reference(reference) if reference is not None else _manifest_ref(manifest, path)
    model = _build(ref, allow_pickle, path)
    inputs = InputSpec.from_dict(manifest["inputs"])
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
              kept: dict | None = None) -> Path:
    """Write a shrunk model as safetensors plus the manifest ``load_slim`` rebuilds it from.

    ``reference``: how to build the original architecture (default: ``model.dgate_origin``, else
    derived from the class, see ``models.reference_of``). ``example_inputs``, ``recipe`` and
    ``kept`` (from ``kept_groups`` before the cut) are recorded for the record and for checks.
    A reference that would not rebuild this model (e.g. an ``nn.Sequential``, whose class called
    without arguments is empty) is an error here, not when loading: pass ``reference=``.
    """
    if gate_set(model) is not None:
        raise CheckpointError(f"{type(model).__name__} still has gates: dg.shrink it first (or save it with "
                              "dg.save_gated to resume training)")
    origin = _origin(model, reference, example_inputs, example_kwargs)
    recipe = load_recipe(recipe).to_dict() if recipe is not None else origin.recipe
    state = model.state_dict()
    if getattr(model, "dgate_origin", None) is None or reference is not None:
        _check_rebuilds(origin.reference, state, model, derived=reference is None)
    manifest = {"format": "slim", "model": origin.reference.relative_to(Path(path).parent).to_dict(), "recipe": recipe,
                "inputs": origin.inputs.to_dict() if origin.inputs is not None else None, "kept_groups": kept,
                "kept_input_features": {k: v.tolist() for k, v in getattr(model, "kept_input_features", {}).items()},
                "cut_attributes": getattr(model, "cut_attributes", {})}
    return _write(path, state, manifest)


def load_slim(path, model: nn.Module | None = None, reference=None, allow_pickle: bool = False) -> nn.Module:
    """The slim model saved at ``path``, in eval mode, computing what the saved model computed.

    The architecture is rebuilt from the reference in the file (or ``reference``), or taken from
    ``model``: a fresh, unpruned instance of the original architecture, which is cut to the saved
    shapes in place. A file that does not fit the architecture raises ``CheckpointError``.
    """
    state, manifest = _read(path, "slim")
    if model is not None:
        if gate_set(model) is not None:
            raise CheckpointError("load_slim needs a fresh model of the original architecture, not a gated one")
        ref = reference_of_or_none(model)
        label = ref or type(model).__name__
    else:
        ref = as_reference(reference) if reference is not None else _manifest_ref(manifest, path)
        model, label = _build(ref, allow_pickle, path), ref
    _resize(model, state, path, label)
    set_cut_attributes(model, manifest.get("cut_attributes") or {})
    fix_attributes(model)
    _load_strict(model, state, path, label)
    if manifest.get("kept_input_features"):
        model.kept_input_features = {k: torch.tensor(v, dtype=torch.long)
                                     for k, v in manifest["kept_input_features"].items()}
    inputs = InputSpec.from_dict(manifest["inputs"]) if manifest.get("inputs") else None
    if ref is not None:
        model.dgate_origin = Origin(ref, inputs, manifest.get("recipe"))
    return model.eval()


def read_manifest(path) -> dict:
    """The manifest of a checkpoint written here (format, model reference, recipe, inputs...)."""
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
            fresh = build(ref)
    except Exception:  # a factory that computes on its tensors fails on meta: build it for real
        try:
            fresh = build(ref)
        except ModelSpecError as exc:
            raise ModelSpecError(f"save_slim: {type(model).__name__} could not be rebuilt from {how} ({exc}); "
                                 f"{fix}") from None
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


def _build(ref: ModelRef, allow_pickle: bool, path) -> nn.Module:
    try:
        return build(ref, allow_pickle)
    except ModelSpecError as exc:
        raise CheckpointError(f"{path}: cannot rebuild its model {ref}: {exc}") from None


def _resize(model: nn.Module, state: dict, path, ref) -> None:
    """Give every tensor whose saved shape differs an empty tensor of that shape: a cut only
    shrinks dims, so a saved tensor larger than the fresh one means another architecture."""
    own = model.state_dict()
    for key, saved in state.items():
        if key not in own or tuple(own[key].shape) == tuple(saved.shape):
            continue  # a missing key is reported by the strict load
        if own[key].ndim != saved.ndim or any(s > o for s, o in zip(saved.shape, own[key].shape)):
            raise CheckpointError(f"{path} does not fit {ref}: tensor '{key}' has shape {tuple(saved.shape)} in the "
                                  f"file but {tuple(own[key].shape)} in the rebuilt model, so it is not a cut of "
                                  "this architecture")
        module, attr = owner(model, key)
        replace_tensor(module, attr, torch.empty(saved.shape, dtype=saved.dtype))


def _load_strict(model: nn.Module, state: dict, path, ref) -> None:
    problem = mismatch(model, state)
    if problem:
        raise CheckpointError(f"{path} does not fit {ref} ({problem}): it was written for another architecture "
                              "(or another version of it)")
    model.load_state_dict(state, strict=True)


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


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


def _write(path, state: dict, manifest: dict) -> Path:
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        raise CheckpointError(f"cannot write {path}: directory '{parent}' does not exist (create it first)")
    tensors, aliases = _dedupe(state)
    import dgating_surgery
    manifest = {**manifest, "version": FORMAT_VERSION, "aliases": aliases, "sha256": _digest(tensors),
                "written_by": f"dgating-surgery {dgating_surgery.__version__}, torch {torch.__version__}"}
    text = dumps(manifest)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        save_file(tensors, tmp, metadata={META_KEY: text})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; the result is an ordinary file
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, Exception):  # OSError, or safetensors' error around one (a full disk)
            raise CheckpointError(f"cannot write {path}: {_write_failure(exc)}; nothing was written") from None
        raise  # Ctrl-C: the temporary file is gone, the target untouched
    return path


def _write_failure(exc: Exception) -> str:
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).strip().splitlines()[0]
    code = exc.errno if isinstance(exc, OSError) else None
    found = re.search(r"os error (\d+)", text)
    code = code or (int(found.group(1)) if found else None)
    if code in (errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return f"{os.strerror(code)} (is the disk full?)"
    return text


def _read(path, expected: str | None) -> tuple[dict[str, torch.Tensor], dict]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file: it is truncated or corrupt ({exc}); write "
                              "it again") from None
    if META_KEY not in metadata:
        raise CheckpointError(f"{path} has no dgating-surgery manifest: it holds plain weights (load them with "
                              "--weights or safetensors.torch.load_file)")
    try:
        manifest = json.loads(metadata[META_KEY])
        version, kind = int(manifest["version"]), manifest["format"]
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"{path}: its manifest is corrupt; write the file again") from None
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer dgating-surgery (format {version}); upgrade to read it")
    if expected is not None and kind != expected:
        hint = ("load it with dg.load_slim; `dgate report`/`dgate shrink` take the gated file from `dgate convert`"
                if kind == "slim" else "it is still gated: load it with dg.load_gated, or cut it with `dgate shrink`")
        raise CheckpointError(f"{path} is a {kind} checkpoint, not a {expected} one: {hint}")
    if manifest.get("sha256") != _digest(state):
        raise CheckpointError(f"{path} is corrupt: its tensors do not match the checksum written with them; write it "
                              "again")
    for alias, target in manifest.get("aliases", {}).items():
        state[alias] = state[target]
    return state, manifest
