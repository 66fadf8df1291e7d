"""End to end: the unpack example on its bundled archives, hostile ones included.

Each archive goes through the real entry point with a real sandboxed
worker; the test checks what was extracted (byte for byte), each refusal
and its kind, where the run stopped, and that nothing landed outside the
output directory or was left half-written inside it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `examples` is not an installed package: import it from the checkout
    sys.path.insert(0, str(REPO))


from examples.unpack import cli, make_samples, safety  # noqa: E402
from examples.unpack.workers import Unpacker  # noqa: E402
from worker import rpc  # noqa: E402

SAMPLES = make_samples.SAMPLES_DIR
EXPECTED = make_samples.EXPECTED


def _run(archive: Path, out: Path, *extra: str, **kwargs: Any) -> tuple[int, dict[str, Any], str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    status = cli.main([str(archive), str(out), "--json", "-", *extra], stdout=stdout, stderr=stderr, **kwargs)
    return status, json.loads(stdout.getvalue()), stderr.getvalue()


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir()}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bundled_archive(tmp_path: Path, name: str) -> None:
    expected = EXPECTED[name]
    out = tmp_path / "out"
    status, report, stderr = _run(SAMPLES / name, out)

    # nothing outside the output directory, nothing hidden or partial inside it
    made_something = bool(report["extracted"] or report["directories"])
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out"] if made_something else [])  # (no empty OUTDIR)
    assert report["outdir_removed"] is not made_something
    assert not Path("/tmp/privsep-evil.txt").exists()
    assert not any(p.name.startswith(".") for p in out.rglob("*"))
    assert not any(p.is_symlink() for p in out.rglob("*"))
    assert all(p.is_file() or p.is_dir() for p in out.rglob("*"))  # no devices, no FIFOs

    files = _files(out)
    assert files == {e["name"] for e in report["extracted"]}
    if expected["files"] == "some":
        assert files
    else:
        assert files == set(expected["files"]), report
    if expected["refused"] != "any":
        assert [(r["name"], r["kind"]) for r in report["refused"]] == list(expected["refused"]), report["refused"]
    for r in report["refused"]:
        assert r["reason"] and r["name"] in stderr  # each refusal printed, with its reason
    stopped = report["stopped"]["kind"] if report["stopped"] else None
    assert stopped == expected["stopped"], report["stopped"]
    clean = not report["refused"] and stopped is None
    assert status == (cli.EXIT_OK if clean else cli.EXIT_REFUSED)
    if name.startswith("good"):
        for rel, data in make_samples.GOOD_TREE.items():
            assert (out / rel).read_bytes() == data
        assert (out / "empty-dir").is_dir()
    for rel in files:
        assert (out / rel).stat().st_mode & 0o7777 == 0o644  # no modes (setuid, exec) from the archive


def test_report_names_the_sandbox_layers(tmp_path: Path) -> None:
    status, report, _ = _run(SAMPLES / "good.zip", tmp_path / "out")
    assert status == cli.EXIT_OK
    layers = report["sandbox"]["layers"]
    assert any(layer.startswith("seccomp") for layer in layers) and "no_new_privs" in layers


def test_bombs_stop_while_streaming_not_from_headers(tmp_path: Path) -> None:
    _, report, _ = _run(SAMPLES / "zip-bomb.zip", tmp_path / "a")
    assert report["stopped"]["member"] == "zeros.bin"
    assert ":1" in report["stopped"]["reason"]  # the ratio that was passed
    assert report["bytes"] < 1 << 20  # the bomb's output never landed
    # total-size limit: a good archive with a tiny budget
    status, report, _ = _run(SAMPLES / "good.zip", tmp_path / "b", "--max-total", "1K")
    assert status == cli.EXIT_REFUSED
    assert report["stopped"]["kind"] == "bomb" and "total" in report["stopped"]["reason"]
    assert report["bytes"] <= 1024
    # member-count limit
    status, report, _ = _run(SAMPLES / "good.zip", tmp_path / "c", "--max-members", "2")
    assert report["stopped"]["kind"] == safety.TOO_MANY and status == cli.EXIT_REFUSED


def test_a_bomb_is_fine_when_the_user_raises_the_limits(tmp_path: Path) -> None:
    status, report, _ = _run(SAMPLES / "tar-bomb.tar.gz", tmp_path / "out", "--max-ratio", "10000")
    assert status == cli.EXIT_OK, report
    assert (tmp_path / "out" / "zeros.bin").stat().st_size == make_samples.BOMB_BYTES


class Crashing(Unpacker):
    """Dies half-way through writing ``numbers.csv`` (module level: importable by every spawn method)."""

    @rpc
    def extract_member(self, out: str, total_so_far: int, limits: dict[str, Any]) -> dict[str, int]:
        if out.endswith("numbers.csv"):
            dst = self.broker.create(out)
            dst.write(b"n,sq")
            dst.flush()
            os._exit(9)
        return super().extract_member(out, total_so_far, limits)


def test_crashed_worker_leaves_no_partial_file(tmp_path: Path) -> None:
    status, report, _ = _run(SAMPLES / "good.zip", tmp_path / "out", worker_cls=Crashing)
    assert status == cli.EXIT_REFUSED
    assert report["stopped"]["kind"] == "worker-crashed"
    assert not (tmp_path / "out" / "data" / "numbers.csv").exists()
    assert not any(p.name.startswith(".") for p in (tmp_path / "out").rglob("*"))


class Shouting(Unpacker):
    """A 'compromised' worker whose errors carry terminal escapes."""

    @rpc
    def extract_member(self, out: str, total_so_far: int, limits: dict[str, Any]) -> dict[str, int]:
        if out.endswith("numbers.csv"):
            raise ValueError("\x1b]0;owned\x07\x1b[2J\rfine\nunpack: all members extracted")
        return super().extract_member(out, total_so_far, limits)


def test_a_workers_text_reaches_the_terminal_escaped(tmp_path: Path) -> None:
    """A worker's exception message went to the terminal as it was: ANSI
    escapes (retitle, clear screen) and a forged line of the CLI's own."""
    status, report, stderr = _run(SAMPLES / "good.zip", tmp_path / "out", worker_cls=Shouting)
    assert status == cli.EXIT_REFUSED
    (refused,) = [r for r in report["refused"] if r["name"].endswith("numbers.csv")]
    assert refused["reason"] == "\\x1b]0;owned\\x07\\x1b[2J\\rfine\\nunpack: all members extracted"
    assert "\x1b" not in stderr and "\r" not in stderr
    assert all(line.isprintable() for line in stderr.splitlines()), stderr


