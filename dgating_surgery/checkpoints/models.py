"""Resolving MODEL specs: what users have (a factory, a pickled model, a Hugging Face directory)
turned into an ``nn.Module`` plus a ``ModelRef`` that a checkpoint manifest can store and that
builds the same architecture again later, without pickle.

A MODEL spec is one of

- ``package.module:callable`` (a factory or class, e.g. ``torchvision.models:resnet18``), called
  with optional keyword arguments; ``--weights`` (safetensors or a ``state_dict`` file) fills it;
- a Hugging Face directory: ``config.json`` alone (architecture only, ``from_config``) or a saved
  model (``from_pretrained``, local files only); the manifest keeps the config itself;
- a file from ``torch.save(model)``: a whole-model pickle can run arbitrary code when loaded, so it
  is only read with ``allow_pickle=True`` (``--allow-pickle``).

A factory may also be a file, ``path/to/file.py:callable``, or a timm model name, ``timm:resnet18``
(``timm.create_model``). Modules in the current directory are importable, for factories and for the
classes a pickle names, but after the installed libraries (a ``torchvision/`` folder there never
replaces torchvision). A checkpoint's manifest stores a pickle's path (and a factory file's)
relative to the checkpoint, so that the two can be moved together.

What a reference read from a checkpoint may run is decided in ``trust.py``: ``build`` runs a
library's model constructor freely, anything else only with the caller's ``trust_code`` (or
``allow_pickle`` for a pickle).
"""
from __future__ import annotations

import difflib
import importlib
import importlib.util
import json
import os
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import DGatingError, ModelSpecError, UntrustedCodeError, one_line
from .inputs import InputSpec
from .trust import PICKLE_FLAG, hf_class, is_file_spec, named_file, refusal, safe_constructor

REF_FIELDS = ("kind", "spec", "kwargs", "config")
REF_KINDS = ("factory", "pickle", "hf")
# libraries a MODEL spec commonly names, and the extra of this package that installs each
EXTRAS = {"torchvision": "vision", "timm": "timm", "transformers": "transformers"}


@dataclass
class ModelRef:
    """How to build the original architecture again. ``kind``: "factory" (``spec`` is
    "pkg.mod:callable", called with ``kwargs``), "pickle" (``spec`` is the file; needs
    allow_pickle) or "hf" (``spec`` is the transformers class name, ``config`` its config dict)."""

    kind: str
    spec: str
    kwargs: dict = field(default_factory=dict)
    config: dict | None = None

    def to_dict(self) -> dict:
        out = {"kind": self.kind, "spec": self.spec}
        if self.kwargs:
            out["kwargs"] = self.kwargs
        if self.config is not None:
            out["config"] = self.config
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "ModelRef":
        problem = _ref_problem(data)
        if problem is not None:
            text = repr(data)
            raise ModelSpecError(f"not a model reference ({problem}): {text if len(text) < 200 else text[:197] + '...'}")
        return cls(data["kind"], data["spec"], dict(data.get("kwargs") or {}), data.get("config"))

    def _path(self) -> tuple[str, str] | None:
        """The file this reference names (a pickle, or a factory's .py file) and the rest of the spec."""
        named = named_file(self)
        return None if named is None else (named, self.spec[len(named):])

    def relative_to(self, directory) -> "ModelRef":
        """This reference with its file written relative to ``directory`` (a checkpoint's), so that
        a manifest holds no machine-specific absolute path."""
        named = self._path()
        if named is None or not os.path.isabs(named[0]):
            return self
        try:
            rel = os.path.relpath(named[0], Path(directory).resolve())
        except ValueError:  # another drive (Windows): keep it absolute
            return self
        return ModelRef(self.kind, Path(rel).as_posix() + named[1], dict(self.kwargs), self.config)

    def resolved(self, directory) -> "ModelRef":
        """This reference with a relative file resolved against ``directory`` (the checkpoint's)."""
        named = self._path()
        if named is None or os.path.isabs(named[0]):
            return self
        return ModelRef(self.kind, str((Path(directory) / named[0]).resolve()) + named[1], dict(self.kwargs),
                        self.config)

    def __str__(self) -> str:
        if self.kind == "hf":
            return f"transformers.{self.spec} (config stored in the file)"
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
        return f"{self.spec}({args})" if self.kind == "factory" else f"pickled model {self.spec}"


