"""Command line of the thumbnailer: walk, grant, dispatch, report.

This module is the *broker* side. It keeps the process's authority and
never decodes an image; everything hostile happens in :mod:`.workers`.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from examples._report import (
    emit,
    interrupted_by,
    interrupted_status,
    json_replaces_input,
    json_report_path,
    json_target_problem,
    missing_module,
    sigterm_stops_as_ctrl_c,
    writable_dir_problem,
)

from .._safe_fs import ensure_subdir, rmdir_if_empty
from . import imaging
from .make_samples import SAMPLES_DIR, ensure_runtime_specials
from .progress import Progress, render_summary, safe

PROG = "python3 -m examples.thumbnailer"

EXIT_OK = 0  # every image file was converted
EXIT_REJECTED = 1  # the run finished, but some inputs were rejected (see the report)
EXIT_USAGE = 2  # bad command line (argparse's own convention)
EXIT_FATAL = 3  # could not run at all: the sandboxed workers could not be started
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143

INPUT_RIGHTS_NAMES = ("READ", "FSTAT", "SEEK")
MAX_DEPTH = 32  # directory nesting we walk into; deeper trees are reported, not followed

DESCRIPTION = f"""\
Make thumbnails of untrusted images, decoding each one in a sandboxed worker.

This process is the privsep *broker*. It walks INPUT_DIR and opens each image
file read-only; the broker refuses symlinks leading out of INPUT_DIR, FIFOs
and devices (only regular files beneath the directory are granted). Each open
file goes to a pool of sandboxed workers: a worker decodes it with Pillow,
shrinks it to fit SIZE x SIZE (keeping the aspect ratio, never enlarging) and
asks the broker to create the output file. The output appears in OUTPUT_DIR
only once the conversion finished: a crash, a timeout or an error leaves
nothing behind. A worker that dies or is killed by the sandbox is replaced
and the run goes on. Every rejected file is listed with its reason.

Inputs: JPEG, PNG, WebP, GIF, BMP, TIFF, recognised by content (files are
picked by suffix: {" ".join(sorted(imaging.INPUT_SUFFIXES))}).
Outputs: JPEG, PNG, WebP. Subdirectories are mirrored; hidden files are
ignored. Each output takes its input's name with the format's suffix
(a.png -> a.jpg). When two inputs in a directory would get the same name, one
already named so keeps it (b.jpg) and the others keep their own suffix too
(b.gif -> b.gif.jpg, or b.gif~2.jpg if that is taken as well); an output
name longer than 255 bytes is refused.
Images over {imaging.MAX_PIXELS // 1_000_000} megapixels are refused as decompression bombs, and files
over {imaging.MAX_INPUT_BYTES >> 20} MiB as too large.

Without INPUT_DIR, the bundled samples are used: real images plus hostile
ones (truncated, wrong magic, a decompression bomb, a huge declared size, an
empty file, a symlink to /etc/passwd, a FIFO). Git cannot store a FIFO, so
the FIFO (and the symlink, if the checkout dropped it) is created in the
samples directory on first use:
  {SAMPLES_DIR}
"""

EPILOG = f"""\
exit status:
  {EXIT_OK}    the run completed: every file was converted or rejected with a reason (the
       summary and the --json report list each rejection)
  {EXIT_REJECTED}    with --strict: the run completed but some inputs were rejected (the bundled
       samples always are, on purpose)
  {EXIT_USAGE}    usage error (bad option, INPUT_DIR not a directory, ...)
  {EXIT_FATAL}    the sandboxed workers could not be started (see `privsep check`)
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C): the images in progress are finished (Ctrl-C again stops
       them, counted neither converted nor rejected), the thumbnails made so far are kept
       and counted, none is partial; the summary and the --json report ("interrupted":
       true) are still given
  {EXIT_TERMINATED}  stopped by SIGTERM (kill, a service manager): the same as Ctrl-C

examples:
  {PROG} -o thumbnails                       # the bundled samples
  {PROG} ~/Pictures -o /tmp/thumbs --size 256 --format webp --workers 4
  {PROG} photos -o thumbs --json report.json  # machine-readable report too
