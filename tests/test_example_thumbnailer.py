"""End to end: the thumbnailer example on its bundled samples, hostile ones included.

Runs the real entry point (``python3 -m examples.thumbnailer`` in a
subprocess, and ``main()`` in-process for the variations), with real
sandboxed workers, and checks the outputs, the per-file reasons, and that
nothing partial or out of place is ever left behind.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `examples` is not an installed package: import it from the checkout
    sys.path.insert(0, str(REPO))

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

from examples.thumbnailer import cli, make_samples  # noqa: E402
from examples.thumbnailer.progress import Progress  # noqa: E402
from examples.thumbnailer.workers import Thumbnailer  # noqa: E402
from protocol import Rights  # noqa: E402
from worker import rpc  # noqa: E402

GOOD = make_samples.GOOD
HOSTILE = make_samples.HOSTILE
PIL_FORMAT = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


def _copy_samples(dst: Path) -> Path:
    """The bundled samples in a private directory, with the run-time FIFO and symlink made."""
    shutil.copytree(make_samples.SAMPLES_DIR, dst, symlinks=True, ignore=shutil.ignore_patterns(make_samples.FIFO_NAME))
    make_samples.ensure_runtime_specials(dst)
    return dst


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _output_name(rel: str, fmt: str) -> str:
    return str(Path(rel).with_suffix(cli.imaging.OUTPUT_FORMATS[fmt][1]))


def _check_outputs(out: Path, report: dict[str, Any], fmt: str, size: int) -> None:
    converted = {item["input"]: item for item in report["converted"]}
    assert set(converted) == set(GOOD), report["rejected"]
    expected_files = {_output_name(rel, fmt) for rel in GOOD}
    files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() or p.is_symlink()}
    assert files == expected_files  # no temporaries, no partial outputs, nothing else
    for rel, (_fmt, width, height, _mode) in GOOD.items():
        path = out / _output_name(rel, fmt)
        assert not path.is_symlink() and path.stat().st_mode & 0o777 == 0o644
        with Image.open(path) as img:
            img.load()  # decodable, to the last byte
            assert img.format == PIL_FORMAT[fmt]
            assert max(img.size) == size, (rel, img.size)  # fits the box, touching it
            assert abs(img.width / img.height - width / height) < 0.05  # aspect ratio kept
            assert list(img.size) == [converted[rel]["width"], converted[rel]["height"]]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One run of the real command line on (a copy of) the bundled samples."""
    base = tmp_path_factory.mktemp("thumbs")
    inp = _copy_samples(base / "in")
    before = _tree(inp)
    out = base / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "examples.thumbnailer", str(inp), "-o", str(out), "--format", "png", "--size", "64",
         "--workers", "2", "--json", str(base / "report.json"), "--strict"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    report = json.loads((base / "report.json").read_text())
    return {"proc": proc, "report": report, "base": base, "in": inp, "out": out, "before": before}


def test_cli_converts_every_real_image(cli_run: dict[str, Any]) -> None:
    proc = cli_run["proc"]
    assert proc.returncode == cli.EXIT_REJECTED, proc.stderr  # the hostile samples are rejected, on purpose
    _check_outputs(cli_run["out"], cli_run["report"], "png", 64)


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_cli_rejects_each_hostile_sample_with_a_reason(cli_run: dict[str, Any], name: str) -> None:
    rejected = {item["input"]: item for item in cli_run["report"]["rejected"]}
    assert name in rejected, f"{name} was not rejected: {cli_run['report']['converted']}"
    assert rejected[name]["kind"] == HOSTILE[name], rejected[name]
    assert rejected[name]["reason"]
    assert name in cli_run["proc"].stdout  # the human summary names it too
    assert not (cli_run["out"] / _output_name(name, "png")).exists()


def test_cli_reasons_are_specific(cli_run: dict[str, Any]) -> None:
    reasons = {item["input"]: item["reason"] for item in cli_run["report"]["rejected"]}
    assert "Mpx" in reasons["bomb.png"] and "limit" in reasons["bomb.png"]
    # (Pillow's own check refuses its 50000x50000 header at open: the count comes from its message)
    assert reasons["huge-header.bmp"] == "the header declares 2,500 Mpx, over the 40 Mpx limit; refused before decoding"
    assert "/etc/passwd" in reasons["passwd.jpg"]
    assert reasons["fifo.jpg"] == (
        "a FIFO, not a regular file; the broker refused it (only regular files are granted, this is a fifo)"
    )
    assert "0 bytes" in reasons["empty.jpg"]
    assert "This is not" in reasons["not-really.png"]  # shows what the file really starts with


def test_cli_leaves_nothing_behind_or_outside(cli_run: dict[str, Any]) -> None:
    base: Path = cli_run["base"]
    assert {p.name for p in base.iterdir()} == {"in", "out", "report.json"}
    assert _tree(cli_run["in"]) == cli_run["before"]  # the input directory is untouched
    hidden = [p for p in cli_run["out"].rglob(".*")]
    assert hidden == []  # no temporaries survive
    assert cli_run["report"]["workers_replaced"] == 0  # bad input is an error, not a crash


