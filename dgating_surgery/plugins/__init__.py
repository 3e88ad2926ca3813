"""Optional-library plugins: op rules and attribute fixers for the layers of libraries this
package does not depend on (transformers, timm). Each registers a loader with the engine
(``engine.extensions``) when this package is imported; the engine runs it, importing the plugin,
only once the user's code has imported its library, so that dgating-surgery itself never imports
them; a plugin's ``refresh()``, if it has one, runs at every load (to register classes imported
since)."""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

from ..engine.extensions import register_library

PLUGINS = ("transformers", "timm")  # each names both the library and the plugin module here


def _loader(library: str):
    def load() -> None:
        """Import the plugin of ``library`` (its rows register on import) and refresh it."""
        plugin = importlib.import_module(f"{__name__}.{library}")
        refresh = getattr(plugin, "refresh", None)
        if refresh is not None:
            refresh()
    return load


for _library in PLUGINS:
    register_library(_library, _loader(_library))


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs ``callback`` once the module ``name`` has been imported (by whoever imports it)."""

    def __init__(self, name: str, callback):
        self.name, self.callback = name, callback

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                self.callback()
            spec.loader.exec_module = exec_module
        return spec


def _install_hf_loader() -> None:
    importlib.import_module(f"{__name__}.transformers").install_loader()


def watch_transformers() -> None:
    """With dgating_surgery imported, ``from_pretrained`` of a slim Hugging Face checkpoint restores
    its per-layer widths (see ``plugins.transformers``): install that now if transformers' model
    code is loaded, else when it is."""
    if "transformers.modeling_utils" in sys.modules:
        _install_hf_loader()
    elif not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport("transformers.modeling_utils", _install_hf_loader))
