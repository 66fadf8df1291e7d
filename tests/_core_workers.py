"""The worker classes of test_core.py, in a module of their own: a zygote
imports a worker's module, and this one imports neither pytest nor the tests."""

from __future__ import annotations

import errno
import io
import os
import sys
import threading
import time
import warnings
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from typing import Any

from _common import READ

from protocol import (
    NotCapable,
    Rights,
    WorkerCrashed,
    WorkerTimeout,
)
from worker import Worker, rpc


def _nested(n: int) -> list:
    x: list = []
    for _ in range(n):
        x = [x]
    return x


class _Text(str):
    def __getitem__(self, index: Any) -> str:
        raise RuntimeError("a str subclass's own code")


class CustomError(Exception):
    pass


# What the wire refuses: (make it, the error, what the error says).
_UNSENDABLE: dict[str, tuple[Callable[[], object], type[Exception], str]] = {
    "int-key": (lambda: {1: "a"}, TypeError, "map keys must be str, not int"),
    "tuple-key-deep-inside": (lambda: [{"a": {(1, 2): 3}}], TypeError, "map keys must be str, not tuple"),
    "2**63": (lambda: 1 << 63, ValueError, "outside signed 64 bits"),
    "below-int64": (lambda: [-(1 << 63) - 1], ValueError, "outside signed 64 bits"),
    "nested-600": (lambda: _nested(600), ValueError, "nested deeper than the wire allows"),
}


EXPECTED = {"a.txt": b"hello", "b.bin": bytes(range(256)) * 4, "sub/c.txt": b"deep"}  # the tree fixture's


class _StrFails(Exception):
    def __str__(self) -> str:
        return f"line {self.line}"  # type: ignore[attr-defined]  # (never set: the bug in a parser's error class)


class _StrSubclass(Exception):
    def __str__(self) -> str:
        return _Text("a message")


class _OwnDecodeError(UnicodeDecodeError):
    pass


class _OwnIOError(OSError):
    pass


class _OwnNotFound(FileNotFoundError):
    pass


class Upper(Worker):
    def setup(self) -> None:
        self.ready = True

    @rpc
    def shout(self, text: str) -> str:
        return text.upper()

    @rpc
    def echo(self, *args: object, **kwargs: object) -> dict:
        return {"args": list(args), "kwargs": kwargs}

    @rpc
    def was_setup(self) -> bool:
        return self.ready

    @rpc
    def count_bytes(self, f: io.BufferedReader) -> int:
        return len(f.read())

    @rpc
    def describe(self, f: io.IOBase) -> dict:
        return {"mode": f.mode, "readable": f.readable(), "writable": f.writable()}

    @rpc
    def try_write(self, f: io.BufferedIOBase) -> str:
        try:
            os.write(f.fileno(), b"x")
        except OSError as exc:
            return errno.errorcode[exc.errno]
        return "wrote"

    @rpc
    def read_named(self, name: str) -> bytes:
        with self.broker.open(f"data/{name}", Rights.READ) as f:
            return f.read()

    @rpc
    def open_mode(self, path: str, rights: int) -> str:
        with self.broker.open(path, Rights(rights)) as f:
            return f.mode

    @rpc
    def stat_it(self, path: str) -> dict:
        st = self.broker.stat(path)
        return {"type": st.type, "size": st.size}

    @rpc
    def ls(self, path: str) -> list:
        return self.broker.listdir(path)

    @rpc
    def ls_joined(self, path: str) -> str:
        return "\n".join(self.broker.listdir(path))  # (one string: a list of 20,000 would not fit an answer)

    @rpc
    def ls_in_joined(self, d: Any, path: str) -> str:
        return "\n".join(d.listdir(path))

    @rpc
    def ls_raw(self, path: str, times: int) -> list:
        """As a compromised worker may: ask for a listing's first page ``times`` over, taking each
        answer with recvmsg and keeping any fd it carries. What came: [bytes, fds] per answer."""
        import array
        import socket

        chan, got = self.broker._chan, []
        for i in range(times):
            chan.send({"t": "req", "id": 1 << 30 | i, "op": "listdir", "a": {"path": path, "at": 0}})
            data, anc, _, _ = chan.sock.recvmsg(1 << 20, socket.CMSG_SPACE(64 * 4))
            fds = array.array("i")
            for _, _, cdata in anc:
                fds.frombytes(cdata[: len(cdata) - len(cdata) % 4])
            self.kept_fds = [*getattr(self, "kept_fds", []), *fds]
            got.append([len(data), len(fds)])
        return got

    @rpc
    def count_in(self, d: Any) -> int:
        self.last_arg = d  # (kept past its call: closed when the call ends, as file arguments are)
        return len(d.listdir(""))

    @rpc
    def count_in_last_arg(self) -> int:
        return len(self.last_arg.listdir(""))

    @rpc
    def ask_dir(self, path: str, keep: bool) -> int:
        d = self.broker.opendir(path, READ)
        n = len(d.listdir(""))
        if keep:
            self.kept = d
        else:
            d.close()
        return n

    @rpc
    def close_kept_after_return(self) -> None:
        def later() -> None:
            time.sleep(0.2)
            self.kept.close()  # outside a call: let go with the next request

        threading.Thread(target=later).start()

    @rpc
    def count(self, values: list) -> int:
        return len(values)

    @rpc
    def numbers(self, n: int) -> list:
        return list(range(n))

    @rpc
    def write_out(self, name: str, data: bytes, fail: bool = False) -> int:
        with self.broker.create(f"out/{name}") as f:
            f.write(data)
        if fail:
            raise CustomError("failed after writing")
        return len(data)

    @rpc
    def write_then_die(self, name: str) -> None:
        with self.broker.create(f"out/{name}") as f:
            f.write(b"partial")
            f.flush()
        os.kill(os.getpid(), 9)

    @rpc
    def write_sparse(self, name: str, size: int, pieces: list) -> None:
        """An output of ``size`` bytes with only ``pieces`` (offset, data) written: the rest holes."""
        rights = Rights.WRITE | Rights.SEEK | Rights.FSTAT | Rights.FTRUNCATE  # the file itself, not a pipe
        f = self.broker.create(f"out/{name}", rights)
        os.ftruncate(f.fileno(), size)
        for offset, data in pieces:
            os.pwrite(f.fileno(), data, offset)

    @rpc
    def make_pipe(self) -> object:
        r, w = os.pipe()
        os.write(w, b"from the worker")
        os.close(w)
        return os.fdopen(r, "rb")

    @rpc
    def give_back(self, value: object) -> object:
        return value

    @rpc
    def unsendable(self, name: str) -> object:
        return _UNSENDABLE[name][0]()

    @rpc
    def big(self, n: int) -> bytes:
        return b"z" * n

    @rpc
    def raise_oserror(self) -> None:
        raise FileNotFoundError(errno.ENOENT, "no such thing", "missing.txt")

    @rpc
    def raise_custom(self) -> None:
        raise CustomError("custom failure")


