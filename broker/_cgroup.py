"""Per-worker memory cgroups, where the broker can make them. Private.

**cgroup v2** (the unified hierarchy): each worker gets a child of the
broker's own cgroup (or of ``Broker(cgroup_parent=...)``) with ``memory.max``
set and ``memory.swap.max`` at 0 where swap is accounted. That needs the
parent to hand the memory controller to its children: ``memory`` in its
``cgroup.subtree_control``, or written there by us. The kernel refuses that
for a cgroup that holds processes (no internal processes outside the root),
so a broker in an ordinary service cgroup must be given a delegated parent
(systemd ``Delegate=yes``, the broker itself in a leaf beneath it).

**cgroup v1** (a separate ``memory`` hierarchy, as hosts that still mount one
have): a child of the broker's memory cgroup with ``memory.limit_in_bytes``
(and ``memory.memsw.limit_in_bytes``, so swap cannot stretch it, where swap
is accounted).

The child sits beneath the broker's own cgroup, so every limit on the broker
still covers its workers. The broker moves a worker in before giving it any
call, and removes the cgroup after reaping it. Memory the worker touched
before the move (in ``setup()``) stays charged where it was. An OOM kill
inside the cgroup is reported as the worker's end ``"oom"``. Nothing here is
asked of, or visible to, the worker.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from worker.sandbox._namespaces import write_file

log = logging.getLogger("privsep.broker")

_ids = itertools.count(1)


@dataclass(frozen=True)
class CgroupSupport:
    """Where worker cgroups can be made: ``version`` 2 or 1 and the parent
    directory, or ``version`` 0 and the reason they cannot."""

    version: int
    parent: str
    reason: str = ""

    def describe(self) -> str:
        if not self.version:
            return f"unavailable ({self.reason})"
        return f"v{self.version} beneath {self.parent}"


def _own_cgroups() -> dict[str, str]:
    """controller (or "" for v2) -> path of this process's cgroup in that hierarchy."""
    out: dict[str, str] = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            hier, controllers, path = line.rstrip("\n").split(":", 2)
            if hier == "0" and controllers == "":
                out[""] = path
            for c in controllers.split(","):
                if c:
                    out[c] = path
    return out


