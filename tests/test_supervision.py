"""Supervision: limits, structured ends, audit events, leak-free churn, and
the zygote giving exactly the sandbox the other spawn methods give."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
import math
import os
import re
import select
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from _supervision_workers import (
    _FLOOD,
    Asker,
    ClockReader,
    Deaf,
    Decoder,
    Dialer,
    FdWriter,
    Flooder,
    Forger,
    ForgingSetup,
    Hog,
    LateOffender,
    Mapper,
    Printer,
    ProxyReader,
    Relister,
    Segfaults,
    SelfSignaller,
    Speller,
)
from conftest import READ, default_policy, wait_stopped

from broker import Broker, Policy
from broker._loop import notified_now
from protocol import PolicyViolation, Rights, WorkerCrashed, WorkerTimeout


def test_memory_hog_is_stopped_and_reported(tree: Path) -> None:
    with Broker(Policy().with_limits(address_space=1 << 30), root=tree) as b:
        w = b.spawn(Hog)
        with pytest.raises(WorkerCrashed) as info:
            w.eat(2)
        assert info.value.exit.kind == "oom"
        assert isinstance(info.value.__cause__, MemoryError)
        assert b.spawn(Hog).ping() == "pong"  # the broker goes on


def test_cpu_limit_ends_a_spinning_worker(tree: Path) -> None:
    with Broker(Policy().with_limits(cpu_seconds=1), root=tree) as b:
        w = b.spawn(Hog)
        with pytest.raises(WorkerTimeout) as info:
            w.with_timeout(20).spin()
        assert info.value.exit.reason.startswith("CPU time limit reached (SIGXCPU; Limits.cpu_seconds bounds the "
                                                 "CPU time of the worker's whole life, not of one call)")


def test_a_cpu_clock_named_by_a_pid_is_reported_as_one(tree: Path) -> None:
    """The report read 'clock_getres(0xfffd33fa, 0x0, ...)' for glibc's
    clock_getcpuclockid(getpid()), which the filter refuses as it refuses any
    process's CPU clock named by its pid (a README audit)."""
    with Broker(Policy(), root=tree) as b:
        w = b.spawn(ClockReader)
        with pytest.raises(PolicyViolation) as info:
            w.cpu_time_of(w.pid)
    assert f"for syscall clock_gettime(<SCHED CPU clock of process {w.pid}>, 0x" in str(info.value)
    assert "A worker reads its own as pid 0 (CLOCK_PROCESS_CPUTIME_ID" in str(info.value)


def test_a_sigxcpu_it_sent_itself_is_no_timeout(tree: Path) -> None:
    """SIGXCPU was read as "CPU time limit reached" (a timeout) whoever sent
    it: a worker with no CPU limit made its end read as one (red-team round
    17). It is the limit's only where one was set."""
    with Broker(Policy(), root=tree) as b:
        w = b.spawn(SelfSignaller)
        with pytest.raises(WorkerCrashed) as info:
            w.die_of(signal.SIGXCPU)
        assert not isinstance(info.value, WorkerTimeout)
        assert w.exit is not None and (w.exit.kind, w.exit.signal) == ("signal", signal.SIGXCPU)
        assert w.exit.reason == "killed by SIGXCPU, which it can send itself"
    with Broker(Policy().with_limits(cpu_seconds=30), root=tree) as b:
        w = b.spawn(SelfSignaller)
        with pytest.raises(WorkerTimeout):
            w.die_of(signal.SIGXCPU)
        assert w.exit is not None and w.exit.kind == "timeout"


def test_violation_names_the_syscall_and_path(tree: Path) -> None:
    with Broker(Policy(), root=tree) as b:
        w = b.spawn(Hog)
        with pytest.raises(PolicyViolation) as info:
            w.forbidden()
        assert info.value.syscall in ("openat", "open")
        assert "/etc/hostname" in str(info.value)
        assert "import" not in str(info.value)  # no hint that does not apply
        assert str(info.value).endswith("a worker opens nothing by path on its own. Take the file as a call's "
                                        "argument, or ask the broker (self.broker.open('relative/path')), or read "
                                        "it in setup(), which runs before sandbox entry")
        assert w.exit is not None and w.exit.kind == "violation"


