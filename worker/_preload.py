"""Modules Python imports by itself, on first use, that a worker would
otherwise import after sandbox entry, where an import is a file-system
access and stops the worker.

* Every text codec of the standard library: ``bytes.decode("cp1252")``, a
  ZIP member name in cp437, ``"idna"`` for a host name. A codec's module is
  imported the first time its name is looked up.
* ``_strptime``: ``time.strptime`` and ``datetime.strptime`` import it on
  their first call.

Loaded once before any worker exists: in the zygote (and an exec'd worker)
at start, in the broker before its first fork. About 15 ms and 4 MB, shared
by every worker it forks.
"""

from __future__ import annotations

import codecs
import functools
import importlib
import pkgutil


@functools.cache
def preload() -> None:
    import encodings

    for mod in pkgutil.iter_modules(encodings.__path__):
        try:
            codecs.lookup(mod.name)  # imports the codec's module, and caches the lookup
        except (LookupError, ImportError):  # (aliases, charmap's helpers; mbcs and oem: Windows only)
            pass
    importlib.import_module("_strptime")  # (no stub: a private module of the standard library)
