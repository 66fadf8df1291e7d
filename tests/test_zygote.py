"""The zygote's pre-forked spare: what it holds, and what happens when it
dies, is handed a class nobody prepared, or cannot load its class; and the
spare that makes its worker ahead (``Worker.setup_ahead``)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgpack
import pytest
from _zygote_workers import (
    Appender,
    Eager,
    Echo,
    EchoWithSetup,
    Environ,
    FailsAhead,
    SlowAhead,
    Snoop,
)
from conftest import (
    READ,
    default_policy,
    fd_targets,
    open_fds,
    proc_state,
    spare_made_ahead,
    spare_of,
    wait_stopped,
    zygote_channel_copy,
)

from broker import Broker, Policy
from protocol import Rights, WorkerCrashed
from worker import Worker, rpc
from worker._lifeline import PREFERRED_SLOT
from worker._serve import CHANNEL_FD, NET_FD
from worker.sandbox._namespaces import fresh_net


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def _wait_entered(pid: int) -> dict[str, str]:
    """The spare's status once it is under its seccomp filter (it enters while it waits)."""
    deadline = time.monotonic() + 10
    while (st := _status(pid))["Seccomp"] != "2":
        assert time.monotonic() < deadline, f"spare {pid} did not enter its sandbox: {st}"
        time.sleep(0.005)
    return st


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
        settled = {0, 1, 2, CHANNEL_FD, *([NET_FD] if _may_make_netns() else []), PREFERRED_SLOT}

        def fds_and_reads(held: dict[int, str]) -> tuple[set[int], list[str]]:
            """The fds it holds but the read ends of the pipes on its fds 1 and 2, and those read ends."""
            reads = [n for n, t in held.items() if n > 2 and t in (held.get(1), held.get(2))]
            return set(held) - set(reads), sorted(held[n] for n in reads)

        def settled_yet(held: dict[int, str]) -> bool:
            # (both read ends: between its two pipes, fd 2 is still the pipe the zygote gave it)
            others, reads = fds_and_reads(held)
            return others == settled and held.get(2, "").startswith("pipe:") and len(set(reads)) == 2

        deadline = time.monotonic() + 5
        while not settled_yet(held := _fd_targets_of(pid)) and time.monotonic() < deadline:
            time.sleep(0.005)  # it is still moving what fork gave it to its slots, and closing the rest
        assert settled_yet(held), held
        # Its own description of the lifeline, whose write end is the broker's (worker._lifeline).
        lifeline = held[PREFERRED_SLOT]
        assert lifeline.startswith("pipe:") and lifeline in _fd_targets_of(b._zygote._proc.pid).values()  # type: ignore[union-attr]
        # fd 0 /dev/null, fds 1 and 2 pipes whose read ends it holds (worker._output), its one socket,
        # its lifeline (above) and (where the zygote may make one: a root broker) the empty network
        # namespace made for it: no grant, no directory, no other channel
        assert held[0] == "/dev/null" and held[1].startswith("pipe:") and held[2].startswith("pipe:")
        assert held[1] != held[2] and fds_and_reads(held)[1] == sorted([held[1], held[2]]), held
        beyond_stdio = sorted(t for n, t in held.items() if n > 2 and not t.startswith("pipe:"))
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
        # dead, its socket closed, not reaped: the zygote reaps only when told
        while (state := proc_state(spare[0])) != "Z":
            assert state != "gone"
            time.sleep(0.005)
        before = open_fds(b)
        w = b.spawn(Echo)
        assert w.ping() == "pong" and w.pid != spare[0]
        assert _gone(spare[0]), "the dead spare was left as a zombie"
        w.kill()
        assert open_fds(b) == before


def test_a_spare_loads_a_class_it_was_not_prepared_for(tree: Path) -> None:
    with Broker(default_policy(), root=tree, spawn="zygote") as b:
        b.spawn(EchoWithSetup).kill()  # the next spare is prepared for EchoWithSetup only (not made ahead)
        assert not spare_made_ahead(b)
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
        # a fork (the spare made ahead for Echo is let go), then a spare the zygote failed to prepare
        for _ in range(2):
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
        a, c = b.spawn(EchoWithSetup), b.spawn(EchoWithSetup)
        assert "net" in a.sandbox["namespaces"] and "net" in c.sandbox["namespaces"]
        mine = _netns(os.getpid())
        assert len({mine, _netns(a.pid), _netns(c.pid)}) == 3
        spare = spare_of(b)  # read once the zygote has forked it: out of the namespace it made for it
        assert _netns(b._zygote._proc.pid) == mine  # type: ignore[union-attr]
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
        # Its workers die with it (parent-death signal); their status died with it too.
        with pytest.raises(WorkerCrashed, match="the zygote that reaps it"):
            w.ping()
        assert w.exit is not None and w.exit.kind == "crashed"
        fresh = b.spawn(Echo)  # a new zygote serves the next spawn
        assert fresh.ping() == "pong" and b._zygote is not zygote


def test_a_zygote_killed_from_outside_is_reaped_when_its_workers_end_is_asked_for(tree: Path) -> None:
    """Killed from outside (an administrator, the OOM killer), the zygote was
    left a zombie of the broker until the next spawn or close(), even after
    a call had found its worker dead and asked it how the worker ended."""
    with Broker(default_policy(), root=tree, spawn="zygote") as b:
        w, idle = b.spawn(Echo), b.spawn(Echo)
        assert w.ping() == "pong"
        assert b._zygote is not None
        zygote = b._zygote._proc.pid
        os.kill(zygote, signal.SIGKILL)  # (not waited for here: that is the broker's job)
        deadline = time.monotonic() + 10
        # Dead, its workers sent their parent-death signal, and reaped with no call made: the idle
        # watch records their ends, asking the dead zygote how they ended.
        while proc_state(zygote) != "gone":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(WorkerCrashed, match="the zygote that reaps it"):
            w.ping()
        assert not os.path.exists(f"/proc/{zygote}"), proc_state(zygote)
        # A stop() of another of its workers, dead before the stop, cannot know how that one ended
        # either: as a call or kill() says (it read "stopped, exit status None", kind ok).
        ended = idle.stop()
        assert ended.kind == "crashed" and ended.exit_code is None and ended.signal is None, ended
        assert ended.reason.startswith("channel closed; exit status unknown: the zygote"), ended


