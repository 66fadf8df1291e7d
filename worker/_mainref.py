"""Naming a worker class so that a zygote (or an exec'd worker) finds it.

A class is named by its module and qualified name. A class defined in the
main script (``__main__``) is found the way ``multiprocessing``'s spawn and
forkserver start methods find it: by the module the script was run as
(``python -m pkg.mod``), or by the script's path, which the zygote runs as a
module named ``__privsep_main__``. Either way the script's code under
``if __name__ == "__main__":`` does not run there; code outside it does, once
per zygote, as it does in a ``multiprocessing`` child.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from importlib.machinery import SourceFileLoader
from types import ModuleType

#: Prefix of the module name of a class in the main script: then a path
#: (starting with "/") or the name of the module the script was run as.
MAIN_PREFIX = "__main__:"
MAIN_NAME = "__privsep_main__"

_importing = 0  # > 0 while a zygote imports a worker class's module
# The main script's module: "__mp_main__" in a multiprocessing child started by spawn or
# forkserver, which runs the parent's script under that name (and as __main__ too).
_MAIN_MODULES = frozenset({"__main__", "__mp_main__"})


def module_ref(cls: type) -> str | None:
    """The module name to send for ``cls``, or None where no other
    interpreter can find it (defined in a function, or in a main module
    that is not a file: ``python -c``, an interactive session)."""
    if "<locals>" in cls.__qualname__:
        return None
    module = cls.__module__
    if module not in _MAIN_MODULES:
        return module
    return _main_ref(module)


def _main_ref(module: str) -> str | None:
    main = sys.modules.get(module)
    spec = getattr(main, "__spec__", None)
    name = getattr(spec, "name", None)
    if isinstance(name, str) and name and name != "__main__":
        return MAIN_PREFIX + name  # python -m pkg.mod
    path = getattr(main, "__file__", None)
    if isinstance(path, str) and not path.endswith((".pyc", ".pyo")) and os.path.isfile(path):
        return MAIN_PREFIX + os.path.abspath(path)  # a source file, with or without .py
    return None


def is_main_ref(module: str) -> bool:
    return module.startswith(MAIN_PREFIX)


def main_refs() -> list[str]:
    """The references of this process's main script (see module_ref)."""
    return sorted({ref for name in _MAIN_MODULES if (ref := _main_ref(name)) is not None})


# The main scripts this interpreter may run (None: any). A zygote gets its
# broker's own at start: whatever a request names, it runs no other file as
# a main script (a forged request once named a worker's memfd).
_allowed_main: frozenset[str] | None = None


def allow_main_only(refs: list[str]) -> None:
    global _allowed_main
    _allowed_main = frozenset(refs)


def import_ref(module: str) -> ModuleType:
    """Import the module a class reference names (see :func:`module_ref`).
    While it runs, making a ``Broker`` raises (see :func:`check_not_importing`)."""
    global _importing
    _importing += 1
    try:
        if not is_main_ref(module):
            return importlib.import_module(module)
        if _allowed_main is not None and module not in _allowed_main:
            raise ImportError(f"{module[len(MAIN_PREFIX):]} is not its broker's main script: not loaded")
        target = module[len(MAIN_PREFIX):]
        if not target.startswith("/"):
            return importlib.import_module(target)
        return _load_script(target)
    finally:
        _importing -= 1


def _load_script(path: str) -> ModuleType:
    loaded = sys.modules.get(MAIN_NAME)
    if loaded is not None:
        if getattr(loaded, "__file__", None) != path:
            raise ImportError(f"another main script ({loaded.__file__}) is loaded here, not {path}")
        return loaded
    # An explicit source loader: a script need not end in .py (``./tool`` with a #! line).
    spec = importlib.util.spec_from_file_location(MAIN_NAME, path, loader=SourceFileLoader(MAIN_NAME, path))
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load the main script {path}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[MAIN_NAME] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules[MAIN_NAME]
        raise
    return mod


def check_not_importing() -> None:
    """Raise if a zygote is importing a worker's module right now: a module
    (usually a main script) that makes a Broker when imported would start
    zygotes without end."""
    if _importing:
        raise RuntimeError(
            "a Broker was made while privsep's zygote imported a worker class's module; "
            "put the script's main code under `if __name__ == \"__main__\":` (as multiprocessing "
            "requires), or use Broker(spawn=\"fork\")"
        )