def test_cli_reports_the_sandbox_and_the_numbers(cli_run: dict[str, Any]) -> None:
    report, proc = cli_run["report"], cli_run["proc"]
    layers = report["sandbox"]["layers"]
    assert any(layer.startswith("seccomp") for layer in layers), layers
    assert "no_new_privs" in layers
    assert report["counts"] == {"converted": len(GOOD), "rejected": len(HOSTILE), "skipped": 0}
    assert report["seconds"] > 0 and report["images_per_second"] > 0
    assert "Sandbox layers the workers ran under:" in proc.stdout
    assert "seccomp" in proc.stdout
    # not a terminal: plain progress lines on stderr, one per file
    assert proc.stderr.count("] ok ") == len(GOOD)
    assert proc.stderr.count("] REJECTED ") == len(HOSTILE)
    assert "\r" not in proc.stderr


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_main_other_formats(tmp_path: Path, fmt: str) -> None:
    inp = _copy_samples(tmp_path / "in")
    out = tmp_path / "out"
    stdout, stderr = io.StringIO(), io.StringIO()
    status = cli.main(
        [str(inp), "-o", str(out), "-f", fmt, "-s", "100", "--quality", "70", "--json", "-", "-q", "--strict"],
        stdout=stdout, stderr=stderr,
    )  # fmt: skip
    assert status == cli.EXIT_REJECTED
    report = json.loads(stdout.getvalue())  # --json - : the report is stdout, alone
    _check_outputs(out, report, fmt, 100)
    assert "converted" in stderr.getvalue()  # the human summary moved to stderr


def test_main_all_good_exits_zero_and_output_inside_input(tmp_path: Path) -> None:
    inp = tmp_path / "photos"
    inp.mkdir()
    shutil.copy(make_samples.SAMPLES_DIR / "harbour.jpg", inp / "a.jpg")
    shutil.copy(make_samples.SAMPLES_DIR / "diagram.png", inp / "a.png")  # same stem: the later keeps its suffix
    (inp / "notes.txt").write_text("not an image")
    out = inp / "thumbs"  # inside the input: must not be walked into
    stdout = io.StringIO()
    status = cli.main([str(inp), "-o", str(out), "-f", "webp", "--json", str(tmp_path / "r.json")],
                      stdout=stdout, stderr=io.StringIO())  # fmt: skip
    assert status == cli.EXIT_OK, stdout.getvalue()
    assert sorted(p.name for p in out.iterdir()) == ["a.png.webp", "a.webp"]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["skipped"] == [  # (the output directory said, not left out in silence: a probe)
        {"input": "thumbs/", "reason": "the output directory: left out of the walk"},
        {"input": "notes.txt", "reason": "not an image file name"},
    ]
    status = cli.main([str(inp), "-o", str(out), "-f", "webp"], stdout=io.StringIO(), stderr=io.StringIO())
    assert status == cli.EXIT_OK  # a second run replaces, and does not pick up its own outputs
    assert sorted(p.name for p in out.iterdir()) == ["a.png.webp", "a.webp"]


def test_directory_symlink_out_is_refused_not_followed(tmp_path: Path) -> None:
    inp = tmp_path / "in"
    inp.mkdir()
    shutil.copy(make_samples.SAMPLES_DIR / "harbour.jpg", inp / "ok.jpg")
    secret = tmp_path / "secret"
    secret.mkdir()
    shutil.copy(make_samples.SAMPLES_DIR / "harbour.jpg", secret / "private.jpg")
    os.symlink(secret, inp / "escape")  # a directory symlink out of the input
    os.symlink(secret / "private.jpg", inp / "private.jpg")  # a file symlink out
    out = tmp_path / "out"
    stdout = io.StringIO()
    status = cli.main([str(inp), "-o", str(out), "--json", "-", "--strict"], stdout=stdout, stderr=io.StringIO())
    report = json.loads(stdout.getvalue())
    assert status == cli.EXIT_REJECTED
    assert [c["input"] for c in report["converted"]] == ["ok.jpg"]
    assert {r["input"]: r["kind"] for r in report["rejected"]} == {"private.jpg": "not-capable"}
    assert _tree(out) == {"ok.jpg"}
    # it was skipped as "not an image file name"; one inside the input directory too, and one named like an image
    os.symlink(inp / "sub", inp / "within")
    (inp / "sub").mkdir()
    os.symlink(secret, inp / "album.jpg")
    stdout = io.StringIO()
    cli.main([str(inp), "-o", str(out), "--json", "-"], stdout=stdout, stderr=io.StringIO())
    reason = "a symlink to a directory (not followed)"
    assert json.loads(stdout.getvalue())["skipped"] == [
        {"input": name, "reason": reason} for name in ("album.jpg", "escape", "within")
    ]


class Misbehaving(Thumbnailer):
    """A Thumbnailer that crashes mid-write, hangs, or makes a forbidden syscall, chosen by output name.

    At module level, so that every spawn method (fork, zygote, exec) can import it by name.
    """

    @rpc
    def thumbnail(self, src: Any, size: int, fmt: str, quality: int, out: str) -> dict[str, Any]:
        name = out.rsplit("/", 1)[-1]
        if name.startswith("crash"):
            dst = self.broker.create(out)
            dst.write(b"half an image")
            dst.flush()
            os._exit(3)  # dies with a partial output open: it must not appear
        if name.startswith("hang"):
            time.sleep(60)
        if name.startswith("syscall"):
            import socket

            socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # no network in the sandbox
        return super().thumbnail(src, size, fmt, quality, out)


