"""A directory nobody can create files in, for the examples' tests."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


def unwritable_dir(path: Path) -> Iterator[Path]:
    """``path``, an empty directory nobody can create files in: mode 0555, or for root (who ignores
    modes) the immutable attribute. Skips the test if neither takes, found by trying."""
    path.mkdir()
    path.chmod(0o555)
    immutable = False
    try:
        if os.access(path, os.W_OK):  # root: try chattr +i
            chattr = shutil.which("chattr")
            if chattr is None:
                pytest.skip("running as root and there is no chattr to make a directory unwritable")
            proc = subprocess.run([chattr, "+i", str(path)], capture_output=True, text=True)
            immutable = proc.returncode == 0
            if not immutable:
                pytest.skip(f"running as root and `chattr +i` failed here: {proc.stderr.strip()}")
        try:
            (path / "probe").touch()
        except OSError:
            pass
        else:
            pytest.skip(f"could not make {path} unwritable (mode 0555 and chattr +i did not stop a create)")
        yield path
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        path.chmod(0o755)
