"""Command line of the unpacker: the broker side.

The broker never parses the archive. It asks the sandboxed worker what the
next member is, checks the name and type itself (:mod:`.safety`), creates
directories itself (``mkdirat`` + ``O_NOFOLLOW``, beneath the output
directory's fd), and for each accepted file tells the worker the output path
to create; the worker streams the data into a file the broker commits only
if the member was complete and within the limits.
"""

from __future__ import annotations

import argparse
import errno
import os
import stat
import sys
import time
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

from .._safe_fs import ensure_subdir, missing_dirs, remove_made_dirs
from ..thumbnailer.progress import fmt_bytes
from . import safety
from .safety import Limits, Refused

PROG = "python3 -m examples.unpack"

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_FATAL = 3
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143

DESCRIPTION = """\
Extract an untrusted zip or tar archive (plain, .gz, .bz2, .xz) into OUTDIR.

The archive is parsed only inside a sandboxed worker, which holds nothing but
a read-only handle on ARCHIVE. This process (the broker) checks every
member's name and type, makes the directories, and lets the worker create
each file beneath OUTDIR; a file appears only once all its data arrived
within the limits, so a member cut short leaves nothing behind.

Refused, each with a message, and never written:
  * names with a '..' component (zip-slip), absolute names (/x, C:\\x, \\\\host\\x),
    names with backslashes, control characters, invalid UTF-8 or over-long parts
  * every symlink and hardlink member, wherever it points (the simplest rule
    that is safe: no link is ever created), device, FIFO and socket members
  * encrypted zip members; duplicate names; a file where a directory is needed
Zip bombs stop the extraction: the bytes actually coming out of the
decompressor are counted while streaming (headers are never trusted) against
--max-total for the whole archive and --max-ratio (output bytes per
compressed byte, per member and for the archive, checked past the first MiB;
the data a compressed tar decompresses to skip a refused member counts too);
--max-members caps the member count. Members finished before the stop are kept.

File modes, owners and times from the archive are not applied: files are
created 0644, directories 0755.
"""

