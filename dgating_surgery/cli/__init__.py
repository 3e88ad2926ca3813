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
from . import convert, demo, inspect, report, shrink  # noqa: F401  (each adds its command to main)
from .common import main
