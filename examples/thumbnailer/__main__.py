"""``python3 -m examples.thumbnailer``: see ``--help``."""

import signal
import sys

try:
    from .cli import main
except KeyboardInterrupt:  # Ctrl-C while the program loads: a line, not a traceback
    print("thumbnailer: interrupted (Ctrl-C)", file=sys.stderr)
    sys.exit(130)

if __name__ == "__main__":
    status = main()
    # A second Ctrl-C (or a SIGTERM) as the program exits, after its report: ignored, so that the
    # exit status is the one it reported (with the default handlers back, the process died of the
    # signal, -2 to a waitpid, in 5 of 6 double Ctrl-Cs of a probe).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(status)
