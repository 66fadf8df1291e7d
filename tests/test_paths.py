"""Path requests from a worker: everything that tries to leave its granted
tree is refused (NotCapable) and the file is never opened. The broker alone
enforces this: the worker's own early checks are bypassed here by sending
raw requests."""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path
from typing import Any

import pytest
from _paths_workers import (
    _LOOKUP,
    Asker,
    Creator,
    DirMaker,
    Maker,
    ModeString,
    Namer,
    Nested,
    PathUser,
    ProxyMaker,
    ProxyReturner,
    SpawnGrantOpener,
    Writer,
)
from conftest import READ, default_policy
from hypothesis import given, settings
from hypothesis import strategies as st

from broker import Broker, Policy
from protocol import NotCapable, PolicyError, Rights
from protocol._remote import exception_from_wire

_DOTDOT = "'..' is not allowed in a path"
_ESCAPED = "path escapes its granted directory (symlink, magic link or '..')"
_NO_GRANT = "no grant in the policy covers this path"
# path: (errno, the refusal's reason) - each escape is refused by its own check, not by whichever comes first
ESCAPES: dict[str, tuple[int, str]] = {
    "../secret": (errno.EACCES, _DOTDOT),
    "data/../secret": (errno.EACCES, _DOTDOT),
    "data/../../etc/passwd": (errno.EACCES, _DOTDOT),
    "/etc/passwd": (errno.EACCES, "absolute paths are not allowed"),
    "data/link_abs": (errno.EACCES, _ESCAPED),
    "data/link_up": (errno.EACCES, _ESCAPED),
    "data/link_proc": (errno.EACCES, _ESCAPED),
    "data/link_fd": (errno.EACCES, _ESCAPED),
    "data/a.txt\x00junk": (errno.EACCES, "path contains a NUL byte"),
    "data/sub/../../secret": (errno.EACCES, _DOTDOT),
    "secret": (errno.EACCES, _NO_GRANT),
    "": (errno.EACCES, _NO_GRANT),
    "data": (errno.EACCES, "only regular files are granted, this is a dir"),
}


@pytest.mark.parametrize("path", ESCAPES)
def test_escapes_are_refused_by_the_broker(ro_broker: Broker, path: str) -> None:
    w = ro_broker.spawn(Asker)
    with pytest.raises(NotCapable) as info:
        w.open_raw(path)
    assert (info.value.errno, info.value.strerror) == ESCAPES[path]
    assert w.open_raw("data/a.txt") == b"hello"  # still serving


@pytest.mark.parametrize("path", ESCAPES)
def test_escapes_are_refused_for_broker_side_open(ro_broker: Broker, path: str) -> None:
    with pytest.raises(NotCapable):
        ro_broker.open(path, Rights.READ)


def test_symlink_inside_the_tree_is_followed(ro_broker: Broker) -> None:
    w = ro_broker.spawn(Asker)
    assert w.open_raw("data/link_in") == b"hello"
    assert w.open_raw("data/./sub//c.txt") == b"deep"


def test_fifo_is_never_opened(ro_broker: Broker) -> None:
    w = ro_broker.spawn(Asker)
    with pytest.raises(NotCapable, match="fifo"):
        w.open_raw("data/fifo")


def test_directory_is_not_a_file(ro_broker: Broker) -> None:
    w = ro_broker.spawn(Asker)
    with pytest.raises(NotCapable):
        w.open_raw("data/sub")


def test_missing_file_is_file_not_found(ro_broker: Broker) -> None:
    w = ro_broker.spawn(Asker)
    with pytest.raises(FileNotFoundError):
        w.open_raw("data/nope.txt")


def test_rights_beyond_policy_are_refused(ro_broker: Broker) -> None:
    w = ro_broker.spawn(Asker)
    with pytest.raises(NotCapable):
        w.open_raw("data/a.txt", int(Rights.READ | Rights.WRITE))
    # a rights integer with unknown bits is refused too
    with pytest.raises(NotCapable):
        w.open_raw("data/a.txt", 1 << 60)


def test_client_checks_early_too(ro_broker: Broker) -> None:
    w = ro_broker.spawn(Asker)
    with pytest.raises(NotCapable, match=r"'\.\.'") as info:
        w.open_checked("data/../secret")
    # The worker's traceback shows privsep's own lines too (they were bare "File ..., line N").
    tb = info.value.remote_traceback  # type: ignore[attr-defined]
    assert "with self.broker.open(path, Rights.READ) as f:" in tb
    assert "path = _checked(path)" in tb and 'raise NotCapable(f"\'..\' is not allowed' in tb


