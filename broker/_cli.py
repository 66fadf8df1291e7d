"""``privsep``: the command line."""

from __future__ import annotations

import argparse
import os
import sys

from protocol import __version__

DESCRIPTION = """\
privsep runs hostile-input parsers in sandboxed workers. A privileged broker
keeps the authority and hands workers rights-limited file descriptors.

Library use: see README.md (from broker import Broker, Policy; from worker
import Worker, rpc).
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="privsep", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"privsep {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    check = sub.add_parser(
        "check", help="probe this kernel and say which sandbox layers workers get (exit status 1 if the "
        "minimum is not met)"
    )
    check.add_argument("--json", action="store_true", help="print the probe results as JSON")
    sub.add_parser(
        "demo",
        help="run the image-converter demo on the bundled samples (takes the options of python3 -m "
        "examples.thumbnailer; see privsep demo --help)",
        add_help=False,
    )
    ns, rest = parser.parse_known_args(argv)
    if rest and ns.command != "demo":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if ns.command == "check":
        from ._check import run_check

        return run_check(json=ns.json)
    if ns.command == "demo":
        # The examples live in the source tree beside the packages (an
        # editable install), not in the installed distribution.
        source_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        if os.path.isdir(os.path.join(source_root, "examples")) and source_root not in sys.path:
            sys.path.insert(0, source_root)
        try:
            from examples.thumbnailer.__main__ import main as demo_main
        except ImportError:
            print("privsep demo: the examples are not installed (a non-editable install leaves them out); in a "
                  "source checkout run python3 -m examples.thumbnailer, or install it with "
                  "pip install -e '.[examples]' and privsep demo works from anywhere", file=sys.stderr)
            return 2
        return int(demo_main(rest, prog="privsep demo") or 0)
    # No command: a usage error (exit status 2, as argparse gives), with the help to say what to type.
    parser.print_help(sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
