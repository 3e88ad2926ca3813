"""Optional-library plugins: op rules and attribute fixers for the layers of libraries this
package does not depend on (transformers, timm). A plugin is imported only once its library has
been imported by the user's code, so that dgating-surgery itself never imports them."""
from __future__ import annotations

import importlib
import sys

PLUGINS = ("transformers", "timm")  # each names both the library and the plugin module here
_loaded: set[str] = set()


def load() -> None:
    """Import the plugin of every supported library the process has imported (once each)."""
    for library in PLUGINS:
        if library in sys.modules and library not in _loaded:
            _loaded.add(library)
            importlib.import_module(f"{__name__}.{library}")