def test_a_reap_ends_when_the_zygote_dies_though_its_channel_stays_open(tree: Path) -> None:
    """A spare the zygote has just forked holds a copy of the zygote's end of
    its channel until it runs to close it (at background priority, on busy
    CPUs, a while): a zygote that died meanwhile never hung up, and a reap
    asked of it waited its whole 10 s, each one of its workers' in turn."""
    with Broker(default_policy(), root=tree, spawn="zygote") as b:
        w = b.spawn(Echo)
        assert w.ping() == "pong"
        zygote = b._zygote
        assert zygote is not None
        # Its next spare made: the request for it read (under load it was still queued when the zygote
        # stopped, and was taken below for the reap's, the reap's for a second ask; a CI run).
        assert zygote.waiting_spare() is not None
        held = zygote_channel_copy(b)
        try:
            os.kill(zygote._proc.pid, signal.SIGSTOP)  # the reap's answer will not come
            wait_stopped(zygote._proc.pid)  # (not stopping: woken by the signal, it took the request first; a CI run)
            killer = threading.Timer(0.3, os.kill, (zygote._proc.pid, signal.SIGKILL))
            killer.start()
            t0 = time.monotonic()
            assert zygote.reap(w.pid) is None  # (its workers' statuses died with it)
            took = time.monotonic() - t0
            killer.join()
            assert 0.25 < took < 2.0, f"the reap took {took:.2f} s"
            # Its request waits in the channel's queue, which our copy shares.
            assert select.select([held], [], [], 0)[0] and msgpack.unpackb(os.read(held, 65536))["t"] == "reap"
            assert zygote.reap(w.pid) is None
            assert not select.select([held], [], [], 0)[0], "a dead zygote was asked again"
        finally:
            os.close(held)
        with pytest.raises(WorkerCrashed, match="the zygote that reaps it"):
            w.ping()


@pytest.mark.parametrize("waits_for", ["a spare", "a spare, awaited", "a fork on request"])
def test_a_spawn_ends_when_the_zygote_dies_though_its_channel_stays_open(tree: Path, waits_for: str) -> None:
    """As a reap above: a spawn waiting for the spare it had asked for, or
    for the worker it asked the zygote to fork (one with grants, where the
    spare was made ahead for none), waited its whole spawn_timeout for a
    zygote that had died meanwhile. An aspawn() waits for the spare on the
    loop, before its turn: it then starts a new zygote, at once."""
    with Broker(default_policy(), root=tree, spawn="zygote") as b:
        assert b.spawn(Echo).ping() == "pong"
        zygote = b._zygote
        assert zygote is not None
        zygote.waiting_spare()  # made: the next spawn takes it, and asks for another
        held = zygote_channel_copy(b, "worker._zygote" if waits_for == "a fork on request" else "--spares")
        try:
            os.kill(zygote._proc.pid, signal.SIGSTOP)  # no answer will come
            if waits_for.startswith("a spare"):
                assert b.spawn(Echo).ping() == "pong"  # (the spare made: then asks for another)
            killer = threading.Timer(0.3, os.kill, (zygote._proc.pid, signal.SIGKILL))
            killer.start()
            t0 = time.monotonic()
            if waits_for == "a spare, awaited":
                w = asyncio.run(b.aspawn(Echo))
                assert w.ping() == "pong" and b._zygote is not zygote
            else:
                with pytest.raises(WorkerCrashed, match="the zygote has exited"):
                    if waits_for == "a spare":
                        b.spawn(Echo)
                    else:
                        with b.opendir("data", READ) as d:
                            b.spawn(Echo, grants={"d": d})
            took = time.monotonic() - t0
            killer.join()
            assert 0.25 < took < 2.0, f"the spawn took {took:.2f} s"
        finally:
            os.close(held)
        assert b.spawn(Echo).ping() == "pong"  # a new zygote


@pytest.mark.parametrize("path", ["a spare", "a fork on request"])
def test_a_spawn_from_a_zygote_that_lives_but_does_not_answer_says_so(tree: Path, path: str) -> None:
    """The other side of the two tests above: a zygote alive but not answering
    (stopped, here) is ended at spawn_timeout, and the spawn says it did not
    answer, not that it had exited (it is killed then, which a look after the
    kill would have read as its own death). Both ways a spawn waits on the
    zygote: for its next spare, and for a worker it forks on request."""
    with Broker(default_policy(), root=tree, spawn="zygote", spawn_timeout=0.5) as b:
        assert b.spawn(Echo).ping() == "pong"
        zygote = b._zygote
        assert zygote is not None
        zygote.waiting_spare()
        if path == "a spare":
            os.kill(zygote._proc.pid, signal.SIGSTOP)
            assert b.spawn(Echo).ping() == "pong"  # (the spare made: then asks for another)
            expected = r"zygote did not answer within 0\.5 s"
        else:
            with zygote._lock:  # (let the spare go while the zygote can still reap it)
                spare, zygote._spare = zygote._spare, None
                assert spare is not None
                zygote._discard(spare)
            assert zygote.forks_next()
            os.kill(zygote._proc.pid, signal.SIGSTOP)
            expected = r"zygote did not answer a spawn request within 0\.5 s"
        with pytest.raises(WorkerCrashed, match=expected):
            b.spawn(Echo)
        assert b.spawn(Echo).ping() == "pong"  # a new zygote


