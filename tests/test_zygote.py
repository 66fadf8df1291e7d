"""The zygote's pre-forked spare: what it holds, and what happens when it
dies, is handed a class nobody prepared, or cannot load its class."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from conftest import READ, default_policy, fd_targets, open_fds, spare_of

from broker import Broker
from protocol import WorkerCrashed
from worker import Worker, rpc
from worker.sandbox._namespaces import fresh_net


class Echo(Worker):
    @rpc
    def ping(self) -> str:
        return "pong"

    @rpc
    def where(self) -> int:
        return os.getpid()


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def _may_make_netns() -> bool:
    """Probe: can this process make a network namespace (and so can its zygote)?"""
    fd = fresh_net()
    if fd is None:
        return False
    os.close(fd)
    return True


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def _fd_targets_of(pid: int) -> dict[int, str]:
    out = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            pass
    return out


def _gone(pid: int, timeout: float = 5.0) -> bool:
    """The process no longer exists (dead and reaped: not even a zombie)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not os.path.exists(f"/proc/{pid}"):
            return True
        time.sleep(0.01)
    return False


def test_a_spawn_is_served_by_the_waiting_spare_which_holds_nothing(tree: Path) -> None:
    with Broker(default_policy(), root=tree, spawn="zygote") as b:
        with b.opendir("data", READ) as d:
            first = b.spawn(Echo, grants={"d": d})
        assert first.ping() == "pong"
        spare = spare_of(b)
        assert spare is not None
        pid, fd = spare
        assert _ppid(pid) == b._zygote._proc.pid  # type: ignore[union-attr]
        deadline = time.monotonic() + 5
        while len(held := _fd_targets_of(pid)) > 5 and time.monotonic() < deadline:
            time.sleep(0.005)  # it is still closing what fork gave it
        # stdio inherited from the zygote, its one socket and (where the zygote may make one: a root
        # broker) the empty network namespace made for it: no grant, no directory, no other channel
        beyond_stdio = sorted(t for n, t in held.items() if n > 2)
        if _may_make_netns():
            assert len(beyond_stdio) == 2, held
            assert beyond_stdio[0].startswith("net:") and beyond_stdio[0] != os.readlink("/proc/self/ns/net")
        else:
            assert len(beyond_stdio) == 1, held
        assert beyond_stdio[-1].startswith("socket:"), held
        assert fd_targets()[fd].startswith("socket:")
        w = b.spawn(Echo)
        assert w.pid == pid and w.where() == pid  # the spare became this worker
        assert spare_of(b) not in (None, spare)  # and a new one waits
        assert w.spawn_method == "zygote"


def test_a_dead_spare_is_reaped_and_the_spawn_forks_instead(tree: Path) -> None:
    with Broker(default_policy(), root=tree, spawn="zygote") as b:
        b.spawn(Echo).kill()
        spare = spare_of(b)
        assert spare is not None
        os.kill(spare[0], signal.SIGKILL)
        while _state(spare[0]) != "Z":  # dead, its socket closed, not reaped: the zygote reaps only when told
            time.sleep(0.005)
        before = open_fds(b)
        w = b.spawn(Echo)
        assert w.ping() == "pong" and w.pid != spare[0]
        assert _gone(spare[0]), "the dead spare was left as a zombie"
        w.kill()
        assert open_fds(b) == before


def test_a_spare_loads_a_class_it_was_not_prepared_for(tree: Path) -> None:
    with Broker(default_policy(), root=tree, spawn="zygote") as b:
        b.spawn(Echo).kill()  # the next spare is prepared for Echo only
        spare = spare_of(b)
        assert spare is not None
        from _late_worker import Late  # here, so that the zygote has not imported it with this module

        w = b.spawn(Late)
        assert w.where() == spare[0]
        assert w.sandbox["seccomp"] == "notify" and "landlock" in " ".join(w.sandbox["layers"])


