"""Every exception dgating-surgery raises on purpose: each names what was wrong and what to do.

The command line turns any ``DGatingError`` into one ``Error: ...`` line; anything else escaping
the package is a bug.
"""


def one_line(exc: BaseException) -> str:
    """Another library's exception as one line of ours: its type and the first line of its message."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


class DGatingError(Exception):
    """Base class of every error this package raises on purpose."""


class RecipeError(DGatingError, ValueError):
    """A recipe file or dict is invalid; the message names the file and field."""


class TraceError(DGatingError, RuntimeError):
    """The model could not be captured as a graph, or did not run on the example inputs."""


class GatingError(DGatingError, RuntimeError):
    """Gating could not be applied (nothing matched, model already gated, ...)."""


class NotGatedError(DGatingError, ValueError):
    """A function that needs a gated model (shrink, penalty, save_gated, ...) got an ungated one."""


class ShrinkError(DGatingError, RuntimeError):
    """Shrinking failed or the slim model does not compute the gated model's function."""


class CheckpointError(DGatingError, RuntimeError):
    """A checkpoint cannot be written or read, or does not fit the architecture it names."""


class UntrustedCodeError(CheckpointError):
    """A checkpoint asks to run code the caller did not allow (a callable that is not a library's
    model constructor, a file, a pickle): the message says what it asks to run and which opt-in
    (``trust_code``, ``allow_pickle``) or explicit architecture would allow it."""


class ModelSpecError(DGatingError, ValueError):
    """A MODEL spec or weights file could not be resolved; the message names it and says what to pass."""


class WrapperError(DGatingError, TypeError):
    """A model comes in a wrapper the function cannot see through (PEFT adapters, FSDP v1); the
    message says what to pass instead."""


class LambdaError(DGatingError, ValueError):
    """A D-Gating strength lambda (or a lambda schedule) is invalid: negative, not finite, ..."""


class DGatingWarning(UserWarning):
    """Every warning dgating-surgery gives on purpose (``wrappers.warn_user``): the command line shows
    each once, wherever it is attributed (to the user's line, which for ``dgate`` is click's)."""
