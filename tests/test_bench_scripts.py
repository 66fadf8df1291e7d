"""The benchmark scripts still run and print their tables.

CI does not run the benchmarks (they are never timed tests). These runs use
tiny sizes and check only that each script finishes and prints every row it
promises, so a change that breaks a benchmark is caught here. No figure is
checked: the numbers are meaningless at these sizes.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# They pin their processes to a CPU, and keep it busy: no other test beside them (conftest).
pytestmark = pytest.mark.exclusive


def run_bench(name: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", f"bench.{name}", *args],
        capture_output=True, text=True, timeout=180, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def test_bench_rpc_prints_every_case() -> None:
    out = run_bench("bench_rpc", "-n", "20", "--rounds", "1", "--placement", "pinned")
    assert "sandbox: default spawn works" in out
    for case in ("ping", "take", "take-pipe", "grant", "give", "aio.ping"):
        assert f"privsep sandboxed {case} " in out, case
        assert f"privsep unsandboxed {case} " in out, case
    assert "Default request_rate=" in out and "the last five at a median" in out
    assert "Audit log, pinned:" in out
    assert "A worker's own open() answered with an fd (self.broker.open(), timed inside the worker), pinned:" in out
    assert "answered through privsep's policy check and secure open" in out and "privsep against it:" in out
    assert "Code addresses, pinned: the zygote worker's grant calls take" in out
    assert "a worker forked from the broker" in out and "with its peer exec'd instead of forked" in out


def test_bench_spawn_prints_every_case() -> None:
    out = run_bench("bench_spawn", "-n", "2")
    for case in (
        "privsep sandboxed zygote ",
        "privsep sandboxed zygote, setup() on request",
        "privsep sandboxed exec",
        "multiprocessing forkserver",
        "floor: fork + Landlock + seccomp",
    ):
        assert case in out, case
    assert "Targets" in out and "Back to back" in out
    assert "with await astop(), against" in out


def test_bench_pool_prints_every_case() -> None:
    out = run_bench("bench_pool", "--tasks", "20", "--rounds", "1")
    for case in (
        "ProcessPoolExecutor(2) small",
        "privsep sandboxed pool(2) small",
        "privsep sandboxed pool(2) fd grant",
    ):
        assert case in out, case


def test_bench_thumbnailer_prints_every_method() -> None:
    out = run_bench("bench_thumbnailer", "--count", "4", "--repeat", "1", "--no-bwrap")
    for label in ("( a) in-process", "( c) privsep sandboxed pool", "(cw) privsep sandboxed pool, already started"):
        assert label in out, label
    assert "c/b  =" in out


def test_bench_seccomp_prints_every_syscall() -> None:
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler: bench_seccomp times syscalls in a C loop")
    out = run_bench("bench_seccomp", "--iterations", "2000", "--rounds", "1")
    for syscall in ("getppid", "read(fd, 0 bytes)", "fcntl(F_GETFD)", "ioctl(FIONREAD)"):
        assert syscall in out, syscall
    assert "Filter load" in out


def test_bench_seccomp_profiles_the_kernel_entry() -> None:
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler: the profiled loop is C")
    if shutil.which("perf") is None:
        pytest.skip("perf is not installed")
    out = run_bench("bench_seccomp", "--iterations", "2000", "--rounds", "1", "--perf", "--perf-calls", "300000")
    assert "Kernel profile" in out
    if "Kernel profile: skipped" not in out:
        assert "seccomp entry functions" in out and "BPF program" in out
        assert "The slow syscall entry without seccomp" in out
