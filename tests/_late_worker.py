"""A worker class in a module the zygote has not imported until asked (test_zygote)."""

from __future__ import annotations

import os

from worker import Worker, rpc


class Late(Worker):
    @rpc
    def where(self) -> int:
        return os.getpid()
