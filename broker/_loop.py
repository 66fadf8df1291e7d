"""Waiting on an asyncio event loop for one fd, instead of blocking it."""

from __future__ import annotations

import asyncio
import select


async def readable(fd: int, timeout: float) -> bool:
    """Wait until ``fd`` is readable (a pidfd: its process has ended); False
    after ``timeout`` seconds. The fd must stay open while this waits."""
    if select.select([fd], [], [], 0)[0]:
        return True
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_reader(fd, ready)
    try:
        await asyncio.wait_for(fut, timeout)
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(fd)