class Statics(Worker):
    @staticmethod
    @rpc
    def double(x: int) -> int:
        return 2 * x

    @classmethod
    @rpc
    def kind(cls) -> str:
        return cls.__name__

    @rpc
    @staticmethod
    def triple(x: int) -> int:
        return 3 * x


class Player(Worker):
    @rpc
    def stop(self) -> str:  # the worker's own "stop": of the playback, say
        return "stopped playing"

    @rpc
    def name(self) -> str:
        return "player"


class BlobKeeper(Worker):
    """A compromised worker that keeps the memfds the broker's large values
    come in, to grow them later into memory outside its RLIMIT_AS."""

    @rpc
    def keep_blobs(self) -> None:
        import protocol._wire as wire

        read, self.kept = wire._read_blob, []

        def keeping(fd: int, offset: int, length: int) -> bytes:
            self.kept.append(os.dup(fd))
            return read(fd, offset, length)

        wire._read_blob = keeping

    @rpc
    def size(self, value: bytes) -> int:
        return len(value)

    @rpc
    def tamper(self) -> list[list[object]]:
        import fcntl

        def attempt(op: Callable[..., object], *args: object) -> object:
            try:
                op(*args)
            except OSError as exc:
                return errno.errorcode[exc.errno]
            return "done"

        return [
            [
                fcntl.fcntl(fd, fcntl.F_GET_SEALS),
                attempt(os.ftruncate, fd, 1 << 30),
                attempt(os.ftruncate, fd, 0),
                attempt(os.pwrite, fd, b"x", 0),
                os.pread(fd, 3, 0),
            ]
            for fd in self.kept
        ]


class Hoard(Worker):
    @rpc
    def make(self, n: int, text: bool = False) -> object:
        return "t" * n if text else [b"b" * n]

    @rpc
    def length(self, *args: object, **kwargs: object) -> int:
        return len(args) + len(kwargs)


class Sizes(Worker):
    @rpc
    def make(self, n: int) -> bytes:
        return b"m" * n

    @rpc
    def dicts(self, n: int) -> list:
        return [{"k": i} for i in range(n)]

    @rpc
    def length(self, value: object) -> int:
        return len(value)  # type: ignore[arg-type]