def _ref_problem(data) -> str | None:
    """Why ``data`` is not a reference's dict (fields, their types), or None."""
    if not isinstance(data, dict):
        return f"a {type(data).__name__}, not an object"
    unknown = sorted(str(k) for k in data if k not in REF_FIELDS)
    if unknown:
        return f"unknown field '{unknown[0]}' (known: {', '.join(REF_FIELDS)})"
    kind, spec = data.get("kind"), data.get("spec")
    if kind not in REF_KINDS:
        return f"field 'kind' is {kind!r}, not one of {', '.join(REF_KINDS)}"
    if not isinstance(spec, str) or not spec or len(spec) > 1000 or "\0" in spec:
        return "field 'spec' must be a non-empty string (at most 1000 characters)"
    if not isinstance(data.get("kwargs", {}), dict) or (kind != "factory" and data.get("kwargs")):
        return "field 'kwargs' must be an object of keyword arguments, and only a factory takes them"
    if (kind == "hf") != isinstance(data.get("config"), dict):
        return "field 'config' must be an object (the transformers config) for kind hf, and absent otherwise"
    return None


@dataclass
class Origin:
    """What a checkpoint needs to know of a model beyond its tensors, kept on the model as
    ``model.dgate_origin`` by ``load_gated``/``load_slim`` and the CLI, so that saving it again
    needs no arguments."""

    reference: ModelRef
    inputs: InputSpec | None = None
    recipe: dict | None = None


def factory_ref(spec: str, kwargs: dict | None = None) -> ModelRef:
    """The reference of a factory spec; a factory file's path is made absolute (the manifest stores
    it relative to the checkpoint)."""
    if is_file_spec(spec):
        module, _, attr = spec.rpartition(":")
        path = Path(module).expanduser()
        if path.is_file():
            spec = f"{path.resolve()}:{attr}"
    return ModelRef("factory", spec, dict(kwargs or {}))


# -- resolving a spec ------------------------------------------------------------------------------
def load_model(spec: str, weights: str | os.PathLike | None = None, kwargs: dict | None = None,
               allow_pickle: bool = False) -> tuple[nn.Module, ModelRef]:
    """The model a MODEL spec names, and the reference that rebuilds its architecture."""
    path = Path(spec)
    is_factory = not path.exists() and ":" in spec and not spec.endswith((".pt", ".pth", ".bin", ".safetensors"))
    if not path.exists() and not is_factory:
        raise ModelSpecError(f"MODEL '{spec}': no such file or directory, and not a factory 'package.module:callable' "
                             "(e.g. torchvision.models:resnet18)")
    if kwargs and not is_factory:
        raise ModelSpecError(f"MODEL '{spec}': keyword arguments (--arg) only apply to a factory 'package.module:callable'")
    if is_factory:
        ref = factory_ref(spec, kwargs)
        model = build(ref, trust_code=True)  # the caller named it
    elif path.is_dir():
        model, ref = _load_hf(path)
    else:
        model, ref = _load_pickle(path, allow_pickle), ModelRef("pickle", str(path.resolve()))
    if weights is not None:
        load_weights(model, read_state_dict(weights), str(weights))
    return model, ref


