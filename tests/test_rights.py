"""Every right in the rights table, present and absent, for a grant held at
spawn and for one made later, from inside a fresh worker per case.

Denials by the filter come back as EPERM here (violation mode "errno"), so
one worker can report its result; the kill mode is covered elsewhere. The
rights table in the README is generated from the same table these cases
check (``worker.sandbox._rights_table``).
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from _rights_workers import Attacker, Closer, Looker, Mover, Prober
from conftest import assert_no_fd_left, open_fds

from broker import Broker, Policy, WorkerHandle
from protocol import Rights, UnsupportedRights
from worker.sandbox._rights_table import TABLE, render_markdown

R, W, S, F, T = Rights.READ, Rights.WRITE, Rights.SEEK, Rights.FSTAT, Rights.FTRUNCATE
RW = R | W | S | F | T
ALL_FILE = RW | Rights.APPEND | Rights.FSYNC | Rights.MMAP_R | Rights.MMAP_W | Rights.FCHMOD | Rights.FCHOWN \
    | Rights.FLOCK | Rights.FUTIMES | Rights.FSTATFS | Rights.FCNTL | Rights.IOCTL  # fmt: skip
def _make_root(path: Path) -> Path:
    (path / "data").mkdir()
    (path / "data" / "f.bin").write_bytes(b"0123456789")
    (path / "data" / "a.txt").write_text("inside")
    (path / "data" / "victim.txt").write_text("x")
    (path / "secret").write_text("outside")
    return path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return _make_root(tmp_path)


def _broker(root: Path) -> Broker:
    policy = Policy().allow("data/", ALL_FILE | Rights.LOOKUP | Rights.CREATE | Rights.UNLINKAT)
    return Broker(policy.with_sandbox(violation="errno"), root=root)


def _run(root: Path, op: str, rights: Rights, phase: str) -> dict[str, Any]:
    with _broker(root) as b:
        cap = b.open("data/f.bin", rights)
        if phase == "spawn":
            return b.spawn(Prober, grants={"f": cap}).probe(op)
        return b.spawn(Prober).probe(op, cap)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Broker, Path, WorkerHandle]]:
    """One broker (and tree) for the cases that change nothing in the tree;
    each case still runs in a fresh worker (see ``run``). The witness, a
    worker that lives through them all, is made first (so is the zygote)."""
    root = _make_root(tmp_path_factory.mktemp("rights"))
    with _broker(root) as b:
        yield b, root, b.spawn(Prober, grants={"f": b.open("data/f.bin", R | S | F)})


# The ops that change the file when they succeed (its bytes, mode or times): their cases, right
# present or absent, get a broker and a tree of their own, as every case did.
_CHANGES_THE_TREE = frozenset({"WRITE", "FTRUNCATE", "FCHMOD", "FUTIMES"})

Runner = Callable[[str, Rights, str], dict[str, Any]]


def _snapshot(root: Path) -> dict[str, tuple[bytes, int, int]]:
    """Each file's bytes, mode and mtime (not atime: a read changes it)."""
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mode, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}  # fmt: skip


@pytest.fixture
def run(shared: tuple[Broker, Path, WorkerHandle], tmp_path: Path) -> Iterator[Runner]:
    """``run(op, rights, phase)``: ``op`` on data/f.bin opened with ``rights``, in a
    fresh worker that holds it from spawn or is passed it later. After the case
    the shared broker still answers, the tree is as it was and no fd is left."""
    b, root, witness = shared
    before, snapshot = open_fds(b), _snapshot(root)
    workers: list[WorkerHandle] = []
    caps: list[Any] = []

    def run_(op: str, rights: Rights, phase: str) -> dict[str, Any]:
        if op in _CHANGES_THE_TREE:
            return _run(_make_root(tmp_path), op, rights, phase)
        caps.append(b.open("data/f.bin", rights))
        workers.append(b.spawn(Prober, grants={"f": caps[-1]}) if phase == "spawn" else b.spawn(Prober))
        return workers[-1].probe(op) if phase == "spawn" else workers[-1].probe(op, caps[-1])

    yield run_
    for w in workers:
        w.kill()
    for cap in caps:
        cap.close()
    with b.open("data/a.txt", R) as f:
        assert f.read_all() == b"inside"
    assert witness.probe("FSTAT") == {"ok": "True"}  # another worker is still served
    assert _snapshot(root) == snapshot
    assert_no_fd_left(b, before, "the case")


