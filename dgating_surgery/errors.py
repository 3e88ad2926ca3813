"""Exceptions raised by dgating-surgery: each names what was wrong and what to do about it."""


class DGatingError(Exception):
    """Base class of every error this package raises on purpose."""


class RecipeError(DGatingError, ValueError):
    """A recipe file or dict is invalid; the message names the file and field."""


class TraceError(DGatingError, RuntimeError):
    """The model could not be captured as a graph, or did not run on the example inputs."""


class GatingError(DGatingError, RuntimeError):
    """Gating could not be applied (nothing matched, model already gated, ...)."""


class ShrinkError(DGatingError, RuntimeError):
    """Shrinking failed or the slim model does not compute the gated model's function."""
