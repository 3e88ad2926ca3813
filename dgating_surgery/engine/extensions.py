"""The engine's registry of library plugins: rules, fixers and constraints for the layers of an
optional library (transformers, timm) that this package does not depend on.

A plugin package registers a loader per library (``register_library``); ``load`` runs the loader of
every registered library the process has imported, before the engine traces or fixes a model. So
the engine finds plugins without importing them or their libraries, and a plugin's own
registrations (``rules.register_module_rule``, ``fixers.register_module_fixer``, ...) happen only
when the user's code uses its library."""
from __future__ import annotations

import sys
from typing import Callable

LOADERS: dict[str, Callable[[], None]] = {}  # library (a top-level module name) -> its plugin's loader


def register_library(library: str, loader: Callable[[], None]) -> None:
    """Run ``loader`` at every ``load`` once ``library`` has been imported (it imports the plugin,
    whose import registers its rows, and refreshes them)."""
    LOADERS[library] = loader


def load() -> None:
    """Run the loader of every registered library the process has imported."""
    for library, loader in list(LOADERS.items()):
        if library in sys.modules:
            loader()
