"""``python -m dgating_surgery.cli``: the ``dgate`` command."""
from . import _installed_libraries_first, main

_installed_libraries_first()
main()