def test_dead_and_killed_workers_are_replaced_and_the_run_goes_on(tmp_path: Path) -> None:
    inp = tmp_path / "in"
    inp.mkdir()
    names = ["crash.jpg", "hang.jpg", "syscall.jpg", *[f"ok{i}.jpg" for i in range(5)]]
    for name in names:
        shutil.copy(make_samples.SAMPLES_DIR / "harbour.jpg", inp / name)
    out = tmp_path / "out"
    stdout = io.StringIO()
    started = time.monotonic()
    status = cli.main(
        [str(inp), "-o", str(out), "--workers", "2", "--timeout", "1", "--json", "-", "--strict"],
        worker_cls=Misbehaving, stdout=stdout, stderr=io.StringIO(),
    )  # fmt: skip
    assert time.monotonic() - started < 20
    report = json.loads(stdout.getvalue())
    assert status == cli.EXIT_REJECTED
    kinds = {r["input"]: r["kind"] for r in report["rejected"]}
    assert kinds["crash.jpg"] == "worker-crashed"
    assert kinds["hang.jpg"] == "timeout"
    assert kinds["syscall.jpg"] in ("killed-by-sandbox", "not-capable", "error"), report["rejected"]
    assert sorted(c["input"] for c in report["converted"]) == [f"ok{i}.jpg" for i in range(5)]
    assert report["workers_replaced"] >= 2
    assert _tree(out) == {f"ok{i}.jpg" for i in range(5)}  # no partial crash.jpg, no temporaries


class Slow(Thumbnailer):
    @rpc
    def thumbnail(self, src: Any, size: int, fmt: str, quality: int, out: str) -> dict[str, Any]:
        time.sleep(30 if out.rsplit("/", 1)[-1].startswith("h") else 0.2)
        return super().thumbnail(src, size, fmt, quality, out)


@pytest.mark.parametrize(("presses", "signame"), [(1, "SIGINT"), (2, "SIGINT"), (1, "SIGTERM"), (2, "SIGTERM")])
def test_ctrl_c_keeps_the_finished_thumbnails_and_says_how_many(tmp_path: Path, presses: int, signame: str) -> None:
    """The count said was taken before the image in progress finished (and
    was committed): it said 2 with 3 on disk. Once: what is in progress
    finishes and is counted; twice: it is stopped at once, and discarded.
    SIGTERM (which ended the run with no summary and no report) does the same,
    with exit status 143."""
    import signal
    import threading

    sig = getattr(signal, signame)

    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    names = [f"p{i:02}.jpg" for i in range(12)] if presses == 1 else ["a0.jpg", "a1.jpg", "h0.jpg", "h1.jpg"]
    for name in names:
        shutil.copy(make_samples.SAMPLES_DIR / "harbour.jpg", inp / name)

    def interrupt_after_two() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(_finished(out)) < 2:
            time.sleep(0.01)
        for _ in range(presses):
            time.sleep(0.3)  # (the second press: while the first waits for the image in progress)
            signal.pthread_kill(threading.main_thread().ident, sig)  # type: ignore[arg-type]

    stdout, stderr = io.StringIO(), io.StringIO()
    threading.Thread(target=interrupt_after_two, daemon=True).start()
    started = time.monotonic()
    status = cli.main([str(inp), "-o", str(out), "--workers", "1", "--quiet", "--json", str(tmp_path / "r.json")],
                      worker_cls=Slow, stdout=stdout, stderr=stderr)  # fmt: skip
    expected = cli.EXIT_INTERRUPTED if sig == signal.SIGINT else cli.EXIT_TERMINATED
    assert status == expected
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # put back as it was
    assert time.monotonic() - started < 20  # never the 30 s an "h" image takes
    done = sorted(p.name for p in out.iterdir())
    assert 2 <= len(done) < len(names) and all(not n.startswith(".") for n in done)
    if presses == 2:
        assert done == ["a0.jpg", "a1.jpg"] and "Ctrl-C again to stop at once" in stderr.getvalue()
    for name in done:
        with Image.open(out / name) as im:
            im.load()  # complete images only
    assert f"after {len(done)} of {len(names)} images; the {len(done)} thumbnails in {out} are complete" in (
        stderr.getvalue()
    )
    # the report and the summary too (there were none after a Ctrl-C)
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["interrupted"] is True and report["exit_status"] == expected
    assert [c["input"] for c in report["converted"]] == done
    # an image the second Ctrl-C stopped is neither converted nor rejected: the user stopped it, not the image
    assert report["rejected"] == [] and report["workers_replaced"] == 0, report
    assert report["counts"] == {"converted": len(done), "rejected": 0, "skipped": 0}
    assert stdout.getvalue().startswith(f"Interrupted: {len(done)} converted, 0 rejected in ")


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    for argv in (["--size", "0"], ["--format", "gif"], ["--quality", "101"], [str(tmp_path / "missing")]):
        proc = subprocess.run([sys.executable, "-m", "examples.thumbnailer", *argv, "-o", str(tmp_path / "o")],
                              cwd=REPO, capture_output=True, text=True, timeout=60)  # fmt: skip
        assert proc.returncode == cli.EXIT_USAGE, (argv, proc.stderr)
        assert "usage:" in proc.stderr