class Sleepy(Unpacker):
    """Takes its time over ``numbers.csv``, its third member, having written half of it."""

    @rpc
    def extract_member(self, out: str, total_so_far: int, limits: dict[str, Any]) -> dict[str, int]:
        if out.endswith("numbers.csv"):
            with self.broker.create(out) as dst:
                dst.write(b"n,sq\n")
            import time

            time.sleep(30)
        return super().extract_member(out, total_so_far, limits)


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_ctrl_c_counts_what_was_extracted_and_leaves_nothing_partial(tmp_path: Path, signame: str) -> None:
    """SIGTERM (which ended the run with no summary and no report) stops it as Ctrl-C does, with exit status 143."""
    import signal
    import threading
    import time

    out = tmp_path / "out"
    sig = getattr(signal, signame)
    expected = cli.EXIT_INTERRUPTED if sig == signal.SIGINT else cli.EXIT_TERMINATED

    def interrupt_after_two_files() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(_files(out) if out.is_dir() else ()) < 2:
            time.sleep(0.01)
        time.sleep(0.3)
        signal.pthread_kill(threading.main_thread().ident, sig)  # type: ignore[arg-type]

    threading.Thread(target=interrupt_after_two_files, daemon=True).start()
    started = time.monotonic()
    stdout, stderr = io.StringIO(), io.StringIO()
    status = cli.main([str(SAMPLES / "good.zip"), str(out), "--quiet", "--json", "-"], worker_cls=Sleepy,
                      stdout=stdout, stderr=stderr)  # fmt: skip
    assert status == expected and time.monotonic() - started < 20
    assert _files(out) == {"docs/readme.txt", "docs/guide/intro.md"}  # not the half-written numbers.csv
    assert not any(p.name.startswith(".") for p in out.rglob("*"))
    said = f"unpack: interrupted after 2 files; what is in {out} is complete (none is partial)\n"
    # the report and the summary too (there were none after a Ctrl-C); the summary after that line
    assert stderr.getvalue().startswith(said + "Interrupted: good.zip (zip): extracted 2 files "), stderr.getvalue()
    report = json.loads(stdout.getvalue())
    assert report["interrupted"] is True and report["exit_status"] == expected
    assert sorted(e["name"] for e in report["extracted"]) == ["docs/guide/intro.md", "docs/readme.txt"]