@pytest.mark.parametrize("how", ["close(2)", "close(0)", "aclose()"])
def test_a_stopped_zygote_holds_close_no_more_than_its_reap_budget(tree: Path, how: str) -> None:
    """close() asks the zygote for the end of each of its workers. One
    stopped (or stuck) does not answer: each such ask gave up after 10 s,
    even in a Ctrl-C'd close(0). While closing, it waits 2 s, then ends the
    zygote; its worker and spare end too."""
    b = Broker(default_policy(), root=tree, spawn="zygote")
    try:
        w = b.spawn(Echo)
        assert w.ping() == "pong"
        zygote = b._zygote
        assert zygote is not None
        spare = zygote.waiting_spare()
        assert spare is not None
        os.kill(zygote._proc.pid, signal.SIGSTOP)
        t0 = time.monotonic()
    finally:
        if how == "aclose()":
            asyncio.run(b.aclose())
        else:
            b.close(2.0 if how == "close(2)" else 0.0)
    took = time.monotonic() - t0
    assert took < 5.0, took
    assert zygote._proc.returncode is not None
    assert w.exit is not None
    # (the spare, killed at background priority, may take a moment to run to its end)
    deadline = time.monotonic() + 5.0
    while any(proc_state(pid) not in ("gone", "Z") for pid in (w.pid, spare[0])) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [proc_state(pid) in ("gone", "Z") for pid in (w.pid, spare[0])] == [True, True]


def _pids_cgroup_parent() -> str | None:
    """A directory where a pids cgroup can be made: the v1 pids hierarchy's
    root, or the v2 root with the pids controller enabled for its children."""
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split(" - ") for line in f]
    for head, tail in mounts:
        point = head.split()[4]
        fstype, _, options = tail.split()[:3]
        if fstype == "cgroup" and "pids" in options.split(","):
            return point
        if fstype == "cgroup2":
            try:
                with open(os.path.join(point, "cgroup.subtree_control")) as ctl:
                    if "pids" in ctl.read().split():
                        return point
            except OSError:
                pass
    return None


_PROCESS_LIMIT_SCRIPT = """
with Broker(Policy(), root=tempfile.mkdtemp(), spawn="zygote") as b:
    w = b.spawn(Echo)
    zygote = b._zygote._proc.pid
    b._zygote.waiting_spare()
    with open(os.path.join({cgroup!r}, "pids.current")) as f:
        limit(f.read().strip())  # no process more
    spare = b.spawn(Echo)  # (the spare made before: the next one cannot be; kept, so that no end is reaped now)
    print("spare", spare.ping(), flush=True)
    for _ in range(2):
        try:
            b.spawn(Echo)
            print("spawned", flush=True)
        except WorkerCrashed as exc:
            print("failed", exc, flush=True)
    print("the first worker", w.ping(), b._zygote._proc.pid == zygote, flush=True)
    limit("max")
    print("lifted", b.spawn(Echo).ping(), b._zygote._proc.pid == zygote, w.ping(), flush=True)
"""


_IN_PIDS_CGROUP = """
import os, signal, sys, tempfile, time
sys.path.insert(0, {tests!r})
with open(os.path.join({cgroup!r}, "cgroup.procs"), "w") as f:
    f.write(str(os.getpid()))
from broker import Broker, Policy
from protocol import WorkerCrashed
from _zygote_workers import Echo

def limit(value):
    with open(os.path.join({cgroup!r}, "pids.max"), "w") as f:
        f.write(value)
"""


def _run_in_pids_cgroup(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``script`` (formatted with ``tests`` and ``cgroup``) in a new pids
    cgroup of its own, which it moves itself into first (``_IN_PIDS_CGROUP``:
    ``limit(value)`` sets the cgroup's limit); skips where none can be made."""
    parent = _pids_cgroup_parent()
    if parent is None:
        pytest.skip("no pids cgroup controller to set a process limit with")
    cgroup = os.path.join(parent, f"privsep-test-{os.getpid()}-{time.monotonic_ns()}")
    os.mkdir(cgroup)
    try:
        text = (_IN_PIDS_CGROUP + script).format(tests=str(Path(__file__).parent), cgroup=cgroup)
        return subprocess.run([sys.executable, "-c", text, *args], capture_output=True, text=True, timeout=120)
    finally:
        deadline = time.monotonic() + 5.0
        while True:
            try:
                os.rmdir(cgroup)
                break
            except OSError:  # (EBUSY: a process that just exited leaves the cgroup a moment later)
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)


_NO_PROCESS_LEFT_SCRIPT = """
with Broker(Policy(), root=tempfile.mkdtemp(), spawn=sys.argv[1]) as b:
    w = b.spawn(Echo)
    if b._zygote is not None:  # gone: the next spawn must start a new one
        b._zygote.waiting_spare()
        os.kill(b._zygote._proc.pid, signal.SIGKILL)
        b._zygote._proc.wait()
        while len(open(os.path.join({cgroup!r}, "cgroup.procs")).read().split()) > 2:
            time.sleep(0.01)  # (its spare dies with it)
    with open(os.path.join({cgroup!r}, "pids.current")) as f:
        limit(f.read().strip())  # no process more
    try:
        b.spawn(Echo)
        print("spawned", flush=True)
    except WorkerCrashed as exc:
        print("failed", exc, type(exc.__cause__).__name__, flush=True)
    limit("max")
    print("lifted", b.spawn(Echo).ping(), flush=True)
"""


@pytest.mark.parametrize("method", ["zygote", "fork", "exec"])
def test_a_spawn_at_a_process_limit_says_it_cannot_start_the_worker(method: str) -> None:
    """At a process limit, starting a new zygote (the last one gone), forking
    a worker from the broker, or exec'ing one raised a bare BlockingIOError;
    now a WorkerCrashed that names the class, as when the zygote cannot
    fork, with the OSError as its cause."""
    out = _run_in_pids_cgroup(_NO_PROCESS_LEFT_SCRIPT, method)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "failed cannot start Echo: [Errno 11] Resource temporarily unavailable BlockingIOError", "lifted pong"
    ], out.stderr


