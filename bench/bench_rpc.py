"""RPC round trip: privsep against a raw socketpair + msgpack ping-pong.

Cases, each timed call by call (``perf_counter_ns``), median and p90:

* ``ping``   a call with no fd: ``w.ping()`` against the raw ping-pong
  (a forked child echoing msgpack over a SOCK_SEQPACKET socketpair).
* ``take``   a call passing one fd grant broker -> worker (a capability
  opened once, passed each call): ``w.take(cap)`` against the raw ping-pong
  with the same fd attached by ``sendmsg``/SCM_RIGHTS.
* ``grant``  a call in which the worker asks the broker for a file, gets
  the fd back and reads 4 bytes: ``w.grant()`` (``self.broker.open``)
  against the raw exchange doing the same work (call -> request -> the
  parent opens the file beneath a directory fd and sends it -> the child
  reads 4 bytes -> reply): two round trips, one carrying an fd.
* ``give``   a call whose answer carries an fd: the worker returns a file
  it holds (granted at spawn) and the broker closes the capability it gets:
  ``w.give()`` against the raw ping-pong answering with that fd attached.
* ``aio``    ``await w.aio.ping()`` against the same raw floor, and against
  a raw asyncio ping-pong (``loop.sock_recv``) to show asyncio's own cost.
* ``bulk``   a call passing a list of 2,000 ints, answered with it:
  ``w.echo(ints)`` against the raw ping-pong packing and unpacking the same
  list both ways. No target: it shows what privsep's checks of the data
  cost (the wire check on both sides, the broker's export and import).

Headline: privsep with the default sandbox (whatever the default spawn and
sandbox settings are), with the unsandboxed framework (``UNSANDBOXED``)
alongside. Every case runs pinned (all processes and threads on CPU 0, the
zygotes too: as under ``taskset -c 0``), unpinned, and split
(this process on CPU 0, the peers on CPU 1: what an unpinned run costs when
the scheduler puts the two ends on different cores).
The grant latency is measured with ``request_rate=None``; the default
per-worker request rate limit is measured on its own at the end (its cost,
and a low limit holding a worker to its rate), and so is
the audit log: pinned grant calls (one event each) with the
``privsep.audit`` logger off, into a NullHandler, and into a FileHandler.
Then a worker's own ``self.broker.open()`` timed inside the worker (pinned
and unpinned), against a raw child whose request is answered with the fd
attached (the parent opening it beneath a directory fd), and against the
same raw child answered through privsep's own policy check and secure open
(``Resolver.locate`` and ``Resolver.open``, no RPC layer): what the security
work costs, and what the RPC layer adds on top of it. Last, pinned, where
the code sits: grant, take and ping in the headline worker against a worker
forked from this process (``spawn="fork"``, its interpreter at the
broker's addresses; the exec'd zygote's is elsewhere under address-space
randomisation), and the raw floor's forked peer against an exec'd one
(``setarch -R`` runs it all without randomisation). Grants
carry READ|SEEK|FSTAT (delivered as the file itself); ``take-pipe`` passes
a READ-only grant, which privsep delivers as a pipe fed by a broker thread.

Run from the repository root:  python3 -m bench.bench_rpc [--quick]
"""

from __future__ import annotations

import argparse
import array
import asyncio
import functools
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import msgpack

from bench._common import (
    DATA_DIR,
    DATA_FILE,
    GRANT_RIGHTS,
    PIPE_RIGHTS,
    PLACEMENT_TEXT,
    PLACEMENTS,
    BenchWorker,
    Stats,
    data_root,
    interleave,
    machine_line,
    make_broker,
    place,
    print_table,
    ratio,
    sandbox_status,
    us,
)
from broker import Policy
from broker._resolve import Resolver
from protocol import Rights

BUF = 256 * 1024
ANC = socket.CMSG_SPACE(4 * array.array("i").itemsize)
CLOEXEC = getattr(socket, "MSG_CMSG_CLOEXEC", 0x40000000)
ADDR_NO_RANDOMIZE = 0x0040000  # personality(2) flag: setarch -R
OPEN_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK


def _fds_of(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - len(data) % arr.itemsize])
            fds.extend(arr)
    return fds


