"""The lifeline (worker._lifeline): a process armed on it is SIGKILLed by
the kernel when the last write end of the pipe closes. Each case runs in
fresh forked children, against the kernel."""

from __future__ import annotations

import os
import resource
import select
import signal
import time

import pytest

from worker import _lifeline

pytestmark = pytest.mark.skipif(not _lifeline.AVAILABLE, reason="no F_SETSIG here: Linux only")


def _armed_child(shared: int, *close: int) -> tuple[int, int]:
    """Fork a child that arms itself on ``shared`` (closing ``close``
    first), says so on a pipe, then spins; (its pid, that pipe's read end).
    The child exits 3 if arming returned, 4 if it could not arm."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            for fd in close:
                os.close(fd)
            fd = _lifeline.arm(shared)
            if fd is None:
                os._exit(4)
            os.close(shared)  # (its own description is what counts)
            os.write(w, b"armed")
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                pass
            os._exit(3)
        finally:
            os._exit(5)
    os.close(w)
    return pid, r


def _status_within(pid: int, seconds: float) -> int | None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.002)
    return None


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def test_an_armed_process_is_killed_when_the_last_write_end_closes() -> None:
    lr, lw = os.pipe2(os.O_CLOEXEC)
    other = os.dup(lw)  # a second holder of the write end: the broker's forked copy, say
    pid, said = _armed_child(lr, lw, other)
    try:
        os.close(lr)
        assert select.select([said], [], [], 10)[0] and os.read(said, 5) == b"armed"
        os.close(lw)
        assert _status_within(pid, 0.3) is None  # one write end is still open: it runs on
        t0 = time.monotonic()
        os.close(other)
        status = _status_within(pid, 5.0)
        took = time.monotonic() - t0
        assert status is not None, "still running 5 s after the last write end closed"
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
        assert took < 1.0, took
    finally:
        _kill(pid)
        os.close(said)


def test_arming_after_the_write_end_has_closed_ends_the_process_at_once() -> None:
    """The broker died between the fork and the arming: no signal comes,
    and the hung-up pipe says so."""
    lr, lw = os.pipe2(os.O_CLOEXEC)
    os.close(lw)
    pid, said = _armed_child(lr)
    try:
        os.close(lr)
        status = _status_within(pid, 5.0)
        assert status is not None and os.waitstatus_to_exitcode(status) == 0, status
        assert os.read(said, 5) == b""  # it never went on past arm()
    finally:
        _kill(pid)
        os.close(said)


def test_each_armed_process_is_killed_whatever_the_others_do() -> None:
    """One pipe per zygote, one description per child: closing one child's
    description (or its death) leaves the others armed."""
    lr, lw = os.pipe2(os.O_CLOEXEC)
    first, said1 = _armed_child(lr, lw)
    second, said2 = _armed_child(lr, lw)
    try:
        os.close(lr)
        for said in (said1, said2):
            assert select.select([said], [], [], 10)[0] and os.read(said, 5) == b"armed"
        _kill(first)
        assert _status_within(second, 0.2) is None
        os.close(lw)
        status = _status_within(second, 5.0)
        assert status is not None and os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
    finally:
        _kill(first)
        _kill(second)
        os.close(said1)
        os.close(said2)


@pytest.mark.parametrize(
    ("soft", "highest", "moving", "expected"),
    [
        (1024, 12, 4, _lifeline.PREFERRED_SLOT),  # room: the preferred slot, above a small open_files
        (48, 12, 4, 43),  # below the limit, with room above it for the moves
        (1024, 100, 4, 101),  # above the grants' slots
        (16, 12, 4, -1),  # no room: none (the parent-death signal alone)
    ],
)
def test_the_lifelines_slot_fits_under_the_fd_limit(soft: int, highest: int, moving: int, expected: int) -> None:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
            os.write(w, str(_lifeline.place(highest, moving)).encode())
        finally:
            os._exit(0)
    os.close(w)
    try:
        got = os.read(r, 100)
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    assert int(got) == expected
