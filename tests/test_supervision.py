"""Supervision: limits, structured ends, audit events, leak-free churn, and
the zygote giving exactly the sandbox the other spawn methods give."""

from __future__ import annotations

import logging
import os
import subprocess
import time
from pathlib import Path

import pytest
from conftest import READ, default_policy, open_fds

from broker import Broker, Policy
from protocol import NotCapable, PolicyViolation, WorkerCrashed, WorkerTimeout
from worker import Worker, rpc


class Hog(Worker):
    @rpc
    def ping(self) -> str:
        return "pong"

    @rpc
    def eat(self, gib: int) -> int:
        block = bytearray(gib << 30)
        return len(block)

    @rpc
    def spin(self) -> None:
        while True:
            pass

    @rpc
    def forbidden(self) -> str:
        try:
            os.open("/etc/hostname", os.O_RDONLY)
        except OSError as exc:
            return f"errno {exc.errno}"
        return "opened"

    @rpc
    def flood(self, n: int) -> int:
        denied = 0
        for _ in range(n):
            try:
                self.broker.stat("data/a.txt")
            except NotCapable:
                denied += 1
        return denied

    @rpc
    def report(self) -> dict:
        return {"pid": os.getpid()}


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
        assert "CPU time" in info.value.exit.reason


def test_violation_names_the_syscall_and_path(tree: Path) -> None:
    with Broker(Policy(), root=tree) as b:
        w = b.spawn(Hog)
        with pytest.raises(PolicyViolation) as info:
            w.forbidden()
        assert info.value.syscall in ("openat", "open")
        assert "/etc/hostname" in str(info.value)
        assert w.exit is not None and w.exit.kind == "violation"


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
    events = [r.privsep for r in caplog.records if hasattr(r, "privsep")]  # type: ignore[attr-defined]
    decisions = {(e["request"], e["decision"]) for e in events}
    assert ("stat", "granted") in decisions
    assert ("violation", "denied") in decisions
    assert ("spawn", "granted") in decisions
    for e in events:
        assert {"worker", "pid", "request", "path", "rights", "decision", "reason"} <= set(e)


def test_request_flood_is_throttled(tree: Path) -> None:
    with Broker(default_policy(), root=tree, request_rate=200.0) as b:
        w = b.spawn(Hog)
        t0 = time.monotonic()
        assert w.flood(600) == 0
        assert time.monotonic() - t0 > 1.5  # 600 requests at 200/s after a burst of 200


def test_grant_quota_per_call(tree: Path) -> None:
    with Broker(default_policy(), root=tree, max_requests_per_call=50) as b:
        assert b.spawn(Hog).flood(60) == 10


@pytest.mark.parametrize("method", ["zygote", "fork", "exec"])
def test_every_spawn_method_gets_the_same_sandbox(tree: Path, method: str) -> None:
    with Broker(Policy().allow("data/", READ), root=tree, spawn=method) as b:
        w = b.spawn(Hog)
        assert w.spawn_method == method
        reference = Broker(Policy().allow("data/", READ), root=tree, spawn="fork")
        try:
            ref = reference.spawn(Hog)
            timing = {"entry_us"}
            assert {k: v for k, v in w.sandbox.items() if k not in timing} == {
                k: v for k, v in ref.sandbox.items() if k not in timing
            }
        finally:
            reference.close()
        assert "seccomp" in " ".join(w.sandbox["layers"]) and "landlock" in " ".join(w.sandbox["layers"])
        with pytest.raises(PolicyViolation):
            w.forbidden()


def test_no_fd_or_process_leak_after_1000_spawn_kill_cycles(tree: Path) -> None:
    with Broker(Policy(), root=tree) as b:
        b.spawn(Hog).kill()  # start the zygote
        fds_before = open_fds()
        procs_before = _descendants()
        for i in range(1000):
            w = b.spawn(Hog)
            if i % 100 == 0:
                assert w.ping() == "pong"
            w.kill()
        assert open_fds() == fds_before
        assert _descendants() == procs_before
        assert b.workers == []


def _descendants() -> set[int]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid=,stat=,comm="], capture_output=True, text=True).stdout
    tree: dict[int, list[tuple[int, str]]] = {}
    for line in out.splitlines():
        pid, ppid, st, comm = line.split()[:4]
        if comm != "ps":  # the listing's own process
            tree.setdefault(int(ppid), []).append((int(pid), st))
    seen: set[int] = set()
    stack = [os.getpid()]
    while stack:
        for child, _st in tree.get(stack.pop(), []):
            if child not in seen:
                seen.add(child)
                stack.append(child)
    return seen
