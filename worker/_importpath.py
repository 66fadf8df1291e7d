"""The broker's import path, in an interpreter it exec'd (the zygote, the
restricted opener): ``PYTHONPATH`` cannot carry an entry that holds
``os.pathsep``, so the broker passes the whole path in
``PRIVSEP_IMPORT_PATH`` too (``broker._interp``). Called first thing in the
child's ``main()``, before anything of the program's is imported."""

from __future__ import annotations

import json
import os
import sys

PATH_VAR = "PRIVSEP_IMPORT_PATH"


def adopt_import_path() -> None:
    """Put the broker's path first on ``sys.path`` (in its order), and drop
    the variable: the workers' environment is the broker's, as it was."""
    raw = os.environ.pop(PATH_VAR, None)
    if raw is None:
        return
    entries = json.loads(raw)
    if not isinstance(entries, list) or not all(isinstance(e, str) and os.path.isabs(e) for e in entries):
        raise SystemExit(f"{PATH_VAR} is not a list of absolute paths")
    sys.path[:] = [*entries, *(p for p in sys.path if p not in entries)]
