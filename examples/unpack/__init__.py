"""privsep's second example: extract untrusted zip/tar archives in a sandboxed worker.

Run it with ``python3 -m examples.unpack --help`` from the repository root.
"""
