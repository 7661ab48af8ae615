"""``python -m ddpm_ref``: the ``ddpm`` command line (see ``ddpm_ref/cli.py``)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
