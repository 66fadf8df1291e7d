"""Worker spawn to first answered call, against the usual ways to start one.

Each sample is the wall time from asking for a new process to holding the
answer of its first trivial call (``perf_counter_ns``); the process is then
stopped outside the timed part. Cases:

* privsep ``spawn="zygote"``, ``"fork"`` and ``"exec"``: ``b.spawn(W)`` then
  ``w.ping()``, with the default sandbox (headline) and ``UNSANDBOXED``.
  The zygote and the forkserver are started by a warm-up spawn, not timed.
  ``W`` has no ``setup()``, so the zygote's spare makes the worker and
  enters its sandbox while it waits (``Worker.setup_ahead``); the row
  "zygote, setup() on request" spawns a class with a ``setup()`` and no
  such promise, whose spare runs setup() and sandbox entry only once asked.
* ``multiprocessing`` forkserver (preloading the module holding the target,
  as the zygote preloads the worker's module) and spawn:
  ``ctx.Process(target=...)`` + ``start()`` until the child's answer
  arrives over a ``ctx.Pipe``.
* an exec'd fresh interpreter: ``subprocess`` running ``python -c`` that
  writes one byte to a pipe; with and without ``-S`` (site import).
* floors: ``os.fork()`` in this process, the child writing one byte to a
  pipe; the same after ``enter(prepare(SandboxSpec(namespaces=False)))``
  (fork + Landlock + a precompiled seccomp filter, plus rlimits, caps and
  no_new_privs), and after ``enter(prepare(SandboxSpec()))`` (the full
  default sandbox that privsep's workers enter, namespaces included).

After the interleaved rounds, the zygote, the forkserver and the fork +
Landlock + seccomp floor each run the same number of samples back to back
(as a pool start or a busy server spawns: caches warm, the zygote's spare
refilled between spawns). Both tables are printed, and the targets are
judged on both.

Two more rows, where the broker can make memory cgroups: the same two zygote
cases with ``Limits.memory`` set, so each worker gets a cgroup of its own
(made for the spare, which moves itself in while it waits: a move can wait
for an RCU grace period, about 10 ms on this VM).

Targets (issue 5): zygote median under 2x the fork + sandbox floor, and at
least 4x faster than forkserver.

Last, for a server on an event loop: how long the loop is kept busy per
worker it spawns with ``aspawn``, calls once (``aio.ping``) and stops, with
``await astop()`` against the blocking ``stop()`` (busy = wall time minus
the time the loop sat waiting in its selector).

Run from the repository root:  python3 -m bench.bench_spawn [--quick]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import selectors
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import (
    BenchWorker,
    SetupBenchWorker,
    Stats,
    data_root,
    machine_line,
    make_broker,
    mp_answer,
    ms,
    print_table,
    ratio,
    sandbox_status,
)

clock = time.perf_counter_ns


def fork_floor(prepared: Any) -> int:
    """fork, (enter the sandbox,) write one byte; ns until the parent has it."""
    r, w = os.pipe()
    t0 = clock()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            if prepared is not None:
                from worker.sandbox import enter

                report = enter(prepared, [w])
                nfd = report.get("notify_fd")
                if isinstance(nfd, int):
                    os.close(nfd)
            os.write(w, b"1")
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    got = os.read(r, 1)
    dt = clock() - t0
    os.close(r)
    _, status = os.waitpid(pid, 0)
    if got != b"1":
        raise RuntimeError(f"floor child failed (status {status:#x})")
    return dt


def mp_start(ctx: Any) -> int:
    """multiprocessing: Process creation until the child's first answer."""
    ours, theirs = ctx.Pipe(duplex=False)
    t0 = clock()
    p = ctx.Process(target=mp_answer, args=(theirs,))
    p.start()
    theirs.close()
    value = ours.recv()
    dt = clock() - t0
    p.join()
    ours.close()
    if value != 1:
        raise RuntimeError("multiprocessing child answered wrongly")
    return dt


def fresh_interpreter(flags: list[str]) -> int:
    t0 = clock()
    proc = subprocess.Popen(
        [sys.executable, *flags, "-c", "import os; os.write(1, b'1')"], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL
    )
    assert proc.stdout is not None
    got = proc.stdout.read(1)
    dt = clock() - t0
    proc.stdout.close()
    proc.wait()
    if got != b"1":
        raise RuntimeError("fresh interpreter did not answer")
    return dt