def test_help_explains_itself() -> None:
    proc = subprocess.run([sys.executable, "-m", "examples.thumbnailer", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0
    for word in ("sandbox", "--size", "--format", "--quality", "--workers", "--json", "--timeout", "exit status",
                 "FIFO", "bundled samples", "one\nalready named so keeps it (b.jpg)", "b.gif~2.jpg"):  # fmt: skip
        assert word in proc.stdout, word


def test_progress_bar_on_a_terminal() -> None:
    stream = io.StringIO()
    progress = Progress(stream, 3, tty=True)
    progress.update("a.jpg", True, "ok")
    progress.update("b.jpg", False, "truncated: ...")
    progress.update("c.jpg", True, "ok")
    progress.finish()
    text = stream.getvalue()
    assert "\r" in text and "3/3" in text and "rejected b.jpg" in text


def test_missing_symlink_after_a_clone_is_recreated(tmp_path: Path) -> None:
    samples = _copy_samples(tmp_path / "s")
    (samples / make_samples.SYMLINK_NAME).unlink()
    (samples / make_samples.SYMLINK_NAME).write_text("/etc/passwd")  # what core.symlinks=false checks out
    (samples / make_samples.FIFO_NAME).unlink()
    notes = make_samples.ensure_runtime_specials(samples)
    assert len(notes) == 2
    assert os.readlink(samples / make_samples.SYMLINK_NAME) == make_samples.SYMLINK_TARGET
    assert make_samples.ensure_runtime_specials(samples) == []


def test_bundled_samples_are_small_and_reproducible(tmp_path: Path) -> None:
    total = sum(p.lstat().st_size for p in make_samples.SAMPLES_DIR.rglob("*"))
    assert total < 1_000_000
    make_samples.generate(tmp_path)
    for rel in [*GOOD, *(n for n in HOSTILE if n not in (make_samples.FIFO_NAME, make_samples.SYMLINK_NAME))]:
        assert (tmp_path / rel).read_bytes() == (make_samples.SAMPLES_DIR / rel).read_bytes(), rel


def _exotic_inputs(directory: Path) -> dict[str, str | None]:
    """Inputs not among the bundled samples: unusual modes (must convert) and more hostile headers.

    Returns name -> expected rejection kind (None: must convert).
    """
    import struct

    from PIL import PngImagePlugin

    directory.mkdir()
    grad = Image.linear_gradient("L").resize((300, 200))
    grad.convert("LAB").save(directory / "lab.tif")  # LAB -> RGB goes through ImageCms, imported lazily by Pillow
    grad.convert("F").save(directory / "float.tif")
    grad.convert("CMYK").save(directory / "cmyk.tif", compression="tiff_adobe_deflate")
    grad.convert("RGB").save(directory / "progressive.jpg", progressive=True)
    pal = grad.convert("P")
    pal.info["transparency"] = 0
    pal.save(directory / "palette-alpha.png")
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "A" * (8 << 20), zip=True)  # an 8 MiB zTXt chunk: a text-chunk bomb
    Image.new("RGB", (200, 100), "red").save(directory / "ztxt-bomb.png", pnginfo=info)
    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, "JPEG")
    jpeg = bytearray(buf.getvalue())
    sof = jpeg.find(b"\xff\xc0")
    jpeg[sof + 5 : sof + 9] = struct.pack(">HH", 65500, 65500)
    (directory / "sof-huge.jpg").write_bytes(bytes(jpeg))
    png = bytearray((directory / "palette-alpha.png").read_bytes())
    png[16:20] = b"\xff\xff\xff\xff"  # IHDR width 4294967295 (and now a bad CRC)
    (directory / "ihdr-broken.png").write_bytes(bytes(png))
    (directory / "ghostscript.jpg").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    return {"lab.tif": None, "float.tif": None, "cmyk.tif": None, "progressive.jpg": None,
            "palette-alpha.png": None, "ztxt-bomb.png": "decompression-bomb", "sof-huge.jpg": "decompression-bomb",
            "ihdr-broken.png": "corrupt", "ghostscript.jpg": "not-an-image"}  # fmt: skip


def test_exotic_and_more_hostile_inputs(tmp_path: Path) -> None:
    expected = _exotic_inputs(tmp_path / "in")
    stdout = io.StringIO()
    status = cli.main([str(tmp_path / "in"), "-o", str(tmp_path / "out"), "-f", "png", "--json", "-", "--strict"],
                      stdout=stdout, stderr=io.StringIO())  # fmt: skip
    report = json.loads(stdout.getvalue())
    assert status == cli.EXIT_REJECTED
    got = {r["input"]: r["kind"] for r in report["rejected"]} | {c["input"]: None for c in report["converted"]}
    assert got == expected, report["rejected"]
    assert report["workers_replaced"] == 0  # no lazy import tripped the sandbox
    with Image.open(tmp_path / "out" / "palette-alpha.png") as img:
        assert img.mode == "RGBA"  # transparency kept


_NO_LAZY_IMPORTS = """
import glob, io, os, sys
sys.path.insert(0, sys.argv[1])
from examples.thumbnailer import imaging
imaging.configure_pillow(); imaging.warm_up()
before = set(sys.modules)
events = []
sys.addaudithook(lambda ev, args: events.append(ev) if ev in ("import", "os.listdir", "os.scandir") else None)
for path in sorted(sys.argv[2:]):
    for fmt in imaging.OUTPUT_FORMATS:
        with open(path, "rb") as f:
            try:
                imaging.make_thumbnail(f, io.BytesIO(), 64, fmt, 80)
            except imaging.Rejected:
                pass
print(sorted(set(sys.modules) - before), events)
"""


def test_setup_preloads_everything_the_decoders_need(tmp_path: Path) -> None:
    """After setup, no input (good, hostile, exotic) makes Pillow import anything: in the sandbox it could not."""
    _exotic_inputs(tmp_path / "exotic")
    inputs = [p for p in [*make_samples.SAMPLES_DIR.rglob("*"), *(tmp_path / "exotic").iterdir()]
              if p.is_file() and not p.is_symlink() and p.suffix.lower() in cli.imaging.INPUT_SUFFIXES]  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", _NO_LAZY_IMPORTS, str(REPO), *map(str, inputs)],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[] []"