def _echo(sock: socket.socket, held: int) -> NoReturn:
    """The raw child: answer calls, like a worker would, with nothing else."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    packb, unpackb = msgpack.packb, msgpack.unpackb
    give = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [held]))]
    try:
        while True:
            data, anc, _, _ = sock.recvmsg(BUF, ANC, CLOEXEC)
            if not data:
                break
            for fd in _fds_of(anc):
                os.close(fd)
            msg = unpackb(data, raw=False)
            if msg["m"] == "grant":
                sock.sendmsg([packb({"t": "req", "id": 1, "op": "open", "a": {"path": DATA_FILE, "rights": 1}})])
                rep, anc, _, _ = sock.recvmsg(BUF, ANC, CLOEXEC)
                unpackb(rep, raw=False)
                (fd,) = _fds_of(anc)
                value: Any = os.read(fd, 4)
                os.close(fd)
            elif msg["m"] == "echo":
                value = msg["a"][0]
            elif msg["m"] == "give":
                sock.sendmsg([packb({"t": "ret", "id": msg["id"], "v": 0})], give)
                continue
            else:
                value = 1
            sock.sendmsg([packb({"t": "ret", "id": msg["id"], "v": value})])
    finally:
        os._exit(0)


_EXEC_ECHO = (
    "import socket, sys; sys.path.insert(0, sys.argv[1]); from bench.bench_rpc import _echo; "
    "_echo(socket.socket(fileno=int(sys.argv[2])), int(sys.argv[3]))"
)


class RawPeer:
    """The floor: a forked child echoing msgpack over a SEQPACKET socketpair.

    ``exec_peer``: the child is a fresh interpreter instead (exec'd, as
    privsep's zygote is), so its code sits at other addresses than this
    process's (address-space randomisation), as a zygote worker's does."""

    def __init__(self, root: str, *, exec_peer: bool = False):
        self.sock, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.fd = os.open(os.path.join(root, DATA_FILE), OPEN_FLAGS)
        self.proc: subprocess.Popen[bytes] | None = None
        if exec_peer:
            here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            argv = [sys.executable, "-c", _EXEC_ECHO, here, str(child.fileno()), str(self.fd)]
            self.proc = subprocess.Popen(argv, pass_fds=(child.fileno(), self.fd))
            pid = self.proc.pid
        else:
            pid = os.fork()
            if pid == 0:
                self.sock.close()
                _echo(child, self.fd)
        child.close()
        self.pid = pid
        self.dirfd = os.open(os.path.join(root, DATA_DIR), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [self.fd]))]
        self.ids = 0

    def _call(self, method: str, args: list[Any]) -> bytes:
        self.ids += 1
        return msgpack.packb({"t": "call", "id": self.ids, "m": method, "a": args, "k": {}})

    def ping(self) -> Any:
        self.sock.sendmsg([self._call("ping", [])])
        return msgpack.unpackb(self.sock.recv(BUF), raw=False)["v"]

    def take(self) -> Any:
        self.sock.sendmsg([self._call("take", [0])], self.anc)
        return msgpack.unpackb(self.sock.recv(BUF), raw=False)["v"]

    def give(self) -> Any:
        self.sock.sendmsg([self._call("give", [])])
        data, anc, _, _ = self.sock.recvmsg(BUF, ANC, CLOEXEC)
        for fd in _fds_of(anc):
            os.close(fd)
        return msgpack.unpackb(data, raw=False)["v"]

    def grant(self) -> Any:
        self.sock.sendmsg([self._call("grant", [])])
        req = msgpack.unpackb(self.sock.recv(BUF), raw=False)
        fd = os.open(os.path.basename(req["a"]["path"]), OPEN_FLAGS, dir_fd=self.dirfd)
        try:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
            self.sock.sendmsg([msgpack.packb({"t": "rep", "id": req["id"], "v": 0})], anc)
        finally:
            os.close(fd)
        return msgpack.unpackb(self.sock.recv(BUF), raw=False)["v"]

    def echo(self, value: Any) -> Any:
        self.sock.sendmsg([self._call("echo", [value])])
        return msgpack.unpackb(self.sock.recv(BUF), raw=False)["v"]

    async def aping(self, loop: asyncio.AbstractEventLoop) -> Any:
        self.sock.send(self._call("ping", []))
        return msgpack.unpackb(await loop.sock_recv(self.sock, BUF), raw=False)["v"]

    def close(self) -> None:
        self.sock.close()
        os.close(self.fd)
        os.close(self.dirfd)
        if self.proc is not None:
            self.proc.wait()
        else:
            os.waitpid(self.pid, 0)


#: (privsep case, raw floor case, what it is)
KINDS = (
    ("ping", "ping", "call, no fd"),
    ("take", "take", "call passing 1 fd"),
    ("take-pipe", "take", "same, READ-only grant (travels as a pipe fed by a broker thread)"),
    ("grant", "grant", "worker asks for a file, gets the fd, reads 4 bytes"),
    ("give", "give", "call answered with an fd (the worker returns a file it holds)"),
    ("aio.ping", "ping", "asyncio ping-pong (loop.sock_recv), vs the sync raw ping"),
    ("bulk", "bulk", "call passing 2,000 ints, answered with them (no target)"),
)
BULK = list(range(-1000, 1000))
NO_TARGET = frozenset({"bulk"})


def _give(w: Any) -> None:
    w.give().close()  # the capability is the caller's to close, as the raw floor closes its fd


def time_async(make: Callable[[], Any], n: int, rounds: int, warmup: int) -> list[int]:
    """Time ``await make()`` call by call inside one event loop."""

    async def run() -> list[int]:
        for _ in range(warmup):
            await make()
        clock = time.perf_counter_ns
        out: list[int] = []
        for _ in range(n * rounds):
            t0 = clock()
            await make()
            out.append(clock() - t0)
        return out

    return asyncio.run(run())


def bench(root: str, n: int, rounds: int, warmup: int, placements: Sequence[str]) -> None:
    ok, why = sandbox_status(root)
    print(machine_line())
    if ok:
        print(f"sandbox: default spawn works; layers: {why}")
    else:
        print(f"sandbox: default spawn FAILS ({why}); showing the unsandboxed framework only")

    raw = RawPeer(root)
    brokers: list[tuple[str, Any]] = []
    if ok:
        brokers.append(("sandboxed", make_broker(root, sandboxed=True, request_rate=None)))
    brokers.append(("unsandboxed", make_broker(root, sandboxed=False, request_rate=None)))
    # started now, so that it runs the same code as the others even if the tree changes under a long run
    limited = make_broker(root, sandboxed=ok)
    handles: dict[str, Any] = {}
    givers: dict[str, Any] = {}  # a worker holding a file from spawn, for `give`
    caps: list[Any] = []
    try:
        limited_worker = limited.spawn(BenchWorker)
        for label, b in brokers:
            handles[label] = b.spawn(BenchWorker)
            caps.append(b.open(DATA_FILE, GRANT_RIGHTS))
            caps.append(b.open(DATA_FILE, PIPE_RIGHTS))
            with b.open(DATA_FILE, GRANT_RIGHTS) as held:
                givers[label] = b.spawn(BenchWorker, grants={"data": held})
        method = handles[brokers[0][0]].spawn_method
        print(f"privsep spawn method: {method}; {n} calls x {rounds} rounds per case, {warmup} warm-up")
        assert raw.ping() == raw.take() == 1 and raw.grant() == b"\x00\x01\x02\x03" and raw.give() == 0
        assert raw.echo(BULK) == BULK
        for h in handles.values():
            assert h.ping() == 1 and h.grant() == b"\x00\x01\x02\x03" and h.echo(BULK) == BULK
        for g in givers.values():
            with g.give() as cap:
                assert os.pread(cap.fileno(), 4, 0) == b"\x00\x01\x02\x03"
        headline = brokers[0][0]
        peers = [raw.pid, *(h.pid for h in handles.values()), *(g.pid for g in givers.values())]
        for placement in placements:
            place(peers, placement)
            cases: dict[str, Callable[[], object]] = {
                "raw ping": raw.ping,
                "raw take": raw.take,
                "raw grant": raw.grant,
                "raw give": raw.give,
                "raw bulk": functools.partial(raw.echo, BULK),
            }
            for i, (label, _) in enumerate(brokers):
                h = handles[label]
                cases[f"{label} ping"] = h.ping
                cases[f"{label} take"] = functools.partial(h.take, caps[2 * i])
                cases[f"{label} take-pipe"] = functools.partial(h.take, caps[2 * i + 1])
                cases[f"{label} grant"] = h.grant
                cases[f"{label} give"] = functools.partial(_give, givers[label])
                cases[f"{label} bulk"] = functools.partial(h.echo, BULK)
            res = interleave(cases, n, rounds, warmup)
            # asyncio: the raw socket goes non-blocking for this part only
            raw.sock.setblocking(False)
            try:
                araw = time_async(lambda: raw.aping(asyncio.get_running_loop()), n, rounds, warmup)
                res["raw aio.ping"] = Stats(araw)
            finally:
                raw.sock.setblocking(True)
            for label, _ in brokers:
                res[f"{label} aio.ping"] = Stats(time_async(handles[label].aio.ping, n, rounds, warmup))

            rows: list[list[str]] = []
            for kind, floor_kind, what in KINDS:
                floor = res[f"raw {floor_kind}"]
                if kind == floor_kind:
                    rows.append([f"raw {kind}: {what}", us(floor.median), us(floor.p90), "1.00x", ""])
                elif kind == "aio.ping":
                    s = res["raw aio.ping"]
                    rows.append([f"raw {kind}: {what}", us(s.median), us(s.p90), ratio(s.median, floor.median), ""])
                for label, _ in brokers:
                    s = res[f"{label} {kind}"]
                    met = "-" if kind in NO_TARGET else "yes" if s.median <= 1.5 * floor.median else "NO"
                    rows.append(
                        [f"privsep {label} {kind}", us(s.median), us(s.p90), ratio(s.median, floor.median), met]
                    )
            print_table(
                f"RPC round trip, {PLACEMENT_TEXT[placement]}\n"
                f"(headline: privsep {headline}; ratio = median / median of the raw case above it; "
                f"<=1.5x: the project's target, within 1.5 times the raw floor)",
                ["case", "median us", "p90 us", "vs raw", "<=1.5x"],
                rows,
            )
        place(peers, "unpinned")
        _rate_limit_note(root, ok, limited, limited_worker, handles[brokers[0][0]], n, rounds)
        _audit_note(handles[brokers[0][0]], n, rounds)
        _worker_open_note(root, brokers[0][1].policy, handles[brokers[0][0]], n, rounds, placements)
        if "pinned" in placements:
            _layout_note(root, ok, handles[brokers[0][0]], caps[0], n, rounds, warmup)
    finally:
        limited.close()
        for cap in caps:
            cap.close()
        for _, b in brokers:
            b.close()
        raw.close()


def _raw_open_times(root: str, n: int, secure: Resolver | None = None) -> list[int]:
    """The floor for a worker's own request answered with an fd: a forked
    child sends ``n`` msgpack requests over a SEQPACKET socketpair; this
    process opens the file beneath a directory fd and answers each with the
    fd attached. The child times each request to its fd in hand (closing it
    outside the timed part) and sends the times back.

    With ``secure`` (privsep's resolver for ``root``), the parent
    answers as privsep's broker decides and opens, with no RPC layer around
    it: the policy check (``locate``), then the open beneath the grant
    (openat2 O_PATH with RESOLVE_BENEATH, fstat, reopen through
    /proc/self/fd)."""
    ours, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            ours.close()
            os.close(r)
            packb, unpackb, clock = msgpack.packb, msgpack.unpackb, time.perf_counter_ns
            want = int(GRANT_RIGHTS)  # what BenchWorker.opens() asks for
            times = []
            for i in range(n):
                t0 = clock()
                child.send(packb({"t": "req", "id": i, "op": "open", "a": {"path": DATA_FILE, "rights": want}}))
                data, anc, _, _ = child.recvmsg(BUF, ANC, CLOEXEC)
                unpackb(data, raw=False)
                (fd,) = _fds_of(anc)
                times.append(clock() - t0)
                os.close(fd)
            with os.fdopen(w, "wb") as out:
                out.write(packb(times))
        finally:
            os._exit(0)
    child.close()
    os.close(w)
    got = os.fdopen(r, "rb")
    dirfd = os.open(os.path.join(root, DATA_DIR), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for _ in range(n):
            req = msgpack.unpackb(ours.recv(BUF), raw=False)
            if secure is None:
                fd = os.open(os.path.basename(req["a"]["path"]), OPEN_FLAGS, dir_fd=dirfd)
            else:
                rights = Rights(req["a"]["rights"])
                fd = secure.open(secure.locate(req["a"]["path"], rights), rights).detach()
            try:
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())]
                ours.sendmsg([msgpack.packb({"t": "rep", "id": req["id"], "v": 0})], anc)
            finally:
                os.close(fd)
        times = msgpack.unpackb(got.read())
    finally:
        os.close(dirfd)
        ours.close()  # (a child still waiting for a reply reads EOF and exits)
        got.close()
        os.waitpid(pid, 0)
    return times


def _worker_open_note(root: str, policy: Policy, w: Any, n: int, rounds: int, placements: Sequence[str]) -> None:
    """A worker's own ``self.broker.open()`` timed inside the worker, against
    the raw request answered with an fd, in interleaved blocks; and against
    the same raw request answered through privsep's own policy check and
    secure open, which splits the gap into what the security work costs and
    what the RPC layer adds."""
    saved = (os.sched_getaffinity(0), os.sched_getaffinity(w.pid))
    resolver = Resolver(policy, root)
    try:
        for placement in [p for p in placements if p != "split"]:
            place([w.pid], placement)  # the raw children inherit this process's CPUs
            times: dict[str, list[int]] = {"raw": [], "secure": [], "privsep": []}
            w.opens(min(200, n))
            for _ in range(rounds):
                times["raw"] += _raw_open_times(root, n)
                times["secure"] += _raw_open_times(root, n, resolver)
                times["privsep"] += w.opens(n)
            raw, secure, ours = Stats(times["raw"]), Stats(times["secure"]), Stats(times["privsep"])
            print(
                f"A worker's own open() answered with an fd (self.broker.open(), timed inside the worker), "
                f"{placement}: median {us(ours.median)} us (p90 {us(ours.p90)}) against {us(raw.median)} us "
                f"(p90 {us(raw.p90)}) for a raw request answered with one fd, the parent opening beneath a "
                f"directory fd: {ratio(ours.median, raw.median)}. The same raw request answered through "
                f"privsep's policy check and secure open (openat2 O_PATH beneath the grant, fstat, reopen "
                f"through /proc/self/fd), no RPC layer: {us(secure.median)} us (p90 {us(secure.p90)}), "
                f"{ratio(secure.median, raw.median)} of the raw floor; privsep against it: "
                f"{ratio(ours.median, secure.median)}."
                + (" (A ratio under 1x: the scheduler put the raw peers on different cores, and a round trip "
                   "across cores costs more; the split tables above show that cost.)"
                   if placement != "pinned" and ours.median < raw.median else "")
            )
    finally:
        resolver.close()
        os.sched_setaffinity(0, saved[0])
        os.sched_setaffinity(w.pid, saved[1])


def _layout_note(root: str, sandboxed: bool, w: Any, cap: Any, n: int, rounds: int, warmup: int) -> None:
    """Where the two interpreters' code sits, pinned: the headline worker
    ``w`` (the zygote's, whose interpreter was exec'd, so address-space
    randomisation put its code elsewhere than the broker's) against a worker
    forked from this process (``spawn="fork"``: its code at this process's
    addresses), and the raw floor's forked peer against an exec'd one. Two
    processes taking turns on one CPU share what its branch predictors and
    caches learned only where their code sits at the same addresses.
    ``cap``: a file of ``w``'s broker, for ``take``."""
    saved = (os.sched_getaffinity(0), os.sched_getaffinity(w.pid))
    peers = [RawPeer(root), RawPeer(root, exec_peer=True)]
    try:
        with make_broker(root, sandboxed=sandboxed, spawn="fork", request_rate=None) as fb:
            forked = fb.spawn(BenchWorker)
            assert forked.spawn_method == "fork" and forked.grant() == peers[1].grant() == b"\x00\x01\x02\x03"
            forked_cap = fb.open(DATA_FILE, GRANT_RIGHTS)
            place([p.pid for p in peers] + [w.pid, forked.pid], "pinned")
            with forked_cap:
                res = interleave(
                    {
                        "raw forked ping": peers[0].ping, "raw exec ping": peers[1].ping,
                        "raw forked take": peers[0].take, "raw exec take": peers[1].take,
                        "raw forked grant": peers[0].grant, "raw exec grant": peers[1].grant,
                        "ours ping": w.ping, "forked ping": forked.ping,
                        "ours take": functools.partial(w.take, cap),
                        "forked take": functools.partial(forked.take, forked_cap),
                        "ours grant": w.grant, "forked grant": forked.grant,
                    },
                    n, rounds, warmup,
                )
    finally:
        for p in peers:
            p.close()
        os.sched_setaffinity(0, saved[0])
        os.sched_setaffinity(w.pid, saved[1])
    m = {k: v.median for k, v in res.items()}
    floor, gap = m["raw forked grant"], m["ours grant"] - m["raw forked grant"]
    print(
        f"Code addresses, pinned: the {w.spawn_method} worker's grant calls take {us(m['ours grant'])} us "
        f"({ratio(m['ours grant'], floor)} the raw floor), a worker forked from the broker (spawn=\"fork\", its "
        f"interpreter's code at the broker's addresses) {us(m['forked grant'])} us "
        f"({ratio(m['forked grant'], floor)}): {us(m['ours grant'] - m['forked grant'])} us more, "
        f"{(m['ours grant'] - m['forked grant']) / gap:.0%} of the gap to the floor (take: {us(m['ours take'])} "
        f"against {us(m['forked take'])} us, {ratio(m['ours take'], m['raw forked take'])} and "
        f"{ratio(m['forked take'], m['raw forked take'])} its floor, "
        f"{(m['ours take'] - m['forked take']) / (m['ours take'] - m['raw forked take']):.0%} of its gap; "
        f"ping: {us(m['ours ping'])} against {us(m['forked ping'])} us). The raw floor with its peer exec'd "
        f"instead of forked: grant {us(m['raw exec grant'])} against {us(floor)} us, take "
        f"{us(m['raw exec take'])} against {us(m['raw forked take'])} us, ping {us(m['raw exec ping'])} against "
        f"{us(m['raw forked ping'])} us. "
        + ("Address-space randomisation is on: the exec'd zygote's code sits elsewhere than the broker's, and two "
           "interpreters taking turns on one CPU share what its branch predictors and caches learned only at "
           "the same addresses (run under `setarch -R` to see the difference vanish)."
           if _randomised() else
           "Address-space randomisation is off in this run: the zygote's code sits at the broker's addresses too.")
    )


def _randomised() -> bool:
    """Are this process's addresses randomised (and so its exec'd children's)?"""
    try:
        with open("/proc/sys/kernel/randomize_va_space") as f:
            if f.read().strip() == "0":
                return False
        with open("/proc/self/personality") as f:
            return not int(f.read(), 16) & ADDR_NO_RANDOMIZE
    except (OSError, ValueError):
        return True


def _audit_note(w: Any, n: int, rounds: int) -> None:
    """Grant calls (one audit event each) with the privsep.audit logger off, into
    a NullHandler (the event itself: record, dict, logging's dispatch), and into a
    FileHandler writing every line to a file, in interleaved blocks, pinned to one
    CPU so the per-call cost is not lost in cross-core wakeups."""
    import logging
    import tempfile

    log = logging.getLogger("privsep.audit")
    saved = (log.level, log.propagate, os.sched_getaffinity(0), os.sched_getaffinity(w.pid))
    times: dict[str, list[float]] = {"off": [], "null": [], "file": []}

    def block() -> float:
        t0 = time.perf_counter_ns()
        for _ in range(n):
            w.grant()
        return (time.perf_counter_ns() - t0) / n / 1e3

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "audit.log")
        handlers: dict[str, logging.Handler | None] = {
            "off": None, "null": logging.NullHandler(), "file": logging.FileHandler(path)
        }
        for h in handlers.values():
            if h is not None:
                h.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
        try:
            os.sched_setaffinity(0, {0})
            os.sched_setaffinity(w.pid, {0})
            block()
            for _ in range(rounds):
                for mode, h in handlers.items():
                    if h is not None:
                        log.addHandler(h)
                        log.setLevel(logging.INFO)
                        log.propagate = False
                    try:
                        times[mode].append(block())
                    finally:
                        if h is not None:
                            log.removeHandler(h)
                        log.setLevel(saved[0])
                        log.propagate = saved[1]
        finally:
            os.sched_setaffinity(0, saved[2])
            os.sched_setaffinity(w.pid, saved[3])
            for h in handlers.values():
                if h is not None:
                    h.close()
        with open(path) as f:
            events = sum(1 for _ in f)
    off, null, file = (statistics.median(times[k]) for k in ("off", "null", "file"))
    print(
        f"Audit log, pinned: grant calls take {off:.1f} us with privsep.audit off; each call's event adds "
        f"{null - off:+.1f} us into a NullHandler (the event itself) and {file - off:+.1f} us into a FileHandler "
        f"writing each line ({events:,} lines written, {events / (n * rounds):.0f} per call)."
    )


def _rate_limit_note(root: str, sandboxed: bool, b: Any, w: Any, free: Any, n: int, rounds: int) -> None:
    """The default per-worker request_rate: its cost on grant calls that it
    does not throttle (interleaved blocks against a worker without a limit),
    and, on a broker with a low rate, that a worker is held to it once the
    burst (1 s worth of requests) is spent."""
    rate = b.request_rate
    if rate is None:
        return
    times: dict[str, list[float]] = {"limited": [], "free": []}
    saved = {pid: os.sched_getaffinity(pid) for pid in (0, w.pid, free.pid)}
    try:
        for pid in saved:  # pinned, like the audit note: unpinned blocks differ by more than the cost
            os.sched_setaffinity(pid, {0})
        for _ in range(rounds):
            for label, h in (("limited", w), ("free", free)):
                t0 = time.perf_counter_ns()
                for _ in range(n):
                    h.grant()
                times[label].append((time.perf_counter_ns() - t0) / n / 1e3)
    finally:
        for pid, cpus in saved.items():
            os.sched_setaffinity(pid, cpus)
    lim, fre = statistics.median(times["limited"]), statistics.median(times["free"])
    # The bucket holds 1 s of requests and refills at the rate: well below it, nothing waits.
    throttled = 1e6 / lim > 0.9 * rate
    print(
        f"\nDefault request_rate={rate:,.0f}/s per worker, pinned: back-to-back grant calls take {lim:.1f} us "
        f"({1e6 / lim:,.0f}/s) against {fre:.1f} us without a limit ({lim - fre:+.1f} us); "
        + ("the limit throttles them." if throttled else "that is below the limit, so it never throttles them.")
    )
    low = max(200.0, min(1000.0, 1e6 / lim / 4))  # well below what one worker can ask for, unpinned too
    with make_broker(root, sandboxed=sandboxed, request_rate=low) as slow:
        sw = slow.spawn(BenchWorker)
        window = int(low / 5)  # 0.2 s worth at the limit
        t_start = time.perf_counter_ns()
        rates: list[float] = []
        while (time.perf_counter_ns() - t_start) / 1e9 < 3.0:
            t0 = time.perf_counter_ns()
            for _ in range(window):
                sw.grant()
            rates.append(window / ((time.perf_counter_ns() - t0) / 1e9))
        settled = statistics.median(rates[-5:])
    print(
        f"request_rate={low:,.0f}/s: the first window ran at {rates[0]:,.0f}/s (the burst), "
        f"the last five at a median {settled:,.0f}/s ({settled / low:.2f}x the limit)."
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="about 15 s instead of about a minute")
    ap.add_argument("-n", type=int, help="calls per block")
    ap.add_argument("--rounds", type=int, help="interleaved rounds")
    ap.add_argument("--placement", choices=PLACEMENTS, action="append", help="only these CPU placements")
    args = ap.parse_args(argv)
    n = args.n or (300 if args.quick else 1500)
    rounds = args.rounds or (3 if args.quick else 5)
    with data_root() as root:
        bench(root, n, rounds, warmup=min(200, n), placements=args.placement or PLACEMENTS)


if __name__ == "__main__":
    main()
