"""Shared helpers for the benchmarks, and the worker classes they spawn.

The worker classes live here, in an importable module (never ``__main__``),
so that the zygote and exec spawn methods can import them by name. The
module-level functions are the ``multiprocessing`` /
``ProcessPoolExecutor`` counterparts of the same work.

Benchmarks are scripts, not tests: run them from the repository root as
``python3 -m bench.bench_rpc`` (or ``python3 bench/bench_rpc.py``).
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # the zygote inherits sys.path as PYTHONPATH
    sys.path.insert(0, REPO_ROOT)

from protocol import Rights  # noqa: E402
from worker import Worker, rpc  # noqa: E402

DATA_DIR = "data"
DATA_FILE = "data/x"
DATA = bytes(range(256)) * 16  # 4 KiB
READ_SIZE = 64
#: Rights of the fd grants. With SEEK and FSTAT a grant made after sandbox
#: entry travels as the file itself; READ alone travels as a pipe that a
#: broker thread fills from the file (see worker/sandbox/_rights_table.py).
GRANT_RIGHTS = Rights.READ | Rights.SEEK | Rights.FSTAT
PIPE_RIGHTS = Rights.READ


# -- the work, in a privsep worker ----------------------------------------
class BenchWorker(Worker):
    """Trivial methods: the benchmarks measure the framework, not the work."""

    @rpc
    def ping(self) -> int:
        return 1

    @rpc
    def take(self, f: IO[bytes]) -> int:
        """Receive an fd and do nothing with it (the framework closes it)."""
        return 1

    @rpc
    def echo(self, value: Any) -> Any:
        """Answer with what was sent (the bulk case: a list of ints)."""
        return value

    @rpc
    def read(self, f: IO[bytes]) -> int:
        """Read a passed file (the fd-grant task of the pool benchmark)."""
        return len(f.read(READ_SIZE))

    @rpc
    def grant(self) -> bytes:
        """Ask the broker for a file and read a few bytes of it."""
        with self.broker.open(DATA_FILE, GRANT_RIGHTS) as f:
            return f.read(4)

    @rpc
    def opens(self, n: int) -> list[int]:
        """Ask the broker for the file ``n`` times, timing each request inside
        the worker (request sent to file object in hand); the file is closed
        outside the timed part. Returns the times in ns."""
        clock, ask, times = time.perf_counter_ns, self.broker.open, []
        for _ in range(n):
            t0 = clock()
            f = ask(DATA_FILE, GRANT_RIGHTS)
            times.append(clock() - t0)
            f.close()
        return times

    @rpc
    def give(self) -> IO[bytes]:
        """Answer with a file: the one granted at spawn as ``data`` (the
        broker gets its own copy of the fd, a capability it must close)."""
        return self.grants["data"]


class SetupBenchWorker(BenchWorker):
    """The same, with a setup() of its own and no ``setup_ahead`` promise: the
    zygote's spare gets its request before setup() and sandbox entry run, as
    for any class that does not promise its setup() stays in the process."""

    def setup(self) -> None:
        self.ready = True


# -- the same work, for multiprocessing / ProcessPoolExecutor ---------------
def mp_ping() -> int:
    return 1


def mp_answer(conn: Any) -> None:
    """A ``multiprocessing.Process`` target: answer once over a pipe."""
    conn.send(1)
    conn.close()


def mp_read(path: str) -> int:
    """The unsandboxed counterpart of ``BenchWorker.read``: open by path."""
    with open(path, "rb") as f:
        return len(f.read(READ_SIZE))


# -- fixtures -------------------------------------------------------------
@contextmanager
def data_root() -> Iterator[str]:
    """A temporary broker root holding ``data/x``."""
    root = tempfile.mkdtemp(prefix="privsep-bench-")
    try:
        os.mkdir(os.path.join(root, DATA_DIR))
        with open(os.path.join(root, DATA_FILE), "wb") as f:
            f.write(DATA)
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def make_broker(
    root: str, *, sandboxed: bool, spawn: str = "auto", memory: int | None = None, **options: Any
) -> Any:
    """A Broker granting ``GRANT_RIGHTS`` beneath ``data/``; default settings
    otherwise (``memory``: ``Limits.memory``, a cgroup per worker)."""
    from broker import UNSANDBOXED, Broker, Policy

    policy = Policy().allow(DATA_DIR + "/", GRANT_RIGHTS)
    if memory is not None:
        policy = policy.with_limits(memory=memory)
    if sandboxed:
        return Broker(policy, root=root, spawn=spawn, **options)
    return Broker(policy, root=root, spawn=spawn, sandbox=UNSANDBOXED, **options)


def sandbox_status(root: str) -> tuple[bool, str]:
    """Does the default (sandboxed) spawn work here? (ok, what it applied or why not)."""
    try:
        with make_broker(root, sandboxed=True) as b:
            w = b.spawn(BenchWorker)
            if w.ping() != 1:
                return False, "ping returned the wrong value"
            layers = w.sandbox.get("layers", [])
            return True, " ".join(layers) if layers else "(no layers reported)"
    except Exception as exc:  # report, then fall back to the unsandboxed numbers
        return False, f"{type(exc).__name__}: {exc}"


# -- CPU placement ----------------------------------------------------------
ALL_CPUS: frozenset[int] = frozenset(os.sched_getaffinity(0))
PLACEMENTS = ("pinned", "unpinned", "split")
PLACEMENT_TEXT = {
    "pinned": "pinned: every process and thread on CPU 0 (as under taskset -c 0)",
    "unpinned": "unpinned: every process free to run on any CPU",
    "split": "split: this process on CPU 0, the peers on CPU 1 (cross-core wakeups every message)",
}


def place(peers: Sequence[int], placement: str) -> None:
    """Place this process and ``peers`` (pids): all on CPU 0 ("pinned"), all
    anywhere ("unpinned"), or this process on CPU 0 and the peers on the
    other CPU ("split", the worst case an unpinned run can fall into).

    Every thread of each, and every process below this one counts as a
    peer (a zygote and its spare, the restricted opener): pinned means what
    ``taskset -c 0`` means. (Pinning this thread and the workers alone left
    the zygote free to make its spares on the other CPU, which hid what a
    one-CPU machine pays for them.)"""
    cpus = sorted(ALL_CPUS)
    if placement == "pinned":
        mine, theirs = {cpus[0]}, {cpus[0]}
    elif placement == "split" and len(cpus) > 1:
        mine, theirs = {cpus[0]}, set(cpus[1:])
    else:
        mine, theirs = set(cpus), set(cpus)
    _set_cpus(os.getpid(), mine)
    for pid in {*peers, *_descendants()}:
        _set_cpus(pid, theirs)


def _set_cpus(pid: int, cpus: set[int]) -> None:
    """Every thread of process ``pid`` (gone meanwhile: nothing to place)."""
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except FileNotFoundError:
        return
    for tid in tids:
        try:
            os.sched_setaffinity(tid, cpus)
        except ProcessLookupError:
            pass


def _descendants() -> list[int]:
    """Every process below this one, read from /proc."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            children.setdefault(int(stat[stat.rindex(b")") + 2 :].split()[1]), []).append(int(name))
    found: list[int] = []
    todo = [os.getpid()]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


