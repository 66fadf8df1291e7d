"""A worker class whose module imports nothing of privsep's but ``worker``
(test_rights): what a spawn-time directory grant needs after sandbox entry
must not come from the broker's modules, which a zygote loads only for a
class whose module imports them."""

from __future__ import annotations

import sys

from worker import Worker, rpc


class Lone(Worker):
    @rpc
    def loaded(self) -> list[str]:
        return sorted(name for name in sys.modules if name.split(".")[0] in ("broker", "worker", "protocol"))

    @rpc
    def use_grant(self) -> dict[str, object]:
        d = self.grants["d"]
        with d.open("a.txt") as f:
            text = f.read()
        with d.create("made.txt") as f:
            f.write(b"made")
        d.mkdir("sub")
        d.unlink("made.txt")
        return {"read": text, "stat": d.stat("a.txt").size, "listdir": d.listdir()}
