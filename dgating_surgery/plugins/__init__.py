"""Optional-library plugins: op rules and attribute fixers for the layers of libraries this
package does not depend on (transformers, timm). A plugin is imported only once its library has
been imported by the user's code, so that dgating-surgery itself never imports them; a plugin's
``refresh()``, if it has one, runs at every ``load`` (to register classes imported since)."""
from __future__ import annotations

import importlib
import sys

PLUGINS = ("transformers", "timm")  # each names both the library and the plugin module here


def load() -> None:
    """Import the plugin of every supported library the process has imported, and refresh it."""
    for library in PLUGINS:
        if library in sys.modules:
            plugin = importlib.import_module(f"{__name__}.{library}")
            refresh = getattr(plugin, "refresh", None)
            if refresh is not None:
                refresh()