# -- measuring ----------------------------------------------------------------
@dataclass
class Stats:
    """Per-operation times in ns."""

    samples: list[int]

    @property
    def median(self) -> float:
        return float(statistics.median(self.samples))

    @property
    def p90(self) -> float:
        s = sorted(self.samples)
        return float(s[min(len(s) - 1, int(len(s) * 0.9))])

    @property
    def n(self) -> int:
        return len(self.samples)


def time_calls(fn: Callable[[], object], n: int, warmup: int = 0) -> list[int]:
    """Time ``n`` calls of ``fn`` one by one (ns each), after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    clock = time.perf_counter_ns
    out = [0] * n
    for i in range(n):
        t0 = clock()
        fn()
        out[i] = clock() - t0
    return out


def interleave(cases: dict[str, Callable[[], object]], n: int, rounds: int, warmup: int) -> dict[str, Stats]:
    """Run every case ``rounds`` times in blocks of ``n`` calls, rotating the
    order each round, so that drift on a shared VM hits all cases alike."""
    names = list(cases)
    out: dict[str, list[int]] = {k: [] for k in names}
    for name in names:
        time_calls(cases[name], 0, warmup)
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            out[name].extend(time_calls(cases[name], n))
    return {k: Stats(v) for k, v in out.items()}


# -- printing -----------------------------------------------------------------
def us(ns: float) -> str:
    return f"{ns / 1000:.1f}"


def ms(ns: float) -> str:
    return f"{ns / 1e6:.2f}"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    print(f"\n{title}")
    line = "  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths, strict=True)))
    print(line)
    print("-" * len(line))
    for row in rows:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))))
    sys.stdout.flush()


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), or "" where none is given: the
    same code's ratios moved when this VM landed on another host CPU."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    return value.strip()
    except OSError:
        pass
    return ""


def machine_line() -> str:
    model = cpu_model()
    return (
        f"python {sys.version.split()[0]}, {os.uname().sysname} {os.uname().release}, "
        f"{os.cpu_count()} CPUs{f' ({model})' if model else ''}, affinity {sorted(ALL_CPUS)}"
    )