def build(ref: ModelRef, allow_pickle: bool = False, trust_code: bool = False, folder=None) -> nn.Module:
    """A fresh model of the referenced architecture (random weights for factories and HF configs).

    A library's model constructor with plain arguments (``trust.safe_constructor``) always runs;
    anything else only with ``trust_code`` (the caller chose the reference or trusts its file) or,
    for a pickle, ``allow_pickle``, else ``UntrustedCodeError``. ``folder``: the checkpoint's, which
    a file the reference names may not leave."""
    problem = refusal(ref, trust_code, allow_pickle, folder)
    if problem is not None:
        raise UntrustedCodeError(problem)
    if ref.kind == "pickle":
        return _load_pickle(Path(ref.spec), allow_pickle)
    constructor, _ = safe_constructor(ref)
    if ref.kind == "hf":
        return _hf_from_config(ref.spec, ref.config)
    module_name, _, attr = ref.spec.rpartition(":")
    if not module_name or not attr:
        raise ModelSpecError(f"factory '{ref.spec}': write it as package.module:callable (or path/to/file.py:callable)")
    target = constructor or _factory(ref.spec, module_name, attr)
    try:
        model = target(**ref.kwargs)
    except DGatingError:
        raise  # e.g. a size bound checkpoint.py sets around the build
    except Exception as exc:
        frames = traceback.extract_tb(exc.__traceback__)
        if isinstance(exc, TypeError) and len(frames) == 1:  # raised by the call itself: the arguments
            raise ModelSpecError(f"factory '{ref.spec}' rejected its arguments {ref.kwargs}: {exc}") from None
        raise ModelSpecError(f"factory '{ref.spec}' raised {_describe_exc(exc)}") from None
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"factory '{ref.spec}' returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _factory(spec: str, module_name: str, attr: str):
    """The callable a factory spec names: an attribute of an importable module or of a .py file, or
    a timm model name (``timm:resnet18`` calls ``timm.create_model("resnet18")``)."""
    _cwd_importable()
    if is_file_spec(spec):
        target: Any = _import_file(module_name, spec)
    else:
        try:
            target = importlib.import_module(module_name)
        except ImportError as exc:
            missing = (getattr(exc, "name", None) or "").partition(".")[0]
            hint = (f": install {missing} (pip install {missing}, or this package's '{EXTRAS[missing]}' extra: "
                    f"pip install '.[{EXTRAS[missing]}]')" if missing in EXTRAS else
                    "; is it installed or in the current directory?")
            raise ModelSpecError(f"factory '{spec}': cannot import module '{module_name}' ({exc}){hint}") from None
        except Exception as exc:
            raise ModelSpecError(f"factory '{spec}': importing module '{module_name}' raised {_describe_exc(exc)}") \
                from None
    found = target
    for part in attr.split("."):
        if not hasattr(found, part):
            if module_name == "timm" and "." not in attr:
                return _timm_model(spec, attr)
            names = [n for n in dir(found) if not n.startswith("_")]
            close = difflib.get_close_matches(part, names, n=3)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ModelSpecError(f"factory '{spec}': module '{module_name}' has no attribute '{attr}'{hint}")
        found = getattr(found, part)
    if not callable(found):
        raise ModelSpecError(f"factory '{spec}' is not callable")
    return found


def _timm_model(spec: str, name: str):
    import timm
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else " (timm.list_models() lists them)"
        raise ModelSpecError(f"factory '{spec}': timm has no attribute or model named '{name}'{hint}")

    def create(**kwargs):
        return timm.create_model(name, **kwargs)
    return create


def _import_file(path_text: str, spec: str):
    """The module a factory's .py file defines (imported once). Its directory becomes importable
    after the installed libraries, so that it can import its neighbours and a pickle can name its
    classes; it keeps its own name only where that name is not an installed module's (a
    ``torchvision.py`` factory never stands in for torchvision)."""
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise ModelSpecError(f"factory '{spec}': file '{path}' not found")
    path = path.resolve()
    name = path.stem
    existing = sys.modules.get(name)
    if existing is not None and getattr(existing, "__file__", None) and Path(existing.__file__).resolve() == path:
        return existing
    if existing is not None or not name.isidentifier() or _installed(name, path):
        name = f"_dgate_factory_{abs(hash(str(path)))}"
        if name in sys.modules:
            return sys.modules[name]
    _append_path(str(path.parent))
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise ModelSpecError(f"factory '{spec}': importing {path} raised {_describe_exc(exc)}") from None
    return module


def _installed(name: str, path: Path) -> bool:
    """Whether another module than the file at ``path`` is importable as ``name`` (a library)."""
    try:
        found = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return False
    return found is not None and (found.origin is None or Path(found.origin).resolve() != path)