class IgnoresBudget(Unpacker):
    """A 'compromised' worker: writes 4 MiB whatever the limits say."""

    @rpc
    def extract_member(self, out: str, total_so_far: int, limits: dict[str, Any]) -> dict[str, int]:
        from examples.unpack.workers import OUTPUT_RIGHTS

        with self.broker.create(out, OUTPUT_RIGHTS) as dst:
            for _ in range(64):
                dst.write(bytes(1 << 16))
        return {"bytes": 4 << 20, "consumed": 0}


def test_file_size_limit_holds_even_if_the_worker_ignores_the_budget(tmp_path: Path) -> None:
    """--max-total also becomes the worker's RLIMIT_FSIZE: the kernel stops the write, not the worker's goodwill."""
    status, report, _ = _run(SAMPLES / "good.zip", tmp_path / "out", "--max-total", "1M", worker_cls=IgnoresBudget)
    assert status == cli.EXIT_REFUSED
    assert report["stopped"]["kind"] == "bomb" and "RLIMIT_FSIZE" in report["stopped"]["reason"], report
    assert report["extracted"] == []
    assert all(p.stat().st_size <= (1 << 20) + (1 << 16) for p in (tmp_path / "out").rglob("*") if p.is_file())


def test_unicode_and_unsafe_names(tmp_path: Path) -> None:
    archive = tmp_path / "names.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("café/naïve.txt", b"ok")
        zf.writestr("bell\x07.txt", b"control character")
        zf.writestr("x" * 300, b"component too long")
        zf.writestr("./a/./b//c.txt", b"normalised")
    status, report, _ = _run(archive, tmp_path / "out")
    assert status == cli.EXIT_REFUSED
    assert _files(tmp_path / "out") == {"café/naïve.txt", "a/b/c.txt"}
    assert sorted(r["kind"] for r in report["refused"]) == ["unsafe-name", "unsafe-name"]


def test_output_symlink_planted_beforehand_is_not_followed(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, out / "docs")  # e.g. left by an earlier, different tool
    status, report, _ = _run(SAMPLES / "good.zip", out, "--overwrite")
    assert status == cli.EXIT_REFUSED
    assert list(outside.iterdir()) == []
    assert {r["kind"] for r in report["refused"]} == {safety.CONFLICT}


