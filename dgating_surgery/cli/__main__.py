"""``python -m dgating_surgery.cli``: the ``dgate`` command."""
from . import main
from .common import installed_libraries_first

installed_libraries_first()
main()
