"""How both examples hand their report to the user: the human summary on
stdout (or stderr when the JSON report takes stdout with ``--json -``), and
the JSON report written atomically to a file when asked."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, TextIO


def emit(report: dict[str, Any], summary: str, json_target: str | None, stdout: TextIO, stderr: TextIO) -> None:
    if json_target == "-":
        stderr.write(summary)
        json.dump(report, stdout, indent=2, sort_keys=True)
        stdout.write("\n")
        return
    stdout.write(summary)
    if json_target:
        # A temporary beside the target, renamed into place: never half a report.
        directory = os.path.dirname(os.path.abspath(json_target))
        fd, tmp = tempfile.mkstemp(prefix=".report-", suffix=".json", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(report, fh, indent=2, sort_keys=True)
                fh.write("\n")
            os.replace(tmp, json_target)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
