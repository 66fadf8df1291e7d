"""``python3 -m examples.unpack ARCHIVE OUTDIR``: see ``--help``."""

import sys

try:
    from examples._report import exit_as_reported

    from .cli import main
except KeyboardInterrupt:  # Ctrl-C while the program loads: a line, not a traceback
    print("unpack: interrupted (Ctrl-C)", file=sys.stderr)
    sys.exit(130)

if __name__ == "__main__":
    exit_as_reported(main())
