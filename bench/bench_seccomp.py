"""Per-syscall cost of the privsep seccomp filter, against no filter.

Each measurement runs in a fresh forked child: one with no filter, one that
entered the full sandbox (``enter`` with the default spec). The loops are C
(compiled with the system's cc at bench time; a cffi ``lib.syscall`` loop is
the fallback) so Python's call overhead does not drown the signal. Reports
the best of several rounds, in ns per call, and the difference.

Run:  python3 bench/bench_seccomp.py [--iterations N] [--rounds R]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cffi

from worker.sandbox import SandboxSpec, enter, prepare

C_SRC = r"""
#include <unistd.h>
#include <fcntl.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
long loop_getppid(long n) { long s = 0; for (long i = 0; i < n; i++) s += syscall(SYS_getppid); return s; }
long loop_fcntl(int fd, long n) {
    long s = 0; for (long i = 0; i < n; i++) s += syscall(SYS_fcntl, fd, F_GETFD); return s; }
long loop_ioctl(int fd, long n) {
    int v; long s = 0; for (long i = 0; i < n; i++) s += syscall(SYS_ioctl, fd, FIONREAD, &v); return s; }
long loop_read0(int fd, long n) {
    char c; long s = 0; for (long i = 0; i < n; i++) s += syscall(SYS_read, fd, &c, 0); return s; }
"""
CDEF = """
long loop_getppid(long n);
long loop_fcntl(int fd, long n);
long loop_ioctl(int fd, long n);
long loop_read0(int fd, long n);
"""


def load_loops() -> tuple[Any, str]:
    ffi = cffi.FFI()
    ffi.cdef(CDEF)
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc:
        tmp = tempfile.mkdtemp(prefix="privsep-bench-")
        src, so = os.path.join(tmp, "loops.c"), os.path.join(tmp, "loops.so")
        with open(src, "w") as f:
            f.write(C_SRC)
        subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", so, src], check=True)
        lib = ffi.dlopen(so)  # loaded before any fork: children inherit the mapping
        shutil.rmtree(tmp)
        return lib, "C loop (cc -O2)"
    from worker.sandbox._libc import ffi as lffi
    from worker.sandbox._libc import lib as llib

    class PyLoops:
        def _loop(self, n: int, *a: Any) -> int:
            cargs = [lffi.cast("long", x) for x in a]
            f = llib.syscall
            for _ in range(n):
                f(*cargs)
            return 0

        def loop_getppid(self, n: int) -> int:
            return self._loop(n, 110)

        def loop_fcntl(self, fd: int, n: int) -> int:
            return self._loop(n, 72, fd, 1)

        def loop_ioctl(self, fd: int, n: int) -> int:
            return self._loop(n, 16, fd, 0x541B, 0)

        def loop_read0(self, fd: int, n: int) -> int:
            return self._loop(n, 0, fd, 0, 0)

    return PyLoops(), "cffi lib.syscall loop in Python (no cc found; overhead-dominated)"


def _load_allow_all() -> None:
    from worker.sandbox import _bpf, _seccomp
    from worker.sandbox._libc import PR_SET_NO_NEW_PRIVS, prctl

    asm = _bpf.Asm()
    asm.ret(_seccomp.RET_ALLOW)
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    _seccomp.load(asm.assemble()[0], 0)


def measure_in_child(sandboxed: bool | None, cases: dict[str, Callable[[int], Any]], n: int, prepared: Any,
                     keep: list[int]) -> dict[str, float]:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.close(r)
            if sandboxed is None:
                _load_allow_all()
            elif sandboxed:
                rep = enter(prepared, [0, 1, 2, w, *keep])
                if rep.listener_fd is not None:
                    os.close(rep.listener_fd)  # nothing is denied in the loops
            out: dict[str, float] = {}
            for name, fn in cases.items():
                fn(n // 10)  # warm up
                t0 = time.perf_counter_ns()
                fn(n)
                out[name] = (time.perf_counter_ns() - t0) / n
            os.write(w, json.dumps(out).encode())
        except BaseException as exc:
            os.write(2, f"bench child: {exc!r}\n".encode())
        finally:
            os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return dict(json.loads(data))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=2_000_000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    loops, how = load_loops()
    pr, _pw = os.pipe()
    prepared = prepare(SandboxSpec(namespaces=False))
    cases: dict[str, Callable[[int], Any]] = {
        "getppid (allowed, cached)": loops.loop_getppid,
        "read(fd, 0 bytes) (allowed, cached)": lambda n: loops.loop_read0(pr, n),
        "fcntl(F_GETFD) (argument-checked)": lambda n: loops.loop_fcntl(pr, n),
        "ioctl(FIONREAD) (argument-checked)": lambda n: loops.loop_ioctl(pr, n),
    }
    best: dict[bool | None, dict[str, float]] = {False: {}, None: {}, True: {}}
    for _ in range(args.rounds):
        for sandboxed in (False, None, True):
            got = measure_in_child(sandboxed, cases, args.iterations, prepared, [pr])
            for k, v in got.items():
                best[sandboxed][k] = min(v, best[sandboxed].get(k, v))
    print(f"privsep seccomp filter overhead ({how}, {args.iterations} calls, best of {args.rounds} rounds)")
    print(f"filter: {prepared.compiled.length if prepared.compiled else 0} BPF instructions")
    print("columns: no filter | a 1-instruction RET_ALLOW filter (the kernel's fixed cost of any filter) |")
    print("         the privsep sandbox | overhead vs no filter | overhead of privsep's rules beyond any filter")
    print(f"{'syscall':38} {'none':>9} {'allow-all':>10} {'privsep':>9} {'overhead':>9} {'rules':>8} {'ratio':>6}")
    for k in cases:
        base, floor, sb = best[False][k], best[None][k], best[True][k]
        print(f"{k:38} {base:7.1f}ns {floor:8.1f}ns {sb:7.1f}ns {sb - base:7.1f}ns {sb - floor:6.1f}ns"
              f" {sb / base:5.2f}x")


if __name__ == "__main__":
    main()