def test_main_job_command_succeeds_on_the_bundled_samples(tmp_path: Path) -> None:
    """The README's main-job command: the hostile samples are rejected with
    reasons, and that is the demo working, so the exit status is 0."""
    out = tmp_path / "thumbnails"
    proc = subprocess.run(
        [sys.executable, "-m", "examples.thumbnailer", "-o", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == cli.EXIT_OK, proc.stderr
    assert "converted" in proc.stdout + proc.stderr and "Rejected" in proc.stdout + proc.stderr
    made = sorted(p.name for p in out.iterdir())
    assert len(made) == 8 and not any(name.startswith(".") for name in made)


def _finished(out: Path) -> list[str]:
    """The thumbnails committed in ``out`` so far; not the hidden files that come first (the CLI's
    writability probe, a thumbnail still being written), which a wait for output once mistook for one."""
    try:
        return [p.name for p in out.iterdir() if not p.name.startswith(".")]
    except FileNotFoundError:
        return []


def _photos(directory: Path, *names: str) -> Path:
    directory.mkdir()
    for name in names:
        shutil.copy(make_samples.SAMPLES_DIR / "harbour.jpg", directory / name)
    return directory


def test_a_json_target_that_cannot_be_written_is_a_usage_error_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--json FILE was opened only after the whole run: a missing directory, or
    a directory as FILE, crashed at the end with a traceback naming a temporary."""
    inp, out = _photos(tmp_path / "in", "a.jpg"), tmp_path / "out"
    (tmp_path / "adir").mkdir()
    cases = {
        str(tmp_path / "nodir" / "r.json"): f"the directory '{tmp_path / 'nodir'}' does not exist",
        str(tmp_path / "adir"): f"--json '{tmp_path / 'adir'}' is a directory",
    }
    for target, message in cases.items():
        status = cli.main([str(inp), "-o", str(out), "--json", target], stdout=io.StringIO(), stderr=io.StringIO())
        assert status == cli.EXIT_USAGE
        err = capsys.readouterr().err
        assert err.splitlines()[-1].startswith(f"{cli.PROG}: error: --json ") and message in err, err
        assert not out.exists()  # no work done, nothing left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "in"]


def test_a_report_that_fails_at_the_end_says_so_in_one_line(tmp_path: Path) -> None:
    """The report's directory vanishes during the run: one line naming the user's path, exit 2, no traceback."""
    import threading

    # (five images at 0.2 s each: the directory goes while four are still to come, even on a loaded
    # machine, where three once left too little time for the thread that removes it)
    names = ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg"]
    inp, out = _photos(tmp_path / "in", *names), tmp_path / "out"
    (tmp_path / "reports").mkdir()
    target = tmp_path / "reports" / "r.json"

    def remove_the_reports_directory() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not _finished(out):
            time.sleep(0.01)
        (tmp_path / "reports").rmdir()

    thread = threading.Thread(target=remove_the_reports_directory, daemon=True)
    thread.start()
    stderr = io.StringIO()
    status = cli.main([str(inp), "-o", str(out), "--workers", "1", "--quiet", "--json", str(target)],
                      worker_cls=Slow, stdout=io.StringIO(), stderr=stderr)  # fmt: skip
    thread.join()
    assert status == cli.EXIT_USAGE
    said = stderr.getvalue()
    assert said == f"thumbnailer: cannot write the --json report to '{target}': No such file or directory\n"
    assert sorted(p.name for p in out.iterdir()) == names


def test_the_report_file_gets_the_usual_mode(tmp_path: Path) -> None:
    """mkstemp made the report 0600 whatever the umask."""
    inp = _photos(tmp_path / "in", "a.jpg")
    old = os.umask(0o027)
    try:
        status = cli.main([str(inp), "-o", str(tmp_path / "out"), "--quiet", "--json", str(tmp_path / "r.json")],
                          stdout=io.StringIO(), stderr=io.StringIO())  # fmt: skip
    finally:
        os.umask(old)
    assert status == cli.EXIT_OK
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o640
    assert json.loads((tmp_path / "r.json").read_text())["counts"]["converted"] == 1


def test_a_report_to_a_fifo_is_written_into_it_not_over_it(tmp_path: Path) -> None:
    """An existing target that is no regular file (a FIFO here; /dev/null as root is the same case) is
    written into, as a shell's > would: replacing it would put a regular file where the device was."""
    import threading

    inp, fifo = _photos(tmp_path / "in", "a.jpg"), tmp_path / "report.fifo"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    status = cli.main([str(inp), "-o", str(tmp_path / "out"), "-q", "--json", str(fifo)],
                      stdout=io.StringIO(), stderr=io.StringIO())  # fmt: skip
    reader.join(30)
    assert status == cli.EXIT_OK
    assert fifo.is_fifo()  # still the FIFO, not a file put in its place
    assert json.loads(got[0])["counts"]["converted"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out", "report.fifo"]  # no temporary left


def test_a_report_through_a_symlink_replaces_the_file_it_names(tmp_path: Path) -> None:
    """--json LINK writes the file the link names, atomically beside it, and keeps the link."""
    inp = _photos(tmp_path / "in", "a.jpg")
    (tmp_path / "shared").mkdir()
    real = tmp_path / "shared" / "report.json"
    real.write_text("old")
    link = tmp_path / "report.json"
    link.symlink_to(real)
    status = cli.main([str(inp), "-o", str(tmp_path / "out"), "-q", "--json", str(link)],
                      stdout=io.StringIO(), stderr=io.StringIO())  # fmt: skip
    assert status == cli.EXIT_OK
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert json.loads(real.read_text())["counts"]["converted"] == 1
    assert sorted(p.name for p in real.parent.iterdir()) == ["report.json"]  # no temporary left


def _ctrl_c_when_the_broker_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    """A real SIGINT to this process as the broker starts (its zygote boots then, for about 0.3 s)."""
    import signal

    import broker

    class Interrupted(broker.Broker):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            signal.raise_signal(signal.SIGINT)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(broker, "Broker", Interrupted)


def test_ctrl_c_while_the_broker_starts_is_one_line_and_a_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C in the first ~0.3 s printed a traceback (and wrote no report)."""
    inp, out = _photos(tmp_path / "in", "a.jpg"), tmp_path / "out"
    _ctrl_c_when_the_broker_starts(monkeypatch)
    stdout, stderr = io.StringIO(), io.StringIO()
    try:
        status = cli.main([str(inp), "-o", str(out), "--quiet", "--json", str(tmp_path / "r.json")],
                          stdout=stdout, stderr=stderr)  # fmt: skip
    except KeyboardInterrupt:
        pytest.fail("the Ctrl-C escaped main(): a traceback")
    assert status == cli.EXIT_INTERRUPTED
    said = stderr.getvalue()
    assert said == "thumbnailer: interrupted while starting the sandboxed workers; no image was converted\n"
    assert stdout.getvalue() == ""
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["interrupted"] is True and report["exit_status"] == cli.EXIT_INTERRUPTED
    assert report["counts"] == {"converted": 0, "rejected": 0, "skipped": 0}
    assert not out.exists()  # (made by the run and left empty: removed, as unpack removes its OUTDIR)


_CTRL_C_ON_IMPORT = """
import runpy, signal, sys
at = sys.argv[1]
class CtrlC:
    def find_spec(self, name, path, target=None):
        if name == at:
            signal.raise_signal(signal.SIGINT)
        return None
sys.meta_path.insert(0, CtrlC())
module = sys.argv[2]
sys.argv = [module, *sys.argv[3:]]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def test_ctrl_c_while_the_program_loads_or_walks_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inp = _photos(tmp_path / "in", "a.jpg")
    proc = subprocess.run(
        [sys.executable, "-c", _CTRL_C_ON_IMPORT, "examples.thumbnailer.imaging", "examples.thumbnailer", str(inp),
         "-o", str(tmp_path / "out")],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == cli.EXIT_INTERRUPTED
    assert (proc.stderr, proc.stdout) == ("thumbnailer: interrupted (Ctrl-C)\n", "")

    def walking(*args: Any, **kwargs: Any) -> None:
        import signal

        signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(cli, "plan", walking)
    stderr = io.StringIO()
    try:
        status = cli.main([str(inp), "-o", str(tmp_path / "out")], stdout=io.StringIO(), stderr=stderr)
    except KeyboardInterrupt:
        pytest.fail("the Ctrl-C escaped main(): a traceback")
    assert (status, stderr.getvalue()) == (cli.EXIT_INTERRUPTED, "thumbnailer: interrupted (Ctrl-C)\n")


def test_an_output_dir_that_cannot_be_written_is_a_usage_error(
    tmp_path: Path, unwritable: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every input was "rejected" (kind error, one by one) and the run exited 0."""
    inp = _photos(tmp_path / "in", "a.jpg", "b.jpg")
    stdout = io.StringIO()
    status = cli.main([str(inp), "-o", str(unwritable)], stdout=stdout, stderr=io.StringIO())
    assert status == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith(f"{cli.PROG}: error: cannot write in OUTPUT_DIR '{unwritable}': "), err
    assert stdout.getvalue() == ""  # no run, no summary
    # and a --json FILE in such a directory
    status = cli.main([str(inp), "-o", str(tmp_path / "out"), "--json", str(unwritable / "r.json")],
                      stdout=stdout, stderr=io.StringIO())  # fmt: skip
    assert status == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert f"error: --json '{unwritable / 'r.json'}': cannot write in '{unwritable}': " in err, err
    assert not (tmp_path / "out").exists() and list(unwritable.iterdir()) == []


def test_an_input_already_named_as_its_output_keeps_the_name(tmp_path: Path) -> None:
    """By name order b.gif took b.jpg, and the JPEG b.jpg got b.jpg.jpg."""
    inp = tmp_path / "in"
    inp.mkdir()
    shutil.copy(make_samples.SAMPLES_DIR / "spinner.gif", inp / "b.gif")
    shutil.copy(make_samples.SAMPLES_DIR / "harbour.jpg", inp / "b.jpg")
    shutil.copy(make_samples.SAMPLES_DIR / "diagram.png", inp / "b.gif.jpg")  # (content decides, not the name)
    stdout = io.StringIO()
    status = cli.main([str(inp), "-o", str(tmp_path / "out"), "-f", "jpeg", "--json", "-"],
                      stdout=stdout, stderr=io.StringIO())  # fmt: skip
    assert status == cli.EXIT_OK
    report = json.loads(stdout.getvalue())
    made = {c["input"]: (c["output"], c["source_format"]) for c in report["converted"]}
    assert made == {"b.jpg": ("b.jpg", "JPEG"), "b.gif.jpg": ("b.gif.jpg", "PNG"), "b.gif": ("b.gif~2.jpg", "GIF")}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["b.gif.jpg", "b.gif~2.jpg", "b.jpg"]


def test_an_output_name_over_255_bytes_is_refused_up_front(tmp_path: Path) -> None:
    """It reached the broker, which refused the create: reported as `not-capable`."""
    name = "é" * 125 + "x.jpg"  # 255 bytes (131 characters); as .webp, 256
    inp = _photos(tmp_path / "in", name, "ok.jpg")
    stdout = io.StringIO()
    status = cli.main([str(inp), "-o", str(tmp_path / "out"), "-f", "webp", "--json", "-", "--strict"],
                      stdout=stdout, stderr=io.StringIO())  # fmt: skip
    assert status == cli.EXIT_REJECTED
    report = json.loads(stdout.getvalue())
    assert report["rejected"] == [
        {"input": name, "kind": "name-too-long", "reason": "its thumbnail's name would be longer than 255 bytes"}
    ]
    assert [c["output"] for c in report["converted"]] == ["ok.webp"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ok.webp"]


def test_the_readme_says_what_help_says() -> None:
    """The README said the samples run exits 1 and "1 the run finished but some
    inputs were rejected"; --help (and the code) say 1 only with --strict."""
    readme = " ".join((REPO / "examples" / "thumbnailer" / "README.md").read_text().split())
    assert "**exit status 1**" not in readme and "the exit status is 0 (with `--strict` it would be 1)" in readme
    exit_status = readme[readme.index("Exit status: ") :].split(" Progress is")[0]
    assert "1 only with `--strict`:" in exit_status and "130 interrupted" in exit_status, exit_status
    assert "| `--strict` | exit with status 1 if any input was rejected" in readme
    assert "64 MiB per input file" in readme  # the limit --help gives too
    helptext = " ".join(cli.build_parser().format_help().split())
    assert "with --strict: the run completed but some inputs were rejected" in helptext
    assert f"files over {cli.imaging.MAX_INPUT_BYTES >> 20} MiB as too large" in helptext
    assert f"Images over {cli.imaging.MAX_PIXELS // 1_000_000} megapixels are refused" in helptext


def test_usage_errors_say_what_is_wrong(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """-o naming a file said "cannot create OUTPUT_DIR '...': File exists"; a
    missing INPUT_DIR "is not a directory"."""
    inp = _photos(tmp_path / "in", "a.jpg")
    (tmp_path / "file").write_text("")
    cases = {
        (str(inp), "-o", str(tmp_path / "file")): f"OUTPUT_DIR '{tmp_path / 'file'}' exists and is not a directory",
        (str(tmp_path / "missing"), "-o", str(tmp_path / "o")): f"INPUT_DIR '{tmp_path / 'missing'}' does not exist",
        (str(tmp_path / "file"), "-o", str(tmp_path / "o")): f"INPUT_DIR '{tmp_path / 'file'}' is not a directory",
    }
    for argv, message in cases.items():
        assert cli.main(list(argv), stdout=io.StringIO(), stderr=io.StringIO()) == cli.EXIT_USAGE
        assert capsys.readouterr().err.splitlines()[-1] == f"{cli.PROG}: error: {message}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "in"]


def test_an_output_dir_that_contains_the_input_is_refused(tmp_path: Path) -> None:
    """Thumbnails mirror the input tree beneath OUTPUT_DIR: with `photos -o .`,
    photos/photos/holiday.png became ./photos/holiday.jpg, over the user's
    original (a red-team run), and the output grant covered every input."""
    inp = tmp_path / "photos"
    (inp / "photos").mkdir(parents=True)
    shutil.copy(make_samples.SAMPLES_DIR / "harbour.jpg", inp / "holiday.jpg")
    shutil.copy(make_samples.SAMPLES_DIR / "diagram.png", inp / "photos" / "holiday.png")
    before = (inp / "holiday.jpg").read_bytes()
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        status = cli.main([str(inp), "-o", str(tmp_path)], stdout=io.StringIO(), stderr=io.StringIO())
    assert status == 2 and "must not contain INPUT_DIR" in stderr.getvalue()
    assert (inp / "holiday.jpg").read_bytes() == before
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):  # the bundled samples: named, not "None" (a probe)
        status = cli.main(["-o", "/"], stdout=io.StringIO(), stderr=io.StringIO())
    samples = os.path.realpath(make_samples.SAMPLES_DIR)
    assert status == 2 and f"must not contain INPUT_DIR {samples!r}" in stderr.getvalue()


def test_the_writable_check_interrupted_leaves_no_file(tmp_path: Path) -> None:
    """Checking that OUTPUT_DIR can be written made a named file there and
    removed it: a Ctrl-C between the two left a `.probe-` file in a new
    directory (a probe: 1 of 90 early interrupts). The file has no name now
    (O_TMPFILE). The Ctrl-C is raised here as the open returns."""
    import sys

    from examples._report import writable_dir_problem

    def interrupt(frame: Any, event: str, arg: Any) -> None:
        if event == "c_return" and arg is os.open:
            sys.setprofile(None)
            raise KeyboardInterrupt

    sys.setprofile(interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            writable_dir_problem(str(tmp_path))
    finally:
        sys.setprofile(None)
    assert os.listdir(tmp_path) == []
    assert writable_dir_problem(str(tmp_path)) is None


def test_an_empty_input_leaves_no_empty_output_dir_behind(tmp_path: Path) -> None:
    """An OUTPUT_DIR the run made and left empty (an empty INPUT_DIR) was left
    behind (a probe); it is removed, and the report says so. One that was
    there before is kept."""
    inp = tmp_path / "in"
    inp.mkdir()
    status = cli.main([str(inp), "-o", str(tmp_path / "new"), "--json", str(tmp_path / "r.json")],
                      stdout=io.StringIO(), stderr=io.StringIO())  # fmt: skip
    assert status == cli.EXIT_OK and not (tmp_path / "new").exists()
    assert any("this run made was removed" in n for n in json.loads((tmp_path / "r.json").read_text())["notes"])
    (tmp_path / "old").mkdir()
    assert cli.main([str(inp), "-o", str(tmp_path / "old")], stdout=io.StringIO(), stderr=io.StringIO()) == 0
    assert (tmp_path / "old").is_dir()


def test_a_json_report_never_replaces_an_input_or_a_thumbnail(tmp_path: Path) -> None:
    """`--json` naming a thumbnail the run makes (or an input image) replaced
    it with the report, which listed that thumbnail as converted (a probe)."""
    inp = tmp_path / "in"
    inp.mkdir()
    shutil.copy(make_samples.SAMPLES_DIR / "harbour.jpg", inp / "a.jpg")
    before = (inp / "a.jpg").read_bytes()
    for target in (tmp_path / "out" / "a.jpg", inp / "a.jpg"):
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            status = cli.main([str(inp), "-o", str(tmp_path / "out"), "--json", str(target)],
                              stdout=io.StringIO(), stderr=io.StringIO())  # fmt: skip
        assert status == 2, stderr.getvalue()
        assert "thumbnail this run makes" in stderr.getvalue() or "is an input of this run" in stderr.getvalue()
        assert not (tmp_path / "out").exists()  # (made by the run, and removed: nothing was done)
    assert (inp / "a.jpg").read_bytes() == before


class Overreaching(Thumbnailer):
    """A compromised worker: for its image it writes over another thumbnail,
    plants a file and rewrites a user's, then claims a result for an output
    it never made (a red-team run got all of it through, exit 0)."""

    @rpc
    def thumbnail(self, src: Any, size: int, fmt: str, quality: int, out: str) -> dict[str, Any]:
        from protocol import NotCapable

        base = out.rsplit("/", 1)[0]
        if out.endswith("/b.jpg"):
            for what in (lambda: self.broker.create(f"{base}/a.jpg"),
                         lambda: self.broker.create(f"{base}/planted.html"),
                         lambda: self.broker.open(f"{base}/notes.txt", Rights.WRITE)):
                try:
                    what().write(b"<script>from the worker</script>")
                except NotCapable:
                    pass
            return {"width": 10, "height": 10, "format": fmt, "bytes": 999_999, "source_format": "PNG",
                    "source_size": [20, 20], "animated": False}
        return super().thumbnail(src, size, fmt, quality, out)


def test_a_compromised_worker_writes_nothing_but_its_own_thumbnail(tmp_path: Path) -> None:
    inp = tmp_path / "in"
    inp.mkdir()
    shutil.copy(make_samples.SAMPLES_DIR / "diagram.png", inp / "a.png")
    shutil.copy(make_samples.SAMPLES_DIR / "diagram.png", inp / "b.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("the user's own notes")
    stdout = io.StringIO()
    status = cli.main([str(inp), "-o", str(out), "--json", "-", "-w", "1"], worker_cls=Overreaching, stdout=stdout,
                      stderr=io.StringIO())
    report = json.loads(stdout.getvalue())
    assert status == cli.EXIT_OK
    assert sorted(os.listdir(out)) == ["a.jpg", "notes.txt"]  # no b.jpg (never made), nothing planted
    assert (out / "notes.txt").read_text() == "the user's own notes"
    assert Image.open(out / "a.jpg").format == "JPEG"  # a's own thumbnail, not the worker's script
    assert [c["input"] for c in report["converted"]] == ["a.png"]
    assert report["converted"][0]["bytes"] == (out / "a.jpg").stat().st_size  # the real size, not a claim
    assert [(r["input"], r["reason"]) for r in report["rejected"]] == [
        ("b.png", "the worker said it wrote the thumbnail, and did not")]


class Lazy(Thumbnailer):
    """A compromised worker that writes nothing and claims a plausible result."""

    @rpc
    def thumbnail(self, src: Any, size: int, fmt: str, quality: int, out: str) -> dict[str, Any]:
        return {"width": 64, "height": 48, "format": fmt, "bytes": 694, "source_format": "PNG",
                "source_size": [200, 150], "animated": False}


def test_a_thumbnail_left_by_an_earlier_run_is_not_counted_as_this_runs(tmp_path: Path) -> None:
    """The check after each task looked only for a file at the output's name:
    one an earlier run left there passed, and a worker that wrote nothing had
    the new image counted as converted, with the old thumbnail (a red-team run)."""
    inp = tmp_path / "in"
    inp.mkdir()
    shutil.copy(make_samples.SAMPLES_DIR / "diagram.png", inp / "a.png")
    out = tmp_path / "out"
    assert cli.main([str(inp), "-o", str(out), "--quiet"], stdout=io.StringIO(), stderr=io.StringIO()) == cli.EXIT_OK
    before = (out / "a.jpg").stat()
    stdout = io.StringIO()
    status = cli.main([str(inp), "-o", str(out), "--json", "-"], worker_cls=Lazy, stdout=stdout, stderr=io.StringIO())
    report = json.loads(stdout.getvalue())
    assert status == cli.EXIT_OK and report["converted"] == []
    assert [(r["input"], r["reason"]) for r in report["rejected"]] == [
        ("a.png", "the worker said it wrote the thumbnail, and did not")]
    assert (out / "a.jpg").stat().st_ino == before.st_ino  # the earlier run's, untouched


def test_a_missing_dependency_is_named_for_what_it_is() -> None:
    """A missing Pillow was reported as "privsep is not installed" (a packaging trial)."""
    from examples._report import missing_module

    assert missing_module(ImportError("No module named 'PIL'", name="PIL"), "examples").startswith(
        "Pillow is not installed (No module named 'PIL'); run: pip install Pillow")
    assert missing_module(ImportError("No module named 'broker'", name="broker"), "examples").startswith(
        "privsep is not installed")
    assert missing_module(ImportError("nope", name="lzma"), "examples") == "a module it needs cannot be imported: nope"
