"""Worker classes defined in the main script, the way users first write them.

Each case runs a script in a fresh interpreter (so ``__main__`` is that
script). The zygote finds such a class as multiprocessing's forkserver
does: it imports the script by path (or by module name under ``-m``), so
code under ``if __name__ == "__main__":`` does not run there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

GUARDED = """
import json, os, sys
from broker import Broker, Policy
from worker import Worker, rpc

with open(os.environ["MARK"], "a") as f:  # top-level code: runs here and once in the zygote
    f.write(f"{os.getpid()}\\n")


class Job(Worker):
    @rpc
    def where(self) -> list:
        return [os.getpid(), os.getppid()]


if __name__ == "__main__":
    with Broker(Policy(), root=os.environ["ROOT"]) as b:
        out = {"methods": [], "ahead": [], "pids": []}
        for _ in range(3):
            w = b.spawn(Job)
            out["methods"].append(w.spawn_method)
            out["ahead"].append(bool(w.sandbox.get("ahead")))
            out["pids"].append(w.where()[0] == w.pid)
            out["layers"] = w.sandbox["layers"]
            w.stop()
    print(json.dumps(out))
"""

UNGUARDED = """
import json, os
from broker import Broker, Policy
from worker import Worker, rpc


class Job(Worker):
    @rpc
    def ping(self) -> str:
        return "pong"


b = Broker(Policy(), root=os.environ["ROOT"], spawn=os.environ.get("SPAWN", "auto"))
out = {}
try:
    w = b.spawn(Job)
    out = {"method": w.spawn_method, "ping": w.ping()}
    w2 = b.spawn(Job)  # decided once: no second attempt through the zygote
    out["second"] = w2.spawn_method
except Exception as exc:
    out = {"error": type(exc).__name__, "message": str(exc)}
finally:
    b.close()
print(json.dumps(out))
"""


def run(args: list[str], cwd: Path, **env: str) -> tuple[dict[str, Any], str]:
    """Run python with ``args`` in ``cwd``; (the JSON its last line printed, its stderr)."""
    full = dict(os.environ, ROOT=str(cwd), **env)
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120, cwd=cwd, env=full)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1]), proc.stderr


def run_script(tmp_path: Path, source: str, name: str = "job.py", **env: str) -> tuple[dict[str, Any], str]:
    script = tmp_path / name
    script.write_text(textwrap.dedent(source))
    return run([str(script)], tmp_path, **env)


def test_a_class_in_the_main_script_is_spawned_by_the_zygote(tmp_path: Path) -> None:
    mark = tmp_path / "mark"
    out, _ = run_script(tmp_path, GUARDED, MARK=str(mark))
    assert out["methods"] == ["zygote"] * 3
    assert all(out["pids"])
    assert "no_new_privs" in out["layers"] and any(x.startswith("seccomp") for x in out["layers"])
    assert out["ahead"][1:] == [True, True]  # no setup(): later spares make it before they are asked
    # the script's top-level code ran twice (here, and once in the zygote), its main block once
    assert len(mark.read_text().split()) == 2


MP_CHILD = """
import json, multiprocessing, os, sys
from broker import Broker, Policy
from worker import Worker, rpc


class Job(Worker):
    @rpc
    def ping(self) -> str:
        return "pong"


def child(q) -> None:
    with Broker(Policy(), root=os.environ["ROOT"]) as b:
        w = b.spawn(Job)
        q.put([w.ping(), w.spawn_method, Job.__module__])


if __name__ == "__main__":
    out = {}
    for method in ("spawn", "forkserver"):
        ctx = multiprocessing.get_context(method)
        q = ctx.Queue()
        p = ctx.Process(target=child, args=(q,))
        p.start()
        out[method] = q.get(timeout=60)
        p.join()
    print(json.dumps(out))
