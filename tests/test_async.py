"""The asyncio face: many workers served concurrently on one event loop."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import pytest
from conftest import READ

from broker import Broker, Policy
from protocol import NotCapable, Rights, WorkerTimeout
from worker import Worker, rpc


class AsyncJob(Worker):
    @rpc
    def ping(self) -> str:
        return "pong"

    @rpc
    def nap(self, t: float) -> int:
        time.sleep(t)
        return os.getpid()

    @rpc
    def read(self, name: str) -> bytes:
        with self.broker.open(f"data/{name}", Rights.READ) as f:
            return f.read()

    @rpc
    def write(self, name: str, data: bytes) -> None:
        with self.broker.create(f"out/{name}") as f:
            f.write(data)


def test_concurrent_calls_without_threads(tree: Path) -> None:
    policy = Policy().allow("data/", READ).allow("out/", Rights.WRITE | Rights.CREATE)

    async def main() -> None:
        async with Broker(policy, root=tree) as b:
            workers = [await b.aspawn(AsyncJob) for _ in range(4)]
            threads_before = threading.active_count()
            t0 = time.monotonic()
            pids = await asyncio.gather(*(w.aio.nap(0.4) for w in workers))
            elapsed = time.monotonic() - t0
            assert len(set(pids)) == 4
            assert elapsed < 1.2, elapsed  # concurrent, not 1.6 s in sequence
            assert threading.active_count() == threads_before  # no thread per call
            assert await workers[0].aio.read("a.txt") == b"hello"
            with pytest.raises(NotCapable):
                await workers[1].aio.read("../secret")
            await workers[2].aio.write("async.txt", b"written")
            assert (tree / "out" / "async.txt").read_bytes() == b"written"
            with pytest.raises(WorkerTimeout):
                await workers[3].aio.with_timeout(0.2).nap(5)
            # the loop stayed responsive during calls
            ticks = 0

            async def ticker() -> None:
                nonlocal ticks
                while True:
                    await asyncio.sleep(0.01)
                    ticks += 1

            task = asyncio.create_task(ticker())
            await workers[0].aio.nap(0.3)
            task.cancel()
            assert ticks >= 10

    asyncio.run(main())


def test_instant_answers_still_let_other_tasks_run(tree: Path) -> None:
    """Pinned to one CPU the worker answers before the send returns, so a call
    takes its answer without suspending; a loop of such calls must still yield."""
    policy = Policy().allow("data/", READ)
    saved = os.sched_getaffinity(0)

    async def main() -> tuple[int, int]:
        async with Broker(policy, root=tree) as b:
            w = b.spawn(AsyncJob)
            os.sched_setaffinity(0, {min(saved)})
            os.sched_setaffinity(w.pid, {min(saved)})
            ticks = 0
            done = False

            async def other() -> None:
                nonlocal ticks
                while not done:
                    ticks += 1
                    await asyncio.sleep(0)

            task = asyncio.create_task(other())
            await asyncio.sleep(0)
            calls = 0
            for _ in range(400):
                await w.aio.ping()
                calls += 1
            done = True
            await task
            return calls, ticks

    try:
        calls, ticks = asyncio.run(main())
    finally:
        os.sched_setaffinity(0, saved)
    assert calls == 400
    assert ticks >= 400 // 8 - 1, ticks  # the other task ran at least once every few calls