def test_a_zygote_that_cannot_fork_fails_the_spawn_and_keeps_its_workers(tmp_path: Path) -> None:
    """At a process limit (here a pids cgroup's), the zygote's fork on request
    raised in the zygote, which exited: the spawn failed as "the zygote has
    exited", and every worker it had made died with it. It answers with the
    error; the workers live on, and the same zygote serves once the limit is
    lifted."""
    out = _run_in_pids_cgroup(_PROCESS_LIMIT_SCRIPT)
    assert out.returncode == 0, out.stderr
    failed = "failed cannot start Echo: [Errno 11] the zygote cannot fork: Resource temporarily unavailable"
    assert out.stdout.splitlines() == [
        "spare pong", failed, failed, "the first worker pong True", "lifted pong True pong"
    ], out.stderr


_INTERRUPTED_SCRIPT = """
import os, signal, sys, tempfile, threading
sys.path.insert(0, {tests!r})
from conftest import proc_state, proc_table, wait_stopped
from broker import Broker, Policy
from protocol import Rights
from _zygote_workers import Appender, Echo

def interrupted(what, call, first=None, stop_in=None):
    # The zygote stopped (at once, or once the call enters `stop_in`), so that its
    # answer cannot come before the Ctrl-C.
    zygote = b._zygote._proc.pid

    def stop(frame=None, event="call", arg=None):
        if event == "call" and (frame is None or frame.f_code.co_name == stop_in):
            sys.setprofile(None)
            os.kill(zygote, signal.SIGSTOP)
            wait_stopped(zygote)

    if stop_in is None:
        stop()
    if first is not None:
        first()
    ctrl_c = threading.Timer(0.3, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT))
    ctrl_c.start()
    if stop_in is not None:
        sys.setprofile(stop)
    try:
        call()
        print(what, "not interrupted", flush=True)
    except KeyboardInterrupt:
        print(what, "interrupted", flush=True)
    finally:
        sys.setprofile(None)
        ctrl_c.join()
        os.kill(zygote, signal.SIGCONT)

root = tempfile.mkdtemp()
os.mkdir(os.path.join(root, "out"))
for name in "xy":
    open(os.path.join(root, "out", name), "w").close()
with Broker(Policy().allow("out/", Rights.WRITE), root=root, spawn="zygote") as b:
    ws = [b.spawn(Echo) for _ in range(3)]
    b._zygote.waiting_spare()
    if {case!r} == "reap":
        interrupted("stop", ws[0].stop)
    elif {case!r} in ("a spare let go", "fork on request"):
        # With grants: the spare, made ahead for Echo, is let go (its reap waited for), and the
        # worker forked on request.
        f = b.open("out/x", Rights.WRITE)
        stop_in = "_request_spawn" if {case!r} == "fork on request" else None
        interrupted("spawn", lambda: b.spawn(Appender, grants={{"f": f}}), stop_in=stop_in)
    else:  # the spawn waits for the spare that the spawn before asked for
        interrupted("spawn", lambda: b.spawn(Echo), first=lambda: ws.append(b.spawn(Echo)))
    for w in ws:  # (the first one's stop interrupted: asked again, its status is the one left unread)
        print("stop", w.stop(), flush=True)
    kept = [b.spawn(Echo), b.spawn(Appender, grants={{"f": b.open("out/y", Rights.WRITE)}})]
    print("spawn", [w.ping() for w in kept], flush=True)
    print("stop", b.spawn(Echo).stop(), flush=True)
    spare = b._zygote.waiting_spare()
    zygote = b._zygote._proc.pid
    others = [pid for pid, ppid, _ in proc_table() if ppid == zygote]
    left = set(others) - {{spare[0]}} - {{w.pid for w in ws + kept if w.exit is None}}
    print("left", [(pid, proc_state(pid)) for pid in left], flush=True)
    print("kept", b._zygote._statuses, b._zygote._let_go, flush=True)  # (each status taken by its stop)
"""


@pytest.mark.parametrize("case", ["reap", "a spare let go", "fork on request", "spare"])
def test_a_call_interrupted_while_it_waits_for_the_zygote_leaves_its_answer_to_no_later_call(case: str) -> None:
    """A Ctrl-C while the broker waited for the zygote's answer (the status of
    a stopped worker, or of a spare let go; a worker forked on request; a
    spare) left that answer
    unread, and the next request read it as its own: every later stop said
    "exit status unknown", a spawn failed with "zygote sent a malformed
    reply" or took another worker's pid, and a spare made for no one ran on.
    Each request is numbered now; an earlier one's answer is passed over,
    and a worker made for it ended and reaped; a status in it is kept for
    the stop asked again."""
    script = _INTERRUPTED_SCRIPT.format(tests=str(Path(__file__).parent), case=case)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    stopped = "stop ok: stopped, exit status 0"
    assert out.stdout.splitlines() == [
        "stop interrupted" if case == "reap" else "spawn interrupted",
        *[stopped] * (3 if case != "spare" else 4),
        "spawn ['pong', 'pong']",
        stopped,
        "left []",
        "kept {} set()",
    ], out.stderr


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