EPILOG = f"""\
exit status:
  {EXIT_OK}    every member was extracted
  {EXIT_REFUSED}    some members were refused, or the extraction was stopped (bomb, damaged
       archive, worker crash or timeout), or ARCHIVE is not an archive
  {EXIT_USAGE}    usage error (missing arguments, OUTDIR not empty without --overwrite, ...)
  {EXIT_FATAL}    the sandboxed worker could not be started (see `privsep check`)
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C): the files extracted so far are kept and counted, none is partial;
       the summary and the --json report ("interrupted": true) are still given
  {EXIT_TERMINATED}  stopped by SIGTERM (kill, a service manager): the same as Ctrl-C

examples:
  {PROG} download.zip unpacked/
  {PROG} --max-total 10G --max-ratio 500 dump.tar.xz restore/
  {PROG} examples/unpack/samples/zip-slip.zip /tmp/out --json -   # a hostile sample
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("archive", metavar="ARCHIVE", help="the zip or tar file to extract")
    parser.add_argument(
        "outdir", metavar="OUTDIR",
        help="where to extract; created if missing (and removed if nothing was extracted), must be empty",
    )  # fmt: skip
    parser.add_argument(
        "--max-total", type=_size, default=Limits.max_total, metavar="SIZE",
        help="stop when the extracted bytes would pass SIZE (K/M/G suffixes; default: 1G)",
    )  # fmt: skip
    parser.add_argument(
        "--max-ratio", type=_ratio, default=Limits.max_ratio, metavar="N",
        help="stop when output exceeds N bytes per compressed byte (default: %(default)g)",
    )  # fmt: skip
    parser.add_argument(
        "--max-members", type=_count, default=Limits.max_members, metavar="N",
        help="stop after N members (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "-t", "--timeout", type=_seconds, default=60.0, metavar="SECONDS",
        help="time limit for each step of the worker (default: %(default)g)",
    )  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", help="allow a non-empty OUTDIR (files are replaced)")
    parser.add_argument("--json", metavar="FILE",
                        help="write a machine-readable report to FILE ('-' for stdout); never the ARCHIVE, and a "
                             "member at FILE's name in OUTDIR is refused")  # fmt: skip
    talk = parser.add_mutually_exclusive_group()
    talk.add_argument("-v", "--verbose", action="store_true",
                      help="list every member as it is extracted (else, on a terminal, a line counts them)")
    talk.add_argument("-q", "--quiet", action="store_true", help="print only the summary (no progress line)")
    return parser


def _size(text: str) -> int:
    try:
        value = safety.parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc))
    if value <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number")
    if not 1 <= value <= 1e6:
        raise argparse.ArgumentTypeError("must be between 1 and 1000000")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer")
    if not 1 <= value <= 10_000_000:
        raise argparse.ArgumentTypeError("must be between 1 and 10000000")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number")
    if not 0 < value <= 86400:
        raise argparse.ArgumentTypeError("must be in (0, 86400]")
    return value


def _common_root(a: str, b: str) -> str:
    root = os.path.commonpath([a, b])
    while root in (a, b) and root != os.path.dirname(root):
        root = os.path.dirname(root)
    return root


def classify(exc: BaseException, timeout: float) -> tuple[str, str]:
    """Map what a worker call raised to (kind, reason). Both are shown on the
    terminal and the worker wrote much of them: control characters (ANSI
    escapes, newlines) come out escaped."""
    kind, reason = _classify(exc, timeout)
    return safety.shown(kind), safety.shown(reason)


def _classify(exc: BaseException, timeout: float) -> tuple[str, str]:
    from protocol import NotCapable, PolicyViolation, RemoteError, WorkerCrashed, WorkerTimeout

    if isinstance(exc, WorkerTimeout):
        return "timeout", f"the worker took longer than {timeout:g} s and was killed"
    if isinstance(exc, PolicyViolation):
        return "killed-by-sandbox", f"the sandbox killed the worker for calling {exc.syscall}()"
    if isinstance(exc, WorkerCrashed):
        return "worker-crashed", f"the worker died: {exc}"
    if isinstance(exc, NotCapable):
        return "not-capable", f"refused by the broker: {exc}"
    if isinstance(exc, MemoryError):
        return "too-large", "the worker ran out of memory"
    if isinstance(exc, RemoteError):
        kind, reason = safety.split_reason(exc.remote_message)
        return (kind, reason) if kind != "error" else ("error", f"{exc.type_name}: {exc.remote_message}")
    if isinstance(exc, ValueError):
        return safety.split_reason(str(exc))
    if isinstance(exc, OSError) and exc.errno == errno.EFBIG:
        return safety.BOMB, "the kernel's file-size limit (RLIMIT_FSIZE, set from --max-total) stopped a write"
    if isinstance(exc, OSError):
        return "error", f"{exc.strerror or exc}"
    return "error", f"{type(exc).__name__}: {exc}"


class Extraction:
    """The broker's bookkeeping for one archive: what exists, what was refused, the real byte count."""

    def __init__(self, out_fd: int, limits: Limits, archive_size: int):
        self.out_fd = out_fd
        self.limits = limits
        self.archive_size = archive_size
        self.files: dict[tuple[str, ...], int] = {}
        self.inodes: set[tuple[int, int]] = set()  # (st_dev, st_ino) of every file landed
        self.dirs: set[tuple[str, ...]] = {()}
        self.refused: list[dict[str, str]] = []
        self.total = 0
        self.reserved: tuple[str, ...] | None = None  # the --json report's path in OUTDIR, if it is there

    def refuse(self, name: str, kind: str, reason: str) -> None:
        self.refused.append({"name": name, "kind": kind, "reason": reason})

    def plan_dir(self, parts: tuple[str, ...]) -> None:
        """Create directory ``parts`` (and its parents) beneath the output; raise Refused on a conflict."""
        for i in range(1, len(parts) + 1):
            if parts[:i] in self.files:
                raise Refused(safety.CONFLICT, f"{'/'.join(parts[:i])!r} is a file extracted earlier")
        if parts in self.dirs:
            return
        try:
            ensure_subdir(self.out_fd, parts)
        except OSError as exc:
            raise Refused(safety.CONFLICT, f"cannot make directory {'/'.join(parts)!r}: {exc.strerror}") from None
        for i in range(1, len(parts) + 1):
            self.dirs.add(parts[:i])

    def plan_file(self, parts: tuple[str, ...]) -> None:
        if parts == self.reserved:
            raise Refused(safety.CONFLICT, "the --json report is written at this name; not extracted")
        if parts in self.files:
            raise Refused(safety.DUPLICATE, "a member of the same name was extracted earlier; not overwritten")
        if parts in self.dirs:
            raise Refused(safety.CONFLICT, "a directory of the same name exists")
        self.plan_dir(parts[:-1])
        if self._lands_on_earlier(parts):
            # Another spelling of a name extracted earlier, on a filesystem that folds case
            # (or otherwise maps two names to one file): the commit would replace that file.
            raise Refused(safety.DUPLICATE, "a member extracted earlier has this name on this "
                          "filesystem (it folds case); not overwritten")

    def _lands_on_earlier(self, parts: tuple[str, ...]) -> bool:
        try:
            st = os.stat("/".join(parts), dir_fd=self.out_fd, follow_symlinks=False)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) in self.inodes

    def landed(self, parts: tuple[str, ...]) -> int | None:
        """The real size of a committed output, read by the broker (a worker's own count is not
        trusted); None if no regular file of that name is there (a worker that said it wrote
        one and did not)."""
        path = "/".join(parts)
        try:
            st = os.stat(path, dir_fd=self.out_fd, follow_symlinks=False)
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        self.files[parts] = st.st_size
        self.inodes.add((st.st_dev, st.st_ino))
        self.total += st.st_size
        return st.st_size

    def over_budget(self) -> str | None:
        lim = self.limits
        if self.total > lim.max_total:
            return f"{self.total:,} bytes extracted, over the --max-total limit of {lim.max_total:,}"
        if self.total > lim.ratio_grace and self.total > lim.max_ratio * max(1, self.archive_size):
            return f"{self.total:,} bytes from a {self.archive_size:,}-byte archive, over --max-ratio {lim.max_ratio:g}"
        return None


