"""The worker classes of test_paths.py, in a module of their own: a zygote
imports a worker's module, and this one imports neither pytest nor the tests."""

from __future__ import annotations

from typing import Any

from protocol import NotCapable, Rights
from worker import Worker, rpc

_LOOKUP = Rights.READ | Rights.SEEK | Rights.FSTAT | Rights.LOOKUP


class Asker(Worker):
    @rpc
    def open_raw(self, path: str, rights: int = int(Rights.READ)) -> bytes:
        # Skip the client's local checks: talk to the broker directly, as a
        # compromised worker would.
        value = self.broker._request("open", path=path, rights=rights)
        from worker._files import wrap_received

        with wrap_received(value) as f:
            return f.read()

    @rpc
    def open_checked(self, path: str) -> bytes:
        with self.broker.open(path, Rights.READ) as f:
            return f.read()

    @rpc
    def raw(self, op: str, args: dict) -> object:
        try:
            return self.broker._request(op, **args)
        except Exception as exc:
            return {"error": type(exc).__name__, "errno": getattr(exc, "errno", None)}


class Creator(Worker):
    @rpc
    def create_refused(self, path: str, rights: int) -> str:
        """Ask for an output with rights that cannot be granted; go on."""
        try:
            self.broker.create(path, Rights(rights))
        except Exception as exc:
            return type(exc).__name__
        return "created"


class Namer(Worker):
    @rpc
    def write_each(self, names: list, rights: int) -> int:
        for name in names:
            with self.broker.create(f"out/{name}", Rights(rights)) as f:
                f.write(name.encode())
        return len(names)


# -- pathlib paths, and names the wire cannot carry --------------------------
class PathUser(Worker):
    """Uses pathlib paths everywhere a path is taken."""

    @rpc
    def via_broker(self, name: str) -> bytes:
        from pathlib import PurePosixPath

        with self.broker.open(PurePosixPath("data") / name, Rights.READ) as f:
            return f.read()

    @rpc
    def via_directory(self, d: Any, name: str) -> list[object]:
        from pathlib import PurePosixPath

        with d.open(PurePosixPath(name)) as f:
            got: list[object] = [f.read()]
        got.append(d.stat(PurePosixPath(name)).size)
        got.append(d.listdir(PurePosixPath("sub")))
        return got

    @rpc
    def via_spawn_grant(self, name: str) -> list[object]:
        from pathlib import PurePosixPath

        d = self.grants["data"]
        with d.open(PurePosixPath(name)) as f:
            return [f.read(), d.listdir(PurePosixPath("sub"))]

    @rpc
    def listing(self, d: Any = None) -> list[str]:
        return (d if d is not None else self.grants["data"]).listdir()

    @rpc
    def listing_via_broker(self) -> list[str]:
        return self.broker.listdir("data")

    @rpc
    def bad_type(self, d: Any = None) -> list[str]:
        out = []
        for call in (lambda: self.broker.open(b"data/a.txt"), lambda: (d or self.grants["data"]).open(3)):
            try:
                call()
            except TypeError as exc:
                out.append(str(exc))
        return out


class ProxyReturner(Worker):
    @rpc
    def proxy(self) -> Any:
        return self.broker.opendir("data", _LOOKUP)


class Writer(Worker):
    @rpc
    def write(self, name: str, nap: float = 0.0) -> str:
        import time

        with self.broker.create(f"out/{name}") as f:
            f.write(b"payload")
        time.sleep(nap)
        return "written"

    @rpc
    def read(self, name: str) -> bytes:
        with self.broker.open(f"data/{name}") as f:
            return f.read()


class Maker(Worker):
    @rpc
    def mkdir(self, path: str) -> None:
        self.broker.mkdir(path)

    @rpc
    def unlink_in(self, d: Any, name: str) -> None:
        d.unlink(name)


class Nested(Asker):
    @rpc
    def write(self, path: str, data: bytes) -> None:
        with self.broker.create(path) as f:
            f.write(data)


class ModeString(Worker):
    @rpc
    def open_with(self, rights: object) -> str:
        try:
            self.broker.open("data/a.txt", rights)  # type: ignore[arg-type]
        except TypeError as exc:
            return str(exc)
        return "opened"

    @rpc
    def mkdir_grant(self) -> str:
        try:
            self.broker.mkdir("out")
        except NotCapable as exc:
            return str(exc)
        return "made"


class ProxyMaker(Worker):
    @rpc
    def mkdir_via_proxy(self, where: str, rights: int, name: str) -> None:
        with self.broker.opendir(where, Rights(rights)) as d:
            d.mkdir(name)

    @rpc
    def stat_size(self, path: str) -> int:
        return self.broker.stat(path).size


class SpawnGrantOpener(Worker):
    @rpc
    def open_in(self, name: str) -> object:
        try:
            with self.grants["data"].open(name) as f:
                return f.read()
        except NotCapable as exc:
            return {"errno": exc.errno, "msg": exc.strerror, "filename": exc.filename}


class DirMaker(Worker):
    @rpc
    def make(self, how: str, path: str, parents: bool, exist_ok: bool) -> str:
        if how == "broker":
            mkdir = self.broker.mkdir
        elif how == "proxy":
            mkdir = self.broker.opendir("out", Rights.LOOKUP | Rights.MKDIRAT | Rights.FSTAT).mkdir
            path = path.removeprefix("out/")
        else:
            mkdir = self.grants["out"].mkdir
            path = path.removeprefix("out/")
        try:
            mkdir(path, parents=parents, exist_ok=exist_ok)
        except OSError as exc:
            return type(exc).__name__
        return "made"