def _append_path(directory: str) -> None:
    """Make ``directory`` importable after everything else: never before the installed libraries."""
    if directory not in sys.path and os.path.abspath(directory) not in map(os.path.abspath, sys.path):
        sys.path.append(directory)


def _cwd_importable() -> None:
    """Like uvicorn/gunicorn: a user's own module in the current directory can be imported (for a
    factory the caller named, and for the class a pickle names), also from the console script;
    appended, so that installed libraries come first."""
    _append_path(os.getcwd())


def _describe_exc(exc: BaseException) -> str:
    """An exception raised by the user's code as one line: its type and message and where it was
    raised (the innermost frame outside torch and this package)."""
    message = one_line(exc)
    where = None
    if isinstance(exc, SyntaxError) and exc.filename:
        where = f"{_short(exc.filename)}:{exc.lineno}"
    else:
        skip = (os.path.dirname(torch.__file__), os.path.dirname(os.path.abspath(__file__)), "<frozen")
        frames = traceback.extract_tb(exc.__traceback__)
        user = [f for f in frames if not f.filename.startswith(skip)]
        if user or frames:
            frame = (user or frames)[-1]
            where = f"{_short(frame.filename)}:{frame.lineno} in {frame.name}"
    return f"{message} (at {where})" if where else message


def _short(filename: str) -> str:
    """A file name relative to the current directory when it is inside it."""
    try:
        rel = os.path.relpath(filename)
    except ValueError:
        return filename
    return filename if rel.startswith("..") else rel


def reference_of(model: nn.Module) -> ModelRef:
    """The reference recorded when the model was loaded or gated here, else one derived from its
    class: a transformers model keeps its config; another class is rebuilt by calling it with no
    arguments (pass ``reference=`` when its constructor needs some)."""
    origin = getattr(model, "dgate_origin", None)
    if origin is not None:
        return origin.reference
    cls = type(model)
    while cls.__module__.startswith("torch.nn.utils.parametrize"):  # a parametrized class: its original
        cls = cls.__bases__[0]
    config = getattr(model, "config", None)
    if cls.__module__.startswith("transformers.") and hasattr(config, "to_dict"):
        return ModelRef("hf", cls.__name__, config=config.to_dict())
    if cls.__module__ == "__main__" or "<locals>" in cls.__qualname__:
        raise ModelSpecError(f"{cls.__qualname__} is defined in a script or function, so a checkpoint cannot name "
                             "it: move it to an importable module, or pass reference='package.module:factory'")
    return ModelRef("factory", f"{cls.__module__}:{cls.__qualname__}")


def as_reference(reference) -> ModelRef:
    """A ``ModelRef`` from a ModelRef, a manifest dict or a factory string."""
    if isinstance(reference, ModelRef):
        return reference
    if isinstance(reference, dict):
        return ModelRef.from_dict(reference)
    if isinstance(reference, str) and ":" in reference:
        return factory_ref(reference)
    raise ModelSpecError(f"reference {reference!r}: pass 'package.module:callable', a ModelRef or its dict")


def _load_pickle(path: Path, allow_pickle: bool) -> nn.Module:
    if path.suffix == ".safetensors":
        raise ModelSpecError(f"{path} holds weights, not a model: pass the architecture as MODEL "
                             "(package.module:factory) and this file as --weights")
    if not path.is_file():
        raise ModelSpecError(f"pickled model {path} not found (a checkpoint names it relative to itself: keep the two "
                             "together, or pass the architecture with --model / reference=)")
    _cwd_importable()
    if not allow_pickle:
        try:
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            raise ModelSpecError(f"{path} is a pickled model: loading it runs arbitrary code stored in the file. If "
                                 f"you trust it, pass {PICKLE_FLAG}; safer: pass the architecture as "
                                 "package.module:factory and the weights with --weights") from None
        raise ModelSpecError(f"{path} holds weights (a state_dict), not a model: pass the architecture as MODEL "
                             "(package.module:factory) and this file as --weights")
    try:
        model = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        hint = (" (the class it names must be importable: run from the directory of its module, or put that on "
                "PYTHONPATH)" if isinstance(exc, (ImportError, AttributeError)) else "")
        raise ModelSpecError(f"could not unpickle {path}: {_describe_exc(exc)}{hint}") from None
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"{path} holds a {type(model).__name__}, not a torch.nn.Module (for a state_dict: pass "
                             "the architecture as MODEL and this file as --weights)")
    return model