def _wait_for_end(w: Any, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while w.exit is None and time.monotonic() < deadline:
        time.sleep(0.01)


def test_a_violation_between_calls_ends_the_worker_at_once(tree: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Only a call waited on the sandbox's notifications: a forbidden syscall
    made after the call had answered left its thread blocked and the worker
    serving, unreported; stop() recorded an ok end, or a later call (another
    task's, in a pool) took the blame (red-team round 39)."""
    with Broker(Policy(), root=tree) as b, caplog.at_level(logging.INFO, logger="privsep.audit"):
        w = b.spawn(LateOffender)
        assert w.violate_later(0.05) == "returned"
        _wait_for_end(w)  # no call, no stop: the broker sees it by itself
        assert w.exit is not None and w.exit.kind == "violation", w.exit
        assert w.exit.syscall in ("openat", "open") and "/etc/hostname" in w.exit.reason
        assert not w.alive
        with pytest.raises(PolicyViolation):
            w.ping()
        assert w.stop().kind == "violation"
        witness = b.spawn(LateOffender)  # the broker serves on
        assert witness.ping() == "pong"
    events = [r.privsep for r in caplog.records if r.name == "privsep.audit" and r.privsep["decision"] == "denied"]
    assert [e["request"] for e in events] == ["violation"], events


def test_a_worker_that_dies_between_calls_has_its_end_recorded_at_once(
    tree: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker killed from outside (or by the OOM killer, or a thread of its
    own that ended the process) while no call ran had no end recorded, logged
    or counted until its next call, stop or kill; its fds stayed open until
    then. The idle watch records it at once, as it ended."""
    with Broker(Policy(), root=tree) as b, caplog.at_level(logging.WARNING, logger="privsep.broker"):
        killed, zero, three = b.spawn(LateOffender), b.spawn(LateOffender), b.spawn(LateOffender)
        os.kill(killed.pid, signal.SIGKILL)
        assert zero.exit_later(0.05, 0) == "returned"
        assert three.exit_later(0.05, 3) == "returned"
        for w in (killed, zero, three):
            _wait_for_end(w)  # no call, no stop
        assert killed.exit is not None and (killed.exit.kind, killed.exit.signal) == ("signal", signal.SIGKILL)
        # An exit status 0 it was not asked for is no clean stop.
        assert zero.exit is not None and (zero.exit.kind, zero.exit.exit_code) == ("crashed", 0), zero.exit
        assert zero.exit.reason == "exited with status 0 by itself", zero.exit
        assert three.exit is not None and (three.exit.kind, three.exit.exit_code) == ("crashed", 3), three.exit
        for w in (killed, zero, three):
            assert w not in b.workers and w._pidfd == -1 and w._notify_fd == -1  # its fds let go
            with pytest.raises(WorkerCrashed, match="already ended"):
                w.ping()
            assert w.stop() is w.exit
        witness = b.spawn(LateOffender)
        assert witness.ping() == "pong"
    ends = {r.privsep["pid"]: r.privsep["kind"] for r in caplog.records if hasattr(r, "privsep")}
    assert ends == {killed.pid: "signal", zero.pid: "crashed", three.pid: "crashed"}, ends


def _kill_in(pid: int, seconds: float) -> threading.Timer:
    timer = threading.Timer(seconds, os.kill, (pid, signal.SIGKILL))
    timer.start()
    return timer


def test_an_outside_kill_while_a_stop_waits_is_no_stop(tree: Path) -> None:
    """A SIGKILL from outside (an administrator, the OOM killer) while a stop
    waited for the worker to obey read "stopped (killed after the grace
    period)", kind ok, though the broker had killed nothing and the grace had
    not run out (red-team round 43)."""
    with Broker(Policy(), root=tree) as b:
        for stop in (lambda w: w.stop(3.0), lambda w: asyncio.run(w.astop(3.0))):
            w = b.spawn(LateOffender)
            assert w.linger_at_stop(2.0) == "armed"
            _kill_in(w.pid, 0.2)
            t0 = time.monotonic()
            ended = stop(w)
            assert time.monotonic() - t0 < 1.5
            assert (ended.kind, ended.reason, ended.signal) == ("signal", "killed by SIGKILL", signal.SIGKILL), ended
        w = b.spawn(LateOffender)  # (the broker's own kill, the grace run out, still reads so)
        assert w.linger_at_stop(2.0) == "armed"
        assert w.stop(0.2).reason == "stopped (killed after the grace period)"


@pytest.mark.parametrize("spawn", ["zygote", "fork"])
def test_a_cancelled_astop_of_a_worker_that_ended_meanwhile_says_how_it_ended(tree: Path, spawn: str) -> None:
    """An astop() cancelled after its worker had ended by itself (exit 3
    here), before it looked (the loop busy), recorded "stopped (killed: its
    astop() was cancelled)", kind ok, SIGKILL: every field wrong (red-team
    round 44, 10 of 10). The end is recorded as it was, its status asked
    for off the loop."""
    with Broker(Policy(), root=tree, spawn=spawn) as b:
        w = b.spawn(LateOffender)
        assert w.exit_at_stop(0.2, 3) == "armed"

        async def main() -> None:
            stopping = asyncio.ensure_future(w.astop(5))
            await asyncio.sleep(0.05)  # (the stop sent; astop() waits for the end)
            assert select.select([w._pidfd], [], [], 10)[0]  # the loop held until the worker has ended
            stopping.cancel()
            with pytest.raises(asyncio.CancelledError):
                await stopping

        asyncio.run(main())
        _wait_for_end(w)
        assert w.exit is not None and (w.exit.kind, w.exit.exit_code, w.exit.signal) == ("crashed", 3, None), w.exit


def test_close_gives_the_workers_that_ignore_its_stop_one_moment_together(tree: Path) -> None:
    """close(0) (and a `with Broker` left by Ctrl-C) gave each worker that
    ignored the stop 50 ms in turn: 40 such workers held it 2.1 s (red-team
    round 44). They share the one moment, the stop sent to all at once."""
    b = Broker(Policy(), root=tree)
    try:
        workers = [b.spawn(LateOffender) for _ in range(16)]
        for w in workers:
            assert w.linger_at_stop(30.0) == "armed"
        t0 = time.monotonic()
        b.close(0)
        took = time.monotonic() - t0
    finally:
        b.close()
    assert took < 0.5, took  # (16 x 50 ms before)
    assert [(w.exit.kind, w.exit.reason) if w.exit else None for w in workers] == [("ok", "stopped (killed)")] * 16


def test_a_pool_worker_killed_from_outside_as_it_is_recycled_is_a_crash(tree: Path) -> None:
    """The recycle's stop took an outside SIGKILL for its own grace run out:
    a clean end, so restart="never" left the pool unbroken (red-team round
    43: 13 in 20)."""
    with Broker(Policy(), root=tree) as b, b.pool(LateOffender, size=1, recycle_after=1, restart="never") as pool:
        deadline = time.monotonic() + 10
        while not pool.workers and time.monotonic() < deadline:
            time.sleep(0.01)
        pid = pool.workers[0].pid
        assert pool.submit(LateOffender.linger_at_stop, 2.0).result() == "armed"  # (then recycled: stopped)
        _kill_in(pid, 0.2)  # (while the recycle's stop waits: 2 s)
        while pool.ended == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [(e.kind, e.signal) for e in pool.exits] == [("signal", signal.SIGKILL)], list(pool.exits)
        assert pool.broken is not None and "restart='never'" in pool.broken


def test_a_worker_that_dies_between_awaited_calls_has_its_end_recorded(tree: Path) -> None:
    async def run() -> Any:
        async with Broker(Policy(), root=tree) as b:
            w = await b.aspawn(LateOffender)
            assert await w.aio.ping() == "pong"
            os.kill(w.pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while w.exit is None and time.monotonic() < deadline:
                await asyncio.sleep(0.01)  # (the loop runs on: nothing of the end is waited for on it)
            return w.exit

    end = asyncio.run(run())
    assert end is not None and (end.kind, end.signal) == ("signal", signal.SIGKILL), end


def test_a_violation_between_awaited_calls_ends_the_worker(tree: Path) -> None:
    async def run() -> Any:
        async with Broker(Policy(), root=tree) as b:
            w = await b.aspawn(LateOffender)
            assert await w.aio.violate_later(0.05) == "returned"
            await asyncio.sleep(0.3)
            return await w.astop()

    end = asyncio.run(run())
    assert end.kind == "violation" and end.syscall in ("openat", "open"), end


def test_a_violation_between_calls_is_answered_in_errno_mode(tree: Path) -> None:
    with Broker(Policy().with_sandbox(violation="errno"), root=tree) as b:
        w = b.spawn(LateOffender)
        assert w.violate_later(0.05) == "returned"
        deadline = time.monotonic() + 10
        while w.result() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert w.result() == errno.EPERM  # answered while idle: its thread went on
        assert w.alive and w.exit is None


def test_violations_between_calls_answered_with_an_errno_are_throttled(tree: Path) -> None:
    """Each is work a worker asks of the broker, and an audit event; between
    calls nothing ends a flood, so they are held to 100 a second whatever
    the request rate says (at the default 20,000, one worker kept a broker
    CPU busy for ever, at 11,000 a second; red-team round 40)."""
    with Broker(Policy().with_sandbox(violation="errno"), root=tree) as b:
        w = b.spawn(LateOffender)
        assert w.violate_later(0.0, 200) == "returned"
        time.sleep(2.5)  # (no call meanwhile: one waiting for its answer answers them at the request rate)
        deadline = time.monotonic() + 30
        while w.result() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        errors, elapsed = w.result()
        assert errors == [errno.EPERM] * 200
        assert elapsed > 1.8, elapsed  # 199 gaps of 10 ms at least


@pytest.mark.parametrize("how", ["stop", "astop", "close"])
def test_a_violation_while_a_worker_stops_is_its_end(tree: Path, caplog: pytest.LogCaptureFixture, how: str) -> None:
    """A stop holds the call lock while it waits for the worker to end, so
    the idle watch could not act: a forbidden syscall made then read as a
    clean stop, with no audit event (red-team round 40)."""
    with caplog.at_level(logging.INFO, logger="privsep.audit"):
        b = Broker(Policy(), root=tree)
        w = b.spawn(LateOffender)
        assert w.offend_at_stop() == "armed"
        if how == "stop":
            end = w.stop(timeout=5)
        elif how == "astop":
            end = asyncio.run(w.astop(timeout=5))
        b.close()
        end = w.exit
    assert end is not None and end.kind == "violation" and end.syscall in ("openat", "open"), end
    events = [r.privsep for r in caplog.records if r.name == "privsep.audit" and r.privsep["decision"] == "denied"]
    assert [e["request"] for e in events] == ["violation"], events


def test_a_flood_of_violations_does_not_hold_a_stop_past_its_timeout(tree: Path) -> None:
    """In errno mode each is answered, and the worker lives on: stop() waited
    until the worker left a gap between them, which 32 threads never did
    (15-49 s, or for ever, for a timeout of 1 s), and a call took the
    violations first, never its answer (red-team round 41)."""
    with Broker(Policy().with_sandbox(violation="errno"), root=tree) as b:
        w = b.spawn(LateOffender)
        assert w.with_timeout(10).flood_and_ignore_stop(32) == "flooding"
        for _ in range(20):  # a call reads its answer though a violation is always waiting (round 41)
            t0 = time.monotonic()
            assert w.with_timeout(10).ping() == "pong"
            assert time.monotonic() - t0 < 1.0, time.monotonic() - t0
        t0 = time.monotonic()
        end = w.stop(timeout=0.5)
        assert time.monotonic() - t0 < 1.5, time.monotonic() - t0
        assert end.kind == "ok" and end.signal == signal.SIGKILL, end  # (killed after its grace)


def test_violations_answered_with_an_errno_take_turns_with_a_calls_messages(tree: Path) -> None:
    """Taking the channel first whenever it had a message let a worker that
    kept it full hold its violations unanswered, and unaudited, for the
    whole call (round 42)."""
    with Broker(Policy().with_sandbox(violation="errno"), root=tree, worker_output=True) as b:
        w = b.spawn(LateOffender)
        assert w.with_timeout(20).print_while_offending(1.0) > 20


def test_a_pool_ends_a_worker_with_a_violation_pending_before_its_next_task(tree: Path) -> None:
    """One the idle watch had not ended yet was sent the next task, which
    then raised its PolicyViolation (3-10 in 50 runs; red-team round 40)."""
    with Broker(Policy(), root=tree) as b, b.pool(LateOffender, size=1) as pool:
        for _ in range(20):
            assert pool.submit(LateOffender.violate_later, 0.01).result() == "returned"
            deadline = time.monotonic() + 10
            (worker,) = pool.workers
            while worker.exit is None and not notified_now(worker._notify_fd) and time.monotonic() < deadline:
                pass  # (until the syscall is pending, or already ended by the watch)
            assert pool.submit(LateOffender.ping).result() == "pong"
        assert pool.ended == 20 and all(e.kind == "violation" for e in pool.exits), list(pool.exits)


def test_a_pool_worker_that_offends_between_tasks_is_replaced(tree: Path) -> None:
    with Broker(Policy(), root=tree) as b, b.pool(LateOffender, size=1) as pool:
        assert pool.submit(LateOffender.violate_later, 0.05).result() == "returned"
        (worker,) = pool.workers
        deadline = time.monotonic() + 10
        # (no task meanwhile: a syscall that lands during a call is that call's, as documented)
        while worker.exit is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert worker.exit is not None and worker.exit.kind == "violation", worker.exit  # ended while idle
        assert pool.submit(LateOffender.ping).result() == "pong"  # on a replacement, not blamed
        assert pool.ended == 1 and pool.exits[0].kind == "violation", list(pool.exits)


def test_a_file_mapping_is_named_as_the_cause(tree: Path) -> None:
    """Pillow's PDF writer maps its output: the report said 'mmap(0x0, 0x0,
    0x1, 0x1, 0x4)' and the user read it as a bug of their own (a user trial)."""
    with Broker(default_policy(), root=tree) as b, pytest.raises(PolicyViolation) as info:
        b.spawn(Mapper).map_it(b.open("data/a.txt", READ | Rights.SEEK | Rights.FSTAT))
    assert info.value.syscall == "mmap"
    assert re.search(r"for syscall mmap\(0x0, 0x5, 0x1, 0x1, (0x[0-9a-f]+)\): a mapping of the file at fd "
                     r"(\d+)\. A worker maps a file only when it holds it from its spawn with MMAP_R", str(info.value))


def test_a_working_directory_asked_for_is_named_as_the_cause(tree: Path) -> None:
    """tempfile and os.path.abspath() ask for the working directory: the report named getcwd() alone."""
    with Broker(Policy(), root=tree) as b, pytest.raises(PolicyViolation) as info:
        b.spawn(Hog).tempfile()
    assert info.value.syscall == "getcwd"
    assert str(info.value).endswith(": a worker has no working directory. os.getcwd(), os.path.abspath() and "
                                    "tempfile ask for it: keep scratch data in memory (io.BytesIO), or ask the "
                                    "broker for a file (self.broker.create())")


def test_a_socket_address_is_shown_in_the_report(tree: Path) -> None:
    """uuid.uuid1() asks uuidd over a Unix socket: the report read
    'connect(0x4, 0x7fff0cfed670, 0x6e, 0x558c..., 0x7f2e...)'."""
    with Broker(Policy(), root=tree) as b, pytest.raises(PolicyViolation) as info:
        b.spawn(Hog).connect_unix("/run/privsep-test/nowhere")
    assert info.value.syscall == "connect"
    assert re.search(r"syscall connect\(0x[0-9a-f]+, \{AF_UNIX, '/run/privsep-test/nowhere'\}, 0x1c\)$",
                     str(info.value)), str(info.value)


def test_socket_and_signal_arguments_are_shown_by_name(tree: Path) -> None:
    """The report read 'socket(0x2, 0x80001)' and 'kill(0x1b7b, 0x9)' (a
    user trial): constants by name, pids in decimal, as strace shows them."""
    with Broker(Policy(), root=tree) as b:
        with pytest.raises(PolicyViolation) as sock:
            b.spawn(Dialer).tcp_socket()
        assert str(sock.value).split("for syscall ")[1].startswith("socket(AF_INET, SOCK_STREAM|SOCK_CLOEXEC)")
        with pytest.raises(PolicyViolation) as kill:
            b.spawn(Dialer).kill_init()
        assert str(kill.value).split("for syscall ")[1].startswith("kill(1, SIGKILL)")
        w = b.spawn(Dialer)
        with pytest.raises(PolicyViolation) as trace:
            w.attach()  # (it read 'ptrace(0x10, 0x64e1, 0x0, 0x0, ...)'; a user trial)
        assert str(trace.value).split("for syscall ")[1].startswith("ptrace(PTRACE_ATTACH, 1)")
        # A pid as the kernel reads it, the register's low 32 bits: kill(-1, 0) read
        # 'kill(18446744073709551615)', the probe's 0 dropped as a trailing 0x0 (red-team round 39).
        for pid, sig, shown in ((-1, 0, "kill(-1, 0)"), ((5 << 32) | 1, 9, "kill(1, SIGKILL)")):
            with pytest.raises(PolicyViolation) as raw:
                b.spawn(Dialer).raw_kill(pid, sig)
            assert str(raw.value).split("for syscall ")[1].startswith(shown), str(raw.value)


def test_socket_addresses_read_as_strace_shows_them() -> None:
    import socket
    import struct

    from broker._violation import sockaddr_text

    unix = struct.pack("=H", socket.AF_UNIX) + b"/run/x\0junk"
    abstract = struct.pack("=H", socket.AF_UNIX) + b"\0name"
    inet = struct.pack("=H", socket.AF_INET) + struct.pack(">H", 53) + socket.inet_aton("10.0.0.1") + bytes(8)
    inet6 = struct.pack("=H", socket.AF_INET6) + struct.pack(">H", 443) + bytes(4) + socket.inet_pton(
        socket.AF_INET6, "::1") + bytes(4)
    assert [sockaddr_text(x) for x in (unix, abstract, inet, inet6, b"\x01")] == [
        "{AF_UNIX, '/run/x'}", "{AF_UNIX, @'name'}", "{AF_INET, 10.0.0.1:53}", "{AF_INET6, [::1]:443}", None
    ]


def test_a_late_import_is_named_as_the_likely_cause(tree: Path) -> None:
    with Broker(Policy(), root=tree) as b:
        w = b.spawn(Hog)
        with pytest.raises(PolicyViolation, match="An import after sandbox entry") as late:
            w.late_import()
        assert 'to find which import: with Policy().with_sandbox(violation="errno")' in str(late.value)
        # A package's directory, beneath sys.path: no hint was given for it.
        with pytest.raises(PolicyViolation, match="An import after sandbox entry"):
            b.spawn(Hog).stat_a_package()
        with pytest.raises(PolicyViolation) as info:  # a data file beneath it is no import
            b.spawn(Hog).stat_a_data_file()
        assert "import" not in str(info.value)
        # A source file: an import, or Python's own printer of a traceback's lines.
        with pytest.raises(PolicyViolation, match=r"An import after sandbox entry.*; or a traceback printed with "
                                                  r"its source lines by a hook of your own$"):
            b.spawn(Hog).read_a_source_file()


def test_errno_mode_returns_eperm_instead_of_killing(tree: Path) -> None:
    with Broker(Policy().with_sandbox(violation="errno"), root=tree) as b:
        w = b.spawn(Hog)
        assert w.forbidden() == "errno 1"
        assert w.ping() == "pong"


def test_audit_log_records_grants_denials_and_violations(tree: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="privsep.audit")
    with Broker(default_policy(), root=tree) as b:
        w = b.spawn(Hog)
        w.flood(1)
        with pytest.raises(PolicyViolation):
            w.forbidden()
    events = [r.privsep for r in caplog.records if r.name == "privsep.audit"]  # type: ignore[attr-defined]
    decisions = {(e["request"], e["decision"]) for e in events}
    assert ("stat", "granted") in decisions
    assert ("violation", "denied") in decisions
    assert ("spawn", "granted") in decisions
    for e in events:
        assert {"worker", "pid", "request", "path", "rights", "decision", "reason"} <= set(e)


def test_audit_events_beneath_a_directory_proxy_name_the_file(tree: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A request beneath a directory proxy was audited with the path as the
    worker wrote it, relative to the proxy: reading data/secret/x.txt and
    data/public/x.txt made the same event (red-team round 15). Every event's
    path is from the broker's root."""
    for name in ("public", "secret"):
        (tree / "data" / name).mkdir()
        (tree / "data" / name / "x.txt").write_text(name)
    caplog.set_level(logging.INFO, logger="privsep.audit")
    with Broker(Policy().allow("data/", Rights.LOOKUP | Rights.READ | Rights.FSTAT), root=tree) as b:
        w = b.spawn(ProxyReader)
        assert w.read_both() == [b"public", b"secret"]
        assert w.stat_in(b.opendir("data/secret", Rights.LOOKUP | Rights.FSTAT)) == 6
    events = [(e["request"], e["path"], e["decision"]) for e in
              (r.privsep for r in caplog.records if r.name == "privsep.audit") if e["request"] != "spawn"]  # type: ignore[attr-defined]  # fmt: skip
    assert events == [
        ("opendir", "data/public", "granted"),
        ("dopen", "data/public/x.txt", "granted"),
        ("dopen", "data/public/missing.txt", "failed"),
        ("opendir", "data/secret", "granted"),
        ("dopen", "data/secret/x.txt", "granted"),
        ("dopen", "data/secret/missing.txt", "failed"),
        ("pass", "data/secret", "granted"),
        ("dstat", "data/secret/x.txt", "granted"),
    ]
    assert "dopen 'data/secret/x.txt' granted" in caplog.text  # (the line quotes the path)


def test_audit_events_name_one_file_one_way(tree: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The event named the path as the worker spelled it: one file read as
    data/public/x.txt, data//public/./x.txt or ./data/public/x.txt/, and a
    consumer matching on paths could be dodged (red-team round 17)."""
    (tree / "data" / "public").mkdir()
    (tree / "data" / "public" / "x.txt").write_text("public")
    caplog.set_level(logging.INFO, logger="privsep.audit")
    with Broker(Policy().allow("data/", Rights.LOOKUP | Rights.READ | Rights.FSTAT), root=tree) as b:
        assert b.spawn(Speller).spellings() == ["rep", "rep", "rep", "rerr", "rerr"]
    events = [(e["request"], e["path"], e["decision"]) for e in
              (r.privsep for r in caplog.records if r.name == "privsep.audit") if e["request"] == "stat"]  # type: ignore[attr-defined]  # fmt: skip
    assert events == [("stat", "data/public/x.txt", "granted")] * 3 + [
        ("stat", "data/public/missing.txt", "failed"),
        ("stat", "data//public/../x.txt", "denied"),  # refused before it was a path at all: as written
    ]


def test_capabilities_passed_in_calls_and_at_spawn_are_audited(tree: Path, caplog: pytest.LogCaptureFixture
                                                                ) -> None:  # fmt: skip
    """A file passed to a worker in a call, or held from its spawn, is a
    grant as much as one it asks for: none of them made an event (a batch of
    36 files passed to a pool logged nothing of them; a user trial)."""
    (tree / "data" / "public").mkdir()
    (tree / "data" / "public" / "x.txt").write_text("public")
    caplog.set_level(logging.INFO, logger="privsep.audit")
    rights = Rights.LOOKUP | Rights.READ | Rights.SEEK | Rights.FSTAT  # (a directory held from spawn: SEEK too)
    with Broker(Policy().allow("data/", rights), root=tree) as b:
        w = b.spawn(ProxyReader, grants={"src": b.opendir("data/public", rights)})
        assert w.stat_in(b.opendir("data/public", Rights.LOOKUP | Rights.FSTAT)) == 6
        with b.pool(ProxyReader, size=1) as pool:
            public = b.opendir("data/public/", Rights.LOOKUP | Rights.FSTAT)
            assert pool.submit(ProxyReader.stat_in, public).result() == 6
    events = [(e["worker"], e["request"], e["path"], e["rights"], e["reason"]) for e in
              (r.privsep for r in caplog.records if r.name == "privsep.audit")]  # type: ignore[attr-defined]  # fmt: skip
    first = events[0][0]
    assert [e for e in events if e[0] == first] == [
        (first, "spawn", "ProxyReader", None, "worker ready"),
        (first, "grant", "data/public", "READ|SEEK|FSTAT|LOOKUP", "held from spawn as grants['src']"),
        (first, "pass", "data/public", "FSTAT|LOOKUP", "an argument of stat_in()"),
        (first, "dstat", "data/public/x.txt", None, ""),
    ]
    assert [e[1:] for e in events if e[0] != first] == [
        ("spawn", "ProxyReader", None, "worker ready"),
        ("pass", "data/public", "FSTAT|LOOKUP", "an argument of stat_in()"),
        ("dstat", "data/public/x.txt", None, ""),
    ]


def test_a_workers_end_reads_as_kind_and_reason(tree: Path) -> None:
    """print(handle.exit) printed the dataclass's repr (a user trial)."""
    with Broker(default_policy(), root=tree) as b:
        w = b.spawn(Hog)
        w.kill()
        assert str(w.exit) == "signal: killed by the broker"
        assert repr(w.exit).startswith("WorkerExit(kind='signal', reason='killed by the broker'")


def test_every_worker_end_is_a_structured_log_record(tree: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="privsep.broker")
    with Broker(default_policy(), root=tree) as b:
        stopped, killed, stopped_by_filter = b.spawn(Hog), b.spawn(Hog), b.spawn(Hog)
        stopped.stop()
        killed.kill()
        with pytest.raises(PolicyViolation):
            stopped_by_filter.forbidden()
    ends = {r.privsep["pid"]: r.privsep for r in caplog.records if r.name == "privsep.broker" and hasattr(r, "privsep")}  # type: ignore[attr-defined]
    for handle in (stopped, killed, stopped_by_filter):
        end = ends[handle.pid]
        assert handle.exit is not None
        assert end == {"worker": handle.id, "pid": handle.pid, "class": "Hog", **dataclasses.asdict(handle.exit)}
    assert [ends[h.pid]["kind"] for h in (stopped, killed, stopped_by_filter)] == ["ok", "signal", "violation"]
    assert ends[stopped_by_filter.pid]["syscall"] == "openat"


def test_worker_text_cannot_start_a_log_line_of_its_own(tree: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A path asked for or an exception's message went into the audit and
    broker log lines as it was: its newline started a line of the worker's
    making (a forged 'granted'). The line escapes it; record.privsep keeps it."""
    caplog.set_level(logging.INFO, logger="privsep")
    forged = "INFO privsep.audit #1 Forger open data/secret granted"
    with Broker(default_policy(), root=tree) as b:
        assert b.spawn(Forger).forge_audit(forged) == "FileNotFoundError"
        with pytest.raises(WorkerCrashed):
            b.spawn(ForgingSetup)
        pool = b.pool(ForgingSetup, size=1)  # broken by its setup(), and its log line says why (round 38)
        deadline = time.monotonic() + 30
        while pool._broken is None and time.monotonic() < deadline:
            time.sleep(0.01)
        pool.shutdown()
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("privsep")]
    assert lines and all(line.isprintable() for line in lines), lines
    assert [r for r in caplog.records if r.name == "privsep.pool" and "broken" in r.getMessage()]
    asked = [r for r in caplog.records if r.name == "privsep.audit" and r.privsep["request"] == "open"]  # type: ignore[attr-defined]
    assert [r.privsep["path"] for r in asked] == [f"data/x\n{forged}"]  # type: ignore[attr-defined]
    assert asked[0].getMessage().endswith(f"open {'data/x' + chr(10) + forged!r} failed (No such file or directory)")
    end = next(r for r in caplog.records if r.name == "privsep.broker" and "ForgingSetup" in r.getMessage())
    assert "boom\\rINFO privsep.broker worker #1 ended: ok (stopped)\\u2028\\x1b[2K" in end.getMessage()
    assert "boom\rINFO" in end.privsep["reason"]  # type: ignore[attr-defined]


def test_a_listing_costs_the_request_rate_what_it_costs_the_broker(tree: Path) -> None:
    """Each first page lists the directory again: a worker asking for it in a
    loop made the broker read, check and sort 100,000 entries per request,
    200 times the worker's own CPU and a slowdown of the other workers, for
    one request's share of the rate (a red-team run). A listing now counts as
    one request more per ENTRIES_PER_REQUEST entries read."""
    from broker._handle import ENTRIES_PER_REQUEST

    many = tree / "data" / "many"
    many.mkdir()
    for i in range(100 * ENTRIES_PER_REQUEST):
        (many / f"f{i:05d}").touch()
    rate = 500.0  # a burst of 500 requests, then 500 a second
    with Broker(default_policy(), root=tree, request_rate=rate) as b:
        w = b.spawn(Relister)
        started = time.monotonic()
        assert w.relist("data/many", 12) == 12 * 100 * ENTRIES_PER_REQUEST
        took = time.monotonic() - started
    # 12 listings of 3200 entries, 101 requests' worth each, 500 of them in the burst; a listing's
    # entries are charged once it is read, so the last one's delay only the request after it.
    expected = (11 * 101 + 1 - rate) / rate
    assert expected * 0.9 <= took < expected + 5.0, f"12 listings took {took:.2f} s, expected {expected:.2f} s"


def test_a_call_timeout_holds_while_the_broker_waits_to_answer_a_deaf_worker(tree: Path) -> None:
    """The broker's answer to a request waited for room for the channel's own
    send timeout (10 s), whatever the call's timeout said: a worker that never
    read its answers made a 0.5 s call last 10 s (a red-team run). The wait now
    ends at the call's deadline, and the call raises WorkerTimeout."""
    with Broker(default_policy(), root=tree, request_rate=None) as b:
        w = b.spawn(Deaf)
        started = time.monotonic()
        with pytest.raises(WorkerTimeout, match="the worker left what the broker sent it unread"):
            w.with_timeout(0.5).pipeline(5000)
        took = time.monotonic() - started
        assert w.exit is not None and w.exit.kind == "timeout"
    assert took < 3.0, f"a 0.5 s call took {took:.1f} s"


def test_a_calls_timeout_holds_when_the_call_itself_cannot_be_sent(tree: Path) -> None:
    """The send of the call waited for room for the channel's 10 s, whatever
    the call's timeout said, and the end was recorded as a protocol error
    (a red-team run: a worker that left its answers unread filled the queue)."""
    with Broker(default_policy(), root=tree, request_rate=None) as b:
        w = b.spawn(Asker)
        assert w.ping() == "pong"
        os.kill(w.pid, signal.SIGSTOP)  # it reads nothing from now on
        wait_stopped(w.pid)  # (kill() returns before the worker has stopped: it could still read a packet)
        chan = w._chan.sock
        with pytest.raises(BlockingIOError):
            for _ in range(100_000):  # what a worker leaves unread: the queue to it is full
                chan.send(b"\x90", socket.MSG_DONTWAIT)
        started = time.monotonic()
        with pytest.raises(WorkerTimeout, match="left what the broker sent it unread"):
            w.with_timeout(0.5).ping()
        took = time.monotonic() - started
        assert w.exit is not None and w.exit.kind == "timeout"
    assert took < 3.0, f"a 0.5 s call took {took:.1f} s"


def test_the_request_rate_never_holds_a_call_past_its_timeout(tree: Path) -> None:
    """A listing's entries are charged to the rate, and the wait they cost
    slept past the call's deadline: with request_rate=50, a 0.5 s call took
    11.5 s (a red-team run). The wait now ends at the deadline, as a timeout."""
    from broker._handle import ENTRIES_PER_REQUEST

    many = tree / "data" / "many"
    many.mkdir()
    for i in range(40 * ENTRIES_PER_REQUEST):
        (many / f"f{i:04d}").touch()
    with Broker(default_policy(), root=tree, request_rate=10.0) as b:
        w = b.spawn(Asker)
        started = time.monotonic()
        with pytest.raises(WorkerTimeout, match=r"ran past its 0.5 s timeout"):
            w.with_timeout(0.5).list_then_ask("data/many")  # owes about 3 s after its listing
        took = time.monotonic() - started
        assert w.exit is not None and w.exit.kind == "timeout"
    assert took < 2.0, f"a 0.5 s call took {took:.1f} s"


def test_a_long_path_costs_the_request_rate_what_it_costs_the_broker(tree: Path) -> None:
    """Checking a 4 KiB path of 2,044 parts cost the broker 7 times a short
    request, for one request's share of the rate (a red-team run). A path
    counts one request more per PATH_CHARS_PER_REQUEST characters."""
    from broker._handle import PATH_CHARS_PER_REQUEST

    path = ("d/" * 2048)[: 8 * PATH_CHARS_PER_REQUEST - 1] + "d"  # 2,048 parts: 9 requests' worth each
    assert len(path) == 8 * PATH_CHARS_PER_REQUEST
    rate = 100.0
    with Broker(default_policy(), root=tree, request_rate=rate) as b:
        w = b.spawn(Asker)
        started = time.monotonic()
        assert w.ask(path, 20) == 20  # each refused (no such grant), and each charged
        took = time.monotonic() - started
    expected = (19 * 9 + 1 - rate) / rate  # the last one's charge delays only what comes after it
    assert expected * 0.9 <= took < expected + 5.0, f"took {took:.2f} s, expected {expected:.2f} s"


def test_worker_text_in_log_lines_and_records_is_bounded(tree: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A 16 MiB path (a text blob) went whole into the audit record and,
    escaped character by character, into its line: 5 s of the broker's time
    and 64 MiB of log per request (found by a red-team run). A blob in a
    request now ends the worker unread; a path as long as a packet holds is
    cut to a few KiB in both."""
    caplog.set_level(logging.INFO, logger="privsep.audit")
    with Broker(default_policy(), root=tree, request_rate=None) as b:
        w = b.spawn(Flooder)
        started = time.monotonic()
        assert w.flood_audit(4) == 4
        took = time.monotonic() - started
    asked = [r for r in caplog.records if r.name == "privsep.audit" and r.privsep["request"] == "open"]  # type: ignore[attr-defined]
    assert len(asked) == 4
    for r in asked:
        assert len(r.getMessage()) < 20_000 and len(r.privsep["path"]) < 5000  # type: ignore[attr-defined]
        assert r.privsep["path"].endswith(f"...[{_FLOOD - 4096} more characters]")  # type: ignore[attr-defined]
    assert took < 2.0, f"4 refused requests took {took:.1f} s"


def test_an_error_from_the_wire_is_held_to_the_senders_bounds() -> None:
    """A worker's error may name a class of 8 MiB (kept with the class it
    makes, 512 of them), with a message and traceback as long."""
    from protocol import RemoteError
    from protocol._remote import exception_from_wire

    huge = 8 << 20
    exc = exception_from_wire(
        {"type": "N" * huge, "msg": "m" * huge, "errno": None, "filename": None, "tb": "t" * huge, "base": "ValueError"}
    )
    assert isinstance(exc, RemoteError) and isinstance(exc, ValueError)
    assert len(exc.type_name) <= 256 and len(str(exc)) < 5000
    assert len(exc.remote_traceback) <= 32768  # type: ignore[attr-defined]


def _printed(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str, str]]:
    return [(r.levelname, r.privsep["stream"], r.privsep["text"]) for r in caplog.records  # type: ignore[attr-defined]
            if r.name == "privsep.worker"]


def test_worker_output_is_off_unless_asked_for(tree: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="privsep.worker")
    with Broker(Policy(), root=tree) as b:
        w = b.spawn(Printer)
        assert w.talk() == "done" and w.lines(100) == 100
        assert _printed(caplog) == []
        with pytest.raises(WorkerCrashed, match="output the broker did not ask for") as info:
            w.raw("stdout", "forged")
        assert info.value.exit.kind == "protocol"


def test_worker_output_becomes_log_records_in_order(tree: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="privsep.worker")
    with Broker(Policy(), root=tree, worker_output=True) as b:
        w = b.spawn(Printer)
        assert w.talk() == "done"
        got = _printed(caplog)
        assert got[:4] == [("INFO", "stdout", "from setup()"), ("INFO", "stdout", "second setup line"),
                           ("INFO", "stdout", "one 1"), ("INFO", "stdout", "\x1b]0;owned\x07 escaped")]
        assert got[4:6] == [("INFO", "stdout", "w" * 4096), ("INFO", "stdout", "w" * 904)]
        assert got[6:8] == [("WARNING", "stderr", "to stderr"), ("INFO", "stdout", "from a thread")]
        assert got[8][:2] == ("WARNING", "stderr") and got[8][2].endswith("UserWarning: careful")
        assert got[-3:] == [("INFO", "stdout", "bytes é"), ("INFO", "stdout", "\\xff"),
                            ("INFO", "stdout", "no newline")]  # a line begun goes when the call ends
        messages = [r.getMessage() for r in caplog.records if r.name == "privsep.worker"]
        assert messages[3] == f"worker {w.name} stdout: \\x1b]0;owned\\x07 escaped"
        assert all(m.isprintable() for m in messages)
        assert w.alive and w.lines(3) == 3 and _printed(caplog)[-3:] == [("INFO", "stdout", str(i)) for i in range(3)]
        for stream, text in (("stdin", "x"), ("stdout", "y" * 4097)):
            with pytest.raises(WorkerCrashed, match="output line out of bounds"):
                b.spawn(Printer).raw(stream, text)


def test_worker_output_between_calls_is_bounded(tree: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="privsep.worker")
    with Broker(Policy(), root=tree, worker_output=True, environ={**os.environ, "PRIVSEP_TEST_SETUP_FLOOD": "1"}) as b:
        assert b.spawn(Printer).lines(0) == 0
    got = _printed(caplog)
    assert got[0] == ("INFO", "stdout", "from setup()")
    assert sum(len(text) for _, _, text in got[1:-1]) <= 64 * 1024
    assert got[-1][:2] == ("WARNING", "stderr") and "characters of output dropped while no call ran" in got[-1][2]


def test_worker_output_is_held_to_the_request_rate(tree: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="privsep.worker")
    with Broker(Policy(), root=tree, worker_output=True, request_rate=500.0) as b:
        w = b.spawn(Printer)
        t0 = time.monotonic()
        assert w.lines(1000) == 1000
        assert time.monotonic() - t0 > 0.8  # 1000 lines at 500/s after a burst of 500
    assert [text for _, _, text in _printed(caplog)][-1000:] == [str(i) for i in range(1000)]
    with pytest.raises(TypeError, match="worker_output must be True or False"):
        Broker(Policy(), root=tree, worker_output="yes")  # type: ignore[arg-type]


@pytest.mark.parametrize("spawn", ["zygote", "exec"])
def test_what_code_writes_to_fds_1_and_2_joins_the_worker_output(
    tree: Path, caplog: pytest.LogCaptureFixture, spawn: str
) -> None:
    caplog.set_level(logging.INFO, logger="privsep.worker")
    with Broker(Policy(), root=tree, worker_output=True, spawn=spawn) as b:
        w = b.spawn(FdWriter)
        assert "seccomp" in " ".join(w.sandbox["layers"])  # in the sandbox, as every worker
        assert w.mixed() == "done"
        got = _printed(caplog)
        assert got[:5] == [("INFO", "stdout", "fd 1 in setup()"), ("INFO", "stdout", "fd 1 first"),
                           ("INFO", "stdout", "then print()"), ("WARNING", "stderr", "fd 2 \u00e9 \x1b[31m"),
                           ("WARNING", "stderr", "then stderr")]
        assert got[5] == ("WARNING", "stderr", "Stack (most recent call first):")
        assert "in mixed" in got[6][2] and got[-1] == ("INFO", "stdout", "no newline at the end")
        messages = [r.getMessage() for r in caplog.records if r.name == "privsep.worker"]
        assert all(m.isprintable() for m in messages)  # the escape sequence is escaped in the log line
        # A flood past the pipe fails the write (EAGAIN), never blocks the worker; what the pipe took is logged.
        caplog.clear()
        taken, failed = w.flood(1 << 20)
        assert failed == "BlockingIOError" and 0 < taken < 1 << 20  # (a list: msgpack has no tuples)
        assert sum(len(text) + 1 for _, _, text in _printed(caplog)) == taken
        assert w.mixed() == "done"  # and the pipe works on


def test_a_dying_workers_last_words_are_bounded(tree: Path, caplog: pytest.LogCaptureFixture) -> None:
    """64 KiB of newlines at its death made 4096 log records at once, past the request rate."""
    caplog.set_level(logging.INFO, logger="privsep.worker")
    with Broker(Policy(), root=tree, worker_output=True) as b, pytest.raises(WorkerCrashed) as info:
        b.spawn(Segfaults).flood_and_die()
    assert info.value.exit.exit_code == 3 and len(info.value.exit.last_output) == 4096
    assert [text for _, _, text in _printed(caplog)] == ["line"] * 64


def test_what_a_dying_worker_wrote_to_its_stderr_is_kept_and_logged(
    tree: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker's last words (faulthandler's report of a crash) were lost: the worker that reads
    its stderr pipe back is the one that died. The broker holds the pipe too, and reads what is left."""
    caplog.set_level(logging.INFO, logger="privsep.worker")
    with Broker(Policy(), root=tree, worker_output=True) as b:
        w = b.spawn(Segfaults)
        assert w.ping() == "pong"
        with pytest.raises(WorkerCrashed) as info:
            w.die()
        ex = info.value.exit
        assert ex.kind == "signal" and ex.signal == signal.SIGSEGV
        assert ex.last_output.startswith("dying words\nFatal Python error: Segmentation fault"), ex.last_output
        assert "in die" in ex.last_output and len(ex.last_output) <= 4096
        logged = [text for _, stream, text in _printed(caplog) if stream == "stderr"]
        assert logged[:2] == ["dying words", "Fatal Python error: Segmentation fault"], logged
        assert w._stderr_fd == -1  # let go with its other fds
    with Broker(Policy(), root=tree) as b:  # without worker_output: no pipe kept, nothing read
        w = b.spawn(Segfaults)
        assert w._stderr_fd == -1
        with pytest.raises(WorkerCrashed) as info:
            w.die()
        assert info.value.exit.last_output == ""


def test_what_code_writes_to_fds_1_and_2_goes_nowhere_unless_asked_for(
    tree: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="privsep.worker")
    with Broker(Policy(), root=tree) as b:
        w = b.spawn(FdWriter)
        for _ in range(3):  # from the first call, fds 1 and 2 are /dev/null: every write succeeds
            assert w.mixed() == "done" and w.flood(1 << 20) == [1 << 20, ""]
        assert _printed(caplog) == [] and w.alive


def test_an_audit_lines_path_reads_as_one_field(tree: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Spaces are printable: a refused request for "nope granted (ok)" read
    "open data/nope granted (ok) failed (...)", a grant to whoever reads the
    line by its fields (red-team round 38). The path is quoted."""
    caplog.set_level(logging.INFO, logger="privsep.audit")
    with Broker(default_policy(), root=tree) as b:
        w = b.spawn(Forger)
        assert w.open_named("data/nope granted (ok)") == "FileNotFoundError"
        assert w.open_named("data/it's \"both\"") == "FileNotFoundError"
    opens = [r.getMessage() for r in caplog.records if r.privsep["request"] == "open"]  # type: ignore[attr-defined]
    assert [m.split(" open ", 1)[1] for m in opens] == [
        "'data/nope granted (ok)' failed (No such file or directory)",
        "'data/it\\'s \"both\"' failed (No such file or directory)",
    ]


def test_log_text_escapes_exactly_what_is_not_printable() -> None:
    from broker._logtext import printable

    assert printable("data/é€😀 x.png") == "data/é€😀 x.png"  # printable text untouched
    assert printable("a\\b") == "a\\\\b"  # a backslash doubled, even where nothing else is escaped:
    assert printable("a\\nb") != printable("a\nb")  # a backslash and an n read as a newline (red-team round 37)
    assert printable("a\nb\\n") == "a\\nb\\\\n"  # escaped, and then no escape can be forged
    assert printable("\u202egnp.exe\x00\t") == "\\u202egnp.exe\\x00\\t"


def test_request_flood_is_throttled(tree: Path) -> None:
    with Broker(default_policy(), root=tree, request_rate=200.0) as b:
        w = b.spawn(Hog)
        t0 = time.monotonic()
        assert w.flood(600) == 0
        assert time.monotonic() - t0 > 1.5  # 600 requests at 200/s after a burst of 200


def test_a_flood_of_violations_answered_with_an_errno_is_throttled(tree: Path) -> None:
    """Each is a round trip to the broker and an audit event: in errno mode a
    worker made about 11,000 a second whatever the request rate said."""
    policy = default_policy().with_sandbox(violation="errno")
    with Broker(policy, root=tree, request_rate=200.0) as b:
        w = b.spawn(Hog)
        t0 = time.monotonic()
        assert w.forbidden_times(600) == 600
        assert time.monotonic() - t0 > 1.5  # 600 at 200/s after a burst of 200
        assert w.alive


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"request_rate": 0}, ValueError), ({"request_rate": -5}, ValueError), ({"request_rate": math.nan}, ValueError),
        ({"request_rate": "20k"}, TypeError), ({"max_requests_per_call": -1}, ValueError),
        ({"max_requests_per_call": "3"}, TypeError), ({"max_outputs_per_call": 1.5}, TypeError),
    ],
)
def test_broker_limits_are_checked_where_they_are_given(tree: Path, options: dict[str, Any], error: type) -> None:
    """A request_rate of 0 divided by zero at a worker's first request, and
    a limit given as a string failed in the middle of a call: either ended
    the worker."""
    with pytest.raises(error):
        Broker(default_policy(), root=tree, **options)


def test_limits_of_zero_and_no_limit_are_limits_too(tree: Path) -> None:
    with Broker(default_policy(), root=tree, max_requests_per_call=0, request_rate=math.inf) as b:
        assert b.request_rate is None
        assert b.spawn(Hog).flood(3) == 3  # each request refused, the worker unharmed


def test_grant_quota_per_call(tree: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The requests past the quota are refused, and each refusal is an audit
    event as any is (they were none: 10,000 refusals left no trace in a
    red-team run, round 37)."""
    with Broker(default_policy(), root=tree, max_requests_per_call=50) as b, \
            caplog.at_level(logging.INFO, logger="privsep.audit"):
        assert b.spawn(Hog).flood(60) == 10
    events = [r.privsep for r in caplog.records if hasattr(r, "privsep") and r.privsep["request"] == "stat"]
    assert [e["decision"] for e in events] == ["granted"] * 50 + ["denied"] * 10
    assert {(e["path"], e["reason"]) for e in events[50:]} == {("data/a.txt", "more than 50 requests in one call")}


@pytest.mark.parametrize("method", ["zygote", "fork", "exec"])
def test_codecs_and_strptime_work_in_the_sandbox(tree: Path, method: str) -> None:
    """Python imports a codec's module the first time its name is looked up,
    and _strptime on the first strptime(): after sandbox entry that import
    stopped the worker (a stat of the encodings directory). They are loaded
    before any worker exists."""
    with Broker(Policy(), root=tree, spawn=method) as b:
        assert b.spawn(Decoder).decode() == [
            "café", "€", "é", "あ", "xn--bcher-kva.de", "hi", "ok", "2024", "03.04",
        ]


@pytest.mark.parametrize("method", ["zygote", "fork", "exec"])
def test_every_spawn_method_gets_the_same_sandbox(tree: Path, method: str) -> None:
    with Broker(Policy().allow("data/", READ), root=tree, spawn=method) as b:
        w = b.spawn(Hog)
        assert w.spawn_method == method
        reference = Broker(Policy().allow("data/", READ), root=tree, spawn="fork")
        try:
            ref = reference.spawn(Hog)
            per_worker = {"entry_us", "real_uid"}  # (a real uid is each worker's own)
            assert {k: v for k, v in w.sandbox.items() if k not in per_worker} == {
                k: v for k, v in ref.sandbox.items() if k not in per_worker
            }
            assert (w.sandbox["real_uid"] is None) == (ref.sandbox["real_uid"] is None) == (os.geteuid() != 0)
        finally:
            reference.close()
        assert "seccomp" in " ".join(w.sandbox["layers"]) and "landlock" in " ".join(w.sandbox["layers"])
        with pytest.raises(PolicyViolation):
            w.forbidden()


def test_a_flooding_worker_does_not_starve_the_others(tree: Path) -> None:
    """Sync callers on their own threads, and async calls on one event loop:
    a worker hammering the broker with requests leaves others their share."""
    import asyncio
    import statistics
    import threading

    with Broker(default_policy(), root=tree, request_rate=None) as b:
        flooder, quiet = b.spawn(Hog), b.spawn(Hog)
        quiet.ping()

        def lat(n: int) -> list[float]:
            out = []
            for _ in range(n):
                t0 = time.perf_counter()
                quiet.ping()
                out.append(time.perf_counter() - t0)
            return out

        alone = statistics.median(lat(200))
        flood = threading.Thread(target=flooder.flood, args=(20000,))
        flood.start()
        during = lat(200)
        still_flooding = flood.is_alive()
        flood.join()
        assert still_flooding, "the flood ended too early to measure anything"
        assert statistics.median(during) < max(0.005, 20 * alone), (alone, statistics.median(during))

        async def both() -> tuple[float, bool]:
            task = asyncio.create_task(flooder.aio.flood(20000))
            await asyncio.sleep(0.05)
            t0 = time.perf_counter()
            for _ in range(100):
                await quiet.aio.ping()
            spent = time.perf_counter() - t0
            flooding = not task.done()
            await task
            return spent, flooding

        spent, flooding = asyncio.run(both())
        assert flooding, "the flood ended before the pings did"
        assert spent < 2.0, spent  # 100 pings on the same loop as the flood


def test_a_worker_that_does_not_read_its_answers_cannot_stall_the_loop(tree: Path) -> None:
    import asyncio

    with Broker(default_policy(), root=tree, request_rate=None) as b:
        flooder, quiet = b.spawn(Hog), b.spawn(Hog)

        async def both() -> float:
            task = asyncio.create_task(flooder.aio.flood_pipelined(20000))
            await asyncio.sleep(0)
            t0 = time.perf_counter()
            for _ in range(50):
                await quiet.aio.ping()
            spent = time.perf_counter() - t0
            with pytest.raises(WorkerCrashed) as info:
                await task
            assert info.value.exit.kind == "protocol" and "stopped reading" in info.value.exit.reason
            return spent

        assert asyncio.run(both()) < 2.0


@pytest.mark.parametrize("rate", [None, 20_000.0])
def test_a_worker_that_never_stops_requesting_still_times_out(tree: Path, rate: float | None) -> None:
    """Its requests are always ready to read, so the broker never has to wait for
    one: the call's deadline must still end it."""
    with Broker(default_policy(), root=tree, request_rate=rate, max_requests_per_call=10**9) as b:
        w = b.spawn(Hog)
        outcome: list[BaseException | None] = []

        def call() -> None:
            try:
                w.with_timeout(0.5).talk_forever()
                outcome.append(None)
            except BaseException as exc:
                outcome.append(exc)

        t = threading.Thread(target=call, daemon=True)
        t0 = time.monotonic()
        t.start()
        t.join(10)
        if t.is_alive():
            w.kill()
            t.join(10)
            pytest.fail("the call ran far past its 0.5 s timeout")
        assert time.monotonic() - t0 < 5
        assert len(outcome) == 1 and isinstance(outcome[0], WorkerTimeout), outcome
        assert w.exit is not None and w.exit.kind == "timeout"


def test_a_worker_that_never_stops_requesting_still_times_out_async(tree: Path) -> None:
    import asyncio

    async def main() -> BaseException | None:
        async with Broker(default_policy(), root=tree, request_rate=None, max_requests_per_call=10**9) as b:
            w = b.spawn(Hog)
            try:
                await asyncio.wait_for(w.aio.with_timeout(0.5).talk_forever(128), 10)
            except WorkerTimeout as exc:
                assert w.exit is not None and w.exit.kind == "timeout"
                return exc
            except TimeoutError:
                w.kill()
                pytest.fail("the async call ran far past its 0.5 s timeout")
            return None

    assert isinstance(asyncio.run(main()), WorkerTimeout)


def test_limits_are_importable_where_the_policy_is() -> None:
    """The README speaks of Limits.memory; Limits could be imported only from a private module."""
    from broker import Limits

    limits = Policy().with_limits(memory=256 << 20, cpu_seconds=5).limits
    assert isinstance(limits, Limits) and limits.memory == 256 << 20 and limits.cpu_seconds == 5
    assert limits.open_files == Limits().open_files  # the defaults, but for what was changed