def test_a_spare_that_dies_holding_the_request_is_a_crashed_spawn(tree: Path) -> None:
    """The race the test above avoids: the request is queued, then the spare dies."""
    with Broker(default_policy(), root=tree, spawn="zygote") as b:
        b.spawn(Echo).kill()
        spare = spare_of(b)
        assert spare is not None
        before = open_fds(b)
        os.kill(spare[0], signal.SIGSTOP)  # it cannot read the request before it dies
        outcome: list[BaseException | object] = []

        def spawn() -> None:
            try:
                outcome.append(b.spawn(Echo))
            except BaseException as exc:
                outcome.append(exc)

        t = threading.Thread(target=spawn)
        t.start()
        time.sleep(0.3)
        os.kill(spare[0], signal.SIGKILL)
        t.join(10)
        assert len(outcome) == 1 and isinstance(outcome[0], WorkerCrashed), outcome
        assert outcome[0].exit is not None and outcome[0].exit.signal == signal.SIGKILL
        assert _gone(spare[0])
        assert b.spawn(Echo).ping() == "pong"
        assert b.workers[0].kill() is not None
        assert open_fds(b) == before


def test_a_class_the_spare_cannot_load_is_a_clear_error_and_costs_nothing(tree: Path) -> None:
    with Broker(default_policy(), root=tree, spawn="zygote") as b:
        b.spawn(Echo).kill()
        from _shy_worker import Shy  # here: at the top, it would stop the zygote importing this module

        before = open_fds(b)
        for _ in range(2):  # the spare prepared for Echo, then one the zygote failed to prepare
            with pytest.raises(WorkerCrashed, match="refuses to load in a zygote") as info:
                b.spawn(Shy)
            assert info.value.exit is not None and info.value.exit.kind == "crashed"
        assert b.workers == []
        w = b.spawn(Echo)
        assert w.ping() == "pong"
        w.kill()
        assert open_fds(b) == before


def _netns(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def test_each_worker_gets_a_network_namespace_of_its_own_made_ahead(tree: Path) -> None:
    """The zygote makes each spare's network namespace before the spawn; the
    zygote and the waiting spare (where setup() runs) stay in the broker's."""
    with Broker(default_policy(), root=tree, spawn="zygote") as b:
        a, c = b.spawn(Echo), b.spawn(Echo)
        assert "net" in a.sandbox["namespaces"] and "net" in c.sandbox["namespaces"]
        mine = _netns(os.getpid())
        assert len({mine, _netns(a.pid), _netns(c.pid)}) == 3
        assert _netns(b._zygote._proc.pid) == mine  # type: ignore[union-attr]
        spare = spare_of(b)
        assert spare is not None and _netns(spare[0]) == mine
        with open(f"/proc/{a.pid}/net/dev") as f:
            devices = [line.split(":")[0].strip() for line in f.readlines()[2:]]
        assert devices == ["lo"]
        # what a spare was given stays closed in the worker: no namespace fd survives entry
        assert all(not t.startswith("net:") for t in _fd_targets_of(a.pid).values())


def test_a_dead_zygote_is_replaced_and_its_workers_end_cleanly(tree: Path) -> None:
    with Broker(default_policy(), root=tree, spawn="zygote") as b:
        w = b.spawn(Echo)
        assert w.ping() == "pong"
        zygote = b._zygote
        assert zygote is not None
        os.kill(zygote._proc.pid, signal.SIGKILL)
        zygote._proc.wait()
        with pytest.raises(WorkerCrashed):  # its workers die with it (parent-death signal)
            w.ping()
        assert w.exit is not None
        fresh = b.spawn(Echo)  # a new zygote serves the next spawn
        assert fresh.ping() == "pong" and b._zygote is not zygote


def test_between_spawns_the_broker_holds_the_same_fds_from_the_start(tree: Path) -> None:
    """A spare's answer waits in its own channel's queue until the next spawn
    takes it, so a plain fd count right after Broker() equals one after any
    number of spawn/kill cycles (what a soak test outside privsep measures)."""
    with Broker(default_policy(), root=tree, spawn="zygote") as b:
        before = open_fds()
        for _ in range(30):
            b.spawn(Echo).kill()
        assert open_fds() == before


def test_an_unsandboxed_worker_from_a_spare_holds_no_namespace_fd(tree: Path) -> None:
    from broker import UNSANDBOXED

    with Broker(default_policy(), root=tree, spawn="zygote", sandbox=UNSANDBOXED) as b:
        for _ in range(2):  # the first spare was forked before anything was known; the second after
            w = b.spawn(Echo)
            held = _fd_targets_of(w.pid)
            assert not any(t.startswith("net:") for t in held.values()), held