"""


def test_a_class_of_the_main_script_in_a_multiprocessing_child_is_found(tmp_path: Path) -> None:
    """A multiprocessing child started by spawn or forkserver runs the
    parent's script as __mp_main__: a broker made there sent that name to the
    zygote, whose workers failed ("No module named '__mp_main__'")."""
    out, _ = run_script(tmp_path, MP_CHILD)
    assert out == {m: ["pong", "zygote", "__mp_main__"] for m in ("spawn", "forkserver")}


def test_a_script_without_a_py_suffix_is_found_too(tmp_path: Path) -> None:
    mark = tmp_path / "mark"
    out, _ = run_script(tmp_path, GUARDED, name="job-tool", MARK=str(mark))  # as `python3 job-tool`, or by #!
    assert out["methods"] == ["zygote"] * 3 and all(out["pids"])
    assert len(mark.read_text().split()) == 2


def test_a_class_in_a_module_run_with_dash_m_is_spawned_by_the_zygote(tmp_path: Path) -> None:
    pkg = tmp_path / "jobs"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "job.py").write_text(textwrap.dedent(GUARDED))
    mark = tmp_path / "mark"
    out, _ = run(["-m", "jobs.job"], tmp_path, MARK=str(mark))
    assert out["methods"] == ["zygote"] * 3 and all(out["pids"])
    assert len(mark.read_text().split()) == 2


def test_an_unguarded_script_falls_back_to_fork_and_says_why(tmp_path: Path) -> None:
    """The zygote importing the script would make a Broker there (and so on
    without end): the import fails, and spawn="auto" forks instead."""
    out, stderr = run_script(tmp_path, UNGUARDED)
    assert out == {"method": "fork", "ping": "pong", "second": "fork"}
    assert 'if __name__ == "__main__":' in stderr
    assert stderr.count("forked from the broker instead") == 1
    # at the script's own line (w = b.spawn(Job)), not inside privsep
    assert "job.py:16: RuntimeWarning: Job: the zygote cannot import Job" in stderr, stderr


UNGUARDED_ASYNC = """
import asyncio, json, os
from broker import Broker, Policy
from worker import Worker, rpc


class Job(Worker):
    @rpc
    def ping(self) -> str:
        return "pong"


async def main() -> dict:
    b = Broker(Policy(), root=os.environ["ROOT"])
    try:
        w = await b.aspawn(Job)
        return {"method": w.spawn_method, "ping": await w.aio.ping()}
    finally:
        await b.aclose()

print(json.dumps(asyncio.run(main())))
"""


def test_an_unguarded_script_spawned_by_aspawn_is_warned_of_at_its_line(tmp_path: Path) -> None:
    """aspawn has the zygote load the script on an executor thread: the
    warning came from there, and pointed at threading.py (a user trial)."""
    out, stderr = run_script(tmp_path, UNGUARDED_ASYNC)
    assert out == {"method": "fork", "ping": "pong"}
    assert stderr.count("forked from the broker instead") == 1
    assert "job.py:16: RuntimeWarning: Job: the zygote cannot import Job" in stderr, stderr


def test_an_unguarded_script_with_spawn_zygote_fails_clearly(tmp_path: Path) -> None:
    out, _ = run_script(tmp_path, UNGUARDED, SPAWN="zygote")
    assert out["error"] == "WorkerCrashed"
    assert "cannot import Job" in out["message"] and 'if __name__ == "__main__":' in out["message"]


def test_a_class_from_python_dash_c_is_forked(tmp_path: Path) -> None:
    code = textwrap.dedent(UNGUARDED)
    out, stderr = run(["-c", code], tmp_path)
    assert out == {"method": "fork", "ping": "pong", "second": "fork"}
    assert "forked from the broker instead" not in stderr  # nothing was tried: no file to import


STUCK = """
import json, os, time
from broker import Broker, Policy
from worker import Worker, rpc

if __name__ == "__privsep_main__":
    time.sleep(60)  # top-level code that never finishes when the zygote imports the script


class Job(Worker):
    @rpc
    def ping(self) -> str:
        return "pong"


if __name__ == "__main__":
    t0 = time.monotonic()
    with Broker(Policy(), root=os.environ["ROOT"], spawn_timeout=1.0) as b:
        w = b.spawn(Job)
        out = {"method": w.spawn_method, "ping": w.ping(), "seconds": time.monotonic() - t0}
    print(json.dumps(out))
"""


def test_a_script_the_zygote_cannot_finish_importing_is_forked_after_the_spawn_timeout(tmp_path: Path) -> None:
    out, stderr = run_script(tmp_path, STUCK)
    assert out["method"] == "fork" and out["ping"] == "pong"
    assert out["seconds"] < 20  # the stuck zygote was killed, not waited for
    assert "did not import Job within 1 s" in stderr


EXITS = """
import json, os, sys
from broker import Broker, Policy
from worker import Worker, rpc
from helper import Helper

if __name__ == "__privsep_main__":
    sys.exit("this script exits when imported")  # as an unguarded sys.exit(main()) would


class Job(Worker):
    @rpc
    def ping(self) -> str:
        return "pong"


if __name__ == "__main__":
    with Broker(Policy(), root=os.environ["ROOT"]) as b:
        h = b.spawn(Helper)
        zygote = b._zygote._proc.pid
        w = b.spawn(Job)
        out = {"job": w.spawn_method, "ping": w.ping(), "helper": b.spawn(Helper).spawn_method,
               "same_zygote": b._zygote._proc.pid == zygote and b._zygote.alive()}
    print(json.dumps(out))
