"""``privsep``: the command line."""

from __future__ import annotations

import argparse
import sys

from protocol import __version__

DESCRIPTION = """\
privsep runs hostile-input parsers in sandboxed workers. A privileged broker
keeps the authority and hands workers rights-limited file descriptors.

commands:
  check      probe this kernel and say which sandbox layers workers get
             (exit status 1 if the minimum is not met)
  demo       run the image-converter demo on the bundled samples

Library use: see README.md (from broker import Broker, Policy; from worker
import Worker, rpc).
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="privsep", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"privsep {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    check = sub.add_parser("check", help="probe kernel sandbox features")
    check.add_argument("--json", action="store_true", help="print the probe results as JSON")
    demo = sub.add_parser("demo", help="run the image-converter demo (same options as python3 -m examples.thumbnailer)")
    demo.add_argument("args", nargs=argparse.REMAINDER, help="options passed to the thumbnailer")
    ns = parser.parse_args(argv)
    if ns.command == "check":
        from ._check import run_check

        return run_check(json=ns.json)
    if ns.command == "demo":
        try:
            from examples.thumbnailer.__main__ import main as demo_main
        except ImportError:
            print("privsep demo: run it from a source checkout (python3 -m examples.thumbnailer)", file=sys.stderr)
            return 2
        return int(demo_main(ns.args) or 0)
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
