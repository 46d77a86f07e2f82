"""``python -m cleanai``: the same program as the ``cleanai`` command."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