"""


def test_a_script_that_exits_when_imported_leaves_the_zygote_running(tmp_path: Path) -> None:
    (tmp_path / "helper.py").write_text(
        "from worker import Worker, rpc\n\nclass Helper(Worker):\n    @rpc\n    def ping(self):\n        return 1\n"
    )
    out, stderr = run_script(tmp_path, EXITS)
    assert out == {"job": "fork", "ping": "pong", "helper": "zygote", "same_zygote": True}
    assert "this script exits when imported" in stderr


SLOW_ASYNC = """
import asyncio, json, os, time
from broker import Broker, Policy
from worker import Worker, rpc

if __name__ == "__privsep_main__":
    time.sleep(0.6)  # a slow import in the zygote (heavy top-level imports)


class Job(Worker):
    @rpc
    def ping(self) -> str:
        return "pong"


async def main() -> dict:
    gaps = []

    async def tick() -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    with Broker(Policy(), root=os.environ["ROOT"]) as b:
        ticker = asyncio.create_task(tick())
        await asyncio.sleep(0.05)
        t0 = time.monotonic()
        w = await b.aspawn(Job)
        out = {"method": w.spawn_method, "ping": await w.aio.ping(), "spawn_seconds": time.monotonic() - t0}
        t0 = time.monotonic()
        w2 = await b.aspawn(Job)
        out["second"] = [await w2.aio.ping(), time.monotonic() - t0]
        ticker.cancel()
    out["longest_gap"] = max(gaps)
    return out


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main())))
"""


def test_aspawn_of_a_main_script_class_keeps_the_loop_running_while_the_zygote_imports(tmp_path: Path) -> None:
    """The zygote imports the script off the loop; then the spawn goes on at
    once. (Its import let the zygote's spare go, and the spawn waited for a
    spare none would make: spawn_timeout, 30 s; red-team round 23.)"""
    out, _ = run_script(tmp_path, SLOW_ASYNC)
    assert out["method"] == "zygote" and out["ping"] == "pong"
    assert out["longest_gap"] < 0.3, out  # the 0.6 s import ran off the loop
    assert out["spawn_seconds"] < 5, out  # the import, and a fork
    assert out["second"][0] == "pong" and out["second"][1] < 5, out


SECRET_BLOCK = """
import json, linecache, os, traceback
from broker import Broker, Policy
from worker import Worker, rpc


class Reader(Worker):
    @rpc
    def cached(self) -> list:
        return linecache.getlines(__file__)

    @rpc
    def fails(self) -> str:
        try:
            raise ValueError("shown with its line")
        except ValueError as exc:
            return "".join(traceback.format_exception(exc))


if __name__ == "__main__":
    DB_PASSWORD = "hunter2-only-in-the-main-block"
    with Broker(Policy(), root=os.environ["ROOT"]) as b:
        w = b.spawn(Reader)
        out = {"cached": "".join(w.cached()), "tb": w.fails(), "method": w.spawn_method}
    print(json.dumps(out))
