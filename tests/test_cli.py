"""The ``privsep`` command line, run as a user would."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from protocol import __version__


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-c", "import sys; from broker._cli import main; sys.exit(main())", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=cwd)


def test_version_and_help() -> None:
    assert run("--version").stdout.strip() == f"privsep {__version__}"
    out = run("--help")
    assert out.returncode == 0 and "check" in out.stdout and "demo" in out.stdout
    assert out.stdout.count("image-converter demo") == 1  # each command said once


def test_check_reports_this_kernel() -> None:
    human = run("check")
    assert human.returncode == 0, human.stdout + human.stderr
    assert "minimum met" in human.stdout
    probe = json.loads(run("check", "--json").stdout)
    assert probe["landlock_abi"] >= 1 and probe["seccomp"] is True


def test_unknown_arguments_are_an_error() -> None:
    assert run("bogus").returncode == 2
    assert run("check", "--nope").returncode == 2
    bare = run()  # no command: the help, on stderr, and the usage error's status
    assert bare.returncode == 2 and "commands:" in bare.stderr and bare.stdout == ""


def test_demo_runs_the_thumbnailer_from_anywhere(tmp_path: Path) -> None:
    out = tmp_path / "thumbs"
    proc = run("demo", "-o", str(out), "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert len(list(out.iterdir())) == 8
    # its usage says what was typed (it said "python3 -m examples.thumbnailer")
    helped = run("demo", "--help", cwd=tmp_path)
    assert helped.returncode == 0 and helped.stdout.startswith("usage: privsep demo ")
    wrong = run("demo", str(tmp_path / "missing"), cwd=tmp_path)
    assert wrong.returncode == 2 and wrong.stderr.splitlines()[-1].startswith("privsep demo: error: INPUT_DIR ")


def test_python_m_broker_is_the_same_command(tmp_path: Path) -> None:
    """Where pip's script directory is not on PATH (a --user install, a venv
    not activated), ``python3 -m broker`` is the way in."""
    out = subprocess.run([sys.executable, "-m", "broker", "--version"], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == f"privsep {__version__}", out.stderr
    check = subprocess.run([sys.executable, "-m", "broker", "check"], capture_output=True, text=True,
                           timeout=60, cwd=tmp_path)
    assert check.returncode == 0 and "minimum met" in check.stdout