def sandbox_report(handle: Any) -> dict[str, Any] | None:
    """### SANDBOX-REPORT: the sandbox layers the worker entered (the handle's report)."""
    value = getattr(handle, "sandbox", None)
    return value if isinstance(value, dict) else None


class _Counter:
    """On a terminal, one line of progress, redrawn in place at most ten
    times a second (members are not counted up front: the archive is parsed
    only in the worker). Elsewhere, nothing: logs stay one line per event."""

    def __init__(self, stream: TextIO, enabled: bool):
        self.stream = stream
        self.enabled = enabled and stream.isatty()
        self._last = 0.0
        self._drawn = False

    def update(self, files: int, nbytes: int) -> None:
        now = time.monotonic()
        if not self.enabled or now - self._last < 0.1:
            return
        self._last = now
        self.stream.write(f"\r\x1b[2K  extracting: {files:,} file{'' if files == 1 else 's'}, {fmt_bytes(nbytes)}")
        self.stream.flush()
        self._drawn = True

    def clear(self) -> None:
        if self._drawn:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()
            self._drawn = False


def run(args: argparse.Namespace, *, worker_cls: type | None = None, stdout: TextIO | None = None,
        stderr: TextIO | None = None) -> int:  # fmt: skip
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    parser = build_parser()
    archive = os.path.realpath(args.archive)  # the user's own path: resolving it is fine
    if not os.path.isfile(archive):
        parser.error(f"ARCHIVE {args.archive!r} {'is not a file' if os.path.exists(archive) else 'does not exist'}")
    outdir = os.path.realpath(args.outdir)
    if os.path.exists(outdir) and not os.path.isdir(outdir):
        parser.error(f"OUTDIR {args.outdir!r} exists and is not a directory")
    made_dirs = missing_dirs(outdir)  # OUTDIR and the parents this run makes for it, deepest first
    try:
        os.makedirs(outdir, exist_ok=True)
    except OSError as exc:
        parser.error(f"cannot create OUTDIR {args.outdir!r}: {exc.strerror}")
    if not os.path.isdir(outdir):
        parser.error(f"OUTDIR {args.outdir!r} is not a directory")
    if os.listdir(outdir) and not args.overwrite:
        parser.error(f"OUTDIR {args.outdir!r} is not empty (use --overwrite to extract into it anyway)")
    problem = writable_dir_problem(outdir)  # (else every member would be refused, one by one)
    if problem:
        parser.error(f"cannot write in OUTDIR {args.outdir!r}: {problem}")
    problem = json_target_problem(args.json) or json_replaces_input(args.json, [archive])
    if problem:  # (after OUTDIR is made: the report may go in it)
        remove_made_dirs(made_dirs)
        parser.error(problem)
    limits = Limits(max_total=args.max_total, max_ratio=args.max_ratio, max_members=args.max_members)

    counter = _Counter(stderr, enabled=not args.quiet and not args.verbose)

    def say(line: str) -> None:
        if not args.quiet:
            counter.clear()
            print(line, file=stderr, flush=True)

    report: dict[str, Any] = {"archive": archive, "outdir": outdir, "limits": limits.to_wire(), "interrupted": False}
    stopped: dict[str, str] | None = None
    started = time.monotonic()
    out_fd = os.open(outdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    ex = Extraction(out_fd, limits, os.stat(archive).st_size)
    report_path = json_report_path(args.json)
    if report_path is not None and os.path.commonpath([outdir, report_path]) == outdir:
        ex.reserved = tuple(os.path.relpath(report_path, outdir).split(os.sep))  # (no member lands on it)
    members = 0
    extracting = False  # the sandboxed worker is up
    try:
        try:
            from broker import Broker, Policy
            from protocol import NotCapable, PrivsepError, Rights

            from .workers import Unpacker
        except ImportError as exc:
            print(f"unpack: {missing_module(exc, 'examples')}", file=stderr)
            return EXIT_FATAL
        worker_cls = worker_cls or Unpacker

        root = _common_root(os.path.dirname(archive), outdir)
        archive_rel = os.path.relpath(archive, root)
        out_rel = os.path.relpath(outdir, root)
        policy = (
            Policy()
            .allow(archive_rel, Rights.READ | Rights.FSTAT | Rights.SEEK)  # one file, not its directory
            .allow(out_rel + "/", Rights.WRITE | Rights.SEEK | Rights.FSTAT | Rights.CREATE)
            # RLIMIT_FSIZE: even a compromised worker cannot write one file past the total budget.
            .with_limits(file_size=limits.max_total + (1 << 16))
        )
        try:
            with Broker(policy, root=root) as broker:
                worker = broker.spawn(worker_cls)
                extracting = True
                report["sandbox"] = sandbox_report(worker)
                # No call may create an output but the one it is asked for (the grant covers all
                # of OUTDIR): even a compromised worker writes no other file, and replaces none.
                step = worker.with_timeout(args.timeout).with_outputs()
                try:
                    broker.open(archive_rel, Rights.READ).close()  # fail early, with the broker's reason, if refused
                    info = step.open_archive(archive_rel)
                    report["format"] = info.get("format")
                except NotCapable as exc:
                    stopped = {"kind": "not-capable", "reason": f"refused by the broker: {exc}"}
                except Exception as exc:
                    kind, reason = classify(exc, args.timeout)
                    stopped = {"kind": kind, "reason": reason}
                while stopped is None:
                    try:
                        member = step.next_member(limits.to_wire())
                    except Exception as exc:
                        kind, reason = classify(exc, args.timeout)
                        stopped = {"kind": kind, "reason": reason}
                        break
                    if member is None:
                        break
                    if not isinstance(member, dict):  # the worker is not trusted to describe members sanely
                        stopped = {"kind": "error", "reason": "the worker sent a malformed member description"}
                        break
                    members += 1
                    if members > limits.max_members:
                        stopped = {"kind": safety.TOO_MANY, "reason": f"more than {limits.max_members:,} members"}
                        break
                    raw = member.get("name")
                    shown = safety.printable(raw) if isinstance(raw, bytes) else repr(raw)
                    try:
                        parts = safety.check_name(raw)
                        kind = safety.check_type(member)
                        if kind == safety.DIR:
                            ex.plan_dir(parts)
                            if args.verbose:
                                say(f"  dir   {shown}")
                            continue
                        if not parts:
                            raise Refused(safety.UNSAFE_NAME, "a file member with an empty name")
                        ex.plan_file(parts)
                    except Refused as exc:
                        ex.refuse(shown, exc.kind, exc.reason)
                        say(f"  REFUSED {shown}: {exc.kind}: {exc.reason}")
                        continue
                    out = f"{out_rel}/{'/'.join(parts)}"
                    try:
                        step.with_outputs(out).extract_member(out, ex.total, limits.to_wire())
                    except Exception as exc:
                        kind, reason = classify(exc, args.timeout)
                        if kind in (safety.BOMB, "timeout", "killed-by-sandbox", "worker-crashed", "too-large"):
                            stopped = {"kind": kind, "reason": reason, "member": shown}
                            say(f"  STOPPED at {shown}: {kind}: {reason}")
                            break
                        ex.refuse(shown, kind, reason)
                        say(f"  REFUSED {shown}: {kind}: {reason}")
                        continue
                    size = ex.landed(parts)
                    if size is None:  # the call returned, yet no file of that name is there
                        ex.refuse(shown, "error", "the worker did not produce the file")
                        say(f"  REFUSED {shown}: error: the worker did not produce the file")
                        continue
                    if args.verbose:
                        say(f"  file  {shown} ({_count_of(size, 'byte')})")
                    counter.update(len(ex.files), ex.total)
                    over = ex.over_budget()  # the broker's own check on the real bytes (defence in depth)
                    if over:
                        stopped = {"kind": safety.BOMB, "reason": over, "member": shown}
                        say(f"  STOPPED after {shown}: bomb: {over}")
                        break
        except PrivsepError as exc:
            print(f"unpack: cannot run the sandboxed worker: {type(exc).__name__}: {exc}", file=stderr)
            print("unpack: `privsep check` shows what this kernel supports", file=stderr)
            return EXIT_FATAL
    except KeyboardInterrupt:  # (the broker is closed by now: the member in progress, if any, was discarded)
        report["interrupted"] = True
    finally:
        counter.clear()
        os.close(out_fd)
        # An OUTDIR this run made and left empty (not an archive, all refused, interrupted...) is not left behind.
        removed = 0 if _report_goes_in(outdir, args.json) else remove_made_dirs(made_dirs)
        outdir_removed = removed > 0

    summary_wanted = True
    if report["interrupted"]:
        n = len(ex.files)
        if extracting:
            print(f"unpack: interrupted after {n} file{'' if n == 1 else 's'}; what is in {safety.shown(outdir)} "
                  "is complete (none is partial)", file=stderr)  # fmt: skip
        else:  # the sandboxed worker was not running yet: nothing to sum up
            print("unpack: interrupted while starting the sandboxed worker; nothing was extracted", file=stderr)
            summary_wanted = False
        stderr.flush()
    elapsed = time.monotonic() - started
    report.update(
        {
            "extracted": [{"name": "/".join(p), "bytes": n} for p, n in ex.files.items()],
            "directories": sorted("/".join(d) for d in ex.dirs if d),
            "refused": ex.refused,
            "stopped": stopped,
            "members_seen": members,
            "bytes": ex.total,
            "seconds": round(elapsed, 4),
            "outdir_removed": outdir_removed,
            "parents_removed": max(0, removed - 1),  # directories made above OUTDIR for it, removed with it
        }
    )
    if report["interrupted"]:
        status = interrupted_status()
    else:
        status = EXIT_REFUSED if ex.refused or stopped else EXIT_OK
    report["exit_status"] = status
    if not emit(report, render(report) if summary_wanted else "", args.json, stdout, stderr, prog="unpack"):
        return EXIT_USAGE if status not in (EXIT_INTERRUPTED, EXIT_TERMINATED) else status
    return status


def _count_of(n: int, noun: str) -> str:
    """``1 file``, ``2 files``, ``0 directories``, ``1,024 bytes``."""
    if n == 1:
        return f"1 {noun}"
    return f"{n:,} " + (noun[:-1] + "ies" if noun.endswith("y") else noun + "s")


def _report_goes_in(directory: str, json_target: str | None) -> bool:
    """Whether the --json FILE is to be written in ``directory`` (or beneath it)."""
    if not json_target or json_target == "-":
        return False
    parent = os.path.realpath(os.path.dirname(os.path.abspath(json_target)))
    return parent == directory or parent.startswith(directory.rstrip("/") + "/")


def render(report: dict[str, Any]) -> str:
    from ..thumbnailer.progress import describe_sandbox

    name = os.path.basename(report["archive"])
    lines = [
        ("Interrupted: " if report.get("interrupted") else "")
        + f"{name} ({report.get('format') or 'unrecognised'}): extracted {_count_of(len(report['extracted']), 'file')}"
        f" ({_count_of(report['bytes'], 'byte')}) and {_count_of(len(report['directories']), 'directory')}"
        f" into {report['outdir']}/ in {report['seconds']:.2f} s"
    ]
    if report.get("outdir_removed"):
        parents = report.get("parents_removed") or 0
        above = f", with the {_count_of(parents, 'directory')} above it made for it" if parents else ""
        lines.append(f"Nothing was extracted: the empty {report['outdir']}/ this run made was removed{above}.")
    if report["refused"]:
        lines.append(f"Refused {_count_of(len(report['refused']), 'member')}:")
        width = min(40, max(len(r["name"]) for r in report["refused"]))
        kind_w = max(len(r["kind"]) for r in report["refused"])
        for r in report["refused"]:
            lines.append(f"  {r['name']:<{width}}  {r['kind']:<{kind_w}}  {r['reason']}")
    if report["stopped"]:
        s = report["stopped"]
        where = f" at {s['member']}" if s.get("member") else ""
        lines.append(f"Stopped{where}: {s['kind']}: {s['reason']}")
    lines.append("Sandbox layers the worker ran under:")
    lines.extend("  " + line for line in describe_sandbox(report.get("sandbox")))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None, **kwargs: Any) -> int:
    args = build_parser().parse_args(argv)
    try:
        with sigterm_stops_as_ctrl_c():
            return run(args, **kwargs)
    except SystemExit as exc:
        return int(exc.code or 0)
    except KeyboardInterrupt:  # before the extraction started or while printing the summary
        print(f"unpack: interrupted ({interrupted_by()})", file=kwargs.get("stderr") or sys.stderr)
        return interrupted_status()
