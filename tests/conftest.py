"""Shared fixtures: a file tree with escape bait, and fd accounting."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker import Broker, Policy
from protocol import Rights

READ = Rights.READ | Rights.FSTAT | Rights.SEEK


def open_fds(broker: Broker | None = None) -> set[int]:
    """The fds this process holds right now (excluding the listing's own).

    With ``broker``: also excluding the one fd of its zygote's waiting spare,
    which a spawn replaces by a new one (a leaked old spare still shows)."""
    spare = spare_of(broker)
    return {fd for fd in map(int, os.listdir("/proc/self/fd")) if _is_open(fd)} - ({spare[1]} if spare else set())


def _is_open(fd: int) -> bool:
    """False for the fd the listing itself used, closed by now."""
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def spare_of(broker: Broker | None) -> tuple[int, int] | None:
    """(pid, fd) of the broker's waiting spare, if it has a zygote."""
    zygote = None if broker is None else broker._zygote
    return None if zygote is None else zygote.waiting_spare()


def spare_made_ahead(broker: Broker) -> bool:
    """Whether the broker's waiting spare has made its worker ahead (``Worker.setup_ahead``)."""
    zygote = broker._zygote
    if zygote is None or zygote.waiting_spare() is None:
        return False
    return zygote._spare is not None and zygote._spare.ahead is not None


def fd_targets() -> dict[int, str]:
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass
    return out


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """root/
    data/a.txt, data/b.bin, data/sub/c.txt
    data/link_in -> a.txt            (stays inside: allowed)
    data/link_abs -> /etc/passwd     (absolute: escapes)
    data/link_up -> ../secret        (relative: escapes)
    data/link_proc -> /proc/self/root/etc/passwd (magic link)
    data/fifo (a FIFO)
    out/
    secret
    """
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "a.txt").write_text("hello")
    (data / "b.bin").write_bytes(bytes(range(256)) * 4)
    (data / "sub" / "c.txt").write_text("deep")
    (data / "link_in").symlink_to("a.txt")
    (data / "link_abs").symlink_to("/etc/passwd")
    (data / "link_up").symlink_to("../secret")
    (data / "link_proc").symlink_to("/proc/self/root/etc/passwd")
    (data / "link_fd").symlink_to("/proc/self/fd/0")
    os.mkfifo(data / "fifo")
    (tmp_path / "out").mkdir()
    (tmp_path / "secret").write_text("top secret")
    return tmp_path


def default_policy() -> Policy:
    return Policy().allow("data/", READ).allow("out/", Rights.WRITE | Rights.CREATE)


@pytest.fixture
def broker(tree: Path) -> Iterator[Broker]:
    with Broker(default_policy(), root=tree, call_timeout=30) as b:
        yield b


# Skips must come from probing the kernel or the platform. In CI any other
# skip fails the run, so a missing dependency cannot pass as "skipped".
_PROBE_SKIP_PREFIXES = (
    "FreeBSD",
    "checks the fallbacks used where Capsicum does not exist",
    "kernel lacks",
    "Landlock ABI",
    "ablation needs Landlock",
    "no user namespaces",
    "no seccomp",
    "needs seccomp",
    "cgroup probe:",
    "no CAP_SYS_NICE",
    "cannot mount a tmpfs here",
    "not root:",
)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: Any, exitstatus: int) -> None:
    if os.environ.get("CI") != "true":
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    bad = []
    for report in reporter.stats.get("skipped", []) if reporter else []:
        reason = str(report.longrepr[2]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        if not reason.startswith(_PROBE_SKIP_PREFIXES):
            bad.append(f"{report.nodeid}: {reason}")
    if bad:
        print("\nCI: skips that do not come from a kernel/platform probe:\n  " + "\n  ".join(bad))
        session.exitstatus = 1


def close_later(fds: list[int], seconds: float) -> None:
    """Close ``fds`` from a thread ``seconds`` from now (a worker keeping
    copies of its outputs' write ends past its answer)."""

    def run() -> None:
        time.sleep(seconds)
        for fd in fds:
            os.close(fd)

    threading.Thread(target=run, daemon=True).start()


@pytest.fixture
def unwritable(tmp_path: Path) -> Iterator[Path]:
    """An empty directory nobody can create files in (see _unwritable)."""
    from _unwritable import unwritable_dir

    yield from unwritable_dir(tmp_path / "locked")
