"""How both examples hand their report to the user: the human summary on
stdout (or stderr when the JSON report takes stdout with ``--json -``), and
the JSON report written atomically to a file when asked."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import stat
import sys
import tempfile
import threading
from collections.abc import Iterator
from typing import Any, NoReturn, TextIO

EXIT_INTERRUPTED = 130  # 128 + SIGINT: Ctrl-C
EXIT_TERMINATED = 143  # 128 + SIGTERM: `kill`, a service manager's stop
_terminated = False


@contextlib.contextmanager
def sigterm_stops_as_ctrl_c() -> Iterator[None]:
    """While the run lasts, SIGTERM stops it as a first Ctrl-C does (the work
    in progress finishes, the summary and the report are still given), and
    the exit status says which it was (:func:`interrupted_status`). Only on
    the main thread, where signal handlers run."""
    global _terminated
    _terminated = False
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        global _terminated
        _terminated = True
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def exit_as_reported(status: int) -> NoReturn:
    """Exit with ``status``, the one the report gave. A second Ctrl-C (or a
    SIGTERM) as the program exits, after its report, is ignored: with the
    default handlers back, the process died of the signal, -2 to a waitpid
    (5 of 6 double Ctrl-Cs of a probe)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(status)


def interrupted_status() -> int:
    """The exit status of a run that was stopped: 143 after SIGTERM, 130 after Ctrl-C."""
    return EXIT_TERMINATED if _terminated else EXIT_INTERRUPTED


def interrupted_by() -> str:
    return "SIGTERM" if _terminated else "Ctrl-C"


def missing_module(exc: ImportError, extra: str) -> str:
    """What an ImportError at start means, and what to install (``extra``: the
    pip extra that brings this example's dependencies)."""
    name = (exc.name or "").split(".")[0]
    if name in ("broker", "protocol", "worker"):
        return f"privsep is not installed ({exc}); from a source checkout run: pip install -e '.[{extra}]'"
    if name == "PIL":
        return f"Pillow is not installed ({exc}); run: pip install Pillow (or pip install -e '.[{extra}]')"
    return f"a module it needs cannot be imported: {exc}"

def writable_dir_problem(directory: str) -> str | None:
    """Why a file cannot be created in ``directory`` (the strerror), or None if it can.

    Tries it: makes and removes a temporary file there. Permission bits do not
    tell everything (root passes them, yet not an immutable directory or a
    read-only mount).
    """
    try:
        # A file with no name, where the filesystem can: a Ctrl-C during the try leaves nothing
        # behind (a named one was left in a new OUTDIR once in 90 early interrupts: a probe).
        fd = os.open(directory, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            return exc.strerror or str(exc)
    else:
        os.close(fd)
        return None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".probe-", dir=directory)
    except OSError as exc:
        return exc.strerror or str(exc)
    os.close(fd)
    try:
        os.unlink(tmp)
    except OSError:
        pass
    return None


def json_target_problem(json_target: str | None) -> str | None:
    """What is wrong with ``--json FILE`` (a message for ``parser.error``), or None.

    Checked before any work, so that a report that cannot be written stops
    the run at its start, not after it (the report is written only at the end).
    """
    if not json_target or json_target == "-":
        return None
    if os.path.isdir(json_target):
        return f"--json {json_target!r} is a directory"
    if _written_in_place(json_target):
        return None if os.access(json_target, os.W_OK) else f"--json {json_target!r}: not writable"
    directory = os.path.dirname(_replaced_path(json_target))
    if not os.path.isdir(directory):
        what = "is not a directory" if os.path.lexists(directory) else "does not exist"
        return f"--json {json_target!r}: the directory {directory!r} {what}"
    problem = writable_dir_problem(directory)
    if problem:
        return f"--json {json_target!r}: cannot write in {directory!r}: {problem}"
    return None


def json_report_path(json_target: str | None) -> str | None:
    """The file ``--json FILE`` replaces (resolved), or None when the report
    replaces no file (``-``, none, or a device or FIFO written into)."""
    if not json_target or json_target == "-" or _written_in_place(json_target):
        return None
    return os.path.realpath(_replaced_path(json_target))


def json_replaces_input(json_target: str | None, inputs: list[str]) -> str | None:
    """Why ``--json FILE`` must not be used (it would replace one of the run's
    ``inputs``, resolved paths; a message for ``parser.error``), or None."""
    path = json_report_path(json_target)
    if path is not None and path in inputs:
        return f"--json {json_target!r} is an input of this run: the report would replace it"
    return None


def _written_in_place(json_target: str) -> bool:
    """An existing target that is no regular file (``/dev/null``, a FIFO, a
    terminal) is written into, as a shell's ``>`` would: there is no file to
    replace, and replacing it would put a regular file where a device was."""
    try:
        mode = os.stat(json_target).st_mode
    except OSError:
        return False
    return not stat.S_ISREG(mode) and not stat.S_ISDIR(mode)


def _replaced_path(json_target: str) -> str:
    """The file the report replaces: through a symlink, the file it names
    (the link is kept), else the target itself."""
    return os.path.realpath(json_target) if os.path.islink(json_target) else os.path.abspath(json_target)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def emit(report: dict[str, Any], summary: str, json_target: str | None, stdout: TextIO, stderr: TextIO,
         prog: str = "report") -> bool:  # fmt: skip
    """Print ``summary`` and write ``report``; False (having said why, in one line) if the report file failed."""
    if json_target == "-":
        stderr.write(summary)
        json.dump(report, stdout, indent=2, sort_keys=True)
        stdout.write("\n")
        return True
    stdout.write(summary)
    if not json_target:
        return True
    if _written_in_place(json_target):
        try:
            with open(json_target, "w", encoding="utf-8") as fh:
                json.dump(report, fh, indent=2, sort_keys=True)
                fh.write("\n")
        except OSError as exc:
            stdout.flush()
            print(f"{prog}: cannot write the --json report to {json_target!r}: {exc.strerror or exc}", file=stderr)
            return False
        return True
    # A temporary beside the target, renamed into place: never half a report.
    path = _replaced_path(json_target)
    directory = os.path.dirname(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".report-", suffix=".json", dir=directory)
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes it 0600: give it the mode any new file gets
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=2, sort_keys=True)
            fh.write("\n")
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        stdout.flush()
        print(f"{prog}: cannot write the --json report to {json_target!r}: {exc.strerror or exc}", file=stderr)
        return False
    except BaseException:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        raise
    return True
