"""Waiting on an asyncio event loop for one fd, instead of blocking it."""

from __future__ import annotations

import asyncio
import os
import select


def ready_now(fd: int) -> bool:
    """Is ``fd`` readable (or hung up) now? With poll(): select() refuses an
    fd past 1023, and a broker of a few hundred workers holds such fds."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


def poke(fd: int) -> None:
    """Wake the thread that polls the read end of the non-blocking pipe
    whose write end is ``fd``."""
    try:
        os.write(fd, b"\0")
    except BlockingIOError:
        pass  # (woken already)


def drain(fd: int) -> None:
    """Read what pokes left in the non-blocking pipe whose read end is ``fd``."""
    while True:
        try:
            if not os.read(fd, 64):
                return
        except BlockingIOError:
            return


def notified_now(fd: int) -> bool:
    """Has ``fd`` (a seccomp listener) a notification now? Not merely hung up:
    a receive then would wait for one that never comes."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return any(ev & select.POLLIN for _, ev in poller.poll(0))


async def readable(fd: int, timeout: float) -> bool:
    """Wait until ``fd`` is readable (a pidfd: its process has ended); False
    after ``timeout`` seconds.

    The loop watches a duplicate of ``fd``, owned here, so ``fd`` may be
    closed meanwhile (another task reaping the process): had the loop watched
    ``fd`` itself, a new fd given its number would have taken over the stale
    registration, never to be polled, and lost it again when this wait ended."""
    if ready_now(fd):
        return True
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    own = os.dup(fd)
    try:
        loop.add_reader(own, ready)
        try:
            # (not wait_for: on Python 3.11 it drops a cancel that lands as the future is done, gh-86296)
            async with asyncio.timeout(timeout):
                await fut
            return True
        except TimeoutError:
            return False
        finally:
            loop.remove_reader(own)
    finally:
        os.close(own)


class PerLoopLock:
    """An ``asyncio.Lock`` of the running loop's: made anew when the loop
    changes (a second ``asyncio.run()``, a test framework's loop per test),
    since a lock bound to another loop refuses to be waited on."""

    __slots__ = ("_held",)

    def __init__(self) -> None:
        self._held: tuple[asyncio.AbstractEventLoop, asyncio.Lock] | None = None

    def get(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        held = self._held
        if held is None or held[0] is not loop:
            held = self._held = (loop, asyncio.Lock())
        return held[1]