# (right, base rights the grant always has, expected when present, expected when absent)
# for a grant held at spawn. "EPERM" is the filter's answer in errno mode.
SPAWN_CASES = [
    ("READ", W | S | F | T, "ok", "EBADF"),
    ("WRITE", R | S | F | T, "ok", "EBADF"),
    ("SEEK", R | F, "ok", "EPERM"),
    ("FSTAT", R | S, "ok", "EPERM"),
    ("FTRUNCATE", R | W | S | F, "ok", "EPERM"),
    ("FSYNC", R | S | F, "ok", "EPERM"),
    ("MMAP_R", R | S | F, "ok", "EPERM"),
    ("MMAP_W", RW, "ok", "EPERM"),
    ("FCHMOD", R | S | F, "ok", "EPERM"),
    ("FCHOWN", R | S | F, "ok", "EPERM"),
    ("FLOCK", R | S | F, "ok", "EPERM"),
    ("FUTIMES", R | S | F, "ok", "EPERM"),
    ("FSTATFS", R | S | F, "ok", "EPERM"),
    ("FCNTL", R | S | F, "ok", "EPERM"),
    ("IOCTL", R | S | F, "ok-or-ENOTTY", "EPERM"),
]


def _check(got: dict[str, Any], want: str) -> None:
    if want == "ok":
        assert "ok" in got, got
    elif want == "ok-or-ENOTTY":
        assert "ok" in got or got.get("errno") in ("ENOTTY", "EOPNOTSUPP"), got
    else:
        assert got.get("errno") == want, got


@pytest.mark.parametrize("present", [True, False], ids=["present", "absent"])
@pytest.mark.parametrize(("right", "base", "yes", "no"), SPAWN_CASES, ids=[c[0] for c in SPAWN_CASES])
def test_right_at_spawn(run: Runner, right: str, base: Rights, yes: str, no: str, present: bool) -> None:
    r = Rights[right]
    own = Rights.MMAP if r in (Rights.MMAP_R, Rights.MMAP_W) else r  # the bit that is only this right's
    rights = base | r if present else base & ~own
    _check(run(right, rights, "spawn"), yes if present else no)


# Later grants: what Linux can enforce after entry (see the table).
LATER_CASES = [
    ("READ", W | S | F | T, "ok", "EBADF"),
    ("WRITE", R | S | F | T, "ok", "EBADF"),
    ("SEEK", R, "ok-with-FSTAT", "ESPIPE"),  # without SEEK: a pipe
    ("FSTAT", R | S, "ok", "refused"),  # SEEK without FSTAT cannot be enforced later
    ("FTRUNCATE", R | W | S | F, "ok", "EACCES"),  # Landlock no-truncate opener
]


@pytest.mark.parametrize("present", [True, False], ids=["present", "absent"])
@pytest.mark.parametrize(("right", "base", "yes", "no"), LATER_CASES, ids=[c[0] for c in LATER_CASES])
def test_right_granted_later(run: Runner, right: str, base: Rights, yes: str, no: str, present: bool) -> None:
    r = Rights[right]
    rights = base | r if present else base & ~r
    if yes == "ok-with-FSTAT" and present:
        rights |= F
    want = yes if present else no
    if want == "ok-with-FSTAT":
        want = "ok"
    if want == "refused":
        with pytest.raises(UnsupportedRights):
            run(right, rights, "later")
        return
    _check(run(right, rights, "later"), want)


