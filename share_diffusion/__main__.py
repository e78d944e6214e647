"""``python -m share_diffusion``: see :mod:`share_diffusion.cli`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