class PrivsepCase:
    """Spawn one worker, call it once, stop it (untimed)."""

    def __init__(self, broker: Any, cls: type[BenchWorker] = BenchWorker):
        self.broker = broker
        self.cls = cls
        self.entry_us: list[int] = []

    def __call__(self) -> int:
        t0 = clock()
        w = self.broker.spawn(self.cls)
        w.ping()
        dt = clock() - t0
        entry = w.sandbox.get("entry_us")
        if isinstance(entry, int):
            self.entry_us.append(entry)
        w.stop()
        return dt


MEMORY = 512 << 20  # the Limits.memory rows: a cgroup per worker


def bench(root: str, iterations: int, warmup: int) -> None:
    ok, why = sandbox_status(root)
    print(machine_line())
    print(f"sandbox: default spawn {'works; layers: ' + why if ok else 'FAILS (' + why + ')'}")
    print(f"{iterations} samples per case (interleaved), {warmup} warm-up; times in ms, spawn to first answer")

    brokers: list[Any] = []
    cases: dict[str, Callable[[], int]] = {}
    privsep: dict[str, PrivsepCase] = {}
    labels = (["sandboxed"] if ok else []) + ["unsandboxed"]
    for label in labels:
        for method in ("zygote", "fork", "exec"):
            b = make_broker(root, sandboxed=label == "sandboxed", spawn=method)
            brokers.append(b)
            privsep[f"privsep {label} {method}"] = cases[f"privsep {label} {method}"] = PrivsepCase(b)
    head = "sandboxed" if ok else "unsandboxed"
    on_request = f"privsep {head} zygote, setup() on request"
    b = make_broker(root, sandboxed=ok, spawn="zygote")
    brokers.append(b)
    privsep[on_request] = cases[on_request] = PrivsepCase(b, SetupBenchWorker)
    if ok:
        from broker._cgroup import probe

        support = probe()
        if support.version:
            for cls, what in ((BenchWorker, ""), (SetupBenchWorker, ", setup() on request")):
                b = make_broker(root, sandboxed=True, spawn="zygote", memory=MEMORY)
                brokers.append(b)
                name = f"privsep sandboxed zygote{what}, Limits.memory (cgroup v{support.version})"
                privsep[name] = cases[name] = PrivsepCase(b, cls)
        else:
            print(f"no Limits.memory rows: no memory cgroup here ({support.reason})")

    forkserver = multiprocessing.get_context("forkserver")
    forkserver.set_forkserver_preload(["bench._common"])
    cases["multiprocessing forkserver"] = lambda: mp_start(forkserver)
    spawn_ctx = multiprocessing.get_context("spawn")
    cases["multiprocessing spawn"] = lambda: mp_start(spawn_ctx)
    cases["fresh interpreter (python -c)"] = lambda: fresh_interpreter([])
    cases["fresh interpreter (python -S -c)"] = lambda: fresh_interpreter(["-S"])
    cases["floor: fork + write"] = lambda: fork_floor(None)
    floor_ll = floor_full = None
    try:
        from worker.sandbox import SandboxSpec, prepare

        floor_ll = "floor: fork + Landlock + seccomp"
        floor_full = "floor: fork + default SandboxSpec()"
        prepared_ll = prepare(SandboxSpec(namespaces=False))
        prepared_full = prepare(SandboxSpec())
        cases[floor_ll] = lambda: fork_floor(prepared_ll)
        cases[floor_full] = lambda: fork_floor(prepared_full)
        fork_floor(prepared_ll)
    except Exception as exc:  # the sandbox API is not there (yet)
        print(f"sandbox floor not measurable: {type(exc).__name__}: {exc}")
        cases.pop(floor_ll or "", None)
        cases.pop(floor_full or "", None)
        floor_ll = floor_full = None

    samples: dict[str, list[int]] = {k: [] for k in cases}
    try:
        names = list(cases)
        for name in names:
            for _ in range(warmup):
                cases[name]()
        for case in privsep.values():
            case.entry_us.clear()
        for i in range(iterations):
            k = i % len(names)
            for name in names[k:] + names[:k]:
                samples[name].append(cases[name]())
        # Then each of the headline cases in a burst, as a pool start or a busy server spawns.
        burst_names = [n for n in (f"privsep {head} zygote", on_request, "multiprocessing forkserver", floor_ll) if n]
        burst: dict[str, list[int]] = {}
        for name in burst_names:
            cases[name]()
            burst[name] = [cases[name]() for _ in range(iterations)]
    finally:
        for b in brokers:
            b.close()

    res = {k: Stats(v) for k, v in samples.items()}
    base = res[floor_ll] if floor_ll else res["floor: fork + write"]
    rows = []
    for name, s in res.items():
        entry = privsep[name].entry_us if name in privsep else []
        rows.append(
            [
                name,
                ms(s.median),
                ms(s.p90),
                ratio(s.median, base.median),
                f"{statistics.median(entry) / 1000:.2f}" if entry else "",
            ]
        )
    print_table(
        f"Spawn to first answered call (ratio vs '{floor_ll or 'floor: fork + write'}')",
        ["case", "median ms", "p90 ms", "vs floor", "sandbox entry ms (worker's report)"],
        rows,
    )

    bres = {k: Stats(v) for k, v in burst.items()}
    print_table(
        f"Back to back: each case {iterations} times in a row, after the interleaved rounds",
        ["case", "median ms", "p90 ms", "vs floor"],
        [[name, ms(s.median), ms(s.p90), ratio(s.median, bres[floor_ll].median) if floor_ll else ""]
         for name, s in bres.items()],
    )

    targets = []
    for label, table in (("interleaved", res), ("back to back", bres)):
        for case_name, what in ((f"privsep {head} zygote", "zygote"), (on_request, "zygote, setup() on request")):
            zyg = table[case_name].median
            fs = table["multiprocessing forkserver"].median
            targets.append([f"{label}: {what} ({head}) / forkserver", f"{fs / zyg:.2f}x faster", ">= 4x faster",
                            "yes" if fs >= 4 * zyg else "NO"])
            for floor in (floor_ll, floor_full):
                if floor and floor in table:
                    f = table[floor].median
                    targets.append([f"{label}: {what} ({head}) / '{floor}'", ratio(zyg, f), "< 2x",
                                    "yes" if zyg < 2 * f else "NO"])
    print_table("Targets", ["comparison", "got", "target", "met"], targets)
    loop_busy(root, iterations, head == "sandboxed")


