"""Per-worker memory cgroups (Limits.memory): made where the broker can,
the worker moved in before its first call (a zygote spare moves itself in
while it waits, before setup()), an OOM kill inside reported as "oom", the
cgroup removed when the worker ends or its spare is let go; where the
broker cannot, the worker still starts and its report says why. Real
cgroups, real kernel."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from _cgroup_workers import BALLAST, Ballast, BallastAhead, Eater
from conftest import READ, default_policy

from broker import Broker
from broker._cgroup import WorkerCgroup, probe
from protocol import WorkerCrashed

LIMIT = 64 << 20
SUPPORT = probe()
needs_cgroup = pytest.mark.skipif(not SUPPORT.version, reason=f"cgroup probe: no memory cgroup here: {SUPPORT.reason}")


def _procs(path: str) -> list[int]:
    with open(os.path.join(path, "cgroup.procs")) as f:
        return [int(x) for x in f.read().split()]


def _usage(path: str) -> int:
    name = "memory.current" if SUPPORT.version == 2 else "memory.usage_in_bytes"
    with open(os.path.join(path, name)) as f:
        return int(f.read())


def _wait_in(path: str, pid: int) -> None:
    """The spare moves itself, and a move may wait for an RCU grace period."""
    deadline = time.monotonic() + 10
    while pid not in _procs(path):
        assert time.monotonic() < deadline, f"spare {pid} never moved into {path}"
        time.sleep(0.005)


def _ours() -> list[str]:
    return [n for n in os.listdir(SUPPORT.parent) if n.startswith(f"privsep-{os.getpid()}-")]


@pytest.fixture
def moves(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The pids the broker itself writes into a cgroup."""
    seen: list[int] = []
    real_add = WorkerCgroup.add

    def add(self: WorkerCgroup, pid: int) -> None:
        seen.append(pid)
        real_add(self, pid)

    monkeypatch.setattr(WorkerCgroup, "add", add)
    return seen


@needs_cgroup
@pytest.mark.parametrize("cls", [Ballast, BallastAhead])
def test_a_spare_waits_in_its_workers_cgroup_and_setup_is_charged_there(
    tree: Path, cls: type[Ballast], moves: list[int]
) -> None:
    """A move into a cgroup can wait for the kernel's cgroup lock (an RCU grace
    period): the zygote's spare moves itself while it waits, so no spawn
    does, and what setup() touches is the worker's, whenever it runs."""
    with Broker(default_policy().with_limits(memory=LIMIT), root=tree, spawn="zygote") as b:
        b.spawn(cls).stop()  # the next spare is asked for this class (made ahead for BallastAhead)
        assert b._zygote is not None
        waiting = b._zygote.waiting_spare()
        assert waiting is not None
        spare = b._zygote._spare
        assert spare is not None and spare.cgroup is not None and spare.cgroup.limit == LIMIT
        cg = spare.cgroup
        _wait_in(cg.path, waiting[0])
        moves.clear()
        w = b.spawn(cls)
        assert w.pid == waiting[0] and w._cgroup is cg
        assert moves == []  # the broker moved nothing
        assert _procs(cg.path) == [w.pid]
        assert w.sandbox["cgroup"] == {"memory": LIMIT, "applied": True, "version": SUPPORT.version}
        assert _usage(cg.path) >= BALLAST  # setup()'s memory is charged to the worker's cgroup
        with pytest.raises(WorkerCrashed) as info:
            w.eat(64)  # on top of the ballast: over the limit
        assert info.value.exit is not None and info.value.exit.kind == "oom"
    assert _ours() == []


class _ToldElsewhere(WorkerCgroup):
    """A real cgroup whose spare is told a path it cannot write (the first
    use of ``procs_file``, the zygote's message): it cannot move itself."""

    told = False

    @property
    def procs_file(self) -> str:
        if not self.told:
            self.told = True
            return "/nonexistent-privsep-test/cgroup.procs"
        return super().procs_file


@needs_cgroup
def test_a_spare_that_did_not_move_is_moved_by_the_broker(tree: Path, moves: list[int]) -> None:
    with Broker(default_policy().with_limits(memory=LIMIT), root=tree, spawn="zygote") as b:
        assert b._zygote is not None

        def elsewhere() -> WorkerCgroup:
            cg = WorkerCgroup.create(SUPPORT, LIMIT)
            cg.__class__ = _ToldElsewhere
            return cg

        b._zygote._spare_cgroup = elsewhere
        b.spawn(Eater).stop()  # uses the first spare; the next one is told the wrong path
        waiting = b._zygote.waiting_spare()
        assert waiting is not None
        moves.clear()
        w = b.spawn(Eater)
        assert w.pid == waiting[0] and moves == [w.pid]
        assert w._cgroup is not None and _procs(w._cgroup.path) == [w.pid]
        assert w.sandbox["cgroup"]["applied"] is True
        assert w.ping() == "pong"
    assert _ours() == []


@needs_cgroup
def test_spares_let_go_leave_no_cgroup_behind(tree: Path) -> None:
    """Spares made ahead for one class and thrown away for another, or for a
    spawn with grants, take their cgroups with them."""
    with Broker(default_policy().with_limits(memory=LIMIT), root=tree, spawn="zygote") as b:
        live = []
        for cls in (Eater, Eater, Ballast, Eater, BallastAhead, Ballast):
            live.append(b.spawn(cls))
            assert len(_ours()) <= len(live) + 1  # the workers' and the next spare's
        with b.opendir("data", READ) as d:
            live.append(b.spawn(Eater, grants={"d": d}))
        assert all(w.ping() == "pong" for w in live)
        for w in live[:3]:
            w.kill()
        assert len(_ours()) <= len(live) - 3 + 1
    assert _ours() == []


