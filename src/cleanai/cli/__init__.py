"""The ``cleanai`` command line (``cleanai --help``, or ``python -m cleanai --help``)."""
from .main import build_parser, main
from .models import CLIError

__all__ = ["main", "build_parser", "CLIError"]