def test_cli_subprocess_and_usage(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "examples.unpack", str(SAMPLES / "zip-slip.zip"), str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == cli.EXIT_REFUSED, proc.stderr
    assert "path-traversal" in proc.stdout and "../evil.txt" in proc.stdout
    assert _files(out) == {"ok.txt"}
    assert not (tmp_path / "evil.txt").exists()
    # a non-empty OUTDIR without --overwrite, a missing archive: usage errors
    for argv in ([str(SAMPLES / "good.zip"), str(out)], [str(tmp_path / "missing.zip"), str(tmp_path / "o")], []):
        proc = subprocess.run([sys.executable, "-m", "examples.unpack", *argv], cwd=REPO, capture_output=True,
                              text=True, timeout=60)  # fmt: skip
        assert proc.returncode == cli.EXIT_USAGE, (argv, proc.stderr)
    proc = subprocess.run([sys.executable, "-m", "examples.unpack", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0 and "zip-slip" in proc.stdout and "exit status" in proc.stdout


@pytest.mark.parametrize(
    ("raw", "kind"),
    [
        (b"../x", safety.PATH_TRAVERSAL), (b"a/../../x", safety.PATH_TRAVERSAL), (b"a/..", safety.PATH_TRAVERSAL),
        (b"/etc/passwd", safety.ABSOLUTE), (b"C:/x", safety.ABSOLUTE), (b"\\\\host\\share", safety.ABSOLUTE),
        (b"..\\x", safety.PATH_TRAVERSAL), (b"a\\b", safety.UNSAFE_NAME), (b"a\x00b", safety.UNSAFE_NAME),
        (b"\xff\xfe", safety.UNSAFE_NAME), ("a\u202eb".encode(), safety.UNSAFE_NAME),
        (b"a/" * 70 + b"x", safety.UNSAFE_NAME),
    ],
)  # fmt: skip
def test_check_name_refuses(raw: bytes, kind: str) -> None:
    with pytest.raises(safety.Refused) as info:
        safety.check_name(raw)
    assert info.value.kind == kind


def test_check_name_accepts() -> None:
    assert safety.check_name(b"./a//b/./c.txt") == ("a", "b", "c.txt")
    assert safety.check_name(b"./") == ()
    assert safety.check_name("日本/語.txt".encode()) == ("日本", "語.txt")
    assert safety.check_name(b"..foo/bar..") == ("..foo", "bar..")


def test_samples_are_reproducible(tmp_path: Path) -> None:
    for path in make_samples.generate(tmp_path):
        assert path.read_bytes() == (SAMPLES / path.name).read_bytes(), path.name
    assert sum(p.stat().st_size for p in SAMPLES.iterdir()) < 500_000


@pytest.mark.parametrize("kind", ["zip-stored", "zip-deflated", "zip-bzip2", "zip-lzma", "tar", "tar.gz", "tar.bz2",
                                  "tar.xz"])  # fmt: skip
def test_every_compression_works_in_the_sandbox(tmp_path: Path, kind: str) -> None:
    """Each codec must be loaded in setup(): a lazy import after sandbox entry would kill the worker."""
    import tarfile

    archive = tmp_path / f"a.{kind}"
    payload = {"dir/é.txt": "héllo".encode(), "big.bin": bytes(range(256)) * 400}
    if kind.startswith("zip"):
        method = {"stored": zipfile.ZIP_STORED, "deflated": zipfile.ZIP_DEFLATED, "bzip2": zipfile.ZIP_BZIP2,
                  "lzma": zipfile.ZIP_LZMA}[kind.split("-")[1]]  # fmt: skip
        with zipfile.ZipFile(archive, "w", compression=method) as zf:
            for name, data in payload.items():
                zf.writestr(name, data)
    else:
        mode = "w" if kind == "tar" else "w:" + kind.split(".")[1]
        with tarfile.open(archive, mode) as tf:  # type: ignore[call-overload]
            for name, data in payload.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    status, report, _ = _run(archive, tmp_path / "out")
    assert status == cli.EXIT_OK, report
    for name, data in payload.items():
        assert (tmp_path / "out" / name).read_bytes() == data


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_long_extraction_shows_its_progress_on_a_terminal(tmp_path: Path) -> None:
    """5,000 members took 4-10 s with nothing on the screen until the end."""
    archive = tmp_path / "many.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for i in range(40):
            z.writestr(f"d/f{i}.txt", b"x" * 100)
    err, out = _Terminal(), io.StringIO()
    assert cli.main([str(archive), str(tmp_path / "out")], stdout=out, stderr=err) == cli.EXIT_OK
    text = err.getvalue()
    assert text.startswith("\r\x1b[2K  extracting: 1 file, 100 B")
    assert text.endswith("\r\x1b[2K")  # cleared before the summary
    assert "extracted 40 files" in out.getvalue()
    plain = io.StringIO()  # not a terminal (a log, CI): no progress line
    assert cli.main([str(archive), str(tmp_path / "out2")], stdout=io.StringIO(), stderr=plain) == cli.EXIT_OK
    assert "extracting:" not in plain.getvalue()


def test_a_json_target_that_cannot_be_written_is_a_usage_error_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--json FILE was opened only after the extraction: a missing directory, or a
    directory as FILE, crashed at the end with a traceback naming a temporary."""
    out = tmp_path / "out"
    (tmp_path / "adir").mkdir()
    cases = {
        str(tmp_path / "nodir" / "r.json"): f"the directory '{tmp_path / 'nodir'}' does not exist",
        str(tmp_path / "adir"): f"--json '{tmp_path / 'adir'}' is a directory",
    }
    for target, message in cases.items():
        status = cli.main([str(SAMPLES / "good.zip"), str(out), "--json", target],
                          stdout=io.StringIO(), stderr=io.StringIO())  # fmt: skip
        assert status == cli.EXIT_USAGE
        err = capsys.readouterr().err
        assert err.splitlines()[-1].startswith(f"{cli.PROG}: error: --json ") and message in err, err
        assert not out.exists()  # nothing extracted, no OUTDIR left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir"]
    # the report may go in OUTDIR, which does not exist yet
    status = cli.main([str(SAMPLES / "good.zip"), str(out), "--json", str(out / "r.json")],
                      stdout=io.StringIO(), stderr=io.StringIO())  # fmt: skip
    assert status == cli.EXIT_OK
    assert json.loads((out / "r.json").read_text())["exit_status"] == cli.EXIT_OK


def test_ctrl_c_while_the_broker_starts_is_one_line_and_a_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C in the first ~0.3 s (the broker's zygote booting) printed a traceback."""
    import signal

    import broker

    class Interrupted(broker.Broker):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            signal.raise_signal(signal.SIGINT)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(broker, "Broker", Interrupted)
    stdout, stderr = io.StringIO(), io.StringIO()
    try:
        status = cli.main([str(SAMPLES / "good.zip"), str(tmp_path / "out"), "--json", "-"],
                          stdout=stdout, stderr=stderr)  # fmt: skip
    except KeyboardInterrupt:
        pytest.fail("the Ctrl-C escaped main(): a traceback")
    assert status == cli.EXIT_INTERRUPTED
    assert stderr.getvalue() == "unpack: interrupted while starting the sandboxed worker; nothing was extracted\n"
    report = json.loads(stdout.getvalue())
    assert report["interrupted"] is True and report["exit_status"] == cli.EXIT_INTERRUPTED
    assert report["extracted"] == []


def test_ctrl_c_while_the_program_loads_is_one_line(tmp_path: Path) -> None:
    code = """
import runpy, signal, sys
class CtrlC:
    def find_spec(self, name, path, target=None):
        if name == "examples.unpack.safety":
            signal.raise_signal(signal.SIGINT)
        return None
sys.meta_path.insert(0, CtrlC())
sys.argv = ["unpack", *sys.argv[1:]]
runpy.run_module("examples.unpack", run_name="__main__", alter_sys=True)
"""
    proc = subprocess.run([sys.executable, "-c", code, str(SAMPLES / "good.zip"), str(tmp_path / "out")], cwd=REPO,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert (proc.returncode, proc.stderr, proc.stdout) == (cli.EXIT_INTERRUPTED, "unpack: interrupted (Ctrl-C)\n", "")


def test_an_outdir_that_cannot_be_written_is_a_usage_error(
    tmp_path: Path, unwritable: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every member was refused, one by one, instead of one clear usage error."""
    stdout = io.StringIO()
    status = cli.main([str(SAMPLES / "good.zip"), str(unwritable)], stdout=stdout, stderr=io.StringIO())
    assert status == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith(f"{cli.PROG}: error: cannot write in OUTDIR '{unwritable}': "), err
    assert stdout.getvalue() == ""


def test_counts_in_the_singular_and_no_empty_outdir_left(tmp_path: Path) -> None:
    """It said "extracted 1 files ... and 1 directories", "Refused 1 members:"; and an OUTDIR
    the run made stayed behind, empty, when nothing was extracted."""
    archive = tmp_path / "one.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("d/a.txt", b"x")
        zf.writestr("../evil.txt", b"no")
    stdout = io.StringIO()
    assert cli.main([str(archive), str(tmp_path / "out")], stdout=stdout, stderr=io.StringIO()) == cli.EXIT_REFUSED
    lines = stdout.getvalue().splitlines()
    assert lines[0].startswith(f"one.zip (zip): extracted 1 file (1 byte) and 1 directory into {tmp_path / 'out'}/ ")
    assert lines[1] == "Refused 1 member:"
    # not an archive: the OUTDIR this run made is removed, one that was there is kept
    stdout = io.StringIO()
    status = cli.main([str(SAMPLES / "not-an-archive.zip"), str(tmp_path / "new")], stdout=stdout,
                      stderr=io.StringIO())  # fmt: skip
    assert status == cli.EXIT_REFUSED and not (tmp_path / "new").exists()
    assert stdout.getvalue().splitlines()[1] == (
        f"Nothing was extracted: the empty {tmp_path / 'new'}/ this run made was removed."
    )
    # and so are the parents it made for it (they stayed), never one that was there
    stdout = io.StringIO()
    status = cli.main([str(SAMPLES / "not-an-archive.zip"), str(tmp_path / "p1" / "p2" / "new")], stdout=stdout,
                      stderr=io.StringIO())  # fmt: skip
    assert status == cli.EXIT_REFUSED and not (tmp_path / "p1").exists() and tmp_path.is_dir()
    assert stdout.getvalue().splitlines()[1] == (
        f"Nothing was extracted: the empty {tmp_path / 'p1' / 'p2' / 'new'}/ this run made was removed, with the "
        "2 directories above it made for it."
    )
    (tmp_path / "there").mkdir()
    status = cli.main([str(SAMPLES / "not-an-archive.zip"), str(tmp_path / "there"), "--json", "-"],
                      stdout=io.StringIO(), stderr=io.StringIO())  # fmt: skip
    assert status == cli.EXIT_REFUSED and (tmp_path / "there").is_dir()
    # nor when the report goes in it
    status = cli.main([str(SAMPLES / "not-an-archive.zip"), str(tmp_path / "new"), "--json",
                       str(tmp_path / "new" / "r.json")], stdout=io.StringIO(), stderr=io.StringIO())  # fmt: skip
    assert status == cli.EXIT_REFUSED
    assert json.loads((tmp_path / "new" / "r.json").read_text())["outdir_removed"] is False


def test_usage_errors_say_what_is_wrong(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """OUTDIR naming a file said "cannot create OUTDIR '...': File exists"."""
    file = tmp_path / "file"
    file.write_text("")
    cases = {
        (str(SAMPLES / "good.zip"), str(file)): f"OUTDIR '{file}' exists and is not a directory",
        (str(tmp_path / "missing.zip"), str(tmp_path / "o")): f"ARCHIVE '{tmp_path / 'missing.zip'}' does not exist",
        (str(tmp_path), str(tmp_path / "o")): f"ARCHIVE '{tmp_path}' is not a file",
        # -q with -v: -v was ignored
        (str(SAMPLES / "good.zip"), str(tmp_path / "o"), "-q", "-v"): "argument -v/--verbose: not allowed with "
                                                                       "argument -q/--quiet",
    }
    for argv, message in cases.items():
        try:
            status = cli.main(list(argv), stdout=io.StringIO(), stderr=io.StringIO())
        except SystemExit as exc:  # (argparse's own errors exit, as `python3 -m` would)
            status = exc.code
        assert status == cli.EXIT_USAGE
        assert capsys.readouterr().err.splitlines()[-1] == f"{cli.PROG}: error: {message}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


class Sprayer(Unpacker):
    """A compromised worker: besides the output it is asked for, it writes
    files of its own choosing beneath OUTDIR, one of them over a user's."""

    @rpc
    def extract_member(self, out: str, total_so_far: int, limits: dict[str, Any]) -> dict[str, int]:
        from examples.unpack.workers import OUTPUT_RIGHTS
        from protocol import NotCapable

        base = os.path.dirname(out)
        refused = 0
        for extra in ("keep.txt", f"hidden-{total_so_far}.bin"):
            try:
                with self.broker.create(f"{base}/{extra}", OUTPUT_RIGHTS) as f:
                    f.write(b"OVERWRITTEN BY THE WORKER")
            except NotCapable:
                refused += 1
        if refused != 2:
            raise ValueError(f"corrupt: only {refused} of 2 extra outputs were refused")
        return super().extract_member(out, total_so_far, limits)


class Silent(Unpacker):
    """A compromised worker that says it extracted a member and wrote nothing."""

    @rpc
    def extract_member(self, out: str, total_so_far: int, limits: dict[str, Any]) -> dict[str, int]:
        return {"bytes": 0, "consumed": 0}


def test_a_compromised_worker_writes_no_file_but_the_member_it_is_asked_for(tmp_path: Path) -> None:
    """The worker holds CREATE on all of OUTDIR: each call could create or
    replace any file there, past --max-total and the report (a red-team run
    wrote 43 files, 160 MiB, over a user's file, with exit 0). Each call may
    now create only the output the broker named."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("the user's own")
    status, report, _ = _run(SAMPLES / "good.zip", out, "--overwrite", worker_cls=Sprayer)
    assert status == 0, report
    assert (out / "keep.txt").read_text() == "the user's own"
    assert not any(name.startswith("hidden-") for name in os.listdir(out))
    assert _files(out) == {"keep.txt"} | {e["name"] for e in report["extracted"]}


def test_a_worker_that_writes_nothing_is_reported_not_a_crash(tmp_path: Path) -> None:
    """landed() stat'ed the named file and the error escaped: no summary, no report."""
    out = tmp_path / "out"
    status, report, _ = _run(SAMPLES / "good.zip", out, worker_cls=Silent)
    assert status == 1 and report["extracted"] == []
    assert report["refused"] and all(r["reason"] == "the worker did not produce the file" for r in report["refused"])


@pytest.mark.parametrize("compression", ["gz", "xz"])
def test_a_tar_members_ratio_counts_what_was_read_with_its_header(tmp_path: Path, compression: str) -> None:
    """Reading a compressed tar member's header pulls a block of compressed
    input, which may hold all of the member's data; it was counted from after
    that read, so a 4 MiB member of zeros expanded "from 0 B compressed" and
    was refused at any --max-ratio (a probe), and a 3 MiB member of 83:1 at
    the default 100:1."""
    import tarfile

    archive = tmp_path / f"zeros.tar.{compression}"
    size = 4 << 20
    with tarfile.open(archive, f"w:{compression}") as tf:
        member = tarfile.TarInfo("zeros.bin")
        member.size = size
        tf.addfile(member, io.BytesIO(bytes(size)))
    status, report, _ = _run(archive, tmp_path / "a", "--max-ratio", "1000000")
    assert status == cli.EXIT_OK, report
    assert (tmp_path / "a" / "zeros.bin").stat().st_size == size
    status, report, _ = _run(archive, tmp_path / "b")  # (about 1000:1 or more: a bomb at 100:1)
    assert status == cli.EXIT_REFUSED and report["stopped"]["kind"] == "bomb", report
    assert "from 0 B compressed" not in report["stopped"]["reason"]


def test_a_json_report_never_replaces_the_archive_or_an_extracted_file(tmp_path: Path) -> None:
    """`--json` naming the archive replaced it with the report; naming a
    member's path in OUTDIR replaced the extracted file (a probe). The first
    is a usage error; the member at the report's name is refused."""
    archive = tmp_path / "g.zip"
    archive.write_bytes((SAMPLES / "good.zip").read_bytes())
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        status = cli.main([str(archive), str(tmp_path / "a"), "--json", str(archive)],
                          stdout=io.StringIO(), stderr=io.StringIO())  # fmt: skip
    assert status == 2 and "is an input of this run" in stderr.getvalue()
    assert archive.read_bytes() == (SAMPLES / "good.zip").read_bytes()
    out = tmp_path / "b"
    status = cli.main([str(archive), str(out), "--json", str(out / "hello.txt")],
                      stdout=io.StringIO(), stderr=io.StringIO())  # fmt: skip
    report = json.loads((out / "hello.txt").read_text())
    assert status == cli.EXIT_REFUSED
    assert report["refused"] == [{"kind": "conflict", "name": "hello.txt",
                                  "reason": "the --json report is written at this name; not extracted"}]


def test_the_data_of_a_refused_tar_member_counts_against_the_ratio(tmp_path: Path) -> None:
    """Skipping a member the broker refused decompresses its data to reach the
    next header, and those bytes were not counted: a 2.7 KB .tar.bz2 kept the
    run busy for seconds per member, up to hours for a larger one (a
    red-team run), and nothing stopped it."""
    import tarfile

    archive = tmp_path / "skip.tar.gz"
    size = 64 << 20
    with tarfile.open(archive, "w:gz", compresslevel=1) as tf:
        evil = tarfile.TarInfo("../refused-and-skipped")
        evil.size = size
        tf.addfile(evil, io.BytesIO(bytes(size)))
        ok = tarfile.TarInfo("ok.txt")
        ok.size = 2
        tf.addfile(ok, io.BytesIO(b"ok"))
    assert archive.stat().st_size * 100 < size  # far past --max-ratio 100
    status, report, _ = _run(archive, tmp_path / "out")
    assert status == 1
    assert report["stopped"] is not None and report["stopped"]["kind"] == "bomb", report
    assert "the next member starts 64.0 MiB into the data" in report["stopped"]["reason"]
    assert [r["kind"] for r in report["refused"]] == ["path-traversal"], report


def test_another_spelling_of_an_extracted_name_is_not_overwritten(tmp_path: Path) -> None:
    """On a filesystem that folds case, ``A.txt`` then ``a.txt`` name one
    file, and the second member's commit replaced the first with no word
    (the duplicate check compared the names). This kernel has no casefolding
    (no CONFIG_UNICODE: tmpfs refuses ``-o casefold``), so a hard link stands
    in for the folded name: two names, one file. A file that was there before
    the run (``--overwrite``) is still replaced, as that option says."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "before.txt").write_text("there before the run")
    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    try:
        ex = cli.Extraction(fd, safety.Limits(), 1000)
        (out / "A.txt").write_text("first member")
        assert ex.landed(("A.txt",)) == len("first member")
        os.link(out / "A.txt", out / "a.txt")  # what a casefolded lookup of "a.txt" finds
        with pytest.raises(safety.Refused) as info:
            ex.plan_file(("a.txt",))
        assert info.value.kind == safety.DUPLICATE and "folds case" in info.value.reason
        ex.plan_file(("b.txt",))  # a new name
        ex.plan_file(("before.txt",))  # not extracted by this run: --overwrite replaces it
    finally:
        os.close(fd)
    assert (out / "A.txt").read_text() == "first member"
