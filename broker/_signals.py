"""Telling a program's signal handler's exception from the broker's own.

A handler of the program's (a SIGALRM deadline, say) runs in whatever code
the main thread was in when the signal came, and what it raises comes out
of that code. Out of the broker serving a worker's request, an exception
of the broker's own fails that request, and the worker hears of it; the
handler's was sent to the worker too, and the caller never saw it (a
probe: 38 of 80 alarms that came during a call). Out of a channel's send or
receive, a handler's ``TimeoutError`` read as a broken channel.
"""

from __future__ import annotations

import os
import signal
import sysconfig

#: Where the code the broker runs while it serves a request comes from: its
#: own packages, and the standard library's. (It runs none of the program's,
#: but for logging handlers, which are not signal handlers either.)
_OWN = tuple(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep + pkg + os.sep
    for pkg in ("broker", "protocol", "worker")
) + tuple({sysconfig.get_paths()["stdlib"] + os.sep, sysconfig.get_paths()["platstdlib"] + os.sep})


def raised_by_a_signal_handler(exc: BaseException) -> bool:
    """Was ``exc`` raised by a signal handler of the program's (or code it
    called), in the code its signal interrupted, or raised from such an
    exception? Meant for error paths: it walks the tracebacks, and looks at
    the handlers only if a frame in them comes from outside the broker's
    and the standard library's code."""
    foreign = set()
    seen: set[int] = set()
    chain: BaseException | None = exc
    while chain is not None and id(chain) not in seen and len(seen) < 8:
        # (and the exceptions it was raised from: an OSError given the output's name, say)
        seen.add(id(chain))
        tb = chain.__traceback__
        while tb is not None:
            code = tb.tb_frame.f_code
            if not code.co_filename.startswith(_OWN):
                foreign.add(code)
            tb = tb.tb_next
        chain = chain.__cause__ or chain.__context__
    if not foreign:
        return False
    for signum in range(1, signal.NSIG):
        try:
            handler = signal.getsignal(signum)
        except (ValueError, OSError):  # (numbers the C library keeps for itself)
            continue
        if getattr(handler, "__code__", None) in foreign:
            return True
    return False
