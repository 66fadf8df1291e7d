"""Shared fixtures: a file tree with escape bait, and fd accounting.

A test module's worker classes go in ``tests/_<name>_workers.py``, which
must import neither pytest nor a test module (nor this one): every broker's
zygote imports the module of each class it spawns (README, Layout)."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import os
import stat
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from _common import READ, Witness, close_later  # noqa: F401  (READ and close_later: for the tests)

from broker import Broker, Policy
from protocol import Rights

_lock_fd = -1  # the run's lock file while a test holds it (see pytest_runtest_protocol)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """Run in parallel (pytest-xdist), each test holds a lock on a file
    that the run's test processes share (in the run's temporary directory):
    shared, or, for a test marked ``exclusive`` (one that reads the
    scheduler's policies, or pins itself to a CPU it expects to find free),
    exclusive, so that no other test runs beside it. Held around the whole
    protocol, so that a module's fixtures, set up in its first test and torn
    down in its last, are inside it too. Run in one process: no lock."""
    global _lock_fd
    basetemp = item.config.option.basetemp  # (xdist gives each worker <the run's directory>/popen-gwN)
    if "PYTEST_XDIST_WORKER" not in os.environ or not basetemp:
        yield
        return
    path = os.path.join(os.path.dirname(os.path.abspath(basetemp)), "cpus.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    exclusive = item.get_closest_marker("exclusive") is not None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        _lock_fd = fd
        if exclusive:
            # What tests before it left running (a zygote finishing its next spare) is outside
            # their locks: wait for it to settle. (Our parent is the run's controller.)
            wait_until_quiet(os.getppid(), 1.0)
        yield
    finally:
        _lock_fd = -1
        os.close(fd)  # (the lock goes with the last fd on it)


def proc_table() -> list[tuple[int, int, str]]:
    """(pid, parent pid, state letter) of every process, from /proc."""
    table: list[tuple[int, int, str]] = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue  # gone while listed
            table.append((int(name), int(fields[1]), fields[0]))
    return table


def running_below(root: int) -> list[int]:
    """The processes below ``root``, this one aside, that are running or
    waiting for a CPU now (state R of their main thread, from /proc)."""
    children: dict[int, list[tuple[int, str]]] = {}
    for pid, ppid, state in proc_table():
        children.setdefault(ppid, []).append((pid, state))
    running, stack = [], [root]
    while stack:
        for pid, state in children.get(stack.pop(), []):
            stack.append(pid)
            if state == "R" and pid != os.getpid():
                running.append(pid)
    return running


def wait_until_quiet(root: int, timeout: float) -> bool:
    """Wait until no process below ``root`` but this one runs, in two looks
    20 ms apart, for at most ``timeout`` seconds; whether it came to that."""
    deadline = time.monotonic() + timeout
    quiet_looks = 0
    while True:
        quiet_looks = quiet_looks + 1 if not running_below(root) else 0
        if quiet_looks == 2:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def _no_lock_in_child() -> None:
    """A process a test forks (and may leave running) must not hold the
    lock for it: the lock is the open file's, and a fork shares it."""
    global _lock_fd
    if _lock_fd >= 0:
        with contextlib.suppress(OSError):
            os.close(_lock_fd)
        _lock_fd = -1


os.register_at_fork(after_in_child=_no_lock_in_child)


def proc_state(pid: int) -> str:
    """The process's state letter in /proc ("Z": a zombie), or "gone"."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):  # (reaped between the open and the read: ESRCH)
        return "gone"


def wait_stopped(pid: int) -> None:
    """Wait (at most 5 s) until the kernel shows the process as stopped: kill()
    returns before a SIGSTOP has taken effect, and a process blocked in a
    receive is woken by it, so it could still take a packet that comes then."""
    deadline = time.monotonic() + 5.0
    while proc_state(pid) != "T":
        if time.monotonic() > deadline:
            pytest.fail(f"process {pid} did not stop within 5 s of SIGSTOP")
        time.sleep(0.001)


def zygote_channel_copy(broker: Broker, which: str = "worker._zygote") -> int:
    """A copy, in this process, of the broker's zygote's end of their
    channel (pidfd_getfd: root has ptrace access to the broker's child), as
    a spare the zygote had just forked holds one until it runs to close it.
    ``which``: the zygote's argument before its fd ("--spares": the channel
    its spares come through). The caller closes it."""
    assert broker._zygote is not None
    proc = broker._zygote._proc
    args = [str(a) for a in proc.args]  # type: ignore[union-attr]
    return fd_copy(proc.pid, int(args[args.index(which) + 1]))


def fd_copy(pid: int, fd: int) -> int:
    """A copy, in this process, of process ``pid``'s fd ``fd`` (pidfd_getfd:
    root has ptrace access to the broker's children). The caller closes it."""
    pidfd = os.pidfd_open(pid)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        got = libc.syscall(438, pidfd, fd, 0)  # pidfd_getfd
        if got < 0:
            raise OSError(ctypes.get_errno(), "pidfd_getfd")
        return int(got)
    finally:
        os.close(pidfd)


def open_fds(broker: Broker | None = None) -> set[int]:
    """The fds this process holds right now (excluding the listing's own).

    With ``broker``: also excluding the one fd of its zygote's waiting spare,
    which a spawn replaces by a new one (a leaked old spare still shows)."""
    spare = spare_of(broker)
    return {fd for fd in map(int, os.listdir("/proc/self/fd")) if _is_open(fd)} - ({spare[1]} if spare else set())


def assert_no_fd_left(broker: Broker, before: set[int], what: str) -> None:
    """No fd opened since ``before`` is still open (waiting up to 5 s: a
    pipe's pump thread ends once a killed worker's end is closed). An fd of
    ``before`` may have closed meanwhile: another broker's background thread
    (of an earlier module's closed broker, still reaping) letting a pidfd go."""
    deadline = time.monotonic() + 5
    while open_fds(broker) - before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not open_fds(broker) - before, f"{what}: fds left open"


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
    return make_tree(tmp_path)


def make_tree(tmp_path: Path) -> Path:
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


def _snapshot(root: Path) -> dict[str, tuple[int, int, bytes | str | None]]:
    """Every entry beneath ``root``: its mode, mtime and bytes (a symlink: its
    target; a FIFO: nothing, it is never opened)."""
    out: dict[str, tuple[int, int, bytes | str | None]] = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        body = os.readlink(p) if p.is_symlink() else p.read_bytes() if stat.S_ISREG(st.st_mode) else None
        out[str(p.relative_to(root))] = (st.st_mode, st.st_mtime_ns, body)
    return out


@pytest.fixture(scope="module")
def _shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Broker, Path, Any]]:
    root = make_tree(tmp_path_factory.mktemp("shared"))
    with Broker(default_policy(), root=root, call_timeout=30) as b:
        yield b, root, b.spawn(Witness)  # (made first: the zygote is up before a case counts fds)