def _load_hf(path: Path) -> tuple[nn.Module, ModelRef]:
    if not (path / "config.json").is_file():
        raise ModelSpecError(f"{path} is a directory without config.json: a Hugging Face model directory has one")
    try:
        import transformers
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        raise ModelSpecError(f"{path}/config.json: not a Hugging Face config transformers can read ({exc})") from None
    name = _hf_class_name(config)
    cls = getattr(transformers, name)
    has_weights = any((path / f).exists() for f in ("model.safetensors", "model.safetensors.index.json",
                                                     "pytorch_model.bin"))
    try:
        model = cls.from_pretrained(path, local_files_only=True) if has_weights else cls(config)
    except Exception as exc:
        raise ModelSpecError(f"{path}: transformers could not build {name} ({type(exc).__name__}: {exc})") from None
    return model, ModelRef("hf", name, config=model.config.to_dict())


def _hf_class_name(config) -> str:
    import transformers
    for name in getattr(config, "architectures", None) or []:
        if hasattr(transformers, name):
            return name
    mapping = transformers.models.auto.modeling_auto.MODEL_MAPPING_NAMES
    if config.model_type in mapping:
        return mapping[config.model_type]
    raise ModelSpecError(f"transformers has no model class for config type '{config.model_type}'")


def _hf_from_config(name: str, config: dict | None) -> nn.Module:
    """A transformers model class (never an Auto class: no remote code) built from its config."""
    cls = hf_class(name)
    if cls is None:
        hint = ("install transformers (pip install '.[transformers]')" if importlib.util.find_spec("transformers") is None
                else "is the right transformers installed?")
        raise ModelSpecError(f"cannot rebuild transformers.{name}: transformers has no model class of that name ({hint})")
    try:
        return cls(cls.config_class.from_dict(dict(config or {})))
    except DGatingError:
        raise
    except Exception as exc:
        raise ModelSpecError(f"transformers could not build {name} from the stored config: {_describe_exc(exc)}") \
            from None


# -- weights ---------------------------------------------------------------------------------------
def read_state_dict(path) -> dict[str, torch.Tensor]:
    """Weights from a safetensors file or a ``torch.save(state_dict)`` file (read with
    ``weights_only=True``: no code runs); a {"state_dict": ...} or {"model": ...} wrapper is opened."""
    path = Path(path)
    if not path.is_file():
        raise ModelSpecError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(path)
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelSpecError(f"cannot read weights from {path}: {type(exc).__name__}: {str(exc).splitlines()[0]} "
                             "(a safetensors file or a torch.save(model.state_dict()) file is expected)") from None
    for key in ("state_dict", "model"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ModelSpecError(f"{path} does not hold a state_dict (a mapping of names to tensors)")
    return data


def mismatch(model: nn.Module, state: dict[str, torch.Tensor]) -> str | None:
    """Why ``state`` does not fit ``model`` exactly (first keys of each kind), or None."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in state
              if k in own and isinstance(own[k], torch.Tensor) and tuple(own[k].shape) != tuple(state[k].shape)]
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape differs (file vs model)", shapes)):
        if keys:
            parts.append(f"{label}: {', '.join(keys[:3])}{f' (+{len(keys) - 3} more)' if len(keys) > 3 else ''}")
    return "; ".join(parts) or None


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with an error that names the file and the first mismatches."""
    problem = mismatch(model, state)
    if problem:
        raise ModelSpecError(f"{source} does not fit {type(model).__name__} ({problem}): is it the weights of this "
                             "architecture?")
    model.load_state_dict(state, strict=True)


def dumps(data) -> str:
    """JSON for manifests; refuses what would not come back as written (e.g. a tensor in kwargs)."""
    try:
        return json.dumps(data, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ModelSpecError(f"cannot record {exc}: factory arguments and configs must be plain JSON data") from None
