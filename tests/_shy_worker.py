"""A worker class whose module refuses to be imported by a zygote (test_zygote):
the broker can import it, the zygote and its spares cannot."""

from __future__ import annotations

import sys

from worker import Worker, rpc

_main = getattr(sys.modules.get("__main__"), "__spec__", None)
if _main is not None and _main.name == "worker._zygote":
    raise ImportError("this module refuses to load in a zygote")


class Shy(Worker):
    @rpc
    def ping(self) -> str:
        return "pong"