class Untidy(Worker):
    @rpc
    def thread_raises(self) -> str:
        def run() -> None:
            raise ValueError("in a thread")

        t = threading.Thread(target=run)
        t.start()
        t.join()
        return "survived"

    @rpc
    def del_raises(self) -> str:
        class Bad:
            def __del__(self) -> None:
                raise ValueError("in __del__")

            def __repr__(self) -> str:
                raise RuntimeError("and in __repr__")

        Bad()
        return "survived"

    @rpc
    def hooks_fail(self, where: str) -> str:
        """A hook that fails itself, as near RLIMIT_AS a MemoryError makes it
        (here: the first write to stderr raises)."""
        real = sys.stderr

        class Flaky:
            failed = False

            def write(self, text: str) -> int:
                if not Flaky.failed:
                    Flaky.failed = True
                    raise KeyboardInterrupt
                return real.write(text)

            def flush(self) -> None:
                real.flush()

        class Bad:
            def __del__(self) -> None:
                raise ValueError("in __del__")

        def run() -> None:
            raise ValueError("in a thread")

        sys.stderr = Flaky()  # type: ignore[assignment]
        try:
            if where == "del":
                Bad()
            else:
                t = threading.Thread(target=run)
                t.start()
                t.join()
        finally:
            sys.stderr = real
        return "survived"

    @rpc
    def forgets_to_await(self) -> str:
        async def fetch() -> int:
            return 1

        fetch()  # never awaited: Python warns, and names where the coroutine was made
        return "survived"

    @rpc
    def warns_about(self, what: str) -> str:
        warnings.warn(f"{what} left open", RuntimeWarning, stacklevel=1, source=self)
        return "survived"

    @rpc
    def cpu_count(self) -> int | None:
        return os.cpu_count()

    @rpc
    def chatty(self, mib: int) -> None:
        line = "x" * 1023
        for _ in range(mib * 1024):
            print(line)
            print(line, file=sys.stderr)


class Threaded(Worker):
    def setup(self) -> None:
        try:  # no call runs yet: nobody is listening
            self.broker.stat("data/a.txt")
            self.early = "answered"
        except RuntimeError as exc:
            self.early = str(exc)

    @rpc
    def read_in_threads(self, names: list[str], rounds: int) -> list[int]:
        """Each thread reads its own file over and over: it must get that one."""
        wrong = [0] * len(names)

        def run(i: int) -> None:
            for _ in range(rounds):
                try:
                    with self.broker.open(f"data/{names[i]}", READ) as f:
                        got: bytes | None = f.read()
                except Exception:  # (a reply taken by another thread, typically)
                    got = None
                wrong[i] += got != EXPECTED[names[i]]

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(names))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return wrong

    @rpc
    def asked_in_setup(self) -> str:
        return self.early


class Forger(Worker):
    @rpc
    def refuse(self) -> None:
        raise NotCapable("no grant in the policy covers this path", filename="data/a.txt")


class Liar(Worker):
    @rpc
    def lie(self, kind: str) -> None:
        from protocol import PolicyViolation

        cls = {"violation": PolicyViolation, "timeout": WorkerTimeout, "crashed": WorkerCrashed}[kind]
        raise cls("worker #1 Liar (pid 1) was stopped by the sandbox for syscall execve('/bin/sh')")

    @rpc
    def ping(self) -> str:
        return "pong"


class OddErrors(Worker):
    @rpc
    def raise_(self, kind: str) -> None:
        if kind == "str-fails":
            raise _StrFails()
        if kind == "str-subclass":
            raise _StrSubclass()
        if kind == "strerror-not-str":
            raise OSError(errno.EIO, 6)
        if kind == "key-error":
            return {"present": 1}["missing"]  # type: ignore[return-value]
        if kind == "bare":
            raise ValueError
        if kind == "xml":
            ElementTree.fromstring("<a>")  # ParseError, a SyntaxError (the module: imported at the top)
        if kind == "name":
            return undefined_name  # type: ignore[name-defined,no-any-return] # noqa: F821
        if kind == "decode":
            b"abc\xff".decode()
        if kind == "encode":
            "é".encode("ascii")
        if kind == "own-decode":
            raise _OwnDecodeError("utf-8", b"x", 0, 1, "not this one")
        if kind == "notes-not-a-list":
            exc = ValueError("noted")
            exc.__notes__ = 5  # type: ignore[attr-defined]
            raise exc

    @rpc
    def raise_named(self, name: str) -> None:
        raise type(name, (ValueError,), {})("named")

    @rpc
    def ping(self) -> str:
        return "pong"


