"""Pool throughput: ``broker.pool(W, size=2)`` against ``ProcessPoolExecutor(2)``.

Two workloads, each a batch of tasks submitted back to back and then
waited for (``submit`` + ``result``, the same calls on both executors):

* ``small``: a trivial call (``BenchWorker.ping`` / ``mp_ping``).
* ``fd grant``: privsep passes each task a fresh capability
  (``broker.open("data/x", READ|SEEK|FSTAT)``, opened in the timed loop,
  closed when the task is done; it travels as the file itself) and the
  worker reads 64 bytes from it; the ``ProcessPoolExecutor`` task gets the
  path and opens and reads the file itself, unsandboxed.
* ``fd grant-pipe``: the same with a READ-only capability, which privsep
  delivers as a pipe fed by a broker thread (compared with the same
  executor row).

Headline: the default sandboxed pool, with the ``UNSANDBOXED`` one
alongside. Workers are started (and warmed) before timing. Reports tasks/s
per batch (median over rounds) and the ratio against the executor.

Run from the repository root:  python3 -m bench.bench_pool [--quick]
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import (
    DATA_FILE,
    GRANT_RIGHTS,
    PIPE_RIGHTS,
    READ_SIZE,
    BenchWorker,
    data_root,
    machine_line,
    make_broker,
    mp_ping,
    mp_read,
    print_table,
    sandbox_status,
)
from protocol import Rights

SIZE = 2


def run_batch(submit: Callable[[], Future[Any]], tasks: int, expect: Any) -> float:
    """Submit ``tasks`` tasks, wait for all; return tasks/s."""
    t0 = time.perf_counter_ns()
    futures = [submit() for _ in range(tasks)]
    for f in futures:
        if f.result() != expect:
            raise RuntimeError(f"task answered {f.result()!r}, not {expect!r}")
    return tasks / ((time.perf_counter_ns() - t0) / 1e9)


def privsep_fd_task(broker: Any, pool: Any, rights: Rights = GRANT_RIGHTS) -> Future[Any]:
    cap = broker.open(DATA_FILE, rights)
    fut: Future[Any] = pool.submit(BenchWorker.read, cap)
    fut.add_done_callback(lambda _f: cap.close())
    return fut


def bench(root: str, tasks: int, rounds: int) -> None:
    ok, why = sandbox_status(root)
    print(machine_line())
    print(f"sandbox: default spawn {'works; layers: ' + why if ok else 'FAILS (' + why + ')'}")
    print(f"pool size {SIZE}; {tasks} tasks per batch, {rounds} rounds (interleaved), median batch rate")
    path = os.path.join(root, DATA_FILE)

    labels = (["sandboxed"] if ok else []) + ["unsandboxed"]
    brokers = {label: make_broker(root, sandboxed=label == "sandboxed") for label in labels}
    pools = {label: b.pool(BenchWorker, size=SIZE) for label, b in brokers.items()}
    ppe = ProcessPoolExecutor(SIZE)
    cases: dict[str, tuple[Callable[[], Future[Any]], Any]] = {
        "ProcessPoolExecutor small": (lambda: ppe.submit(mp_ping), 1),
        "ProcessPoolExecutor fd grant": (lambda: ppe.submit(mp_read, path), READ_SIZE),
    }
    for label in labels:
        b, pool = brokers[label], pools[label]
        cases[f"privsep {label} small"] = (functools.partial(pool.submit, BenchWorker.ping), 1)
        cases[f"privsep {label} fd grant"] = (functools.partial(privsep_fd_task, b, pool), READ_SIZE)
        cases[f"privsep {label} fd grant-pipe"] = (
            functools.partial(privsep_fd_task, b, pool, PIPE_RIGHTS),
            READ_SIZE,
        )
    rates: dict[str, list[float]] = {k: [] for k in cases}
    try:
        for submit, expect in cases.values():  # start every worker, warm up
            run_batch(submit, max(200, tasks // 10), expect)
        names = list(cases)
        for r in range(rounds):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                submit, expect = cases[name]
                rates[name].append(run_batch(submit, tasks, expect))
    finally:
        ppe.shutdown()
        for pool in pools.values():
            pool.shutdown()
        for b in brokers.values():
            b.close()

    med = {k: statistics.median(v) for k, v in rates.items()}

    def spread(name: str) -> str:
        return f"{min(rates[name]):,.0f}-{max(rates[name]):,.0f}"

    rows = []
    for kind, floor_kind in (("small", "small"), ("fd grant", "fd grant"), ("fd grant-pipe", "fd grant")):
        base = med[f"ProcessPoolExecutor {floor_kind}"]
        if kind == floor_kind:
            rows.append(
                [f"ProcessPoolExecutor({SIZE}) {kind}", f"{base:,.0f}", spread(f"ProcessPoolExecutor {kind}"),
                 f"{1e6 / base:.1f}", "1.00x"]
            )  # fmt: skip
        for label in labels:
            name = f"privsep {label} {kind}"
            v = med[name]
            cells = [f"{v:,.0f}", spread(name), f"{1e6 / v:.1f}", f"{v / base:.2f}x"]
            rows.append([f"privsep {label} pool({SIZE}) {kind}", *cells])
    print_table(
        "Pool throughput (tasks/s: higher is better; ratio = privsep / ProcessPoolExecutor)",
        ["case", "tasks/s", "range over rounds", "us/task", "vs PPE"],
        rows,
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="about 5 s instead of about 25 s")
    ap.add_argument("--tasks", type=int, help="tasks per batch")
    ap.add_argument("--rounds", type=int, help="rounds")
    args = ap.parse_args(argv)
    tasks = args.tasks or (1000 if args.quick else 4000)
    rounds = args.rounds or (3 if args.quick else 5)
    with data_root() as root:
        bench(root, tasks, rounds)


if __name__ == "__main__":
    main()
