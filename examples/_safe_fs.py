"""Broker-side helper shared by the examples: make directories without following symlinks."""

from __future__ import annotations

import os

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def ensure_subdir(base_fd: int, parts: tuple[str, ...] | list[str], mode: int = 0o755) -> None:
    """Create ``parts`` (one directory per component) beneath the directory ``base_fd``.

    Each component is made with ``mkdirat`` and entered with ``O_NOFOLLOW``
    relative to its parent's fd, so an existing symlink (or a file) anywhere
    on the way raises ``OSError`` (``ELOOP``/``ENOTDIR``) instead of being
    followed out of ``base_fd``. Components must already be checked names
    (no ``/``, not ``.`` or ``..``).
    """
    fd = os.dup(base_fd)
    try:
        for part in parts:
            if not part or part in (".", "..") or "/" in part or "\x00" in part:
                raise ValueError(f"unsafe directory name {part!r}")
            try:
                os.mkdir(part, mode, dir_fd=fd)
            except FileExistsError:
                pass
            nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nxt
    finally:
        os.close(fd)


def missing_dirs(path: str) -> list[str]:
    """The directories ``os.makedirs(path)`` would make, deepest first."""
    made = []
    while not os.path.lexists(path):
        made.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return made


def remove_made_dirs(made: list[str]) -> int:
    """Remove the directories a run made (deepest first), as long as each is
    empty; how many were removed."""
    removed = 0
    for path in made:
        if not rmdir_if_empty(path):
            break
        removed += 1
    return removed


def rmdir_if_empty(path: str) -> bool:
    """Remove ``path`` if it is an empty directory (one a run made and left unused); True if removed."""
    try:
        os.rmdir(path)
    except OSError:
        return False
    return True