@pytest.mark.parametrize(
    "right", ["FSYNC", "MMAP_R", "FCHMOD", "FCHOWN", "FLOCK", "FUTIMES", "FSTATFS", "FCNTL", "IOCTL"]
)
def test_ungrantable_later_rights_are_refused(run: Runner, right: str) -> None:
    with pytest.raises(UnsupportedRights, match="after sandbox entry"):
        run(right, R | S | F | Rights[right], "later")


@pytest.mark.parametrize("right", ["FSYNC", "FCHMOD", "FSTATFS"])
def test_absent_later_rights_are_denied(run: Runner, right: str) -> None:
    assert run(right, R | S | F, "later") == {"errno": "EPERM"}


def test_accept_weaker_delivers_without_the_right(root: Path) -> None:
    policy = Policy().allow("data/", ALL_FILE).accept_weaker(Rights.FSYNC).with_sandbox(violation="errno")
    with Broker(policy, root=root) as b:
        w = b.spawn(Prober)
        got = w.probe("FSYNC", b.open("data/f.bin", R | S | F | Rights.FSYNC))
        assert got == {"errno": "EPERM"}  # granted without FSYNC, as accepted


def test_later_read_write_without_seek_is_refused(run: Runner) -> None:
    with pytest.raises(UnsupportedRights, match="one direction"):
        run("READ", R | W, "later")


def test_append_cannot_be_cleared(run: Runner, shared: tuple[Broker, Path, WorkerHandle]) -> None:
    for phase in ("spawn", "later"):
        got = run("APPEND", Rights.APPEND | S | F | T, phase)
        assert got == {"errno": "EPERM"}, (phase, got)
    assert (shared[1] / "data" / "f.bin").read_bytes() == b"0123456789"


@pytest.mark.parametrize("phase", ["spawn", "later"])
def test_the_open_files_status_flags_are_not_the_workers_to_change(root: Path, phase: str) -> None:
    """A worker without FCNTL set O_DIRECT (with O_APPEND, which the filter
    allowed on any fd) on a file it was given: the open file is the
    broker's capability's too, whose reads then failed with EINVAL, as did
    a sibling's given the same capability (red-team round 35)."""
    with _broker(root) as b:
        cap = b.open("data/f.bin", R | S | F)
        flags = fcntl.fcntl(cap.fileno(), fcntl.F_GETFL)
        w = b.spawn(Prober, grants={"f": cap}) if phase == "spawn" else b.spawn(Prober)
        assert (w.probe("O_DIRECT") if phase == "spawn" else w.probe("O_DIRECT", cap)) == {"errno": "EPERM"}
        assert fcntl.fcntl(cap.fileno(), fcntl.F_GETFL) == flags
        assert os.pread(cap.fileno(), 4, 0) == b"0123"
        assert b.spawn(Prober).probe("READ", cap) == {"ok": repr(b"0")}  # (a sibling given it)


@pytest.mark.parametrize("spawn", ["zygote", "exec"])
def test_a_directory_grant_works_in_a_worker_whose_module_imports_only_worker(root: Path, spawn: str) -> None:
    """Each operation of a spawn-time directory grant imported openat2's
    module on first use, after sandbox entry: a violation (a file-system
    access) in every worker whose module did not import `broker`, which
    loads it first (red-team round 36; the tests' modules all did)."""
    from _lone_worker import Lone

    rights = R | S | F | Rights.LOOKUP | Rights.CREATE | Rights.WRITE | Rights.UNLINKAT | Rights.MKDIRAT
    policy = Policy().allow("data/", rights)
    with Broker(policy, root=root, spawn=spawn) as b, b.opendir("data/", rights) as d:
        w = b.spawn(Lone, grants={"d": d})
        assert not any(name.startswith("broker") for name in w.loaded())
        assert w.use_grant() == {"read": b"inside", "stat": 6, "listdir": ["a.txt", "f.bin", "sub", "victim.txt"]}


def test_pinned_slot_cannot_be_reused(root: Path) -> None:
    """Close a pinned read-only grant, land a stronger fd in its slot: denied."""
    with _broker(root) as b:
        w = b.spawn(Attacker, grants={"f": b.open("data/f.bin", R | Rights.SEEK | Rights.FSTAT)})
        assert w.reuse_slot(b.open("data/f.bin", R | W | S | F | T)) == {"close": "EPERM", "dup2": "EPERM"}


