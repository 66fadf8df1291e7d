"""A worker class whose module takes a second to import in the zygote itself
(a big library, say), not in the test process or in a spare: the zygote is
still importing it for the next spare when the test looks (test_priority)."""

from __future__ import annotations

import sys
import time

from worker import Worker, rpc


def _in_the_zygote() -> bool:
    main = sys.modules.get("__main__")
    serve = sys.modules.get("worker._serve")
    # a spare runs the zygote's code too, but has waited (worker._serve.while_waiting)
    return hasattr(main, "_fork_spare") and not getattr(serve, "_waited", False)


if _in_the_zygote():
    time.sleep(1.0)


class SlowToImport(Worker):
    @rpc
    def ping(self) -> str:
        return "pong"
