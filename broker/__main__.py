"""``python3 -m broker``: the ``privsep`` command, where its script is not on PATH."""

import sys

from ._cli import main

sys.exit(main())