@needs_cgroup
@pytest.mark.parametrize("method", ["zygote", "fork", "exec"])
def test_a_memory_hog_is_killed_by_its_own_cgroup_and_reported(tree: Path, method: str) -> None:
    # address space well above the cgroup limit: the cgroup, not RLIMIT_AS, must stop it
    policy = default_policy().with_limits(memory=LIMIT, address_space=2 << 30)
    with Broker(policy, root=tree, spawn=method) as b:
        w = b.spawn(Eater)
        assert w.sandbox["cgroup"] == {"memory": LIMIT, "applied": True, "version": SUPPORT.version}
        cg = w._cgroup
        assert cg is not None and cg.path.startswith(SUPPORT.parent + "/")
        assert _procs(cg.path) == [w.pid]  # in it before its first call
        assert w.eat(8) == 8 << 20  # well under the limit: fine
        with pytest.raises(WorkerCrashed) as info:
            w.eat(256)
        ex = info.value.exit
        assert ex is not None and ex.kind == "oom" and "64 MiB" in ex.reason, ex
        assert not os.path.exists(cg.path)  # removed with the worker
        # the broker goes on: a fresh worker, a fresh cgroup
        w2 = b.spawn(Eater)
        assert w2.ping() == "pong" and w2._cgroup is not None and w2._cgroup.path != cg.path


@needs_cgroup
def test_every_worker_gets_its_own_cgroup_and_none_outlives_it(tree: Path) -> None:
    with Broker(default_policy().with_limits(memory=LIMIT), root=tree) as b:
        ws = [b.spawn(Eater) for _ in range(3)]
        paths = [w._cgroup.path for w in ws if w._cgroup is not None]
        assert len(set(paths)) == 3
        for w, path in zip(ws, paths, strict=True):
            assert _procs(path) == [w.where()]
        ws[0].stop()
        ws[1].kill()
        assert not os.path.exists(paths[0]) and not os.path.exists(paths[1])
    assert not os.path.exists(paths[2])  # closing the broker ends the last one
    leftovers = [n for n in os.listdir(SUPPORT.parent) if n.startswith(f"privsep-{os.getpid()}-")]
    assert leftovers == []


@needs_cgroup
def test_the_pool_limits_each_worker(tree: Path) -> None:
    with Broker(default_policy().with_limits(memory=LIMIT, address_space=2 << 30), root=tree) as b:
        pool = b.pool(Eater, size=2)
        try:
            ok = pool.submit("eat", 8)
            assert ok.result(30) == 8 << 20
            with pytest.raises(WorkerCrashed) as info:
                pool.submit("eat", 256).result(30)
            assert info.value.exit is not None and info.value.exit.kind == "oom"
        finally:
            pool.shutdown()


def test_without_a_usable_cgroup_the_worker_starts_and_says_why(tree: Path, tmp_path: Path) -> None:
    """A parent that is not a cgroup v2 directory: refused by the probe, reported, not silently dropped."""
    policy = default_policy().with_limits(memory=LIMIT)
    with Broker(policy, root=tree, cgroup_parent=str(tmp_path)) as b:
        assert b.cgroups.version == 0 and "not a cgroup v2 directory" in b.cgroups.reason
        w = b.spawn(Eater)
        report = w.sandbox["cgroup"]
        assert report["applied"] is False and report["memory"] == LIMIT
        assert "not a cgroup v2 directory" in report["reason"]
        assert w.ping() == "pong" and w._cgroup is None


def test_a_v2_parent_without_the_memory_controller_is_refused_with_the_reason() -> None:
    """Probed against the real unified hierarchy where it lacks the memory controller."""
    with open("/proc/self/mountinfo") as f:
        unified = [line.split()[4] for line in f if " - cgroup2 " in line]
    if not unified:
        pytest.skip("cgroup probe: no cgroup v2 mount here")
    with open(os.path.join(unified[0], "cgroup.controllers")) as f:
        if "memory" in f.read().split():
            pytest.skip("cgroup probe: this cgroup v2 mount has the memory controller: nothing to refuse")
    got = probe(unified[0])
    assert got.version == 0 and "no memory controller" in got.reason


def test_no_memory_limit_no_cgroup(tree: Path) -> None:
    with Broker(default_policy(), root=tree) as b:
        w = b.spawn(Eater)
        assert "cgroup" not in w.sandbox and w._cgroup is None


@needs_cgroup
def test_cgroups_a_killed_broker_left_are_removed_by_the_next(tree: Path) -> None:
    """A broker ended by SIGTERM or SIGKILL left its workers' memory cgroups, empty, for good (cgroup
    v1 allows 65,535): a service restarted by its manager leaked some at every restart. The next
    broker to make one in the same parent removes them: empty, of a pid no longer running."""
    import subprocess
    import sys

    import broker._cgroup as cgroup

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    stale = [os.path.join(SUPPORT.parent, f"privsep-{dead_pid}-{n}") for n in (1, 2)]
    live = os.path.join(SUPPORT.parent, f"privsep-{os.getppid()}-1")  # a broker still running: its own
    for path in [*stale, live]:
        os.mkdir(path)
    try:
        getattr(cgroup, "_swept", set()).discard(SUPPORT.parent)  # (this process may have swept already)
        with Broker(default_policy().with_limits(memory=LIMIT), root=tree) as b:
            assert b.spawn(Eater).ping() == "pong"
            assert not any(os.path.exists(p) for p in stale)
            assert os.path.exists(live)
    finally:
        for path in [*stale, live]:
            if os.path.exists(path):
                os.rmdir(path)
