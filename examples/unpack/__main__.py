"""``python3 -m examples.unpack ARCHIVE OUTDIR``: see ``--help``."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