def _mounts() -> list[tuple[str, str, str, set[str]]]:
    """(fstype, mount root, mount point, super options) of every cgroup mount."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, rfields = left.split(), right.split()
            if len(fields) < 5 or len(rfields) < 3 or rfields[0] not in ("cgroup", "cgroup2"):
                continue
            out.append((rfields[0], _unescape(fields[3]), _unescape(fields[4]), set(rfields[2].split(","))))
    return out


def _unescape(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def _join(mount_root: str, mount_point: str, path: str) -> str | None:
    """The directory of cgroup ``path`` under a mount of ``mount_root`` at ``mount_point``."""
    if mount_root != "/":
        if path != mount_root and not path.startswith(mount_root.rstrip("/") + "/"):
            return None
        path = path[len(mount_root):] or "/"
    return os.path.join(mount_point, path.lstrip("/"))


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _v2_parent(parent: str) -> CgroupSupport:
    try:
        if "memory" not in _read(os.path.join(parent, "cgroup.controllers")).split():
            return CgroupSupport(0, parent, f"cgroup v2 at {parent} has no memory controller")
        control = os.path.join(parent, "cgroup.subtree_control")
        if "memory" not in _read(control).split():
            try:
                write_file(control, "+memory")
            except OSError as exc:
                why = "it holds processes (run the broker in a delegated cgroup)" if exc.errno == errno.EBUSY \
                    else exc.strerror
                return CgroupSupport(0, parent, f"cannot enable the memory controller below {parent}: {why}")
        if not os.access(parent, os.W_OK):
            return CgroupSupport(0, parent, f"no write access to {parent}")
    except OSError as exc:
        return CgroupSupport(0, parent, f"cgroup v2 at {parent}: {exc.strerror}")
    return CgroupSupport(2, parent)


def probe(parent: str | None = None) -> CgroupSupport:
    """Find where worker memory cgroups can be made (v2 first, then v1)."""
    if parent is not None:
        return _v2_parent(parent) if os.path.exists(os.path.join(parent, "cgroup.controllers")) \
            else CgroupSupport(0, parent, f"{parent} is not a cgroup v2 directory")
    try:
        own, mounts = _own_cgroups(), _mounts()
    except OSError as exc:
        return CgroupSupport(0, "", f"cannot read this process's cgroups: {exc.strerror}")
    reasons = []
    if "" in own:
        for fstype, root, point, _ in mounts:
            if fstype == "cgroup2":
                where = _join(root, point, own[""])
                if where is not None:
                    found = _v2_parent(where)
                    if found.version:
                        return found
                    reasons.append(found.reason)
                    break
    if "memory" in own:
        for fstype, root, point, opts in mounts:
            if fstype == "cgroup" and "memory" in opts:
                where = _join(root, point, own["memory"])
                if where is not None and os.access(where, os.W_OK):
                    return CgroupSupport(1, where)
                reasons.append(f"no write access to the v1 memory cgroup {where}")
                break
    return CgroupSupport(0, "", "; ".join(reasons) or "no cgroup hierarchy with a memory controller")


_swept: set[str] = set()  # parents swept by this process


def sweep_stale(parent: str) -> int:
    """Remove the empty cgroups a broker that is gone left in ``parent``
    (``privsep-<pid>-<n>``, its pid no longer running: ended by SIGTERM or
    SIGKILL before it could remove them). A cgroup still holding a process,
    or of a broker still running, is left. Returns how many were removed."""
    removed = 0
    try:
        names = os.listdir(parent)
    except OSError:
        return 0
    for name in names:
        kind, _, rest = name.partition("-")
        pid_text, _, n = rest.partition("-")
        if kind != "privsep" or not pid_text.isdigit() or not n.isdigit():
            continue
        pid = int(pid_text)
        if pid == os.getpid() or os.path.exists(f"/proc/{pid}"):
            continue
        try:
            os.rmdir(os.path.join(parent, name))  # (fails on one that still holds a process)
            removed += 1
        except OSError:
            pass
    return removed


class WorkerCgroup:
    """One worker's memory cgroup. Made by :meth:`create`; ``remove()`` after
    the worker is reaped."""

    def __init__(self, support: CgroupSupport, path: str, limit: int):
        self.support = support
        self.path = path
        self.limit = limit

    @classmethod
    def create(cls, support: CgroupSupport, limit: int) -> WorkerCgroup:
        """Make a cgroup capped at ``limit`` bytes (raises OSError)."""
        if support.parent not in _swept:
            _swept.add(support.parent)
            sweep_stale(support.parent)
        path = os.path.join(support.parent, f"privsep-{os.getpid()}-{next(_ids)}")
        os.mkdir(path, 0o755)
        try:
            if support.version == 2:
                write_file(os.path.join(path, "memory.max"), str(limit))
                _write_if_there(os.path.join(path, "memory.swap.max"), "0")
            else:
                write_file(os.path.join(path, "memory.limit_in_bytes"), str(limit))
                _write_if_there(os.path.join(path, "memory.memsw.limit_in_bytes"), str(limit))
        except BaseException:
            os.rmdir(path)
            raise
        return cls(support, path, limit)

    def report(self) -> dict[str, Any]:
        """What a worker in this cgroup reports as ``sandbox["cgroup"]``."""
        return {"memory": self.limit, "applied": True, "version": self.support.version}

    @property
    def procs_file(self) -> str:
        """The file a process writes its pid to in order to move in."""
        return os.path.join(self.path, "cgroup.procs")

    def add(self, pid: int) -> None:
        write_file(self.procs_file, str(pid))

    def holds(self, pid: int) -> bool:
        """Is ``pid`` in this cgroup now? (A read: unlike a move, it never
        waits for the kernel's cgroup lock.)"""
        try:
            return str(pid) in _read(self.procs_file).split()
        except OSError:
            return False

    def oom_killed(self) -> bool:
        """Did the kernel kill a process here for running out of memory?"""
        try:
            if self.support.version == 2:
                text = _read(os.path.join(self.path, "memory.events"))
            else:
                text = _read(os.path.join(self.path, "memory.oom_control"))
        except OSError:
            return False
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill" and value.strip().isdigit():
                return int(value) > 0
        return False

    def remove(self) -> None:
        """Kill anything left and remove the directory (retried briefly: a
        process that just exited leaves the cgroup a moment later)."""
        if self.support.version == 2:
            _write_if_there(os.path.join(self.path, "cgroup.kill"), "1")
        deadline = time.monotonic() + 2.0
        while True:
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError as exc:
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise
                self._kill_left()
                time.sleep(0.005)

    def discard(self) -> None:
        """``remove()`` where a failure must not stop the caller: logged."""
        try:
            self.remove()
        except OSError as exc:
            log.warning("cannot remove the cgroup %s: %s", self.path, exc)

    def _kill_left(self) -> None:
        try:
            pids = _read(self.procs_file).split()
        except OSError:
            return
        for pid in pids:
            try:
                os.kill(int(pid), 9)
            except (ProcessLookupError, ValueError):
                pass


def _write_if_there(path: str, data: str) -> None:
    try:
        write_file(path, data)
    except FileNotFoundError:
        pass