# -- workers made ahead ------------------------------------------------------
def _layers(report: dict[str, object]) -> dict[str, object]:
    return {k: v for k, v in report.items() if k not in ("entry_us", "ahead", "real_uid")}  # (per worker)


def test_a_spare_makes_a_worker_without_setup_ahead_inside_its_sandbox(tree: Path) -> None:
    with Broker(default_policy(), root=tree, spawn="zygote") as b:
        first = b.spawn(Echo)  # the first spare was forked before any class was known
        assert "ahead" not in first.sandbox
        first.kill()
        assert spare_made_ahead(b)
        spare = spare_of(b)
        assert spare is not None
        st = _wait_entered(spare[0])  # in its sandbox before anyone asked for it
        assert st["NoNewPrivs"] == "1" and int(st["CapEff"], 16) == 0 and int(st["CapPrm"], 16) == 0
        assert _netns(spare[0]) not in (_netns(os.getpid()), _netns(b._zygote._proc.pid))  # type: ignore[union-attr]
        w = b.spawn(Echo)
        assert w.pid == spare[0] and w.sandbox["ahead"] is True
        assert _layers(w.sandbox) == _layers(first.sandbox)  # the same sandbox as the spawn-time path
        assert w.ping() == "pong" and w.where() == spare[0]
        assert spare_made_ahead(b) and spare_of(b) != spare  # the next one is being made


def test_a_spare_made_ahead_is_let_go_for_another_class_or_for_grants(tree: Path) -> None:
    with Broker(default_policy(), root=tree, spawn="zygote") as b:
        b.spawn(Echo).kill()
        spare = spare_of(b)
        assert spare is not None and spare_made_ahead(b)
        before = open_fds(b)
        w = b.spawn(EchoWithSetup)
        assert w.pid != spare[0] and "ahead" not in w.sandbox and w.ping() == "pong"
        assert _gone(spare[0]), "the unused spare was left behind"
        w.kill()
        b.spawn(Echo).kill()
        spare = spare_of(b)
        assert spare is not None and spare_made_ahead(b)
        with b.opendir("data", READ) as d:
            g = b.spawn(Echo, grants={"d": d})
        assert g.pid != spare[0] and "ahead" not in g.sandbox and g.ping() == "pong"
        assert _gone(spare[0])
        g.kill()
        assert open_fds(b) == before


def test_a_spare_made_ahead_refuses_any_other_request_itself(tree: Path) -> None:
    """The broker never sends it one; if it did, the spare alone refuses."""
    with Broker(default_policy(), root=tree, spawn="zygote") as b:
        b.spawn(Echo).kill()
        zygote = b._zygote
        assert zygote is not None and spare_made_ahead(b)
        assert zygote._spare is not None
        zygote._spare.ahead = None  # the broker forgets what it was made for
        with pytest.raises(WorkerCrashed, match=r"this spare was made for .*Echo without grants"):
            b.spawn(EchoWithSetup)
        assert b.spawn(Echo).ping() == "pong"


def test_setup_ahead_runs_setup_before_the_request(tree: Path) -> None:
    with Broker(default_policy(), root=tree, spawn="zygote") as b:
        b.spawn(Eager).kill()
        spare = spare_of(b)
        assert spare is not None and spare_made_ahead(b)
        _wait_entered(spare[0])
        asked = time.monotonic()
        w = b.spawn(Eager)
        assert w.pid == spare[0] and w.sandbox["ahead"] is True
        assert w.when_set_up() < asked
        b.spawn(EchoWithSetup).kill()  # a setup() without the promise is never run ahead
        assert not spare_made_ahead(b)


def test_a_setup_that_fails_ahead_fails_the_spawn_as_it_would_have(tree: Path) -> None:
    with Broker(default_policy(), root=tree, spawn="zygote") as b:
        b.spawn(Echo).kill()
        before = open_fds(b)
        ahead = []
        for _ in range(3):  # a spare made for Echo; then spares that tried FailsAhead while waiting
            ahead.append(spare_made_ahead(b) and b._zygote._spare.ahead[1] == "FailsAhead")  # type: ignore[union-attr]
            with pytest.raises(WorkerCrashed, match=r"setup or sandbox entry failed: .*model file is missing") as info:
                b.spawn(FailsAhead)
            assert info.value.exit is not None and info.value.exit.kind == "crashed"
        assert ahead == [False, True, True]
        assert b.workers == []
        assert open_fds(b) == before