def test_create_cannot_escape_or_clobber_specials(broker: Broker, tree: Path) -> None:
    w = broker.spawn(Asker)
    rights = int(Rights.WRITE)
    for path in ("out/../secret", "/tmp/x", "data/new.txt", "out/", "out/sub/x"):
        got = w.raw("create", {"path": path, "rights": rights})
        assert isinstance(got, dict) and got["error"] in ("NotCapable", "FileNotFoundError"), (path, got)
    (tree / "out" / "link").symlink_to("/etc/passwd")
    got = w.raw("create", {"path": "out/link", "rights": rights})
    assert got == {"error": "NotCapable", "errno": errno.EACCES}
    assert (tree / "secret").read_text() == "top secret"


def test_a_refused_create_leaves_no_output(tree: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A create the broker refused after making its output (rights Linux
    cannot hold to after entry: FSTAT without SEEK) stayed among the call's
    outputs and was committed as the call returned: an empty file in place
    of the one it named, the audit saying "denied" then "commit granted"
    (red-team round 37). A retry with rights that can be granted was
    refused as a second create of it."""
    (tree / "out" / "report.txt").write_text("IMPORTANT")
    policy = Policy().allow("out/", Rights.WRITE | Rights.CREATE | Rights.FSTAT | Rights.LOOKUP)
    with Broker(policy, root=tree) as b, caplog.at_level(logging.INFO, logger="privsep.audit"):
        before = set(os.listdir(tree / "out"))
        w = b.spawn(Creator)
        assert w.create_refused("out/report.txt", int(Rights.WRITE | Rights.FSTAT)) == "UnsupportedRights"
        assert (tree / "out" / "report.txt").read_text() == "IMPORTANT"
        assert set(os.listdir(tree / "out")) == before  # (no hidden name left either)
        decisions = [(r.privsep["request"], r.privsep["decision"]) for r in caplog.records if hasattr(r, "privsep")]
        assert decisions == [("spawn", "granted"), ("create", "denied")], decisions
        assert w.with_outputs("out/report.txt").create_refused("out/report.txt", int(Rights.WRITE)) == "created"
        assert (tree / "out" / "report.txt").read_text() == ""  # (created, and left empty by the worker)


LONG_NAMES = [
    "\u00e9" * 117,  # 234 bytes: 2-byte characters
    "\u00e9" * 127 + "a",  # 255 bytes, NAME_MAX
    "\u20ac" * 85,  # 255 bytes of 3-byte characters
    "a" + "\U0001f600" * 63,  # 253 bytes: byte 200 falls inside a 4-byte character
]


@pytest.mark.parametrize("rights", [Rights.WRITE, Rights.WRITE | Rights.SEEK | Rights.FSTAT | Rights.FTRUNCATE],
                         ids=["pipe", "file"])
def test_an_output_with_a_long_non_ascii_name_is_committed(tree: Path, rights: Rights) -> None:
    """The hidden name kept the first 200 characters of the output's name,
    not 200 bytes: a name of 234 to 255 bytes with characters beyond ASCII
    made it longer than NAME_MAX, and the output could not be committed."""
    policy = Policy().allow("out/", Rights.WRITE | Rights.CREATE | Rights.SEEK | Rights.FSTAT | Rights.FTRUNCATE)
    with Broker(policy, root=tree) as b:
        assert b.spawn(Namer).write_each(LONG_NAMES, int(rights)) == len(LONG_NAMES)
    assert sorted(os.listdir(tree / "out")) == sorted(LONG_NAMES)
    for name in LONG_NAMES:
        assert (tree / "out" / name).read_bytes() == name.encode()


def test_a_hidden_name_fits_name_max_and_cuts_no_character() -> None:
    """Also the fallback's (no O_TMPFILE), which ends in ".tmp"."""
    from broker._outputs import hidden_name

    for name in [*LONG_NAMES, "a" * 255, os.fsdecode(b"\xff" * 255), "short"]:
        for suffix in ("", ".tmp"):
            hidden = hidden_name(name, suffix)
            assert len(os.fsencode(hidden)) <= 255, (name, hidden)
            kept = hidden[1:].rsplit(".privsep-", 1)[0]
            assert name.startswith(kept), (name, kept)
            assert kept == name or 196 < len(os.fsencode(kept)) <= 200, (name, kept)  # (less a character at most)


def test_errors_round_trip_unknown_types() -> None:
    exc = exception_from_wire({"type": "os.system", "msg": "x", "errno": None, "filename": None, "tb": ""})
    assert type(exc).__name__ == "RemoteError"


def test_a_forked_copy_of_the_broker_reopens_through_its_own_fd_table(broker: Broker, tree: Path) -> None:
    """The broker reopens a checked O_PATH fd through a cached /proc/self/fd
    directory. A forked copy must not reopen through its parent's table: here
    the parent puts another file at the very fd number the child's O_PATH
    open will get, so a stale directory would hand the child that file."""
    import os

    with broker.open("data/a.txt") as warm:  # the cached directory exists before the fork
        assert os.pread(warm.fileno(), 5, 0) == b"hello"
    go_r, go_w = os.pipe()
    res_r, res_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            os.read(go_r, 1)  # closes nothing first: its lowest free fd stays the parent's
            with broker.open("data/a.txt") as cap:
                os.write(res_w, os.pread(cap.fileno(), 64, 0) or b"(empty)")
            code = 0
        except BaseException as exc:
            os.write(res_w, repr(exc).encode()[:200])
        finally:
            os._exit(code)
    decoy = os.open(tree / "secret", os.O_RDONLY | os.O_CLOEXEC)  # the lowest free fd, as in the child
    os.close(go_r)
    os.close(res_w)
    try:
        os.write(go_w, b"x")
        got = os.read(res_r, 256)
    finally:
        os.close(decoy)
        os.close(go_w)
        os.close(res_r)
        _, status = os.waitpid(pid, 0)
    assert got == b"hello", got
    assert os.waitstatus_to_exitcode(status) == 0



def test_openat2_is_refused_off_linux(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """It made syscall 437 whatever the platform: on FreeBSD, where a
    spawn-time directory grant resolves through it too, that number is not
    openat2. Elsewhere it now raises ENOSYS (docs/freebsd.md)."""
    import errno
    import os

    from worker.sandbox import _openat2

    monkeypatch.setattr(_openat2, "_LINUX", False)
    top = os.open(tree / "data", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with pytest.raises(OSError) as info:
            _openat2.openat2(top, "a.txt", os.O_RDONLY | os.O_CLOEXEC)
        assert info.value.errno == errno.ENOSYS and not _openat2.available()
    finally:
        os.close(top)

@pytest.mark.parametrize("call", ["fixed", "variadic"])
def test_openat2_wrapper_stays_beneath_under_both_call_forms(
    tree: Path, monkeypatch: pytest.MonkeyPatch, call: str
) -> None:
    """The broker's resolver calls openat2 through a fixed prototype where the
    ABI allows it, else as variadic syscall(): both resolve beneath the
    directory fd, refuse what leaves it, and refuse a NUL instead of cutting
    the path there."""
    import os

    from worker.sandbox import _openat2

    if call == "variadic":
        monkeypatch.setattr(_openat2, "_FIXED", None)
    elif _openat2._FIXED is None:
        pytest.skip("this platform calls openat2 as variadic only")
    top = os.open(tree / "data", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fd = _openat2.openat2(top, "sub/../a.txt", os.O_RDONLY | os.O_CLOEXEC)
        try:
            assert os.pread(fd, 5, 0) == b"hello"
        finally:
            os.close(fd)
        for path in ("../secret", "sub/../../secret", "/etc/passwd", "link_abs", "link_up", "link_proc"):
            with pytest.raises(OSError) as info:
                os.close(_openat2.openat2(top, path, os.O_RDONLY | os.O_CLOEXEC))
            assert info.value.errno in (errno.EXDEV, errno.ELOOP), (path, info.value)
        with pytest.raises(ValueError, match="null byte"):
            _openat2.openat2(top, "a.txt\x00../../secret", os.O_RDONLY)
    finally:
        os.close(top)


def _answer(r: Any, path: object, rights: Rights) -> object:
    """What a policy check gives: its Target, or the refusal's type and message."""
    try:
        return r.locate(path, rights)
    except NotCapable as exc:
        return (type(exc), str(exc))


def _fresh_answer(r: Any, path: object, rights: Rights) -> object:
    try:
        return r._locate(path, rights)
    except NotCapable as exc:
        return (type(exc), str(exc))


_PIECES = st.sampled_from(["data", "out", "a.txt", "sub", ".", "..", "", "secret", "x" * 300, "y" * 200, "\x00", "é"])
_RIGHTS = st.sampled_from([READ, Rights.READ, Rights.WRITE, Rights.WRITE | Rights.CREATE, READ | Rights.WRITE])


@settings(max_examples=300, deadline=None)
@given(paths=st.lists(st.lists(_PIECES, max_size=5).map("/".join), min_size=1, max_size=6), rights=_RIGHTS)
def test_remembered_policy_checks_answer_as_a_fresh_check_does(paths: list[str], rights: Rights) -> None:
    """The broker remembers accepted policy checks: asked once and again,
    every path gets exactly what an uncached check gives (the same target, or
    the same refusal), and only short accepted paths are kept."""
    import tempfile

    from broker._resolve import _LOCATED_PATH_MAX, Resolver

    with tempfile.TemporaryDirectory() as tmp:
        os.makedirs(os.path.join(tmp, "data", "sub"))
        os.makedirs(os.path.join(tmp, "out"))
        r = Resolver(default_policy(), tmp)
        try:
            for _ in range(2):
                for path in paths:
                    assert _answer(r, path, rights) == _fresh_answer(r, path, rights), path
            for (path, want), target in r._located.items():
                assert len(path) <= _LOCATED_PATH_MAX and want == int(rights)
                assert target == r._locate(path, Rights(want))
        finally:
            r.close()


def test_a_remembered_check_grants_no_more_rights_and_forgets_at_close(tree: Path) -> None:
    """A path checked once for READ is still refused WRITE; a refused path is
    never remembered; the memory stays bounded; after close() nothing
    remembered is used (a target's fd numbers may name other files then)."""
    from broker._resolve import _LOCATED_MAX, Resolver

    r = Resolver(default_policy(), tree)
    try:
        first = r.locate("data/a.txt", READ)
        assert r.locate("data/a.txt", READ) is first  # remembered
        with pytest.raises(NotCapable):
            r.locate("data/a.txt", READ | Rights.WRITE)
        for _ in range(2):
            with pytest.raises(NotCapable):
                r.locate("secret", Rights.READ)
        assert not any(path == "secret" for path, _ in r._located)
        long = "data/" + "y" * 200 + "/" + "z" * 200  # accepted, but too long to keep
        assert r.locate(long, READ).rest == "y" * 200 + "/" + "z" * 200
        assert not any(path == long for path, _ in r._located)
        for i in range(_LOCATED_MAX + 10):
            r.locate(f"data/n{i}", Rights.READ)
            assert len(r._located) <= _LOCATED_MAX
        stale = r.locate("data/a.txt", READ)
    finally:
        r.close()
    assert r._located == {}
    r._located[("data/a.txt", int(READ))] = stale  # as a check racing close() in another thread could leave
    with pytest.raises(NotCapable, match="closed"):
        r.locate("data/a.txt", READ)


def test_pathlib_paths_are_taken_on_both_sides(tree: Path) -> None:
    with Broker(Policy().allow("data/", _LOOKUP), root=tree) as b:
        with b.open(Path("data/a.txt")) as cap:
            assert os.pread(cap.fileno(), 5, 0) == b"hello"
        with pytest.raises(NotCapable):  # the same checks as a str: still beneath the root
            b.open(Path("data/../secret"))
        for bad in (b"data/a.txt", 3, None):
            with pytest.raises(TypeError, match="path must be a str or a path-like"):
                b.open(bad)  # type: ignore[arg-type]
        w = b.spawn(PathUser)
        assert w.via_broker("a.txt") == b"hello"
        assert w.via_directory(b.opendir(Path("data"), _LOOKUP), "a.txt") == [b"hello", 5, ["c.txt"]]
        assert len(w.bad_type(b.opendir("data", _LOOKUP))) == 2


def test_a_directory_proxy_cannot_be_sent_back_and_says_why(tree: Path) -> None:
    with Broker(Policy().allow("data/", _LOOKUP), root=tree) as b:
        w = b.spawn(ProxyReturner)
        with pytest.raises(TypeError, match="a directory proxy stands for a directory the broker holds"):
            w.proxy()
        assert w.alive


def test_pathlib_paths_in_a_directory_granted_at_spawn(tree: Path) -> None:
    with Broker(Policy().allow("data/", _LOOKUP), root=tree) as b:
        w = b.spawn(PathUser, grants={"data": b.opendir("data", _LOOKUP)})
        assert w.via_spawn_grant("a.txt") == [b"hello", ["c.txt"]]
        assert len(w.bad_type()) == 2


def test_a_policy_path_is_a_str_whose_slash_says_directory() -> None:
    with pytest.raises(PolicyError, match=r"f'\{path\}/'"):
        Policy().allow(Path("data"), Rights.READ)  # type: ignore[arg-type]
    with pytest.raises(PolicyError, match="not int"):
        Policy().allow(3, Rights.READ)  # type: ignore[arg-type]


def test_names_that_are_not_utf8_are_left_out_of_every_listing(tree: Path) -> None:
    """The wire carries UTF-8, so no path API can take such a name: the
    broker's listing, a proxy's and a spawn-time directory's all leave it out
    the same way, and asking for it is refused."""
    with open(os.fsencode(tree / "data") + b"/\xff.txt", "wb") as f:
        f.write(b"x")
    assert "\udcff.txt" in os.listdir(tree / "data")
    with Broker(Policy().allow("data/", _LOOKUP), root=tree) as b:
        w = b.spawn(PathUser, grants={"data": b.opendir("data", _LOOKUP)})
        expected = sorted(n for n in os.listdir(tree / "data") if n != "\udcff.txt")
        assert w.listing() == expected  # the fd-backed directory, listed in the worker
        assert w.listing(b.opendir("data", _LOOKUP)) == expected  # a proxy, listed by the broker
        assert w.listing_via_broker() == expected
        with pytest.raises(NotCapable, match="not valid UTF-8"):
            b.open("data/\udcff.txt")


def test_a_granted_directory_removed_under_the_broker_is_named_as_such(tree: Path) -> None:
    """The broker keeps the directories it opened; one removed (and made
    anew by the same name) is not reached any more. That read 'Operation not
    permitted: .' for a create and named the broker's /proc/self/fd link for
    an output whose commit failed; it now says why, naming the output."""
    import shutil
    import threading

    policy = Policy().allow("out/", Rights.WRITE | Rights.CREATE).allow("data/", READ)
    with Broker(policy, root=tree) as b:
        w = b.spawn(Writer)
        assert w.write("a") == "written" and (tree / "out" / "a").read_bytes() == b"payload"
        threading.Timer(0.3, shutil.rmtree, (tree / "out",)).start()
        with pytest.raises(FileNotFoundError, match="output not committed: its directory was removed") as info:
            w.write("b", 1.0)
        assert info.value.filename == "out/b" and "/proc" not in str(info.value)
        (tree / "out").mkdir()
        with pytest.raises(FileNotFoundError, match="its directory was removed after the broker opened it") as info:
            w.write("c")
        assert info.value.filename == "out/c"
        assert not any((tree / "out").iterdir()) and w.alive
        shutil.rmtree(tree / "data")
        with pytest.raises(FileNotFoundError, match="its directory was removed"):
            w.read("a.txt")
        (tree / "data").mkdir()
    with Broker(policy, root=tree) as b:  # a new broker opens the new directories
        assert b.spawn(Writer).write("d") == "written" and (tree / "out" / "d").exists()


def test_a_failed_mkdir_or_unlink_names_the_path_asked_for(tree: Path) -> None:
    """They named the last component only ('File exists: sub'), and the
    error was raised from itself (its __cause__ was the exception)."""
    policy = Policy().allow("out/", Rights.WRITE | Rights.CREATE | Rights.MKDIRAT | Rights.UNLINKAT | Rights.LOOKUP)
    with Broker(policy, root=tree) as b:
        w = b.spawn(Maker)
        w.mkdir("out/sub")
        with pytest.raises(FileExistsError) as info:
            w.mkdir("out/sub")
        assert info.value.filename == "out/sub"
        with pytest.raises(FileNotFoundError) as info:
            w.unlink_in(b.opendir("out", Rights.UNLINKAT | Rights.LOOKUP), "sub/nope")
        assert info.value.filename == "out/sub/nope"
    local = Broker(policy, root=tree)
    try:
        with pytest.raises(FileExistsError) as info:
            local._resolver.mkdir(local._resolver.locate("out/sub", Rights.MKDIRAT))
        assert info.value.__cause__ is not info.value and isinstance(info.value.__cause__, FileExistsError)
    finally:
        local.close()


def test_a_narrower_grant_adds_rights_and_takes_none_away(tree: Path) -> None:
    """Policy().allow("data/", READ).allow("data/sub/", WRITE) refused a READ
    of data/sub/c.txt: the deepest grant alone decided, so adding a grant
    took away what the wider one gave."""
    base = Policy().allow("data/", READ)
    with Broker(base.allow("data/sub/", Rights.WRITE | Rights.CREATE), root=tree) as b:
        w = b.spawn(Nested)
        assert w.open_raw("data/sub/c.txt", int(READ)) == (tree / "data" / "sub" / "c.txt").read_bytes()
        w.write("data/sub/new", b"made")
        assert (tree / "data" / "sub" / "new").read_bytes() == b"made"
        # One request is resolved beneath one grant: rights split between two are not combined.
        with pytest.raises(NotCapable) as info:
            w.open_raw("data/sub/c.txt", int(Rights.READ | Rights.WRITE))
        assert "no one grant of the policy covering this path gives READ|WRITE" in str(info.value)
        assert "'data/sub/' WRITE|CREATE, 'data/' READ" in str(info.value)
        with pytest.raises(NotCapable, match=r"the policy's 'data/' grants READ.*, not WRITE"):
            w.open_raw("data/a.txt", int(Rights.WRITE))


_GRANT_PATHS = st.sampled_from(["./", "data/", "data/sub/", "data/sub/c.txt", "data/a.txt", "out/", "data/sub/deep/"])
_SOME_RIGHTS = st.sampled_from(
    [Rights.READ, Rights.WRITE, Rights.READ | Rights.SEEK, Rights.FSTAT, Rights.WRITE | Rights.SEEK]
)


@settings(max_examples=300, deadline=None)
@given(
    grants=st.lists(st.tuples(_GRANT_PATHS, _SOME_RIGHTS), max_size=5),
    extra=st.tuples(_GRANT_PATHS, _SOME_RIGHTS),
    path=st.sampled_from(["data/a.txt", "data/sub/c.txt", "data/sub/deep/x", "out/y", "secret", "data/b.bin"]),
    rights=_SOME_RIGHTS,
)
def test_allow_only_adds(
    grants: list[tuple[str, Rights]], extra: tuple[str, Rights], path: str, rights: Rights
) -> None:
    """Whatever a policy grants, the same policy with one more grant grants
    too; and a request is answered beneath a grant covering the path that
    gives every right asked for."""
    policy = Policy()
    for where, r in grants:
        if not where.endswith("/") and r & (Rights.CREATE | Rights.LOOKUP):
            continue
        policy = policy.allow(where, r)
    parts = tuple(path.split("/"))

    def answer(p: Policy) -> Any:
        try:
            return p.lookup(parts, rights)
        except NotCapable:
            return None

    before = answer(policy)
    after = answer(policy.allow(*extra))
    if before is not None:
        assert after is not None
    for got in (before, after):
        if got is not None:
            grant, rest = got
            assert not (rights & ~grant.rights)
            assert (parts[: len(grant.parts)] == grant.parts and rest == parts[len(grant.parts):]) if grant.is_dir \
                else (parts == grant.parts and rest == ())


def test_rights_given_as_a_mode_string_say_what_rights_are(tree: Path) -> None:
    """open(path, "rb") is habit: it read "ValueError: 'rb' is not a valid Rights"."""
    policy = Policy().allow("data/", READ).allow("out/", Rights.WRITE | Rights.CREATE | Rights.MKDIRAT)
    with Broker(policy, root=tree) as b:
        w = b.spawn(ModeString)
        assert w.open_with("rb") == (
            "rights must be Rights flags, such as Rights.READ | Rights.SEEK, not 'rb' "
            "(a mode string is open()'s: ask for Rights.READ, Rights.WRITE, ...)"
        )
        assert w.open_with(None).endswith("not None")
        assert w.open_with(int(Rights.READ)) == "opened"
        with pytest.raises(TypeError, match="not 'r' \\(a mode string is open"):
            b.open("data/a.txt", "r")  # type: ignore[arg-type]
        # mkdir of the granted directory itself said "needs a file name"
        assert w.mkdir_grant() == "needs a name beneath the granted directory, not the directory itself: 'out'"


def test_a_single_file_grant_follows_no_symlink_on_its_path(tree: Path) -> None:
    """allow("inbox/upload.txt") names that file. A symlink planted as the file
    (to a file elsewhere beneath the root) or as a directory on its path must
    not hand out what the policy never named, even staying beneath the root."""
    (tree / "private").mkdir()
    (tree / "private" / "keys.txt").write_text("KEYS")
    (tree / "inbox").mkdir()
    (tree / "inbox" / "upload.txt").symlink_to("../private/keys.txt")
    (tree / "pub").symlink_to("private")
    (tree / "real").mkdir()
    (tree / "real" / "r.txt").write_text("plain")
    policy = (Policy().allow("inbox/upload.txt", READ).allow("pub/keys.txt", READ)
              .allow("real/r.txt", READ))
    with Broker(policy, root=str(tree)) as b:
        h = b.spawn(Asker)
        assert h.open_raw("real/r.txt") == b"plain"  # a plain path still works
        for path in ("inbox/upload.txt", "pub/keys.txt"):
            with pytest.raises(NotCapable, match="follows no symlink") as info:
                h.open_raw(path)
            assert info.value.errno == errno.EACCES and info.value.filename == path
            # the broker alone decides: the raw request skipped the worker's checks
            assert h.raw("stat", {"path": path}) == {"error": "NotCapable", "errno": errno.EACCES}
            with pytest.raises(NotCapable, match="follows no symlink"):
                b.open(path, READ)
        assert h.raw("stat", {"path": "real/r.txt"})["size"] == 5


def test_the_walk_without_symlinks_refuses_any_symlink_component(tmp_path: Path) -> None:
    """The by-hand RESOLVE_NO_SYMLINKS (for kernels without openat2's flag),
    run here with Linux's openat2 as its opener."""
    from broker._resolve import _walk_no_symlinks
    from worker.sandbox._openat2 import openat2

    (tmp_path / "d" / "e").mkdir(parents=True)
    (tmp_path / "d" / "e" / "f").write_text("F")
    (tmp_path / "ln").symlink_to("d")
    (tmp_path / "d" / "e" / "lf").symlink_to("f")
    top = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    try:
        before = len(os.listdir("/proc/self/fd"))
        fd = _walk_no_symlinks(top, "d/e/f", os.O_RDONLY | os.O_CLOEXEC, 0, openat2)
        assert os.read(fd, 5) == b"F"
        os.close(fd)
        for path in ("ln/e/f", "d/e/lf"):
            with pytest.raises(OSError) as info:
                _walk_no_symlinks(top, path, os.O_RDONLY | os.O_CLOEXEC, 0, openat2)
            assert info.value.errno == errno.ELOOP
        with pytest.raises(FileNotFoundError):
            _walk_no_symlinks(top, "d/nope/f", os.O_RDONLY | os.O_CLOEXEC, 0, openat2)
        assert len(os.listdir("/proc/self/fd")) == before  # nothing left open on any path
    finally:
        os.close(top)


def test_mkdir_beneath_a_directory_the_worker_asked_for(tree: Path) -> None:
    """A proxy's mkdir() reached the broker as 'dmkdir', which had no rights
    entry: a KeyError in the broker, raised into the caller's call."""
    policy = Policy().allow("out/", Rights.LOOKUP | Rights.MKDIRAT | Rights.CREATE)
    with Broker(policy, root=tree) as b:
        w = b.spawn(ProxyMaker)
        w.mkdir_via_proxy("out", int(Rights.LOOKUP | Rights.MKDIRAT), "made")
        assert (tree / "out" / "made").is_dir()
        with pytest.raises(NotCapable, match="MKDIRAT"):
            w.mkdir_via_proxy("out", int(Rights.LOOKUP), "not-made")
        assert not (tree / "out" / "not-made").exists()
        assert w.alive


def test_a_fault_of_the_broker_fails_the_request_not_the_call(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug in serving one request (here injected into the broker's own
    resolver) answers that request with an error naming it; the worker and
    its call go on, and the log has the traceback."""
    with Broker(Policy().allow("data/", READ), root=tree) as b:
        w = b.spawn(ProxyMaker)
        assert w.stat_size("data/a.txt") == 5

        def broken(target: object) -> None:
            raise ZeroDivisionError("a bug")

        monkeypatch.setattr(b._resolver, "stat", broken)
        with pytest.raises(RuntimeError, match=r"broker failed to serve this request \(ZeroDivisionError\)"):
            w.stat_size("data/a.txt")
        monkeypatch.undo()
        assert w.alive and w.stat_size("data/a.txt") == 5


def test_a_directory_granted_at_spawn_refuses_as_the_broker_does(tree: Path) -> None:
    """Beneath a directory held since spawn the worker resolves paths itself.
    A symlink out read 'Invalid cross-device link' with errno EXDEV (the
    broker says it escapes, with EACCES); a FIFO opened and read b''; a
    directory failed in Python's open(). All three now say what the broker
    says of them."""
    with Broker(Policy().allow("data/", _LOOKUP), root=tree) as b:
        w = b.spawn(SpawnGrantOpener, grants={"data": b.opendir("data", _LOOKUP)})
        assert w.open_in("a.txt") == b"hello"
        for name in ("link_abs", "link_up", "link_proc"):
            assert w.open_in(name) == {
                "errno": errno.EACCES,
                "msg": "path escapes its granted directory (symlink, magic link or '..')",
                "filename": name,
            }
        fifo = w.open_in("fifo")
        assert isinstance(fifo, dict) and fifo["msg"] == "only regular files are granted, this is a fifo"
        sub = w.open_in("sub")
        assert isinstance(sub, dict) and sub["msg"] == "only regular files are granted, this is a dir"
        assert w.open_in("link_in") == b"hello"  # a symlink that stays inside is followed, as the broker does


def test_a_path_beneath_a_proxy_of_the_root_is_named_as_beneath_the_root(tree: Path) -> None:
    """A proxy of the policy's root is named "": paths beneath it read
    '/out/a.txt' in errors and the audit, and never matched an output named
    'out/a.txt' (with_outputs refused it; a red-team run)."""
    with Broker(Policy().allow("./", _LOOKUP | Rights.CREATE | Rights.WRITE), root=tree) as b:
        root = b.opendir(".", _LOOKUP | Rights.CREATE | Rights.WRITE)
        assert root.name == ""
        target = b._resolver.locate_in(root, "out/a.txt", Rights.WRITE)
        assert target.display == "out/a.txt"
        root.close()


@pytest.mark.parametrize("how", ["broker", "proxy", "spawn-grant"])
def test_mkdir_takes_parents_and_exist_ok_as_pathlib_does(tree: Path, how: str) -> None:
    """A worker could make one level at a time, and an existing directory was
    an error it had to catch (and an audit event) every time (a user trial)."""
    (tree / "out" / "file").write_text("a file")
    rights = Rights.LOOKUP | Rights.MKDIRAT | Rights.FSTAT | Rights.SEEK | Rights.READ
    with Broker(Policy().allow("out/", rights), root=tree) as b:
        grants = {"out": b.opendir("out", rights)} if how == "spawn-grant" else None
        w = b.spawn(DirMaker, grants=grants)
        assert w.make(how, "out/a/b/c", False, False) == "FileNotFoundError"
        assert w.make(how, "out/a/b/c", True, False) == "made"
        assert (tree / "out" / "a" / "b" / "c").is_dir()
        assert w.make(how, "out/a/b/c", True, False) == "FileExistsError"
        assert w.make(how, "out/a/b/c", False, True) == "made"
        assert w.make(how, "out/a/b/d/e", True, True) == "made"
        assert w.make(how, "out/file", True, True) == "FileExistsError"  # a file, not a directory
        assert w.make(how, "out/file/x", True, True) == "NotADirectoryError"
    assert (tree / "out" / "file").read_text() == "a file"


@pytest.mark.parametrize("how", ["broker", "spawn-grant"])
def test_mkdir_with_parents_makes_as_many_levels_as_a_path_can_hold(tree: Path, how: str) -> None:
    """make_dirs was a recursion: 980 levels raised RecursionError in the
    worker (red-team round 37), where a path of 4096 bytes holds about
    2,000."""
    deep = "out/" + "/".join(["d"] * 1500)
    rights = Rights.LOOKUP | Rights.MKDIRAT | Rights.FSTAT | Rights.SEEK
    with Broker(Policy().allow("out/", rights), root=tree) as b:
        if how == "broker":
            w = b.spawn(DirMaker)
        else:
            w = b.spawn(DirMaker, grants={"out": b.opendir("out/", rights)})
        assert w.make(how, deep, True, False) == "made"
        assert w.make(how, deep, True, True) == "made"
    assert (tree / deep).is_dir()
    level = tree / deep  # removed here, level by level: pytest's rmtree of old temp dirs recurses, and fails
    while level != tree / "out":
        level.rmdir()
        level = level.parent


def _mkdir_events(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str, str]]:
    return [(e["path"], e["decision"], e["reason"]) for e in  # type: ignore[attr-defined]
            (r.privsep for r in caplog.records if r.name == "privsep.audit") if e["request"] in ("mkdir", "dmkdir")]


@pytest.mark.parametrize("how", ["broker", "proxy"])
def test_mkdir_exist_ok_on_a_directory_is_a_granted_request(
    tree: Path, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    """mkdir(exist_ok=True) on a directory that exists was a "failed" mkdir in
    the audit log (then a stat request): whoever watches the log for
    failures saw one for every such mkdir, and one per existing level with
    parents=True. The broker answers exist_ok itself now."""
    (tree / "out" / "a" / "b").mkdir(parents=True)
    (tree / "out" / "file").write_text("a file")
    caplog.set_level(logging.INFO, logger="privsep.audit")
    with Broker(Policy().allow("out/", Rights.LOOKUP | Rights.MKDIRAT | Rights.FSTAT), root=tree) as b:
        w = b.spawn(DirMaker)
        assert w.make(how, "out/a/b", False, True) == "made"
        assert w.make(how, "out/a/b/c/d", True, True) == "made"
        assert w.make(how, "out/file", False, True) == "FileExistsError"  # a file, not a directory
        assert w.make(how, "out/a/b", False, False) == "FileExistsError"
    exists = "the directory exists already (exist_ok)"
    assert _mkdir_events(caplog) == [
        ("out/a/b", "granted", exists),
        ("out/a/b/c/d", "failed", "No such file or directory"),  # parents=True: the level above first
        ("out/a/b/c", "granted", ""),
        ("out/a/b/c/d", "granted", ""),
        ("out/file", "failed", "File exists"),
        ("out/a/b", "failed", "File exists"),
    ]
    assert (tree / "out" / "a" / "b" / "c" / "d").is_dir() and (tree / "out" / "file").read_text() == "a file"


def test_mkdir_exist_ok_without_fstat_still_raises(tree: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The broker looks at what exists only as a stat request would: without
    FSTAT in the grant, an existing directory stays FileExistsError."""
    (tree / "out" / "a").mkdir()
    caplog.set_level(logging.INFO, logger="privsep.audit")
    with Broker(Policy().allow("out/", Rights.LOOKUP | Rights.MKDIRAT), root=tree) as b:
        assert b.spawn(DirMaker).make("broker", "out/a", False, True) == "FileExistsError"
    assert _mkdir_events(caplog) == [("out/a", "failed", "File exists")]