@pytest.fixture
def ro_broker(_shared: tuple[Broker, Path, Any]) -> Iterator[Broker]:
    """The ``broker`` fixture's configuration, shared by a module's cases that
    change nothing in the tree and do not depend on the broker's state; each
    spawns workers of its own. After a case its workers are killed, and the
    broker must still answer a request of its own and a witness worker's call,
    with the tree as it was and no fd left."""
    b, root, witness = _shared
    before, tree_before, workers_before = open_fds(b), _snapshot(root), set(b._workers)
    yield b
    for wid, handle in list(b._workers.items()):
        if wid not in workers_before:
            handle.kill()
    with b.open("data/a.txt", READ) as f:
        assert f.read_all() == b"hello"
    assert witness.ping() == "pong"
    assert _snapshot(root) == tree_before, "the case changed the shared tree"
    assert_no_fd_left(b, before, "the case, in the shared broker")


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


def fill_default_executor(seconds: float = 3.0) -> list[asyncio.Future[None]]:
    """Give the running loop a default executor of two threads, both busy
    ``seconds`` with the program's own work; await what is returned before
    the loop ends."""
    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(2))
    return [loop.run_in_executor(None, time.sleep, seconds) for _ in range(2)]


@pytest.fixture
def unwritable(tmp_path: Path) -> Iterator[Path]:
    """An empty directory nobody can create files in (see _unwritable)."""
    from _unwritable import unwritable_dir

    yield from unwritable_dir(tmp_path / "locked")
