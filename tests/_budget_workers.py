"""The worker classes of test_budget.py, in a module of their own: a zygote
imports a worker's module, and this one imports neither pytest nor the tests."""

from __future__ import annotations

import os
from typing import Any

from protocol import NotCapable, Rights
from worker import Worker, rpc


class Hog(Worker):
    def setup(self) -> None:
        self.held: list[Any] = []

    @rpc
    def dirs(self, n: int) -> str:
        return self._hold(n, lambda: self.broker.opendir("data/sub", Rights.LOOKUP))

    def _hold(self, n: int, ask: Any) -> str:
        made = 0
        try:
            for _ in range(n):
                self.held.append(ask())
                made += 1
        except NotCapable as exc:
            return f"{made}: {exc.strerror}"
        return f"{made}"

    @rpc
    def pipes(self, n: int) -> str:
        return self._hold(n, lambda: self.broker.open("data/big", Rights.READ))  # READ alone: a pipe a pump fills

    @rpc
    def outputs(self, n: int) -> str:
        made = []
        try:
            for i in range(n):
                made.append(self.broker.create(f"out/f{i}"))  # WRITE alone: a pipe the call drains
        except NotCapable as exc:
            return f"{len(made)}: {exc.strerror}"
        finally:
            for f in made:
                f.write(b"x")
                f.close()
        return f"{len(made)}"

    @rpc
    def keep(self, f: Any) -> None:
        """Keep a copy of a file argument's pipe, unread, past the call."""
        self.held.append(os.dup(f.fileno()))

    @rpc
    def let_go(self) -> int:
        n = len(self.held)
        for h in self.held:
            h.close()
        self.held.clear()
        return n

    @rpc
    def read(self) -> bytes:
        with self.broker.open("data/a.txt", Rights.READ | Rights.SEEK | Rights.FSTAT) as f:
            return f.read()