@pytest.mark.parametrize("phase", ["spawn", "later"])
def test_directory_grants(root: Path, phase: str) -> None:
    with _broker(root) as b:
        full = b.opendir("data/", R | S | F | Rights.LOOKUP | Rights.CREATE | Rights.UNLINKAT | Rights.WRITE)
        ro = b.opendir("data/", R | S | F | Rights.LOOKUP)
        layer = "kernel" if phase == "spawn" else "broker"
        for d, can_write in ((ro, False), (full, True)):
            w = b.spawn(Prober, grants={"d": d}) if phase == "spawn" else b.spawn(Prober)
            arg = None if phase == "spawn" else d
            assert w.dir_op("open", arg) == {"ok": "inside"}
            assert "a.txt" in w.dir_op("list", arg)["ok"]
            esc = w.dir_op("escape", arg)
            assert esc.get("denied", "").startswith(layer), esc
            made = w.dir_op("create", arg)
            gone = w.dir_op("unlink", arg)
            if can_write:
                assert made == {"ok": "created"} and gone == {"ok": "unlinked"}
            else:
                assert made.get("denied", "").startswith(layer), made
                assert gone.get("denied", "").startswith(layer), gone
        assert (root / "secret").read_text() == "outside"
        assert not (root / "data" / "victim.txt").exists()


def test_grants_held_from_spawn_are_moved_into_the_empty_root(tmp_path: Path) -> None:
    """A directory granted at spawn is bind-mounted into the worker's empty
    root (with every grant on the same host mount, beneath their deepest
    common directory): a stat by '..' reaches no host path above them (it
    reached the whole host's tree; a claims audit), and a rename between
    two grants stays within one mount (no EXDEV)."""
    (tmp_path / "app" / "in").mkdir(parents=True)
    (tmp_path / "app" / "out").mkdir()
    (tmp_path / "app" / "in" / "a.txt").write_text("x")
    (tmp_path / "secret").write_text("outside")
    moving = R | S | F | Rights.LOOKUP | Rights.CREATE | Rights.UNLINKAT | Rights.RENAMEAT | Rights.WRITE
    with Broker(Policy().allow("app/", moving), root=tmp_path) as b:
        w = b.spawn(Mover, grants={"src": b.opendir("app/in/", moving), "dst": b.opendir("app/out/", moving)})
        assert "grantroot" in w.sandbox["namespaces"], w.sandbox["namespaces"]
        seen = w.move_and_look()
    assert (tmp_path / "app" / "out" / "moved.txt").read_text() == "x"
    # ('..' from app/in is app; above app, only the empty root)
    assert seen == {"../secret": "ENOENT", "../../../../../../../etc/passwd": "ENOENT",
                    "../out/moved.txt": 1}, seen


def test_grants_whose_common_directory_holds_the_empty_roots_mountpoint_are_moved_too() -> None:
    """Grants right beneath /tmp, where the empty root is mounted: a copy of
    /tmp's mounts made after that held the empty root itself, so no grant
    moved (red-team round 45, 3 of 3). And a grant whose place cannot be
    read (deleted since opendir) kept every other one from moving: now only
    that one keeps its place. A name that merely ends in " (deleted)" (as
    /proc shows a deleted directory's) is no deleted directory (red-team
    round 46: such a grant kept its host place)."""
    tops = [Path(tempfile.mkdtemp(dir="/tmp")), Path(tempfile.mkdtemp(dir="/tmp", suffix=" (deleted)"))]
    rights = R | S | F | Rights.LOOKUP
    policy = Policy()
    for top in tops:
        policy = policy.allow(f"{top.name}/", rights)
    try:
        with Broker(policy, root="/tmp") as b:
            w = b.spawn(Looker, grants={"a": b.opendir(f"{tops[0].name}/", rights),
                                        "b": b.opendir(f"{tops[1].name}/", rights)})
            assert "grantroot" in w.sandbox["namespaces"], w.sandbox["namespaces"]
            assert w.look() == {"a": "ENOENT", "b": "ENOENT"}
            grants = {"a": b.opendir(f"{tops[0].name}/", rights), "b": b.opendir(f"{tops[1].name}/", rights)}
            tops.pop().rmdir()
            w = b.spawn(Looker, grants=grants)
            assert "grantroot" not in w.sandbox["namespaces"], w.sandbox["namespaces"]
            seen = w.look()
            assert seen["a"] == "ENOENT" and isinstance(seen["b"], int), seen  # (b kept its place: the host's)
    finally:
        for top in tops:
            shutil.rmtree(top)