class _TimedSelector(selectors.DefaultSelector):
    """Counts the time the event loop sits waiting in its selector."""

    idle = 0.0

    def select(self, timeout: float | None = None) -> Any:
        t0 = time.perf_counter()
        try:
            return super().select(timeout)
        finally:
            self.idle += time.perf_counter() - t0


def _loop_cycles(root: str, cycles: int, sandboxed: bool, stop: str) -> tuple[float, float]:
    """``cycles`` of aspawn + aio.ping + stop on a fresh event loop: (wall,
    time the loop was busy: wall minus its time in the selector), per cycle."""
    import asyncio

    selector = _TimedSelector()
    loop = asyncio.SelectorEventLoop(selector)

    async def run() -> tuple[float, float]:
        async with make_broker(root, sandboxed=sandboxed) as b:
            for _ in range(3):  # warm-up: the zygote, its spare, the class
                w = await b.aspawn(BenchWorker)
                await w.aio.ping()
                await w.astop()
            idle0, t0 = selector.idle, time.perf_counter()
            for _ in range(cycles):
                w = await b.aspawn(BenchWorker)
                await w.aio.ping()
                if stop == "astop":
                    await w.astop()
                else:
                    w.stop()
            wall = time.perf_counter() - t0
            return wall / cycles, (wall - (selector.idle - idle0)) / cycles

    try:
        return loop.run_until_complete(run())
    finally:
        loop.close()


def loop_busy(root: str, cycles: int, sandboxed: bool) -> None:
    """How long a server's event loop is kept busy per worker it spawns, calls
    once and stops: with ``await astop()``, against the same with the
    synchronous ``stop()`` (which blocks the loop until the worker is gone)."""
    runs: dict[str, list[tuple[float, float]]] = {"astop": [], "stop": []}
    for _ in range(3):  # interleaved
        for how in runs:
            runs[how].append(_loop_cycles(root, cycles, sandboxed, how))
    wall = {how: statistics.median(r[0] for r in rs) for how, rs in runs.items()}
    busy = {how: statistics.median(r[1] for r in rs) for how, rs in runs.items()}
    print()
    print(
        f"asyncio, {cycles} cycles of aspawn + aio.ping + stop (median of 3 runs each): the event loop is busy "
        f"(wall minus its time waiting in the selector) {busy['astop'] * 1e3:.2f} ms per cycle of "
        f"{wall['astop'] * 1e3:.2f} ms with await astop(), against {busy['stop'] * 1e3:.2f} ms of "
        f"{wall['stop'] * 1e3:.2f} ms with the blocking stop(): {ratio(busy['astop'], busy['stop'])}."
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="about 10 s instead of about 45 s")
    ap.add_argument("-n", "--iterations", type=int, help="samples per case")
    args = ap.parse_args(argv)
    iterations = args.iterations or (10 if args.quick else 60)
    with data_root() as root:
        bench(root, iterations, warmup=2)


if __name__ == "__main__":
    main()
