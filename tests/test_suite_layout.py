"""The suite's own layout: worker classes live where a zygote can import
them cheaply (conftest's docstring; README, Layout)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent
# The one module whose worker classes stay in it: test_main_script's are about classes
# of a main script. (The example tests' classes are the examples'.)
_KEEP_THEIR_CLASSES = {"test_main_script.py"}


def _worker_classes(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    workers = {"Worker"}
    classes = [n for n in tree.body if isinstance(n, ast.ClassDef)]
    grew = True
    while grew:
        grew = False
        for c in classes:
            bases = {b.id if isinstance(b, ast.Name) else getattr(b, "attr", None) for b in c.bases}
            if c.name not in workers and bases & workers:
                workers.add(c.name)
                grew = True
    return sorted(workers - {"Worker"})


def test_test_modules_define_no_worker_class_at_the_top() -> None:
    found = {p.name: _worker_classes(p) for p in sorted(TESTS.glob("test_*.py")) if p.name not in _KEEP_THEIR_CLASSES}
    assert {name: classes for name, classes in found.items() if classes} == {}
    # (the check finds them where they are)
    assert "Sleeper" in _worker_classes(TESTS / "_lifecycle_workers.py")


def test_the_worker_modules_import_neither_pytest_nor_a_test_module() -> None:
    modules = [*sorted(p.stem for p in TESTS.glob("_*_workers.py")), "_common"]
    assert len(modules) > 10
    script = (
        "import sys\n"
        f"sys.path[:0] = [{str(TESTS)!r}, {str(TESTS.parent)!r}]\n"
        f"for m in {modules!r}: __import__(m)\n"
        "print(sorted(m for m in sys.modules if m in ('pytest', 'conftest', 'hypothesis') or m.startswith('test_')))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_an_exclusive_test_waits_for_what_runs_below_the_run_to_settle() -> None:
    """conftest's wait before an exclusive test: a process below the given
    root that keeps a CPU busy holds it up to its timeout; once it is gone,
    the wait ends at once."""
    from conftest import running_below, wait_until_quiet

    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        deadline = time.monotonic() + 5
        while spinner.pid not in running_below(os.getpid()) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert spinner.pid in running_below(os.getpid())
        t0 = time.monotonic()
        assert not wait_until_quiet(os.getpid(), 0.3)
        assert 0.3 <= time.monotonic() - t0 < 2.0
    finally:
        spinner.kill()
        spinner.wait()
    t0 = time.monotonic()
    assert wait_until_quiet(os.getpid(), 5.0)
    assert time.monotonic() - t0 < 1.0
