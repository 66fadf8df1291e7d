"""Per-worker memory cgroups (Limits.memory): made where the broker can,
the worker moved in before its first call, an OOM kill inside reported as
"oom", the cgroup removed when the worker ends; where the broker cannot,
the worker still starts and its report says why. Real cgroups, real kernel."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import default_policy

from broker import Broker
from broker._cgroup import probe
from protocol import WorkerCrashed
from worker import Worker, rpc

LIMIT = 64 << 20
SUPPORT = probe()
needs_cgroup = pytest.mark.skipif(not SUPPORT.version, reason=f"cgroup probe: no memory cgroup here: {SUPPORT.reason}")


class Eater(Worker):
    @rpc
    def ping(self) -> str:
        return "pong"

    @rpc
    def eat(self, mib: int) -> int:
        block = b"\x01" * (mib << 20)  # every page written: charged, not just reserved
        return len(block)

    @rpc
    def where(self) -> int:
        return os.getpid()


def _procs(path: str) -> list[int]:
    with open(os.path.join(path, "cgroup.procs")) as f:
        return [int(x) for x in f.read().split()]


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
