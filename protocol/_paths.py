"""Path checks shared by both sides.

The worker runs them to fail early with a clear message; the broker runs the
same checks again, because the worker is assumed compromised, and then
resolves with ``openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)``, which is
what actually keeps a path inside its tree.
"""

from __future__ import annotations

import os

from ._errors import NotCapable

MAX_PATH_BYTES = 4096
#: What a resolution that would leave its directory says, on either side.
ESCAPES = "path escapes its granted directory (symlink, magic link or '..')"
MAX_COMPONENT_BYTES = 255


def local_path(path: object, *, what: str = "path") -> str:
    """A path given by this process's own code (not read off the wire): a
    ``str``, or an ``os.PathLike`` such as ``pathlib.Path`` that gives one.

    Anything else is the caller's mistake, a ``TypeError``, not a denial.
    Only the type is checked here; :func:`split_relative` checks the path."""
    if type(path) is str:
        return path
    if isinstance(path, os.PathLike):
        given = os.fspath(path)
        if isinstance(given, str):
            return given
        path = given
    if isinstance(path, (bytes, bytearray)):
        raise TypeError(f"{what} must be a str or a path-like object giving one, not bytes (os.fsdecode() makes one)")
    raise TypeError(f"{what} must be a str or a path-like object, not {type(path).__name__}")


def split_relative(path: object, *, what: str = "path") -> tuple[str, ...]:
    """Split a worker-supplied relative path into checked components.

    Raises :class:`NotCapable` for anything that is not a plain relative
    path: absolute paths, ``..`` components, NUL bytes, over-long names,
    non-strings. ``.`` and empty components are dropped. The empty path
    (the granted directory itself) gives ``()``.
    """
    if not isinstance(path, str):
        raise NotCapable(f"{what} must be a string, not {type(path).__name__}")
    try:
        raw = path.encode("utf-8", "strict")
    except UnicodeEncodeError as exc:
        raise NotCapable(f"{what} is not valid UTF-8") from exc
    if len(raw) > MAX_PATH_BYTES:
        raise NotCapable(f"{what} is longer than {MAX_PATH_BYTES} bytes")
    if "\x00" in path:
        raise NotCapable(f"{what} contains a NUL byte", filename=path.replace("\x00", "\\0"))
    if path.startswith("/"):
        raise NotCapable(f"absolute {what}s are not allowed", filename=path)
    parts = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            raise NotCapable(f"'..' is not allowed in a {what}", filename=path)
        if len(part.encode()) > MAX_COMPONENT_BYTES:
            raise NotCapable(f"a component of the {what} is longer than {MAX_COMPONENT_BYTES} bytes", filename=path)
        parts.append(part)
    return tuple(parts)


def is_utf8(name: str) -> bool:
    """Can ``name`` be asked for? A file name that is not valid UTF-8 (read
    back with surrogate escapes) cannot travel on the wire, so no path API
    takes it and no listing shows it."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_name(name: object) -> str:
    """A single directory entry name (no slash, not '.' or '..')."""
    parts = split_relative(name, what="name")
    if len(parts) != 1 or parts[0] != name:
        raise NotCapable("expected a single file name", filename=str(name))
    return parts[0]
