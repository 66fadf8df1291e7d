"""``python3 -m examples.thumbnailer``: see ``--help``."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