"""


@dataclass
class Job:
    rel: str  # path beneath the input directory
    out: str  # path beneath the output directory


@dataclass
class Plan:
    jobs: list[Job] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    rejected: list[dict[str, str]] = field(default_factory=list)  # refused while walking (bad names, depth)


def _positive_int(low: int, high: int) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer")
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is not in {low}..{high}")
        return value

    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number")
    if not 0 < value <= 24 * 3600:
        raise argparse.ArgumentTypeError(f"{value} is not in (0, 86400]")
    return value


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "input", nargs="?", metavar="INPUT_DIR", help="directory of images to convert (default: the bundled samples)"
    )
    parser.add_argument(
        "-o", "--output", metavar="OUTPUT_DIR", default="thumbnails",
        help="where thumbnails go; created if missing, and a thumbnail of the same name from an earlier run "
             "is replaced (default: ./%(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "-s", "--size", type=_positive_int(1, imaging.MAX_SIZE), default=128, metavar="N",
        help="fit thumbnails in N x N pixels, keeping the aspect ratio (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "-f", "--format", choices=sorted(imaging.OUTPUT_FORMATS), default="jpeg",
        help="output format (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--quality", type=_positive_int(1, 100), default=85, metavar="Q",
        help="JPEG/WebP quality 1-100 (default: %(default)s; PNG is lossless and ignores it)",
    )  # fmt: skip
    parser.add_argument(
        "-w", "--workers", type=_positive_int(1, 256), default=max(1, os.cpu_count() or 1), metavar="N",
        help="number of sandboxed worker processes (default: the CPU count, %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "-t", "--timeout", type=_positive_float, default=30.0, metavar="SECONDS",
        help="per-image time limit; a worker that runs over is killed and replaced (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--json", metavar="FILE",
        help="also write a machine-readable report to FILE ('-' for stdout; the human summary then goes to stderr); "
             "never an input image or a thumbnail of the run",
    )  # fmt: skip
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress display, only the summary")
    parser.add_argument(
        "--strict",
        action="store_true",
        help=f"exit with status {EXIT_REJECTED} if any input was rejected (for scripts)",
    )
    return parser


# --------------------------------------------------------------------------- walking


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _printable(name: str) -> str:
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def walk(input_dir: str, *, exclude: tuple[int, int] | None = None) -> Iterator[tuple[str, os.DirEntry[str] | None]]:
    """Yield ``(relative path, entry)`` for every non-directory beneath ``input_dir``, sorted.

    Only real directories are descended into, each opened with
    ``O_NOFOLLOW`` relative to its parent's fd, so a directory swapped for a
    symlink mid-walk is not followed. Files are *not* opened or stat'ed
    through symlinks here: whether a name may be read is decided by
    ``broker.open``, which resolves beneath the granted directory. Hidden
    names are skipped; ``exclude`` is the (st_dev, st_ino) of a directory to
    leave out (the output directory, when it lies inside the input).
    Too-deep directories yield ``(path, None)``.
    """
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    root_fd = os.open(input_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def visit(dir_fd: int, prefix: str, depth: int) -> Iterator[tuple[str, os.DirEntry[str] | None]]:
        with os.scandir(dir_fd) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            if entry.name.startswith("."):
                continue
            rel = prefix + entry.name
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
            except OSError:
                is_dir = False
            if not is_dir:
                yield rel, entry
                continue
            if exclude is not None:
                st = entry.stat(follow_symlinks=False)
                if (st.st_dev, st.st_ino) == exclude:
                    continue
            if depth >= MAX_DEPTH:
                yield rel + "/", None
                continue
            try:
                sub_fd = os.open(entry.name, flags, dir_fd=dir_fd)
            except OSError:
                yield rel, entry  # vanished or replaced by a symlink: let broker.open give the verdict
                continue
            try:
                yield from visit(sub_fd, rel + "/", depth + 1)
            finally:
                os.close(sub_fd)

    try:
        yield from visit(root_fd, "", 0)
    finally:
        os.close(root_fd)


def _is_symlink_to_dir(entry: os.DirEntry[str]) -> bool:
    """Whether ``entry`` is a symlink to a directory: the walk never follows it;
    following it here only picks the words for the report."""
    try:
        return entry.is_symlink() and entry.is_dir(follow_symlinks=True)
    except OSError:
        return False


MAX_NAME_BYTES = 255  # NAME_MAX: the longest file name (one path component) Linux file systems take


def plan(input_dir: str, fmt: str, *, exclude: tuple[int, int] | None = None) -> Plan:
    """Decide which files to convert and what each output is called.

    ``a.jpg`` becomes ``a.png``. If two inputs in a directory would make the
    same output, an input whose own name already is that output name keeps it
    (``b.jpg`` with ``--format jpeg``); the others keep their suffix too
    (``b.gif`` -> ``b.gif.jpg``; by name order when none is such an input:
    ``a.jpg`` -> ``a.png``, ``a.tif`` -> ``a.tif.png``), then ``~2``, ``~3`` ...
    go before the suffix (``b.gif~2.jpg``) if even that is taken. An output
    name longer than 255 bytes is refused here.
    """
    suffix = imaging.OUTPUT_FORMATS[fmt][1]
    result = Plan()
    wanted: list[tuple[str, str, str]] = []  # (rel, parent/, name), in walk order
    for rel, entry in walk(input_dir, exclude=exclude):
        shown = _printable(rel)
        if entry is None:
            result.rejected.append({"input": shown, "kind": "too-deep", "reason": f"nested deeper than {MAX_DEPTH}"})
            continue
        if _is_symlink_to_dir(entry):
            result.skipped.append({"input": shown, "reason": "a symlink to a directory (not followed)"})
            continue
        if Path(rel).suffix.lower() not in imaging.INPUT_SUFFIXES:
            result.skipped.append({"input": shown, "reason": "not an image file name"})
            continue
        if not _is_utf8(rel):
            result.rejected.append({"input": shown, "kind": "bad-name", "reason": "the file name is not valid UTF-8"})
            continue
        parent, _, name = rel.rpartition("/")
        wanted.append((rel, parent + "/" if parent else "", name))
    # Inputs already named as their output (b.jpg -> b.jpg) have that name first.
    own = {prefix + name for _, prefix, name in wanted if name.rsplit(".", 1)[0] + suffix == name}
    taken: set[str] = set()
    for rel, prefix, name in wanted:
        stem = name.rsplit(".", 1)[0]
        out = prefix + stem + suffix
        if out in taken or (out in own and stem + suffix != name):
            out = prefix + name + suffix
            n = 2
            while out in taken or out in own:
                out = f"{prefix}{name}~{n}{suffix}"
                n += 1
        if len(out.rpartition("/")[2].encode("utf-8")) > MAX_NAME_BYTES:
            reason = f"its thumbnail's name would be longer than {MAX_NAME_BYTES} bytes"
            result.rejected.append({"input": _printable(rel), "kind": "name-too-long", "reason": reason})
            continue
        taken.add(out)
        result.jobs.append(Job(rel, out))
    return result


def explain_refusal(path: str, exc: BaseException) -> str:
    """A clear reason for a file ``broker.open`` refused.

    The broker already decided; this only looks (lstat, never following) to
    say *what* the file is, for the report.
    """
    what = ""
    try:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            target = os.readlink(path)
            what = f"a symlink to {target!r}"
            if os.path.isabs(target) or target.startswith(".."):
                what += ", outside the input directory"
        elif stat.S_ISFIFO(st.st_mode):
            what = "a FIFO, not a regular file"
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            what = "a device, not a regular file"
        elif stat.S_ISSOCK(st.st_mode):
            what = "a socket, not a regular file"
    except OSError:
        pass
    detail = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__  # without the broker-side path
    return f"{what}; the broker refused it ({detail})" if what else f"the broker refused it ({detail})"


# --------------------------------------------------------------------------- classification


def classify(exc: BaseException, timeout: float) -> tuple[str, str]:
    """Map what a call raised to a (kind, reason) pair for the report."""
    from protocol import NotCapable, PolicyViolation, RemoteError, WorkerCrashed, WorkerTimeout

    if isinstance(exc, WorkerTimeout):
        return "timeout", f"took longer than {timeout:g} s; the worker was killed and replaced"
    if isinstance(exc, PolicyViolation):
        return "killed-by-sandbox", f"the sandbox killed the worker for calling {exc.syscall}(); it was replaced"
    if isinstance(exc, WorkerCrashed):
        return "worker-crashed", f"the worker died ({exc}); it was replaced"
    if isinstance(exc, NotCapable):
        return "not-capable", f"the broker refused it ({exc.strerror or exc})"
    if isinstance(exc, MemoryError):
        return imaging.TOO_LARGE, "the worker ran out of memory"
    if isinstance(exc, RemoteError):
        kind, reason = imaging.split_reason(exc.remote_message)
        return (kind, reason) if kind != "error" else ("error", f"{exc.type_name}: {exc.remote_message}")
    if isinstance(exc, ValueError):
        return imaging.split_reason(str(exc))
    return "error", f"{type(exc).__name__}: {exc}"


# --------------------------------------------------------------------------- the run


def sandbox_report(broker: Any, pool: Any) -> dict[str, Any] | None:
    """What sandbox layers the workers ran under, as each worker reported at sandbox entry.

    ### SANDBOX-REPORT: the one call site to adapt if the broker's API changes.
    """
    handles = list(getattr(pool, "workers", []) or []) + list(getattr(broker, "workers", []) or [])
    for handle in handles:
        value = getattr(handle, "sandbox", None)
        if isinstance(value, dict):
            return value
    return None


_RESULT_TYPES: dict[str, type | tuple[type, ...]] = {
    "width": int, "height": int, "format": str, "bytes": int, "source_format": (str, type(None)),
    "source_size": list, "animated": bool,
}  # fmt: skip


def accept_result(result: Any, fmt: str, size: int) -> dict[str, Any]:
    """Check what a worker returned before it goes into the report: the worker may be compromised.

    Only the known keys, with the right types and plausible values, are kept; anything else
    raises ``ValueError``.
    """
    if not isinstance(result, dict):
        raise ValueError(f"the worker returned a {type(result).__name__}, not a result")
    clean: dict[str, Any] = {}
    for key, kinds in _RESULT_TYPES.items():
        value = result.get(key)
        if not isinstance(value, kinds) or isinstance(value, bool) is not (kinds is bool):
            raise ValueError(f"the worker's result has a bad {key!r}")
        clean[key] = value
    if not (1 <= clean["width"] <= size and 1 <= clean["height"] <= size and clean["format"] == fmt):
        raise ValueError("the worker's result does not match the request")
    if clean["source_format"] is not None:
        clean["source_format"] = clean["source_format"][:16]
    sizes = clean["source_size"]
    if len(sizes) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in sizes):
        raise ValueError("the worker's result has a bad 'source_size'")
    return clean


class _Batch:
    """Feeds the pool with a bounded number of grants in flight and collects the results."""

    def __init__(self, args: argparse.Namespace, broker: Any, pool: Any, worker_cls: Any, report: dict[str, Any],
                 progress: Progress, input_dir: str, in_rel: str, out_rel: str, out_fd: int):  # fmt: skip
        from protocol import Rights

        self.args, self.broker, self.pool, self.worker_cls = args, broker, pool, worker_cls
        self.report, self.progress = report, progress
        self.input_dir, self.in_rel, self.out_rel, self.out_fd = input_dir, in_rel, out_rel, out_fd
        self.read_rights = Rights.READ | Rights.FSTAT | Rights.SEEK
        # task -> (job, its capability, when it started, what was at its output's name before)
        self.inflight: dict[Future[Any], tuple[Job, Any, float, tuple[int, int] | None]] = {}
        self.made_dirs: set[str] = set()

    def reject(self, rel: str, kind: str, reason: str) -> None:
        self.report["rejected"].append({"input": _printable(rel), "kind": kind, "reason": reason})
        self.progress.update(_printable(rel), False, f"{kind}: {reason}")

    def run(self, jobs: list[Job]) -> None:
        pending = iter(jobs)
        exhausted = False
        while True:
            # At most two grants per worker are open at a time: fds stay few however big the input.
            while not exhausted and len(self.inflight) < 2 * self.args.workers:
                job = next(pending, None)
                if job is None:
                    exhausted = True
                else:
                    self.start(job)
            if not self.inflight:
                break
            done, _ = wait(self.inflight, return_when=FIRST_COMPLETED)
            if self.report.get("sandbox") is None:  # workers start lazily; ask while one is alive
                self.report["sandbox"] = sandbox_report(self.broker, self.pool)
            for fut in done:
                self.finish(fut)
        self.report["sandbox"] = self.report.get("sandbox") or sandbox_report(self.broker, self.pool)

    def settle(self, stderr: TextIO) -> None:
        """After a Ctrl-C (the queued tasks cancelled): let the images being
        converted finish, so that the count said matches what is on disk; a
        second Ctrl-C kills their workers instead (what they wrote is then
        discarded, as for any call that does not return, and they are not
        counted: the user stopped them, not their images)."""
        for fut in [f for f in self.inflight if f.cancelled()]:
            self.inflight.pop(fut)[1].close()
        if not self.inflight:
            return
        n = len(self.inflight)
        print(f"thumbnailer: interrupted; finishing the {n} image{'s' if n > 1 else ''} in progress "
              "(Ctrl-C again to stop at once)", file=stderr, flush=True)
        try:
            wait(self.inflight)
        except KeyboardInterrupt:
            killed = self.pool.workers
            for handle in killed:
                handle.kill()
            wait(self.inflight)  # (at once now: each call ends with its worker)
            for fut in list(self.inflight):
                if _killed_by_us(fut):  # stopped by the user, not by the image: neither converted nor rejected
                    self.inflight.pop(fut)[1].close()
        for fut in list(self.inflight):
            self.finish(fut)

    def start(self, job: Job) -> None:
        from protocol import NotCapable

        try:
            cap = self.broker.open(f"{self.in_rel}/{job.rel}", self.read_rights)
        except NotCapable as exc:
            self.reject(job.rel, "not-capable", explain_refusal(os.path.join(self.input_dir, job.rel), exc))
            return
        except OSError as exc:
            self.reject(job.rel, "unreadable", f"{exc.strerror or exc}")
            return
        reldir = job.out.rpartition("/")[0]
        if reldir and reldir not in self.made_dirs:
            try:
                ensure_subdir(self.out_fd, reldir.split("/"))
                self.made_dirs.add(reldir)
            except OSError as exc:
                cap.close()
                self.reject(job.rel, "output-unsafe", f"cannot make {reldir}/ in the output: {exc.strerror}")
                return
        a = self.args
        before = self._identity(job.out)  # a thumbnail from an earlier run is there, maybe
        out = f"{self.out_rel}/{job.out}"
        # The output grant covers all of OUTPUT_DIR: this task may write its own thumbnail and
        # nothing else there, even if the image made its worker run code of its own.
        fut = self.pool.with_outputs(out).submit(self.worker_cls.thumbnail, cap, a.size, a.format, a.quality, out)
        self.inflight[fut] = (job, cap, time.monotonic(), before)

    def _stat(self, rel: str) -> os.stat_result | None:
        try:
            return os.stat(rel, dir_fd=self.out_fd, follow_symlinks=False)
        except OSError:
            return None

    def _identity(self, rel: str) -> tuple[int, int] | None:
        st = self._stat(rel)
        return None if st is None else (st.st_dev, st.st_ino)

    def finish(self, fut: Future[Any]) -> None:
        job, cap, t0, before = self.inflight.pop(fut)
        cap.close()
        try:
            result = accept_result(fut.result(), self.args.format, self.args.size)
        except Exception as exc:
            kind, reason = classify(exc, self.args.timeout)
            if kind in ("timeout", "killed-by-sandbox", "worker-crashed"):
                self.report["workers_replaced"] += 1
            self.reject(job.rel, kind, reason)
            return
        # What is on disk, not what the worker says: a file this task committed (a commit renames a
        # new file into place: not the one an earlier run left), and its real size.
        st = self._stat(job.out)
        if st is None or not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) == before:
            self.reject(job.rel, "error", "the worker said it wrote the thumbnail, and did not")
            return
        result["bytes"] = st.st_size
        item: dict[str, Any] = {"input": job.rel, "output": job.out, "seconds": round(time.monotonic() - t0, 4)}
        item.update(result)
        self.report["converted"].append(item)
        self.progress.update(job.rel, True, f"-> {job.out} ({result['width']}x{result['height']})")


def _killed_by_us(fut: Future[Any]) -> bool:
    """Did the call end because settle() killed its worker (a second Ctrl-C)?"""
    from protocol import WorkerCrashed

    exc = fut.exception()
    return isinstance(exc, WorkerCrashed) and exc.exit is not None and exc.exit.reason == "killed by the broker"


def _common_root(input_dir: str, output_dir: str) -> str:
    """The broker's root: the deepest directory holding both (never one of them)."""
    root = os.path.commonpath([input_dir, output_dir])
    while root in (input_dir, output_dir) and root != os.path.dirname(root):
        root = os.path.dirname(root)
    return root