"""


def test_a_worker_reads_no_line_of_the_main_block_from_its_line_cache(tmp_path: Path) -> None:
    """The zygote read each worker class's source files whole into the line
    cache (for tracebacks after sandbox entry), and every worker inherited
    it: the main script's `if __name__ == "__main__":` block, which the
    zygote never runs, with whatever it holds (found by a red-team run).
    Only the lines of functions and classes are kept."""
    out, _ = run_script(tmp_path, SECRET_BLOCK)
    assert out["method"] == "zygote"
    assert "hunter2" not in out["cached"] and "__main__" not in out["cached"]
    assert "def fails(self) -> str:" in out["cached"]  # its own code is there
    assert 'raise ValueError("shown with its line")' in out["tb"]  # and tracebacks still show it


def test_the_readmes_quickstart_runs_as_pasted(tmp_path: Path) -> None:
    """The Quickstart needed a data/a.txt of the user's and ended in a NotCapable traceback."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Quickstart", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    said = section.split("it prints ", 1)[1].split(".\n", 1)[0]
    (tmp_path / "quick.py").write_text(code)
    proc = subprocess.run([sys.executable, "quick.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines == ["HI", "5", "b'hello'", "refused: '..' is not allowed in a path: 'data/../secret'"]
    claimed = " ".join(said.split()).replace(" and ", ", ").split(", ")  # what the README says it prints
    assert [f"`{line}`" for line in lines] == claimed


ZYGOTE_KILLED_WHILE_IMPORTING = """
import json, os, signal, threading, time
if __name__ != "__main__":
    time.sleep(1.0)  # the zygote importing this script: slow top-level code (big imports, say)
from broker import Broker, Policy
from worker import Worker, rpc
from protocol import WorkerCrashed


class Job(Worker):
    @rpc
    def parent(self) -> int:
        return os.getppid()


if __name__ == "__main__":
    out = {}
    with Broker(Policy(), root=os.environ["ROOT"]) as b:
        zygote = b._zygote._proc.pid
        if os.environ.get("HOLD"):  # its channel held open, as by a spare it had just forked
            import sys
            sys.path.insert(0, os.environ["HOLD"])
            from conftest import zygote_channel_copy
            held = zygote_channel_copy(b)
        threading.Timer(0.4, os.kill, (zygote, signal.SIGKILL)).start()  # the OOM killer, an admin
        t0 = time.monotonic()
        try:
            b.spawn(Job)
            out["first"] = "spawned"
        except WorkerCrashed as exc:
            out["first"] = str(exc)
        out["took"] = time.monotonic() - t0
        w = b.spawn(Job)
        out["then"] = [w.spawn_method, w.parent() != os.getpid()]
    print(json.dumps(out))
"""


@pytest.mark.parametrize("held", [False, True], ids=["channel closed", "channel held"])
def test_a_zygote_killed_while_importing_the_script_is_no_reason_to_fork_from_the_broker(
    tmp_path: Path, held: bool
) -> None:
    """A zygote killed from outside while it imported the main script made every later worker of that
    class a fork of the broker (its memory, secrets included), for the broker's life. Where a spare it
    had just forked held its channel, the broker waited its spawn_timeout (30 s), then did so."""
    hold = {"HOLD": str(Path(__file__).parent)} if held else {}  # (where conftest is)
    out, err = run_script(tmp_path, ZYGOTE_KILLED_WHILE_IMPORTING, **hold)
    assert out["first"].endswith("the zygote has exited while importing Job"), out
    assert out["took"] < 5.0, out
    assert out["then"] == ["zygote", True], out  # a new zygote, which imported the script again
    assert "forked from the broker" not in err, err


FD_LIMIT_AT_SPAWN = """
import collections, json, os, resource, time
from broker import Broker, Policy
from worker import Worker, rpc


class Job(Worker):
    @rpc
    def ping(self) -> str:
        return "pong"


def zombies_of(parent: int) -> int:
    n = 0
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                state, ppid = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[:2]
            except OSError:
                continue
            n += state == "Z" and int(ppid) == parent
    return n


if __name__ == "__main__":
    out = {"errors": collections.Counter()}
    with Broker(Policy(), root=os.environ["ROOT"]) as b:
        b.spawn(Job).stop()
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 12, hard))
        live = []
        for _ in range(30):
            try:
                live.append(b.spawn(Job))
            except Exception as exc:
                out["errors"][type(exc).__name__] += 1
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        for w in live:
            w.stop()
        time.sleep(0.5)
        out["zombies"] = zombies_of(b._zygote._proc.pid)
        out["then"] = b.spawn(Job).ping()
    print(json.dumps(out))
"""


def test_a_spawn_past_the_brokers_fd_limit_leaves_no_zombie(tmp_path: Path) -> None:
    """EMFILE at the worker's pidfd raised a bare OSError and left the worker a zombie of its
    zygote until the broker closed: a server near its fd limit piled them up."""
    out, _ = run_script(tmp_path, FD_LIMIT_AT_SPAWN)
    assert out["errors"] and set(out["errors"]) == {"WorkerCrashed"}, out
    assert out["zombies"] == 0 and out["then"] == "pong", out


def test_a_path_entry_holding_a_colon_reaches_the_zygote_whole(tmp_path: Path) -> None:
    """The broker's sys.path went to the zygote as PYTHONPATH, joined with ':'
    and not escaped: a script in ``proj:evil/`` gave the zygote ``proj`` and a
    relative ``evil``, found in the directory the broker was run from, whose
    ``msgpack.py`` then ran in the zygote (a packaging trial), and the
    script's own sibling module was not found at all."""
    project = tmp_path / "proj:evil"
    project.mkdir()
    (project / "jobs.py").write_text(textwrap.dedent("""
        import os
        from worker import Worker, rpc

        class Job(Worker):
            @rpc
            def ping(self) -> str:
                return "pong"
    """))
    (project / "main.py").write_text(textwrap.dedent("""
        import json, os
        from broker import Broker, Policy
        from jobs import Job

        if __name__ == "__main__":
            with Broker(Policy(), root=os.environ["ROOT"]) as b:
                w = b.spawn(Job)
                print(json.dumps({"method": w.spawn_method, "ping": w.ping()}))
    """))
    runhere = tmp_path / "runhere"
    (runhere / "evil").mkdir(parents=True)
    marker = tmp_path / "pwned"
    (runhere / "evil" / "msgpack.py").write_text(f"open({str(marker)!r}, 'a').write('x')\nraise SystemExit(1)\n")
    out, _ = run([str(project / "main.py")], runhere)
    assert out == {"method": "zygote", "ping": "pong"}
    assert not marker.exists()
