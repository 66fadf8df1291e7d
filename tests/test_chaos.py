"""Many callers at once, ending workers under one another: threads on the
synchronous API, tasks on the awaited one. Each run calls, times out,
cancels, kills, stops and respawns a handful of workers for a few seconds
with a fixed seed (the interleavings still vary from run to run).

What must hold: every operation ends within a bound well under the stalls
these runs once found (a 30 s spawn timeout from an fd the loop had stopped
polling, 10 s waits for a lock held across an await); nothing raises but
the ends a caller is told to expect; no fd or worker is left afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from _chaos_workers import Chaos
from conftest import open_fds

from broker import Broker, Policy
from protocol import WorkerCrashed, WorkerTimeout

SECONDS = 4.0
# The longest one operation may take: a stop() waits up to its 2 s grace for a
# call on another thread, then kills; the stalls found were 10 s and 30 s.
BOUND = 6.0
EXPECTED = (WorkerCrashed, WorkerTimeout, TimeoutError)  # (WorkerTimeout is a WorkerCrashed)


class Tally:
    """The slowest operation, the ends seen, and anything else raised."""

    def __init__(self) -> None:
        self.slowest = 0.0
        self.ends: Counter[str] = Counter()
        self.unexpected: list[BaseException] = []

    @contextlib.contextmanager
    def op(self) -> Iterator[None]:
        start = time.monotonic()
        try:
            yield
        except EXPECTED as exc:
            self.ends[type(exc).__name__] += 1
        except BaseException as exc:
            self.unexpected.append(exc)
        finally:
            self.slowest = max(self.slowest, time.monotonic() - start)

    def check(self) -> None:
        assert self.unexpected == []
        assert self.slowest < BOUND, f"one operation took {self.slowest:.1f} s"
        assert self.ends["WorkerCrashed"] > 0 and self.ends["WorkerTimeout"] > 0  # (workers did end under calls)


def test_threads_ending_workers_under_one_another(tree: Path) -> None:
    before = open_fds()
    tally = Tally()
    with Broker(Policy(), root=tree) as b:
        handles = [b.spawn(Chaos) for _ in range(4)]
        swap = threading.Lock()
        stop_at = time.monotonic() + SECONDS

        def run(seed: int) -> None:
            rnd = random.Random(seed)
            while time.monotonic() < stop_at:
                i = rnd.randrange(len(handles))
                h, act = handles[i], rnd.random()
                with tally.op():
                    if act < 0.6:
                        assert h.square(7) == 49
                    elif act < 0.75:
                        h.with_timeout(0.02).nap(rnd.choice([0.0, 0.05]))
                    elif act < 0.85:
                        h.nap(0.01)
                    elif act < 0.9:
                        h.kill()
                    elif act < 0.95:
                        h.stop()
                    else:
                        with contextlib.suppress(ValueError):
                            h.fail()
                with swap, tally.op():
                    if handles[i] is h and not h.alive:
                        handles[i] = b.spawn(Chaos)

        threads = [threading.Thread(target=run, args=(seed,)) for seed in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(SECONDS + 60)
        assert not any(t.is_alive() for t in threads)
    tally.check()
    assert b.workers == []
    assert open_fds() == before


def test_tasks_ending_workers_under_one_another(tree: Path) -> None:
    before = open_fds()
    tally = Tally()

    async def main() -> Broker:
        b = await asyncio.to_thread(Broker, Policy(), root=tree)
        async with b:
            handles = [await b.aspawn(Chaos) for _ in range(4)]
            respawning: set[int] = set()
            stop_at = time.monotonic() + SECONDS

            async def run(seed: int) -> None:
                rnd = random.Random(seed)
                while time.monotonic() < stop_at:
                    i = rnd.randrange(len(handles))
                    h, act = handles[i], rnd.random()
                    with tally.op():
                        if act < 0.55:
                            assert await h.aio.square(7) == 49
                        elif act < 0.7:
                            await h.aio.with_timeout(0.02).nap(rnd.choice([0.0, 0.05]))
                        elif act < 0.8:
                            await asyncio.wait_for(h.aio.nap(rnd.choice([0.0, 0.05])), 0.02)
                        elif act < 0.85:
                            task = asyncio.ensure_future(h.aio.nap(0.01))
                            await asyncio.sleep(0)
                            task.cancel()
                            with contextlib.suppress(asyncio.CancelledError):
                                await task
                        elif act < 0.9:
                            await h.akill()
                        elif act < 0.95:
                            await h.astop()
                        else:
                            with contextlib.suppress(ValueError):
                                await h.aio.fail()
                    if handles[i] is h and not h.alive and i not in respawning:
                        respawning.add(i)
                        try:
                            with tally.op():
                                handles[i] = await b.aspawn(Chaos)
                        finally:
                            respawning.discard(i)

            await asyncio.wait_for(asyncio.gather(*(run(seed) for seed in range(12))), SECONDS + 60)
        return b

    b = asyncio.run(main())
    tally.check()
    assert b.workers == []
    assert open_fds() == before