def _mount(source: str, target: str, flags: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(source.encode(), target.encode(), None, ctypes.c_ulong(flags), None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), target)


def test_a_grant_through_a_read_only_mount_stays_read_only_when_one_is_stacked_over_it(tmp_path: Path) -> None:
    """The reopen in the empty root found the grant's directory by its path:
    a writable mount of it stacked on the host over the read-only one the
    broker opened it through made the grant writable (red-team round 45,
    4 of 4). The reopened directory must be seen through mounts of the
    same flags, else the grant keeps its fd."""
    MS_BIND, MS_REMOUNT, MS_RDONLY = 0x1000, 0x20, 0x1
    (tmp_path / "data" / "x").mkdir(parents=True)
    (tmp_path / "ro").mkdir()
    ro = str(tmp_path / "ro")
    try:
        _mount(str(tmp_path / "data"), ro, MS_BIND)
    except OSError as exc:
        pytest.skip(f"this test mounts on the host, which this process may not: {exc}")
    mounted = 1
    try:
        _mount("", ro, MS_REMOUNT | MS_BIND | MS_RDONLY)
        rights = R | S | F | Rights.LOOKUP | Rights.CREATE | Rights.WRITE
        with Broker(Policy().allow("ro/", rights), root=tmp_path) as b:
            with b.opendir("ro/x/", rights) as grant:
                assert b.spawn(Looker, grants={"g": grant}).create("g") == "EROFS"
            with b.opendir("ro/x/", rights) as grant:  # (through the read-only mount)
                _mount(str(tmp_path / "data"), ro, MS_BIND)  # a writable one over it
                mounted += 1
                w = b.spawn(Looker, grants={"g": grant})
                assert w.create("g") == "EROFS"
                assert "grantroot" not in w.sandbox["namespaces"]
        assert not (tmp_path / "data" / "x" / "new.txt").exists()
    finally:
        libc = ctypes.CDLL(None, use_errno=True)
        for _ in range(mounted):
            libc.umount2(ro.encode(), 2)  # (MNT_DETACH: whatever still holds it, nothing is left mounted)


def test_table_covers_every_right_and_renders() -> None:
    names = {e.right for e in TABLE}
    for r in ["READ", "WRITE", "SEEK", "FSTAT", "FTRUNCATE", "FSYNC", "MMAP_R", "MMAP_W", "MMAP_X", "LOOKUP",
              "CREATE", "UNLINKAT", "FCHMOD", "FCHOWN", "FLOCK", "IOCTL", "APPEND"]:  # fmt: skip
        assert r in names
    md = render_markdown()
    assert md.count("\n") == len(TABLE) + 1


def test_readme_carries_the_current_table() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    start, end = "<!-- rights-table:start -->\n", "\n<!-- rights-table:end -->"
    block = readme[readme.index(start) + len(start) : readme.index(end)]
    assert block == render_markdown(), "README rights table is stale: run python3 -m worker.sandbox._rights_table"


def test_closing_a_grant_object_keeps_the_pinned_slot(root: Path) -> None:
    with Broker(Policy().allow("data/", R | S | F), root=root) as b:  # kill mode
        w = b.spawn(Closer, grants={"f": b.open("data/f.bin", R | S | F)})
        assert w.close_grant_politely() == repr(b"1")
