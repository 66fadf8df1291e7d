"""Broker fds held for workers' requests are bounded per worker and in all:
a worker that asks for directories, piped files or outputs and keeps them
cannot fill the broker's fd table, so other workers' requests and new
spawns go on (found by a red-team run: 1007 proxies of one worker made
every other request and spawn fail with EMFILE)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from _budget_workers import Hog
from conftest import open_fds

from broker import Broker, Policy
from protocol import NotCapable, Rights

RIGHTS = Rights.READ | Rights.LOOKUP | Rights.SEEK | Rights.FSTAT


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "data" / "sub").mkdir(parents=True)
    (tmp_path / "data" / "a.txt").write_text("hello")
    (tmp_path / "data" / "big").write_bytes(b"b" * (1 << 20))  # past the pipe buffer: a pump thread
    (tmp_path / "out").mkdir()
    return tmp_path


def _policy(open_files: int) -> Policy:
    return (Policy().allow("data/", RIGHTS).allow("out/", Rights.WRITE | Rights.CREATE)
            .with_limits(open_files=open_files))


def _settled(b: Broker) -> int:
    """What the broker holds for workers, once pump threads have ended."""
    deadline = time.monotonic() + 5
    while b._fds.held and time.monotonic() < deadline:
        time.sleep(0.01)
    return b._fds.held


@pytest.mark.parametrize("kind, cost", [("dirs", 1), ("pipes", 2), ("outputs", 2)])
def test_a_worker_holds_no_more_broker_fds_than_its_share(root: Path, kind: str, cost: int) -> None:
    """Its share is its own open-files limit here (32; two workers would get
    half the broker's limit each): past it, a request is refused, saying so,
    and the broker's fd count stops growing. Once let go (or when the call
    ends, for outputs) every one is given back."""
    with Broker(_policy(32), root=root, request_rate=None) as b:
        honest = b.spawn(Hog)
        hog = b.spawn(Hog)
        before = len(open_fds())
        answer = getattr(hog, kind)(100)
        got, _, why = answer.partition(": ")
        assert "would hold more broker fds for this worker than its share of 32" in why, answer
        # (an output also holds its pipe's two fds while its call runs: 32 fds are 8 outputs)
        assert int(got) == {"dirs": 32, "pipes": 16, "outputs": 8}[kind]
        assert honest.read() == b"hello"  # the other worker's requests go on
        assert b.spawn(Hog).read() == b"hello"  # and so do spawns
        if kind != "outputs":
            assert len(open_fds()) - before >= 32 - 4  # they were held, and are counted
            assert b._fds.held == 32 and hog.let_go() == int(got)
        assert _settled(b) == 0
        assert getattr(hog, kind)(3) == "3"  # its share is whole again
        if kind == "outputs":
            # (the first call caught its refusal and returned: its 8 were committed)
            assert sorted(os.listdir(root / "out")) == [f"f{i}" for i in range(8)]


def test_a_worker_that_ends_gives_back_what_it_held(root: Path) -> None:
    with Broker(_policy(32), root=root, request_rate=None) as b:
        hog = b.spawn(Hog)
        assert hog.dirs(10) == "10" and hog.pipes(5) == "5"
        assert b._fds.held == 20
        hog.kill()
        assert _settled(b) == 0


def test_all_workers_together_hold_at_most_the_brokers_budget(root: Path) -> None:
    """However many workers ask, the broker keeps the rest of its fd table
    (here a budget of 40, as if its limit were 80): each gets a share of it,
    a quarter of it (10) is kept for workers' first 8, and past the whole
    budget a request is refused even within one's share."""
    with Broker(_policy(256), root=root, request_rate=None) as b:
        b._fds.total = 40
        hogs = [b.spawn(Hog) for _ in range(3)]
        answers = [h.dirs(100) for h in hogs]  # shares of 40 // 3 = 13 while three run
        assert [a.split(":")[0] for a in answers] == ["13", "13", "8"], answers
        assert "kept for other workers' first 8" in answers[2]  # 13 + 13 + 8: 34, past the 30 not kept
        spare = b.spawn(Hog)  # four now: within its first 8, from what is kept
        assert spare.dirs(5) == "5"
        assert "more than 40 broker fds" in spare.dirs(5)  # 39 held: one left
        assert spare.read() == b"hello"


def test_workers_that_took_fds_first_leave_a_later_one_its_first_few(root: Path) -> None:
    """Shares are counted when fds are taken: two workers that took theirs
    while fewer ran kept half the budget each, and a worker started after
    them had every request refused, holding nothing (a red-team run). A
    quarter of the budget is kept for workers' first 8 fds."""
    with Broker(_policy(256), root=root, request_rate=None) as b:
        b._fds.total = 64
        first = b.spawn(Hog)
        assert first.dirs(100).split(":")[0] == "48"  # alone: up to the 48 not kept
        second = b.spawn(Hog)
        assert second.dirs(100).split(":")[0] == "8"  # within its first 8, from what is kept
        later = b.spawn(Hog)
        assert later.dirs(8) == "8" and later.read() == b"hello"


def test_a_worker_that_keeps_its_argument_pipes_holds_no_more_than_its_share(root: Path) -> None:
    """A READ-only file argument travels as a pipe a broker thread fills: a
    worker keeping each one unread kept 2 broker fds and a thread per call,
    counted nowhere (a red-team run filled the broker's fd table through a
    pool, as the quick-start's own pattern does). They count now: past its
    share a call with such an argument is refused, and others go on."""
    with Broker(_policy(16), root=root, request_rate=None) as b:
        hoarder = b.spawn(Hog)
        other = b.spawn(Hog)
        kept = 0
        with pytest.raises(NotCapable, match="a file argument delivered as a pipe would hold more broker fds"):
            for _ in range(50):
                cap = b.open("data/big", Rights.READ)
                try:
                    hoarder.keep(cap)
                finally:
                    cap.close()
                kept += 1
        assert kept == 8 and b._fds.held == 16
        assert other.read() == b"hello" and b.spawn(Hog).read() == b"hello"
        hoarder.kill()
        assert _settled(b) == 0  # the pumps end with the worker, and give their fds back
