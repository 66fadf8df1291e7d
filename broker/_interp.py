"""Command line and environment for the interpreters the broker execs (the
zygote and the restricted opener): they import what the broker imports,
and nothing from wherever the broker happens to be run.

``python -m`` puts the current directory first on ``sys.path``: a
``protocol.py``, ``random.py`` or ``msgpack.py`` lying in the directory a
user runs the broker from (a downloads folder full of hostile input, say)
would run with the broker's authority. ``-P`` (3.11) leaves it out, and the
broker's own ``sys.path`` is passed on, absolute, as ``PYTHONPATH``. An
entry holding ``os.pathsep`` cannot be written there (``/srv/proj:x`` would
read as ``/srv/proj`` and a relative ``x``, found in the current directory):
such entries stay out of it, and the whole path travels as JSON in
``PRIVSEP_IMPORT_PATH``, which the child puts in place before it imports
anything of the program's (``worker._importpath``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping

from worker._importpath import PATH_VAR


def interpreter(module: str, *args: str) -> list[str]:
    """The argv that runs ``module`` in a fresh interpreter with the
    broker's own flags (``-O``, ``-W ...``, ``-X ...``, as ``multiprocessing``
    passes them), no user site directory and nothing prepended to
    ``sys.path``. (``-I`` and ``-E`` are not passed on: the child needs
    ``PYTHONPATH``.)"""
    flags = [f for f in subprocess._args_from_interpreter_flags() if f not in _NOT_PASSED]  # type: ignore[attr-defined]
    return [sys.executable, *flags, "-s", "-P", "-m", module, *args]


_NOT_PASSED = frozenset({"-I", "-E", "-s", "-P"})


def import_entries() -> list[str]:
    """The broker's ``sys.path``, each entry made absolute; ``''`` (the
    current directory, for ``python -c`` and the REPL) stays on it as the
    directory it names now, since the broker imports from it too. Entries
    that do not exist are left out."""
    out: list[str] = []
    for entry in sys.path:
        try:
            path = os.path.abspath(entry) if entry else os.getcwd()
        except OSError:  # the current directory was removed
            continue
        if path not in out and os.path.exists(path):
            out.append(path)
    return out


def child_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``environ`` (default: the broker's own environment) with the broker's
    import path as ``PYTHONPATH`` (and, if an entry holds ``os.pathsep``,
    whole in ``PRIVSEP_IMPORT_PATH``) and no start-up file."""
    env = dict(os.environ if environ is None else environ)
    entries = import_entries()
    env["PYTHONPATH"] = os.pathsep.join(e for e in entries if os.pathsep not in e)
    env.pop(PATH_VAR, None)
    if any(os.pathsep in e for e in entries):
        env[PATH_VAR] = json.dumps(entries)
    env.pop("PYTHONSTARTUP", None)
    return env


def checked_environ(environ: Mapping[str, str] | None) -> dict[str, str] | None:
    """A copy of a ``Broker(environ=...)`` mapping, refused if it could not
    be an environment."""
    if environ is None:
        return None
    if not isinstance(environ, Mapping):
        raise TypeError("environ must be a mapping of str to str, or None")
    out: dict[str, str] = {}
    for key, value in environ.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"environ entries must be str to str, not {type(key).__name__} to {type(value).__name__}")
        if not key or "=" in key or "\0" in key or "\0" in value:
            raise ValueError(f"environ entry {key!r} cannot be an environment variable")
        out[key] = value
    return out


__all__ = ["PATH_VAR", "checked_environ", "child_env", "import_entries", "interpreter"]
