"""privsep's main example: a thumbnailer that decodes untrusted images in sandboxed workers.

Run it with ``python3 -m examples.thumbnailer --help`` from the repository root.
"""
