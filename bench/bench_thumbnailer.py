"""Benchmark: what does sandboxing the thumbnailer cost?

    python3 bench/bench_thumbnailer.py [--count 200] [--workers N] [--repeat 5] [--no-bwrap]

The same batch of generated images (small to medium, JPEG/PNG/WebP) is
converted to thumbnails, with the same function (``imaging.make_thumbnail``):

  (a) in-process, one after another, no sandbox
  (b) ``multiprocessing.Pool`` of N processes, no sandbox (chunksize 1: one task per image, like the pool)
  (c) privsep's sandboxed pool of N workers: the broker opens each input as a read-only grant, the
      worker creates its output through the broker (atomic commit)
  (c0) the same privsep pool with the sandbox switched off (``UNSANDBOXED``): separates the cost of
      the IPC and grants from the cost of the sandbox itself
  (d) one ``bwrap`` (bubblewrap) process per image, N at a time: what one might do instead
  (bw, cw) b and c again with the pools started and warmed before the clock starts: the
      steady-state cost per image, without process start-up

Except for bw/cw, every method starts its processes inside the timed region. Each method runs
``--repeat`` times, the methods taking turns; the best time is used for the
ratios (the median is printed too). Ratios: c/a, c/b, d/c. The issue's target is c/b <= 1.10.
Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from examples.thumbnailer import imaging  # noqa: E402

SIZE, FMT, QUALITY = 128, "jpeg", 85


# --------------------------------------------------------------------------- the batch


def make_batch(directory: Path, count: int, seed: int = 7) -> list[Path]:
    """``count`` images, 320 to 1600 px on the long side, a third each JPEG, PNG, WebP."""
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    canvases = []
    for k in range(4):  # a few detailed canvases; every image is a crop of one, so generation stays quick
        grad = Image.linear_gradient("L").resize((1600, 1200))
        noise = Image.effect_noise((800, 600), 30 + 10 * k).resize((1600, 1200))
        canvas = Image.merge("RGB", (grad, grad.transpose(Image.Transpose.FLIP_LEFT_RIGHT), noise))
        draw = ImageDraw.Draw(canvas)
        for _ in range(60):
            x, y, r = rng.randrange(1600), rng.randrange(1200), rng.randrange(10, 200)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.randrange(256) for _ in range(3)))
        canvases.append(canvas)
    formats = [("JPEG", ".jpg"), ("PNG", ".png"), ("WEBP", ".webp")]
    paths = []
    for i in range(count):
        long_side = rng.choice([320, 480, 640, 800, 1024, 1280, 1600])
        w, h = (long_side, long_side * 3 // 4) if rng.random() < 0.7 else (long_side * 3 // 4, long_side)
        x0, y0 = rng.randrange(0, 400), rng.randrange(0, 300)
        img = canvases[i % len(canvases)].crop((x0, y0, x0 + 1200, y0 + 900)).resize((w, h))
        fmt, suffix = formats[i % 3]
        path = directory / f"img{i:04d}{suffix}"
        img.save(path, format=fmt, **({"quality": 85} if fmt in ("JPEG", "WEBP") else {"compress_level": 1}))
        paths.append(path)
    return paths


def _out_name(path: Path) -> str:
    return path.stem + "_" + path.suffix[1:] + imaging.OUTPUT_FORMATS[FMT][1]


def convert_file(src_path: str, out_path: str) -> dict[str, Any]:
    """The unsandboxed conversion (a, b): open, convert, write."""
    with open(src_path, "rb") as src, open(out_path, "wb") as dst:
        return imaging.make_thumbnail(src, dst, SIZE, FMT, QUALITY)


def _init_pillow() -> None:
    imaging.configure_pillow()


# --------------------------------------------------------------------------- the methods


def run_inprocess(paths: list[Path], out: Path, workers: int) -> int:
    _init_pillow()
    for p in paths:
        convert_file(str(p), str(out / _out_name(p)))
    return len(paths)


def _convert_job(job: tuple[str, str]) -> int:
    convert_file(*job)
    return 1


def run_mp_pool(paths: list[Path], out: Path, workers: int) -> int:
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(workers, initializer=_init_pillow) as pool:
        jobs = [(str(p), str(out / _out_name(p))) for p in paths]
        return sum(pool.imap_unordered(_convert_job, jobs, chunksize=1))


def _privsep_batch(broker: Any, pool: Any, paths: list[Path], in_rel: str, out_rel: str, workers: int,
                   prefix: str = "") -> int:  # fmt: skip
    from examples.thumbnailer.workers import Thumbnailer
    from protocol import Rights

    read = Rights.READ | Rights.FSTAT | Rights.SEEK
    done = 0
    inflight: dict[Future[Any], Any] = {}
    it = iter(paths)
    exhausted = False
    while True:
        while not exhausted and len(inflight) < 2 * workers:  # bounded, like the CLI: fds stay few
            p = next(it, None)
            if p is None:
                exhausted = True
                break
            cap = broker.open(f"{in_rel}/{p.name}", read)
            fut = pool.submit(Thumbnailer.thumbnail, cap, SIZE, FMT, QUALITY, f"{out_rel}/{prefix}{_out_name(p)}")
            inflight[fut] = cap
        if not inflight:
            return done
        finished, _ = wait(inflight, return_when=FIRST_COMPLETED)
        for fut in finished:
            inflight.pop(fut).close()
            fut.result()
            done += 1


def _run_privsep(paths: list[Path], out: Path, workers: int, *, sandboxed: bool, warm: bool = False) -> Any:
    from broker import UNSANDBOXED, Broker, Policy
    from examples.thumbnailer.workers import Thumbnailer
    from protocol import Rights

    root = os.path.commonpath([paths[0].parent, out])
    in_rel = os.path.relpath(paths[0].parent, root)
    out_rel = os.path.relpath(out, root)
    read = Rights.READ | Rights.FSTAT | Rights.SEEK
    policy = Policy().allow(f"{in_rel}/", read).allow(f"{out_rel}/", Rights.WRITE | Rights.CREATE)
    extra: dict[str, Any] = {} if sandboxed else {"sandbox": UNSANDBOXED}
    with Broker(policy, root=root, **extra) as broker:
        pool = broker.pool(Thumbnailer, size=workers)
        try:
            if not warm:
                return _privsep_batch(broker, pool, paths, in_rel, out_rel, workers)
            _privsep_batch(broker, pool, paths[: 4 * workers], in_rel, out_rel, workers, prefix="warm-")
            for p in out.glob("warm-*"):
                p.unlink()
            t0 = time.perf_counter()
            done = _privsep_batch(broker, pool, paths, in_rel, out_rel, workers)
            return done, time.perf_counter() - t0
        finally:
            pool.shutdown()


def run_privsep(paths: list[Path], out: Path, workers: int) -> int:
    return _run_privsep(paths, out, workers, sandboxed=True)


def run_privsep_unsandboxed(paths: list[Path], out: Path, workers: int) -> int:
    return _run_privsep(paths, out, workers, sandboxed=False)


def run_privsep_warm(paths: list[Path], out: Path, workers: int) -> tuple[int, float]:
    return _run_privsep(paths, out, workers, sandboxed=True, warm=True)


def run_mp_pool_warm(paths: list[Path], out: Path, workers: int) -> tuple[int, float]:
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(workers, initializer=_init_pillow) as pool:
        warmup = [(str(p), str(out / ("warm-" + _out_name(p)))) for p in paths[: 4 * workers]]
        sum(pool.imap_unordered(_convert_job, warmup, chunksize=1))
        for p in out.glob("warm-*"):
            p.unlink()
        t0 = time.perf_counter()
        jobs = [(str(p), str(out / _out_name(p))) for p in paths]
        n = sum(pool.imap_unordered(_convert_job, jobs, chunksize=1))
        return n, time.perf_counter() - t0


_BWRAP_CODE = (
    "import sys; sys.path.insert(0, sys.argv[1]); from examples.thumbnailer import imaging; "
    "imaging.configure_pillow(); "
    "src = open(sys.argv[2], 'rb'); dst = open(sys.argv[3], 'wb'); "
    "imaging.make_thumbnail(src, dst, int(sys.argv[4]), sys.argv[5], int(sys.argv[6]))"
)


def bwrap_command(src: Path, dst: Path) -> list[str]:
    """A reasonable bubblewrap jail for one image: read-only /, empty /tmp, no network, input and output dir."""
    return [
        "bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp",
        "--ro-bind", str(src), str(src), "--bind", str(dst.parent), str(dst.parent),
        "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
        sys.executable, "-c", _BWRAP_CODE, str(REPO), str(src), str(dst), str(SIZE), FMT, str(QUALITY),
    ]  # fmt: skip


def run_bwrap(paths: list[Path], out: Path, workers: int) -> int:
    env = dict(os.environ)

    def one(p: Path) -> int:
        proc = subprocess.run(bwrap_command(p, out / _out_name(p)), env=env, capture_output=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"bwrap failed on {p.name}: {proc.stderr.decode(errors='replace')[-500:]}")
        return 1

    with ThreadPoolExecutor(workers) as ex:
        return sum(ex.map(one, paths))


# --------------------------------------------------------------------------- driver


def measure(name: str, fn: Callable[[list[Path], Path, int], Any], paths: list[Path], base: Path, workers: int,
            repeat: int) -> list[float]:  # fmt: skip
    times = []
    for r in range(repeat):
        out = base / f"out-{name}-{r}"
        out.mkdir()
        t0 = time.perf_counter()
        got: Any = fn(paths, out, workers)
        elapsed = time.perf_counter() - t0
        n, inner = got if isinstance(got, tuple) else (got, None)
        times.append(inner if inner is not None else elapsed)  # warm runs time the batch only
        made = sorted(os.listdir(out))
        if n != len(paths) or len(made) != len(paths):
            raise SystemExit(f"{name}: converted {n}, {len(made)} files for {len(paths)} inputs")
        shutil.rmtree(out)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=200, help="images in the batch (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes for b, c, d")
    parser.add_argument("--repeat", type=int, default=5, help="runs per method, best is used (default: %(default)s)")
    parser.add_argument("--no-bwrap", action="store_true", help="skip (d)")
    parser.add_argument("--bwrap-count", type=int, default=None, help="images for (d) (default: all; scaled)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="privsep-bench-") as tmp:
        base = Path(tmp)
        t0 = time.perf_counter()
        paths = make_batch(base / "in", args.count)
        size = sum(p.stat().st_size for p in paths)
        print(f"batch: {len(paths)} images, {size / 1e6:.1f} MB, generated in {time.perf_counter() - t0:.1f} s; "
              f"{args.workers} workers on {os.cpu_count()} CPUs; thumbnails {SIZE}px {FMT}")  # fmt: skip
        for p in paths:  # warm the page cache once for everybody
            p.read_bytes()
        methods: list[tuple[str, str, Callable[[list[Path], Path, int], Any]]] = [
            ("a", "in-process, no sandbox", run_inprocess),
            ("b", "multiprocessing.Pool, no sandbox", run_mp_pool),
            ("c", "privsep sandboxed pool", run_privsep),
            ("c0", "privsep pool, sandbox off (UNSANDBOXED)", run_privsep_unsandboxed),
            ("bw", "multiprocessing.Pool, already started", run_mp_pool_warm),
            ("cw", "privsep sandboxed pool, already started", run_privsep_warm),
        ]
        results: dict[str, float] = {}
        # Round-robin: every repeat runs each method once, so a burst of load elsewhere on the
        # machine hurts all methods alike instead of the one that happened to be running.
        all_times: dict[str, list[float]] = {key: [] for key, _label, _fn in methods}
        for r in range(args.repeat):
            for key, _label, fn in methods:
                all_times[key] += measure(f"{key}{r}", fn, paths, base, args.workers, 1)
        for key, label, _fn in methods:
            times = all_times[key]
            results[key] = min(times)
            print(f"({key:>2}) {label:<42} best {min(times):7.3f} s  median {statistics.median(times):7.3f} s"
                  f"  {len(paths) / min(times):7.1f} img/s")  # fmt: skip
        if not args.no_bwrap:
            if shutil.which("bwrap") is None:
                print("(d)  bwrap not found: apt-get install -y bubblewrap  (skipped)")
            else:
                subset = paths[: args.bwrap_count] if args.bwrap_count else paths
                times = measure("d", run_bwrap, subset, base, args.workers, 1)
                scaled = times[0] * len(paths) / len(subset)
                results["d"] = scaled
                note = f" (measured on {len(subset)}, scaled)" if len(subset) != len(paths) else ""
                print(f"( d) {'one bwrap process per image':<42} time {scaled:7.3f} s{note:<20}"
                      f"  {len(paths) / scaled:7.1f} img/s")  # fmt: skip

        print()
        print(f"c/a  = {results['c'] / results['a']:.3f}   (sandboxed pool vs one process; < 1 means the pool's "
              f"{args.workers} workers win)")  # fmt: skip
        cb = results["c"] / results["b"]
        print(f"c/b  = {cb:.3f}   (sandboxed pool vs multiprocessing.Pool; target <= 1.10: "
              f"{'met' if cb <= 1.10 else 'NOT met'})")  # fmt: skip
        print(f"c/c0 = {results['c'] / results['c0']:.3f}   (cost of the sandbox itself, same IPC)")
        print(f"cw/bw = {results['cw'] / results['bw']:.3f}  (the same two pools once started: per-image cost only)")
        if "d" in results:
            print(f"d/c  = {results['d'] / results['c']:.3f}   (a bwrap process per image vs the sandboxed pool)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
