"""A Ctrl-C held off while a received fd has no owner yet.

The interpreter runs a signal's Python handler (KeyboardInterrupt's, for
SIGINT) once the C call during which the signal came has returned, before
the call's result is kept: a Ctrl-C that came during a ``recvmsg`` whose
message carried an fd was raised with the fd installed and owned by
nothing, so it stayed open for good (a probe: 14 of 150 interrupted spawns,
each leaving the spare's socket and the spare itself). Holding the handler
costs two ``signal.signal`` calls (about 17 us here): for a receive that
happens once per spawn, not for a call's.
"""

from __future__ import annotations

import signal
import threading
from types import TracebackType
from typing import Any


class ctrl_c_held:
    """Within the block, a SIGINT is noted instead of handled; on leaving it,
    the handler it would have run is run (KeyboardInterrupt raised, by
    default), after an exception the block raised, if any, as its cause.
    Only in the main thread, the one a signal's handler runs in, and only
    for a handler that is Python code (not SIG_IGN or SIG_DFL)."""

    __slots__ = ("_came", "_handler")

    def __enter__(self) -> None:
        self._handler: Any = None
        self._came: list[Any] = []
        if threading.current_thread() is not threading.main_thread():
            return
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler):
            came = self._came
            signal.signal(signal.SIGINT, lambda signum, frame: came.append(frame))
            self._handler = handler

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        handler, self._handler = self._handler, None
        if handler is None:
            return
        signal.signal(signal.SIGINT, handler)
        if self._came:
            frame = self._came[0]
            self._came.clear()
            if exc is None:
                handler(signal.SIGINT, frame)
            else:
                try:
                    handler(signal.SIGINT, frame)
                except BaseException as interrupt:
                    raise interrupt from exc