def _rel(root: str, path: str) -> str:
    rel = os.path.relpath(path, root)
    return "" if rel == "." else rel


def run(
    args: argparse.Namespace,
    *,
    worker_cls: Any = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Convert everything; return the exit status. ``worker_cls`` lets tests substitute a worker."""
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    prog = getattr(args, "prog", PROG)  # (the name main() was given: `privsep demo`, say)
    notes: list[str] = []
    # The user names the directories, so resolving *their* symlinks is fine;
    # nothing beneath them is resolved here.
    if args.input is None:
        input_dir = str(SAMPLES_DIR)
        try:
            created = ensure_runtime_specials(SAMPLES_DIR)
            notes.extend(f"bundled samples: {n}" for n in created)
        except OSError as exc:
            notes.append(f"could not create the FIFO/symlink samples ({exc}); they are left out")
    else:
        input_dir = args.input
    input_dir = os.path.realpath(input_dir)
    if not os.path.isdir(input_dir):
        what = "is not a directory" if os.path.exists(input_dir) else "does not exist"
        build_parser(prog).error(f"INPUT_DIR {args.input!r} {what}")
    output_dir = os.path.realpath(args.output)
    if output_dir == input_dir:
        build_parser(prog).error("OUTPUT_DIR must not be INPUT_DIR")
    if os.path.commonpath([output_dir, input_dir]) == output_dir:
        # Thumbnails mirror the input tree beneath OUTPUT_DIR: one could land on an input
        # (photos/photos/a.png -> ./photos/a.jpg), and the output grant would cover the inputs.
        build_parser(prog).error(f"OUTPUT_DIR {args.output!r} must not contain INPUT_DIR {args.input or input_dir!r}")
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        build_parser(prog).error(f"OUTPUT_DIR {args.output!r} exists and is not a directory")
    created_output = not os.path.lexists(output_dir)
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as exc:
        build_parser(prog).error(f"cannot create OUTPUT_DIR {args.output!r}: {exc.strerror}")
    problem = writable_dir_problem(output_dir)  # (else every image would be "rejected", one by one)
    if problem:
        build_parser(prog).error(f"cannot write in OUTPUT_DIR {args.output!r}: {problem}")
    problem = json_target_problem(args.json)  # (after OUTPUT_DIR is made: the report may go in it)
    if problem:
        if created_output:
            rmdir_if_empty(output_dir)
        build_parser(prog).error(problem)
    out_st = os.stat(output_dir)

    the_plan = plan(input_dir, args.format, exclude=(out_st.st_dev, out_st.st_ino))
    inputs = [os.path.join(input_dir, job.rel) for job in the_plan.jobs]
    outputs = [os.path.join(output_dir, job.out) for job in the_plan.jobs]
    problem = json_replaces_input(args.json, inputs)
    if problem is None and json_report_path(args.json) in outputs:
        problem = f"--json {args.json!r} is the name of a thumbnail this run makes: one would replace the other"
    if problem:
        if created_output:
            rmdir_if_empty(output_dir)
        build_parser(prog).error(problem)
    if os.path.commonpath([output_dir, input_dir]) == input_dir:
        # Said, not left out in silence: images already in it are not converted (a probe).
        inside = _printable(os.path.relpath(output_dir, input_dir)) + "/"
        the_plan.skipped.insert(0, {"input": inside, "reason": "the output directory: left out of the walk"})
    root = _common_root(input_dir, output_dir)
    in_rel, out_rel = _rel(root, input_dir), _rel(root, output_dir)

    report: dict[str, Any] = {
        "input": input_dir,
        "output": output_dir,
        "format": args.format,
        "size": args.size,
        "quality": args.quality,
        "workers": args.workers,
        "timeout": args.timeout,
        "converted": [],
        "rejected": list(the_plan.rejected),
        "skipped": the_plan.skipped,
        "workers_replaced": 0,
        "notes": notes,
        "interrupted": False,
    }
    progress = Progress(stderr, len(the_plan.jobs) + len(the_plan.rejected), enabled=not args.quiet)
    for item in the_plan.rejected:
        progress.update(item["input"], False, f"{item['kind']}: {item['reason']}")

    started = time.monotonic()
    batch: _Batch | None = None
    out_fd = os.open(output_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            from broker import Broker, Policy
            from protocol import PrivsepError, Rights

            from .workers import Thumbnailer
        except ImportError as exc:
            progress.finish()
            print(f"thumbnailer: {missing_module(exc, 'examples')}", file=stderr)
            return EXIT_FATAL
        worker_cls = worker_cls or Thumbnailer
        read_rights = Rights.READ | Rights.FSTAT | Rights.SEEK
        policy = Policy().allow(f"{in_rel}/", read_rights).allow(f"{out_rel}/", Rights.WRITE | Rights.CREATE)
        try:
            with Broker(policy, root=root) as broker:
                pool = broker.pool(worker_cls, size=args.workers, timeout=args.timeout)
                batch = _Batch(args, broker, pool, worker_cls, report, progress, input_dir, in_rel, out_rel, out_fd)
                try:
                    batch.run(the_plan.jobs)
                except KeyboardInterrupt:
                    pool.shutdown(wait=False, cancel_futures=True)
                    progress.finish()
                    batch.settle(stderr)
                    report["interrupted"] = True
                finally:
                    pool.shutdown()
        except PrivsepError as exc:
            progress.finish()
            print(f"thumbnailer: cannot run the sandboxed workers: {type(exc).__name__}: {exc}", file=stderr)
            print("thumbnailer: `privsep check` shows what this kernel supports", file=stderr)
            return EXIT_FATAL
    except KeyboardInterrupt:  # while loading privsep or starting the broker (or stopping it)
        report["interrupted"] = True
    finally:
        os.close(out_fd)
    progress.finish()

    elapsed = time.monotonic() - started
    if created_output and not report["converted"] and rmdir_if_empty(output_dir):
        # (as unpack removes an OUTDIR it made and left empty: an empty INPUT_DIR, say)
        notes.append(f"nothing was converted: the empty {safe(output_dir)} this run made was removed")
    report["rejected"].sort(key=lambda r: r["input"])
    report["converted"].sort(key=lambda r: r["input"])
    report["counts"] = {
        "converted": len(report["converted"]),
        "rejected": len(report["rejected"]),
        "skipped": len(report["skipped"]),
    }
    report["seconds"] = round(elapsed, 4)
    report["images_per_second"] = round(len(report["converted"]) / elapsed, 2) if elapsed > 0 else 0.0
    summary = render_summary(report)
    if report["interrupted"]:
        status = interrupted_status()
        done = len(report["converted"])
        if batch is None:  # the sandboxed workers were not running yet: nothing to sum up
            print("thumbnailer: interrupted while starting the sandboxed workers; no image was converted",
                  file=stderr)  # fmt: skip
            summary = ""
        else:
            print(f"thumbnailer: interrupted after {done} of {len(the_plan.jobs)} images; the {done} "
                  f"thumbnails in {safe(output_dir)} are complete (none is partial)", file=stderr)  # fmt: skip
        stderr.flush()
    else:
        status = EXIT_REJECTED if report["rejected"] and args.strict else EXIT_OK
    report["exit_status"] = status

    if not emit(report, summary, args.json, stdout, stderr, prog="thumbnailer"):
        return EXIT_USAGE if status not in (EXIT_INTERRUPTED, EXIT_TERMINATED) else status
    return status


def main(argv: list[str] | None = None, *, prog: str = PROG, **kwargs: Any) -> int:
    """The command line; ``prog``: the name it goes by in usage messages (``privsep demo``)."""
    args = build_parser(prog).parse_args(argv)
    args.prog = prog
    try:
        with sigterm_stops_as_ctrl_c():
            return run(args, **kwargs)
    except SystemExit as exc:  # parser.error() inside run()
        return int(exc.code or 0)
    except KeyboardInterrupt:  # before the run started (walking INPUT_DIR) or after it (printing the summary)
        print(f"thumbnailer: interrupted ({interrupted_by()})", file=kwargs.get("stderr") or sys.stderr)
        return interrupted_status()