class OsErrors(Worker):
    @rpc
    def raise_(self, kind: str, f: Any = None) -> None:
        if kind == "unsupported":
            f.write(b"x")  # a read-only file: io.UnsupportedOperation
        if kind == "own":
            raise _OwnIOError(errno.EIO, "disk trouble", "data/a.txt")
        if kind == "own-not-found":
            raise _OwnNotFound(errno.ENOENT, "gone", "data/b.txt")
        if kind == "own-bare":
            raise _OwnIOError("no errno")
        if kind == "denied":
            self.broker.open("elsewhere/x")  # (no grant)


class Returner(Worker):
    @rpc
    def held(self) -> io.BufferedReader:
        return self.grants["data"]  # type: ignore[no-any-return]

    @rpc
    def close_held(self) -> None:
        self.grants["data"].close()  # pinned: the object closes, the fd slot stays

    @rpc
    def in_memory(self) -> io.BytesIO:
        return io.BytesIO(b"made here")

    @rpc
    def writer(self) -> io.BufferedWriter:
        r, w = os.pipe()
        os.close(r)
        f = os.fdopen(w, "wb")
        self.keep = f  # returned as is: the broker gets its own copy of the fd
        return f


class Exits(Worker):
    @rpc
    def quit(self, code: int) -> None:
        raise SystemExit(code)  # a library calling sys.exit()

    @rpc
    def interrupt(self) -> None:
        raise KeyboardInterrupt

    @rpc
    def ping(self) -> str:
        return "pong"


class Sprayer(Worker):
    @rpc
    def other_writes(self) -> list[str]:
        """Writes that are no create(): each refused in a with_outputs() call."""
        refused = []
        for what, ask in (
            ("open", lambda: self.broker.open("out/keep.txt", Rights.WRITE).write(b"X")),
            ("append", lambda: self.broker.open("out/keep.txt", Rights.APPEND).write(b"X")),
            ("unlink", lambda: self.broker.opendir("out", Rights.UNLINKAT | Rights.LOOKUP).unlink("keep.txt")),
            ("mkdir", lambda: self.broker.mkdir("out/newdir")),
        ):
            try:
                ask()
            except NotCapable as exc:
                refused.append(f"{what}: {exc.strerror}")
        return refused

    @rpc
    def fail_after_creating(self, name: str) -> None:
        with self.broker.create(f"out/{name}") as f:
            f.write(b"half")
        raise ValueError("failed after creating an output")

    @rpc
    def write(self, names: list[str]) -> list[str]:
        """Create each output it can; say which were refused (as a compromised
        worker would try, past the one it was asked for)."""
        refused = []
        for name in names:
            try:
                with self.broker.create(f"out/{name}") as f:
                    f.write(name.encode())
            except NotCapable as exc:
                refused.append(f"{name}: {exc.strerror}")
        return refused


class PathWriter(Worker):
    @rpc
    def attempt(self, op: str, path: str) -> str:
        try:
            if op == "create":
                with self.broker.create(path) as f:
                    f.write(b"x")
            elif op == "mkdir":
                self.broker.mkdir(path)
            elif op == "unlink":  # beneath a directory the worker asks for
                where, _, name = path.partition("/")
                with self.broker.opendir(where, Rights.LOOKUP | Rights.UNLINKAT) as d:
                    d.unlink(name)
            else:  # "proxy-create", "proxy-mkdir", "proxy-unlink": the directory itself asked for
                where, _, name = path.rpartition("/")
                rights = Rights.LOOKUP | Rights.WRITE | Rights.CREATE | Rights.MKDIRAT | Rights.UNLINKAT
                with self.broker.opendir(where, rights) as d:
                    if op == "proxy-create":
                        with d.create(name) as f:
                            f.write(b"x")
                    elif op == "proxy-mkdir":
                        d.mkdir(name)
                    else:
                        d.unlink(name)
        except NotCapable as exc:
            return str(exc)
        return "ok"


class NestedFiles(Worker):
    @rpc
    def kinds(self, value: Any) -> list[str]:
        """What each file in ``value`` is here, however it was nested: the
        file itself ("file") or a pipe a broker thread fills ("pipe")."""
        import stat as st

        found: list[str] = []
        pending = [value]
        while pending:
            x = pending.pop(0)
            if isinstance(x, list):
                pending[:0] = x
            elif isinstance(x, dict):
                pending[:0] = x.values()
            elif hasattr(x, "fileno"):
                found.append("pipe" if st.S_ISFIFO(os.fstat(x.fileno()).st_mode) else "file")
        return found

    @rpc
    def files_back(self, n: int) -> dict[str, Any]:
        files = [self.broker.open("data/a.txt", READ) for _ in range(n)]
        return {"files": [*files, 7], "one": {"f": self.broker.open("data/a.txt", READ)}}