def _children(pid: int) -> set[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return {int(x) for x in f.read().split()}


def test_spares_made_ahead_and_let_go_leak_nothing(tree: Path) -> None:
    """Spawns that take a spare made ahead, let it go for another class or for
    grants, or find a spare that is not made ahead, in turn: afterwards the
    broker holds the fds it held, and the zygote has no child but its spare."""
    with Broker(default_policy(), root=tree, spawn="zygote") as b:
        b.spawn(Echo).kill()
        zygote = b._zygote
        assert zygote is not None
        before = open_fds(b)
        taken = []
        with b.opendir("data", READ) as d:
            before_dir = open_fds(b)
            for i in range(40):
                for cls, grants in ((Echo, None), (Echo, None), (EchoWithSetup, None), (Echo, {"d": d}), (Eager, None)):
                    w = b.spawn(cls, grants=grants)
                    taken.append(w.sandbox.get("ahead", False))
                    if i % 10 == 0:
                        assert w.ping() == "pong"
                    w.kill()
            assert open_fds(b) == before_dir
        assert open_fds(b) == before
        spare = spare_of(b)
        assert spare is not None and _children(zygote._proc.pid) == {spare[0]}
        # Each round: Echo (the spare was made for the last round's Eager: let go, except in
        # round one), Echo (made ahead), EchoWithSetup (let go), Echo with grants and Eager
        # (their spares were not made ahead: a setup() without the promise, a spec with fd rules).
        assert taken == [True, True, False, False, False] + [False, True, False, False, False] * 39


def test_a_spare_let_go_in_the_middle_of_a_long_setup_does_not_hold_up_the_spawn(tree: Path) -> None:
    with Broker(default_policy(), root=tree, spawn="zygote") as b:
        b.spawn(SlowAhead).kill()  # its setup() on request: 1.5 s, while the next spare makes one ahead
        w = b.spawn(SlowAhead)  # that one, at once; the spare after it begins its setup() now
        assert w.sandbox["ahead"] is True
        spare = spare_of(b)
        assert spare is not None and spare_made_ahead(b)
        assert _status(spare[0])["Seccomp"] == "0"  # still in setup(), not yet in its sandbox
        t0 = time.monotonic()
        w = b.spawn(Echo)
        assert time.monotonic() - t0 < 1.0, "the spawn waited for the unused spare's setup()"
        assert w.ping() == "pong" and _gone(spare[0])


def test_broker_returns_with_its_zygote_and_first_spare_up_and_keeps_just_those(tree: Path) -> None:
    """What a soak test counts before and after: right after Broker() the zygote
    has one child, its first spare; after spawn/kill cycles, one again; after
    close(), neither is left."""
    with Broker(default_policy(), root=tree, spawn="zygote") as b:
        zygote = b._zygote
        assert zygote is not None
        zpid = zygote._proc.pid
        assert len(_children(zpid)) == 1
        fds = open_fds(b)
        for _ in range(20):
            b.spawn(Echo).kill()
        assert len(_children(zpid)) == 1 and open_fds(b) == fds
        spare = spare_of(b)
        assert spare is not None
    assert _gone(zpid) and _gone(spare[0])


def test_a_zygote_that_dies_during_a_spawn_fails_it_and_its_pidfd_is_never_used(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker dies with its zygote and init may reap it, freeing the pid: the
    broker must not keep (or ever signal through) a pidfd opened on it then."""
    from broker._zygote import Zygote

    with Broker(default_policy(), root=tree, spawn="zygote") as b:
        b.spawn(Echo).kill()
        before = open_fds()
        real = Zygote.spawn

        def spawn_then_lose_the_zygote(self: Zygote, *args: object, **kwargs: object) -> object:
            got = real(self, *args, **kwargs)  # type: ignore[arg-type]
            os.kill(self._proc.pid, signal.SIGKILL)
            self._proc.wait()
            return got

        monkeypatch.setattr(Zygote, "spawn", spawn_then_lose_the_zygote)
        with pytest.raises(WorkerCrashed, match="its zygote died while starting it"):
            b.spawn(Echo)
        monkeypatch.undo()
        assert b.workers == []
        w = b.spawn(Echo)  # a new zygote
        assert w.ping() == "pong"
        w.kill()
        assert len(open_fds()) == len(before)  # the new zygote's two channels for the old one's


_PLANTED = "import pathlib\npathlib.Path({marker!r}).write_text(__name__)\nraise ImportError('planted')\n"


@pytest.mark.parametrize("method", ["zygote", "exec"])
def test_nothing_is_imported_from_the_directory_the_broker_runs_in(
    tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    """The interpreters the broker execs (zygote, exec'd worker, restricted
    opener) run with its authority: modules lying in the directory it is run
    from (a downloads folder of hostile input, say) must not be imported."""
    planted = tmp_path / "downloads"
    planted.mkdir()
    marker = tmp_path / "imported"
    for name in ("protocol", "worker", "broker", "msgpack", "random", "signal"):
        (planted / f"{name}.py").write_text(_PLANTED.format(marker=str(marker)))
    monkeypatch.chdir(planted)
    policy = Policy().allow("out/", Rights.READ | Rights.WRITE | Rights.SEEK | Rights.FSTAT | Rights.CREATE)
    with Broker(policy, root=tree, spawn=method) as b:
        w = b.spawn(Appender)
        assert (w.ping(), w.spawn_method) == ("pong", method)
        # Write without FTRUNCATE, granted after entry: reopened by the restricted opener.
        (tree / "out" / "log").write_bytes(b"")
        with b.open("out/log", Rights.READ | Rights.WRITE | Rights.SEEK | Rights.FSTAT) as cap:
            assert w.append(cap, b"line") == 4
        assert b._opener_proc is not None
    assert (tree / "out" / "log").read_bytes() == b"line"
    assert not marker.exists(), f"{marker.read_text()} was imported from the broker's directory"


@pytest.mark.parametrize("method", ["zygote", "exec", "fork"])
def test_environ_is_all_of_the_environment_workers_get(
    tree: Path, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    """A compromised worker can read its environment and say it back (in a
    result, in an exception's message): Broker(environ=...) keeps the
    broker's variables, say an API key, out of the zygote and the workers."""
    monkeypatch.setenv("PRIVSEP_TEST_SECRET", "hunter2")
    with Broker(Policy(), root=tree, spawn=method, environ={"LANG": "C.UTF-8", "ONLY": "this"}) as b:
        w = b.spawn(Environ)
        got = w.environ()
        assert w.spawn_method == method
        for when in ("setup", "serving"):
            env = got[when]
            assert env.pop("PYTHONPATH"), when  # the broker's import path, always
            assert env == {"LANG": "C.UTF-8", "ONLY": "this"}, when
        if method != "fork":  # (a forked worker's memory is a copy of the broker's: see the README)
            started = [w.pid] + ([b._zygote._proc.pid] if b._zygote is not None else [])
            for pid in started:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    assert b"hunter2" not in f.read(), pid
    with Broker(Policy(), root=tree, spawn=method) as b:
        assert b.spawn(Environ).environ()["serving"]["PRIVSEP_TEST_SECRET"] == "hunter2"  # the default: inherited


def test_an_environ_that_cannot_be_an_environment_is_refused(tree: Path) -> None:
    for bad, error in [({"A=B": "x"}, ValueError), ({"": "x"}, ValueError), ({"A": "x\0y"}, ValueError),
                       ({"A": 1}, TypeError), ({1: "x"}, TypeError), (["A"], TypeError)]:
        with pytest.raises(error):
            Broker(Policy(), root=tree, environ=bad)  # type: ignore[arg-type]


_FLAGS_SCRIPT = """
import sys, tempfile
sys.path.insert(0, {tests!r})
from broker import Broker, Policy
from _zygote_workers import Flags
for method in ("zygote", "exec"):
    with Broker(Policy(), root=tempfile.mkdtemp(), spawn=method) as b:
        print(method, *b.spawn(Flags).flags(), flush=True)
"""


def test_workers_run_with_the_brokers_interpreter_flags() -> None:
    """``python -O`` or ``-X dev`` for the broker holds for its workers, as for
    multiprocessing's children (the zygote is a fresh interpreter)."""
    script = _FLAGS_SCRIPT.format(tests=str(Path(__file__).parent))
    out = subprocess.run([sys.executable, "-O", "-X", "dev", "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["zygote 1 True 1 True", "exec 1 True 1 True"]


_SIGCHLD_SCRIPT = """
import signal, sys, tempfile
sys.path.insert(0, {tests!r})
signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # a server's way to have its children reaped for it
from broker import Broker, Policy
from protocol import WorkerCrashed
from _zygote_workers import Quitter
for method in ("zygote", "fork"):
    with Broker(Policy(), root=tempfile.mkdtemp(), spawn=method) as b:
        w = b.spawn(Quitter)
        try:
            w.quit(3)
        except WorkerCrashed:
            pass
        print(method, w.exit.exit_code, w.exit.reason, flush=True)
"""


def test_a_broker_that_ignores_sigchld_still_learns_how_zygote_workers_end() -> None:
    """An ignored SIGCHLD passes through exec: the zygote's workers were
    reaped by the kernel and their ends were unknown. (A forked worker's
    end stays unknown, and the reason says why.)"""
    script = _SIGCHLD_SCRIPT.format(tests=str(Path(__file__).parent))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    zygote, fork = out.stdout.splitlines()
    assert zygote == "zygote 3 exited with status 3"
    assert fork.startswith("fork None channel closed; exit status unknown: this process ignores SIGCHLD")


_SIGCHLD_DISPOSITION_SCRIPT = """
import signal, sys, tempfile
sys.path.insert(0, {tests!r})
signal.signal(signal.SIGCHLD, signal.SIG_IGN)
from broker import Broker, Policy
from _zygote_workers import Alarmed
for method in ("zygote", "fork", "exec"):
    with Broker(Policy(), root=tempfile.mkdtemp(), spawn=method) as b:
        print(method, b.spawn(Alarmed).sigchld(), flush=True)
"""


def test_a_brokers_ignored_sigchld_is_not_its_workers() -> None:
    """A forked worker kept the broker's ignored SIGCHLD (the zygote and an
    exec'd worker reset it): a subprocess.run() of its own (allow-fork, no
    sandbox) found its child reaped by the kernel (a README audit)."""
    script = _SIGCHLD_DISPOSITION_SCRIPT.format(tests=str(Path(__file__).parent))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [f"{m} {int(signal.SIG_DFL)}" for m in ("zygote", "fork", "exec")]


_SIGMASK_SCRIPT = """
import signal, sys, tempfile
sys.path.insert(0, {tests!r})
signal.pthread_sigmask(signal.SIG_BLOCK, {{signal.SIGALRM, signal.SIGTERM, signal.SIGUSR1}})  # the broker's own affair
from broker import Broker, Policy
from _zygote_workers import Alarmed
for method in ("zygote", "fork", "exec"):
    with Broker(Policy(), root=tempfile.mkdtemp(), spawn=method) as b:
        print(method, *b.spawn(Alarmed).alarm_goes_off(), flush=True)
"""


def test_signals_the_broker_blocks_are_not_blocked_in_its_workers() -> None:
    """A signal mask passes through fork and exec: a worker's setitimer()
    bounding its own parse never went off under a broker that blocks SIGALRM."""
    script = _SIGMASK_SCRIPT.format(tests=str(Path(__file__).parent))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["zygote True []", "fork True []", "exec True []"]


def _local_class() -> type[Worker]:
    class Local(Worker):
        @rpc
        def where(self) -> int:
            return os.getpid()

    return Local


def test_a_class_no_interpreter_can_find_is_forked_and_said_so_once(tree: Path) -> None:
    """A class defined in a function cannot reach the zygote: spawn="auto"
    forks its workers from the broker, which gives them a copy of the
    broker's memory. That happened silently; it now warns, once per class,
    at the caller's line (spawn, aspawn, pool)."""
    import asyncio
    import warnings

    local, other = _local_class(), _local_class()
    with Broker(Policy(), root=tree) as b:
        with pytest.warns(RuntimeWarning, match=r"_local_class.<locals>.Local cannot be found by name .* forked from "
                                                r"the broker and hold a copy of its memory") as got:
            w = b.spawn(local)
        assert [Path(r.filename).name for r in got] == ["test_zygote.py"]
        assert w.spawn_method == "fork" and w.where() == w.pid
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            b.spawn(local).stop()  # said once
            assert b.spawn(Echo).spawn_method == "zygote"  # a module-level class: silently
        async def main() -> None:
            await b.aspawn(other)  # the line the warning names

        with pytest.warns(RuntimeWarning, match="cannot be found by name") as got:
            asyncio.run(main())
        assert [Path(r.filename).name for r in got] == ["test_zygote.py"]
        with pytest.warns(RuntimeWarning, match="cannot be found by name") as got:
            pool = b.pool(_local_class(), size=1)
        assert [Path(r.filename).name for r in got] == ["test_zygote.py"]
        pool.shutdown()
    with warnings.catch_warnings(), Broker(Policy(), root=tree, spawn="fork") as b:
        warnings.simplefilter("error")
        assert b.spawn(_local_class()).spawn_method == "fork"  # asked for: nothing to say


def test_a_worker_shares_no_buffer_with_its_zygote(tree: Path) -> None:
    """Receive buffers were MAP_SHARED (Python's default for an anonymous
    mmap), which fork() keeps shared: a worker could read every message the
    broker sent its zygote and rewrite the next one, to kill the zygote and
    every worker with it, or have it run a file of the worker's own as the
    main script, outside the sandbox (found by a red-team run). A forked
    child now gets the zygote's buffers unmapped, and if not, private and
    wiped."""
    with Broker(Policy(), root=tree) as b:
        honest = b.spawn(Echo)
        w = b.spawn(Snoop)
        assert w.spawn_method == "zygote"
        seen = w.snoop()
        assert seen["nonzero"] == 0, seen  # nothing of the broker's messages to read
        assert seen["found"] >= 1  # the zygote's channels were there to find
        # What the worker wrote reached no zygote: it still serves spawns, its workers live.
        for _ in range(3):
            assert b.spawn(Echo).ping() == "pong"
        assert honest.ping() == "pong" and w.alive


def test_a_channels_buffer_is_private_and_wiped_in_a_forked_child() -> None:
    """Beneath the unmapping: a child that still has a Channel's buffer
    (any fork, any path) sees zeros there, and what it writes stays its own."""
    from protocol._wire import Channel

    a, b = Channel.pair()
    try:
        a.send({"t": "secret", "v": "the broker's message"})
        assert b.recv() == {"t": "secret", "v": "the broker's message"}
        before = bytes(b._buf[:64])
        assert before.count(0) < 64
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                seen = bytes(b._buf[:64])
                b._buf[:64] = b"\xc1" * 64
                os.write(w, b"zero" if seen == bytes(64) else b"seen")
            finally:
                os._exit(0)
        os.close(w)
        assert os.read(r, 4) == b"zero"
        os.close(r)
        os.waitpid(pid, 0)
        assert bytes(b._buf[:64]) == before  # the child's write did not reach the parent
    finally:
        a.close()
        b.close()


def test_a_spawn_request_to_a_zygote_that_died_says_so(tree: Path) -> None:
    """A zygote that died since it was last seen alive: the request's send
    raised a bare BrokenPipeError (seen in a red-team run)."""
    from broker._zygote import _request_spawn

    with Broker(Policy(), root=tree) as b:
        assert b.spawn(Echo).ping() == "pong"
        zygote = b._zygote
        assert zygote is not None
        zygote._proc.kill()
        zygote._proc.wait()
        with pytest.raises(WorkerCrashed, match="the zygote has exited"):
            _request_spawn(zygote._chan, Echo, None, 5.0, [])
        assert b.spawn(Echo).ping() == "pong"  # the next spawn starts a new one


def test_a_zygote_runs_no_main_script_but_its_brokers(tree: Path) -> None:
    """Beneath the private buffers: whatever a request names, the zygote
    loads no file as a main script but its broker's own (a forged request
    once named a worker's memfd, run as Python with the zygote's authority)."""
    mark = tree / "ran"
    script = tree / "other.py"
    script.write_text(f"open({str(mark)!r}, 'w').close()\nclass X: pass\n")
    with Broker(Policy(), root=tree) as b:
        assert b.spawn(Echo).ping() == "pong"
        zygote = b._zygote
        assert zygote is not None
        zygote._chan.send({"t": "load", "module": f"__main__:{script}", "qualname": "X"})
        assert zygote._chan.wait_readable(10)
        reply = zygote._chan.recv()
        assert reply["t"] == "error" and "is not its broker's main script" in reply["e"]["msg"], reply
        assert not mark.exists()
        assert b.spawn(Echo).ping() == "pong"


def test_a_zygote_that_answers_late_is_replaced_not_read_out_of_turn(tree: Path) -> None:
    """A reap or spawn request that timed out left its answer queued: every
    later exchange read the answer to the one before (spawns failed with
    'malformed reply', a handle got another process's pid, ends were lost;
    a red-team run stopped the zygote for 11 s). A zygote that does not
    answer in time is now ended; the next spawn starts a new one."""
    with Broker(Policy(), root=tree) as b:
        w = b.spawn(Echo)
        zygote = b._zygote
        assert zygote is not None
        os.kill(zygote._proc.pid, signal.SIGSTOP)
        try:
            with zygote._lock:
                assert zygote._reap_locked(w.pid, 0.2) is None  # no answer in time
        finally:
            with contextlib.suppress(ProcessLookupError):  # (killed and reaped by now: alive() says so at once)
                os.kill(zygote._proc.pid, signal.SIGCONT)
        assert not zygote.alive()
        zygote._proc.wait(5)  # ended, not left to answer late
        for _ in range(3):  # exchanges after it read their own answers
            other = b.spawn(EchoWithSetup)
            assert other.ping() == "pong" and other.where() == other.pid
            assert other.stop().kind == "ok"
        assert b._zygote is not zygote
