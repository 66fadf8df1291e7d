"""A compromised worker sends whatever it likes on its socket. The broker
drops that worker's connection, keeps serving the others and leaks no fd."""

from __future__ import annotations

import errno
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
from _hostile_workers import (
    _SCM_MAX_FD,
    FILE_OUTPUT,
    BlobRequester,
    Evil,
    InFlightHog,
    KeepsOutputs,
    QueueStuffer,
    TimerHog,
)
from conftest import default_policy, open_fds
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from broker import Broker, Policy, WorkerHandle
from protocol import ProtocolError, Rights, WorkerCrashed
from protocol._wire import (
    _BLOB_EXT,
    EXT_BLOB,
    EXT_TEXT,
    FEW_ITEMS,
    INT_MAX,
    INT_MIN,
    MAX_BLOB,
    MAX_DEPTH,
    MAX_FDS,
    MAX_PACKET,
    Channel,
    Deferred,
    _no_ext_hook,
    _unpack,
    _validate,
    check_plain,
    check_sendable,
    decode,
    encode,
)

msg_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=20) | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=12,
)
near_valid = st.fixed_dictionaries(
    {"t": st.sampled_from(["req", "ret", "err", "ready", "call", "rep", "x"]), "id": st.integers(-5, 5)},
    optional={"op": st.sampled_from(["open", "create", "stat", "listdir", "exec"]), "a": msg_values, "v": msg_values},
).map(lambda d: msgpack.packb(d))
ext_packets = st.tuples(st.integers(0, 127), st.binary(max_size=12)).map(
    lambda t: msgpack.packb({"t": "ret", "id": 1, "v": msgpack.ExtType(*t)})
)
payloads = st.one_of(
    st.binary(min_size=0, max_size=64),
    msg_values.map(lambda v: msgpack.packb(v)),
    near_valid,
    ext_packets,
    st.just(b"\x91" * 5000 + b"\xc0"),  # deep nesting
    st.just(b"\xdc\xff\xff"),  # array header promising more than is there
)
packets = st.lists(
    st.tuples(payloads, st.sampled_from([0, 0, 0, 1, 2, 3, MAX_FDS, MAX_FDS + 1, 100, 254])), min_size=1, max_size=4
)


@pytest.fixture(scope="module")
def hostile_env(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    root: Path = tmp_path_factory.mktemp("hostile")
    (root / "data").mkdir()
    (root / "out").mkdir()
    (root / "data" / "a.txt").write_text("hello")
    with Broker(default_policy(), root=root, call_timeout=20) as b:
        good = b.spawn(Evil)
        yield b, good


def _forged_answer(pkts: list[tuple[bytes, int]]) -> str | None:
    """'ret' or 'err' if a packet the kernel lets through is a message of that
    tag with the id of a fresh worker's first call (1): the broker may take it
    as blast()'s answer."""
    for payload, nfds in pkts:
        if nfds > _SCM_MAX_FD:
            continue
        try:
            msg = msgpack.unpackb(payload)
        except (ValueError, TypeError):
            continue  # not a message at all
        if isinstance(msg, dict) and msg.get("t") in ("ret", "err") and msg.get("id") == 1:
            return str(msg["t"])
    return None


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pkts=packets)
@example(pkts=[(msgpack.packb({"t": "req", "id": 7, "op": "stat", "a": {"path": "data/a.txt"}}), 0)])  # answered
@example(pkts=[(b"\xc1", 254)])  # refused by the kernel: "sent"
def test_random_packets_cost_only_the_sender(hostile_env, pkts) -> None:  # type: ignore[no-untyped-def]
    broker, good = hostile_env
    before = open_fds(broker)
    evil = broker.spawn(Evil)
    forged = _forged_answer(pkts)
    try:
        result = evil.blast([list(p) for p in pkts])
    except WorkerCrashed as exc:
        # A packet that breaks the wire rules ends it ("protocol"), an empty one included.
        assert exc.exit.kind == "protocol", exc.exit
    except Exception:
        if forged != "err":
            raise  # only an 'err' the worker forged as the call's answer raises a remote exception
    else:
        # Every packet the broker took was a request it answered, or the kernel refused it
        # (too many fds): the call's own answer comes back, unless a forged 'ret' came first.
        assert result == "sent" or forged == "ret", result
    evil.kill()
    assert good.ping() == "pong"
    assert open_fds(broker) == before


def test_garbage_costs_the_connection(hostile_env) -> None:  # type: ignore[no-untyped-def]
    broker, good = hostile_env
    before = open_fds(broker)
    evil = broker.spawn(Evil)
    with pytest.raises(WorkerCrashed) as info:
        evil.blast([[b"\xc1garbage", 3]])
    assert info.value.exit.kind == "protocol"
    assert evil.exit is not None and evil.exit.kind == "protocol"
    assert good.ping() == "pong"
    assert open_fds(broker) == before


BOUND_CASES = [
    (msgpack.packb({"t": "ret", "id": 1, "v": 1}), 1, "fds that the message does not name"),
    (msgpack.packb({"t": "ret", "id": 1, "v": 1}), MAX_FDS + 1, "control data truncated"),
    (b"\x00" * (MAX_PACKET + 10), 0, "larger than"),
    (msgpack.packb({"t": "ret", "id": 1, "v": 1 << 63}), 0, "64 bits"),
    (
        msgpack.packb(
            {"t": "ret", "id": 1, "v": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}
        ),
        0,
        "nested",
    ),
    (msgpack.packb({"t": "ret", "id": 1}), 0, "expected keys"),
    (msgpack.packb({"t": "ready", "v": 1, "pid": 1, "sandbox": {}, "notify": None}), 0, "unexpected message type"),
    (msgpack.packb({"t": "req", "id": 1, "op": "exec", "a": {}}), 0, "unknown request"),
    (msgpack.packb({"t": "ret", "id": 99, "v": 1}), 0, "not pending"),
    (
        msgpack.packb({"t": "ret", "id": 1, "v": msgpack.ExtType(1, b"\x00\x00" + b"\x01" + b"\x00" * 7)}),
        0,
        "out of range",
    ),
    (msgpack.packb([1, 2, 3]), 0, "must be a map"),
    (b"\xa3ab", 0, "malformed"),
    (b"", 0, "empty packet"),  # (not the channel's end: the worker is still connected)
    (msgpack.packb(None), 0, "not nil"),  # (recv() says None at the channel's end only)
]


@pytest.mark.parametrize(("payload", "nfds", "why"), [pytest.param(*c, id=c[2]) for c in BOUND_CASES])
def test_each_bound_is_enforced(hostile_env, payload: bytes, nfds: int, why: str) -> None:  # type: ignore[no-untyped-def]
    broker, good = hostile_env
    before = open_fds(broker)
    evil = broker.spawn(Evil)
    with pytest.raises(WorkerCrashed) as info:
        evil.blast([[payload, nfds]])
    assert info.value.exit.kind == "protocol"
    assert why in info.value.exit.reason
    assert good.ping() == "pong"
    assert open_fds(broker) == before


def test_channel_round_trip_and_fd_close_on_error() -> None:
    a, b = Channel.pair()
    r, w = os.pipe()
    try:
        before = open_fds()
        a.send_raw(msgpack.packb({"x": 1}), [r, w])
        with pytest.raises(ProtocolError):
            b.recv()
        assert open_fds() == before
        payload, fds, owned = encode({"big": b"q" * (MAX_PACKET * 2)})
        assert len(fds) == 1 and len(payload) < 200
        a.send_raw(payload, fds)
        for fd in owned:
            os.close(fd)
        assert b.recv() == {"big": b"q" * (MAX_PACKET * 2)}
        assert decode(msgpack.packb({"k": "v"}), []) == {"k": "v"}
    finally:
        os.close(r)
        os.close(w)
        a.close()
        b.close()


def test_a_peek_leaves_the_message_and_its_fds_queued() -> None:
    """What a zygote's starvation check reads of a spare's answer: decoded,
    no fd installed, and the message still there for the spawn that takes it."""
    a, b = Channel.pair()
    r, w = os.pipe()
    try:
        assert b.peek() is None  # nothing waiting: no wait either
        before = open_fds()
        a.send_raw(msgpack.packb({"t": "spare", "pid": 7, "chan": msgpack.ExtType(1, b"\x00")}), [r])
        for _ in range(2):
            assert b.peek() == {"t": "spare", "pid": 7, "chan": msgpack.ExtType(1, b"\x00")}
            assert open_fds() == before  # the kernel's copy of the fd was dropped, not installed
        payload, fds = b.recv_raw()
        assert msgpack.unpackb(payload) == {"t": "spare", "pid": 7, "chan": msgpack.ExtType(1, b"\x00")}
        assert len(fds) == 1 and os.fstat(fds[0]).st_ino == os.fstat(r).st_ino  # it travelled all the same
        os.close(fds[0])
        for bad in (b"\xc1", msgpack.packb([1, 2]) + b"\x00", b"\x92\x01"):  # never-used byte, extra data, short
            a.send_raw(bad)
            assert b.peek() is None  # (what is not one message is none)
            b.recv_raw()
        assert b.peek() is None
        a.close()
        assert b.peek() is None  # the peer gone
        b.close()
        assert b.peek() is None  # this end closed
    finally:
        os.close(r)
        os.close(w)
        a.close()
        b.close()


def test_an_empty_packet_is_not_the_channels_end() -> None:
    """SEQPACKET reads an empty packet and the peer's close both as 0 bytes:
    only a peer that hung up is the end (None); one still connected broke the
    wire rules. A message of nil is not the end either."""
    a, b = Channel.pair()
    try:
        a.send_raw(b"")
        with pytest.raises(ProtocolError, match="empty packet"):
            b.recv()
        a.send_raw(msgpack.packb(None))
        with pytest.raises(ProtocolError, match="not nil"):
            b.recv()
        a.send_raw(msgpack.packb({"k": 1}))
        assert b.recv() == {"k": 1}  # the channel goes on
        a.sock.shutdown(socket.SHUT_WR)
        assert b.recv() is None
    finally:
        a.close()
        b.close()
    a, b = Channel.pair()
    a.close()
    try:
        assert b.recv() is None
        assert b.recv_raw() is None
    finally:
        b.close()


def test_a_message_that_cannot_be_encoded_leaves_the_channel_intact() -> None:
    """The shared fast-path packer must drop a half-packed message, not prefix it to the next."""
    a, b = Channel.pair()
    try:
        with pytest.raises(TypeError):
            a.send({"t": "ret", "id": 1, "v": [1, 2, object()]})
        a.send({"t": "ret", "id": 2, "v": "fine"})
        assert b.recv() == {"t": "ret", "id": 2, "v": "fine"}
    finally:
        a.close()
        b.close()


def test_a_bad_packet_closes_each_of_its_fds_exactly_once() -> None:
    """An fd already wrapped when the check fails is closed once: the dropped
    wrapper must not close a later fd that reuses the number."""
    fd_ext = msgpack.ExtType(1, b"\x00\x00" + b"\x01" + b"\x00" * 7)  # index 0, a file, READ
    payload = msgpack.packb({"t": "ret", "id": 1, "v": [fd_ext, 1 << 63]})  # the int breaks the rules
    r, w = os.pipe()
    os.close(w)
    with pytest.raises(ProtocolError, match="64 bits") as info:
        decode(payload, [r])
    with pytest.raises(OSError):
        os.fstat(r)  # closed
    again, w2 = os.pipe()  # takes the freed number
    try:
        assert again == r
        del info  # the traceback held decode's wrappers until now
        import gc

        gc.collect()
        os.fstat(again)  # still open: nothing closed it a second time
    finally:
        os.close(again)
        os.close(w2)


def test_threads_encode_fds_without_mixing_them() -> None:
    """Each thread packs with its own encoder: the fds of one message never
    end up in another's list."""
    import time

    from broker._deliver import Outgoing
    from protocol import Rights
    from protocol._wire import KIND_STREAM

    bad: list[str] = []

    class Yielding(Outgoing):
        def __privsep_fd__(self) -> tuple[int, int, Rights]:
            time.sleep(0)  # let another thread run in the middle of packing
            return super().__privsep_fd__()

    def run(base: int) -> None:
        for i in range(300):
            fds = [base + i % 7, base + 100 + i % 5]
            msg = {"t": "call", "id": i, "m": "x", "a": [Yielding(fd, KIND_STREAM, Rights.READ, False) for fd in fds]}
            payload, got, owned = encode(msg)
            if got != fds or owned or msgpack.unpackb(payload)["id"] != i:
                bad.append(f"thread {base}: {got} != {fds}")

    threads = [threading.Thread(target=run, args=(1000 * (k + 1),)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert bad == []


def test_a_hook_that_encodes_a_message_of_its_own_does_not_mix_the_two() -> None:
    from broker._deliver import Outgoing
    from protocol import Rights
    from protocol._wire import KIND_STREAM

    inner: list[tuple[bytes, list[int]]] = []

    class Chatty(Outgoing):
        def __privsep_fd__(self) -> tuple[int, int, Rights]:
            payload, fds, _ = encode({"inner": [Outgoing(77, KIND_STREAM, Rights.READ, False)]})
            inner.append((payload, fds))
            return super().__privsep_fd__()

    outer = [Chatty(5, KIND_STREAM, Rights.READ, False), Outgoing(6, KIND_STREAM, Rights.READ, False)]
    payload, fds, owned = encode({"outer": outer})
    assert fds == [5, 6] and owned == []
    assert inner and inner[0][1] == [77]
    assert list(msgpack.unpackb(payload)) == ["outer"]


req_messages = st.fixed_dictionaries(
    {
        "t": st.just("req"),
        "id": st.integers(-5, 5) | msg_values,
        "op": st.sampled_from(["open", "create", "stat", "dopen", "dunlink", "exec"]) | msg_values,
        "a": st.dictionaries(
            st.sampled_from(["path", "rights", "dir", "x"]), st.text(max_size=5) | st.integers(-3, 3) | msg_values,
            max_size=4,
        )
        | msg_values,
    },
    optional={"x": msg_values},
)


@settings(max_examples=300, deadline=None)
@given(msg=req_messages)
def test_a_request_passes_the_check_exactly_when_it_fits_its_schema(msg: dict) -> None:
    """The broker checks a worker's request in one pass when it can; any
    shape at all gets either that message back or ProtocolError (never
    another exception), and exactly the requests that fit their schema pass."""
    from protocol._messages import FROM_WORKER, REQUESTS, check_message

    try:
        check_message(msg, FROM_WORKER)
        passed = True
    except ProtocolError:
        passed = False
    op, args = msg["op"], msg["a"]
    schema = REQUESTS.get(op) if type(op) is str else None
    fits = (
        msg.keys() == {"t", "id", "op", "a"}
        and type(msg["id"]) is int
        and schema is not None
        and type(args) is dict
        and args.keys() == schema.keys()
        and all(type(args[k]) is t for k, t in schema.items())
    )
    assert passed == fits, msg


@pytest.mark.parametrize(
    "msg",
    [
        {"t": "req", "id": 3, "op": ["open"], "a": {}},
        {"t": "req", "id": 3, "op": {"open": 1}, "a": {}},
        {"t": "req", "id": 3, "op": "open", "a": {"path": "data/a.txt", "rights": True}},
        {"t": "req", "id": True, "op": "open", "a": {"path": "data/a.txt", "rights": 1}},
        {"t": "req", "id": 3, "op": "open", "a": {"path": b"data/a.txt", "rights": 1}},
        {"t": "req", "id": 3, "op": "open", "a": {"path": "data/a.txt"}},
        {"t": "req", "id": 3, "op": "open", "a": {"path": "data/a.txt", "rights": 1, "x": 0}},
        {"t": "req", "id": 3, "op": "open", "a": {"path": "data/a.txt", "rights": 1}, "x": 0},
        {"t": "req", "id": 3, "op": "exec", "a": {}},
        {"t": "req", "id": 3, "op": "open", "a": [["path", "data/a.txt"]]},
    ],
)
def test_malformed_requests_are_refused(msg: dict) -> None:
    from protocol._messages import FROM_WORKER, check_message

    with pytest.raises(ProtocolError):
        check_message(msg, FROM_WORKER)
    good = {"t": "req", "id": 3, "op": "open", "a": {"path": "data/a.txt", "rights": 1}}
    assert check_message(good, FROM_WORKER) is good


def _fd_ref(index: int, kind: int = 0, rights: int = 1) -> msgpack.ExtType:
    from protocol._wire import _FD_EXT, EXT_FD

    return msgpack.ExtType(EXT_FD, _FD_EXT.pack(index, kind, rights))


@pytest.mark.parametrize(
    "value, why",
    [
        ([_fd_ref(0), _fd_ref(0)], "repeated"),
        (_fd_ref(1), "out of range"),
        (_fd_ref(0, kind=9), "unknown fd kind"),
        (_fd_ref(0, rights=1 << 40), "invalid rights"),
        (msgpack.ExtType(99, b"x"), "unknown extension"),
        ([_fd_ref(0), 1 << 63], "64 bits"),
        (1, "does not name"),
    ],
)
def test_a_packet_with_one_fd_that_breaks_a_rule_closes_it_exactly_once(value: object, why: str) -> None:
    """The one-fd fast path of Channel.recv hands anything unusual to the
    general decoder or refuses it; either way the fd is closed once, and the
    channel still reads the next packet."""
    import gc

    a, b = Channel.pair()
    r, w = os.pipe()
    os.close(w)
    try:
        a.send_raw(msgpack.packb({"t": "ret", "id": 1, "v": value}), [r])
        os.close(r)  # the receiver has its own copy; this number may be reused below
        before = open_fds()
        lowest = min(set(range(len(before) + 1)) - before)  # the number the packet's fd gets
        with pytest.raises(ProtocolError, match=why) as info:
            b.recv()
        again, w2 = os.pipe()  # takes the freed number while the failed decode's objects live on
        try:
            assert again == lowest
            del info  # the traceback held them until now
            gc.collect()
            os.fstat(again)  # still open: nothing closed the packet's fd a second time
        finally:
            os.close(again)
            os.close(w2)
        assert open_fds() == before  # the copy the packet brought in, closed
        a.send({"t": "ret", "id": 2, "v": "next"})
        assert b.recv() == {"t": "ret", "id": 2, "v": "next"}
    finally:
        a.close()
        b.close()


def test_a_packet_with_one_fd_carrying_a_blob_or_a_file_decodes() -> None:
    payload, fds, owned = encode({"big": b"q" * (MAX_PACKET + 10)})
    assert len(fds) == 1
    a, b = Channel.pair()
    try:
        a.send_raw(payload, fds)
        for fd in owned:
            os.close(fd)
        assert b.recv() == {"big": b"q" * (MAX_PACKET + 10)}
        r, w = os.pipe()
        try:
            a.send_raw(msgpack.packb({"t": "ret", "id": 1, "v": _fd_ref(0, kind=2)}), [r])
            got = b.recv()
            assert got["v"].kind == 2
            os.write(w, b"ok")
            assert os.read(got["v"].fd, 2) == b"ok"
            got["v"].close()
        finally:
            os.close(r)
            os.close(w)
    finally:
        a.close()
        b.close()


def test_a_text_blob_that_is_not_utf8_is_refused() -> None:
    data = b"ok \xff\xfe not UTF-8"
    fd = os.memfd_create("text", os.MFD_CLOEXEC)
    os.write(fd, data)
    payload = msgpack.packb({"t": "ret", "id": 1, "v": msgpack.ExtType(EXT_TEXT, _BLOB_EXT.pack(0, 0, len(data)))})
    before = open_fds()
    with pytest.raises(ProtocolError, match="text blob is not UTF-8"):
        decode(payload, [fd])
    assert open_fds() == before - {fd}  # taken, and closed


def test_a_message_with_blobs_can_be_finished_later() -> None:
    """``defer``: a message carrying blobs comes back unread (its blobs are
    up to 64 MiB to copy and decode: an awaited call has that done off the
    event loop), and finishing it gives what decode() would have, with the
    same errors and every fd taken; one with none is decoded at once."""
    def packet(value: object, data: bytes) -> tuple[bytes, list[int]]:
        fd = os.memfd_create("blob", os.MFD_CLOEXEC)
        os.write(fd, data)
        return msgpack.packb({"t": "ret", "id": 1, "v": value}), [fd]

    tags = frozenset({"ret"})
    text = msgpack.ExtType(EXT_TEXT, _BLOB_EXT.pack(0, 0, 6))
    before = open_fds()
    later = decode(*packet([text, 1], "é".encode() * 3), blob_tags=tags, defer=True)
    assert type(later) is Deferred and open_fds() != before  # (the memfd, until finished)
    assert later.finish() == {"t": "ret", "id": 1, "v": ["é" * 3, 1]}
    assert open_fds() == before
    bad = decode(*packet(text, b"\xff\xfe\xfd\xfc\xfb\xfa"), blob_tags=tags, defer=True)
    with pytest.raises(ProtocolError, match="text blob is not UTF-8"):
        bad.finish()
    assert open_fds() == before
    decode(*packet(text, b"abcdef"), blob_tags=tags, defer=True).discard()
    assert open_fds() == before
    payload, fds = packet(_fd_ref(0), b"")  # an fd, no blob: nothing to defer
    got = decode(payload, fds, blob_tags=tags, defer=True)
    assert type(got) is dict
    got["v"].close()
    assert open_fds() == before
    r, w = os.pipe()  # a file next to a blob: still the message's after a late discard()
    fd = os.memfd_create("blob", os.MFD_CLOEXEC)
    os.write(fd, b"abcdef")
    second = msgpack.ExtType(EXT_TEXT, _BLOB_EXT.pack(1, 0, 6))
    later = decode(msgpack.packb({"t": "ret", "id": 1, "v": [_fd_ref(0, kind=2), second]}), [r, fd],
                   blob_tags=tags, defer=True)
    got = later.finish()
    later.discard()
    with pytest.raises(RuntimeError, match="finished or discarded already"):
        later.finish()
    os.write(w, b"ok")
    assert got["v"][1] == "abcdef" and os.read(got["v"][0].fd, 2) == b"ok"
    got["v"][0].close()
    os.close(w)
    assert open_fds() == before
    a, b = Channel.pair()  # the one-fd fast path of a channel hands the blob on too
    b.blob_tags = tags
    try:
        payload, fds = packet(text, "é".encode() * 3)
        a.send_raw(payload, fds)
        os.close(fds[0])
        later = b.recv(defer_blobs=True)
        assert type(later) is Deferred and later.finish()["v"] == "é" * 3
    finally:
        a.close()
        b.close()
    assert open_fds() == before


def test_the_blobs_of_one_packet_are_bounded_together() -> None:
    """64 blobs of MAX_BLOB each would have the broker read 4 GiB for one
    message. Announced lengths over the budget are refused before any read
    (the memfds here are sparse: nothing was written to them)."""
    fds = []
    for _ in range(3):
        fd = os.memfd_create("blob", os.MFD_CLOEXEC)
        os.ftruncate(fd, MAX_BLOB // 2 + 1)
        fds.append(fd)
    ext = [msgpack.ExtType(EXT_BLOB, _BLOB_EXT.pack(i, 0, MAX_BLOB // 2 + 1)) for i in range(3)]
    before = open_fds()
    with pytest.raises(ProtocolError, match="exceed 67108864 bytes in all"):
        decode(msgpack.packb({"t": "ret", "id": 1, "v": ext}), fds)
    assert open_fds() == before - set(fds)  # taken, and closed
    ok = os.memfd_create("blob", os.MFD_CLOEXEC)
    os.write(ok, b"q" * 100)
    assert decode(msgpack.packb({"t": "ret", "id": 1, "v": [msgpack.ExtType(EXT_BLOB, _BLOB_EXT.pack(0, 0, 100))]}),
                  [ok]) == {"t": "ret", "id": 1, "v": [b"q" * 100]}  # fmt: skip


def test_a_blob_at_an_offset_is_read_there_and_bounded_by_its_file(tmp_path: Path) -> None:
    """A blob names an offset in its memfd (a worker's two are made before
    entry). Past the file's end, or in a file open for writing only (which
    failed as a channel error, 'crashed', in a red-team run), it is a wire
    fault: ProtocolError, every fd closed."""
    fd = os.memfd_create("blob", os.MFD_CLOEXEC)
    os.write(fd, b"a" * 10 + b"b" * 20)

    def blob(offset: int, length: int) -> bytes:
        return msgpack.packb({"t": "ret", "id": 1, "v": msgpack.ExtType(EXT_BLOB, _BLOB_EXT.pack(0, offset, length))})

    assert decode(blob(10, 20), [os.dup(fd)]) == {"t": "ret", "id": 1, "v": b"b" * 20}
    for offset, length in ((11, 20), ((1 << 64) - 1, 1), (30, 1)):
        with pytest.raises(ProtocolError, match="blob length out of bounds"):
            decode(blob(offset, length), [os.dup(fd)])
    os.close(fd)
    write_only = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC)
    os.write(write_only, b"c" * 10)
    before = open_fds()
    with pytest.raises(ProtocolError, match="blob fd cannot be read"):
        decode(blob(0, 10), [write_only])
    assert open_fds() == before - {write_only}


def test_a_blob_is_read_only_in_a_message_that_may_carry_one() -> None:
    """A request's path sent as a 64 MiB text blob (one memfd, reused) cost
    the broker a read and a UTF-8 decode of it before the path was refused
    for its length: about 115 ms of broker time for one sendmsg, at the
    request rate, stalling every worker on its loop (found by a red-team
    run). Where ``blob_tags`` says which tags may carry one, a blob in any
    other is refused before anything is read (the memfd here is sparse and
    short of its announced length: a read would fail otherwise)."""
    tags = frozenset({"ret"})

    def packet(tag: str, value: object, n: int) -> tuple[bytes, list[int]]:
        fds = []
        for _ in range(n):
            fd = os.memfd_create("blob", os.MFD_CLOEXEC)
            os.write(fd, "é".encode() * 50)
            fds.append(fd)
        return msgpack.packb({"t": tag, "id": 1, "v": value}), fds

    text = msgpack.ExtType(EXT_TEXT, _BLOB_EXT.pack(0, 0, MAX_BLOB // 2))  # announced past what the memfd holds
    before = open_fds()
    for fds_n in (1, 2):  # (one fd takes the one-fd fast path first)
        payload, fds = packet("req", [text] + [msgpack.ExtType(EXT_BLOB, _BLOB_EXT.pack(1, 0, 10))] * (fds_n - 1),
                              fds_n)
        with pytest.raises(ProtocolError, match="a 'req' message carries no out-of-band value"):
            decode(payload, fds, blob_tags=tags)
        assert open_fds() == before  # taken, and closed
    # Where a blob may come, it is read, wherever it sits.
    nested = {"a": [1, {"b": msgpack.ExtType(EXT_TEXT, _BLOB_EXT.pack(0, 0, 100))}],
              "c": msgpack.ExtType(EXT_BLOB, _BLOB_EXT.pack(1, 0, 4))}
    payload, fds = packet("ret", nested, 2)
    assert decode(payload, fds, blob_tags=tags)["v"] == {"a": [1, {"b": "é" * 50}], "c": "é".encode() * 2}
    payload, fds = packet("ret", msgpack.ExtType(EXT_TEXT, _BLOB_EXT.pack(0, 0, 100)), 1)
    assert decode(payload, fds, blob_tags=tags)["v"] == "é" * 50
    assert open_fds() == before
    # And through a channel, as the broker receives a worker's messages.
    a, b = Channel.pair()
    b.blob_tags = tags
    try:
        payload, fds = packet("req", text, 1)
        a.send_raw(payload, fds)
        for fd in fds:
            os.close(fd)
        with pytest.raises(ProtocolError, match="carries no out-of-band value"):
            b.recv()
    finally:
        a.close()
        b.close()


_keys = st.one_of(st.text(max_size=3), st.integers(-3, 3), st.binary(max_size=2), st.booleans())
_leaves = st.one_of(
    st.none(), st.booleans(), st.floats(allow_nan=False), st.text(max_size=4), st.binary(max_size=4),
    st.integers(-(1 << 66), 1 << 66), st.sampled_from([(1 << 63) - 1, 1 << 63, -(1 << 63), -(1 << 63) - 1]),
)


def _deep(leaf: st.SearchStrategy) -> st.SearchStrategy:
    # Shallow, or around MAX_DEPTH (32) from where this sits in the message.
    return st.builds(_nest, leaf, st.one_of(st.integers(0, 3), st.integers(28, 35)))


def _nest(x: object, n: int) -> object:
    for _ in range(n):
        x = [x]
    return x


_values = st.recursive(
    st.one_of(_leaves, _deep(_leaves)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.tuples(inner), st.dictionaries(_keys, inner, max_size=3)),
    max_leaves=12,
)


@settings(max_examples=400, deadline=None)
@given(_values)
def test_the_sender_refuses_exactly_what_the_receiver_would(value: object) -> None:
    """check_sendable (the broker's argument walk and a worker's result use
    it) against the receiving side's unpack + _validate of the same value in
    an answer: neither may pass what the other refuses."""
    try:
        check_sendable(value, 1)
        sendable = True
    except (TypeError, ValueError):
        sendable = False
    try:
        packed = msgpack.packb({"t": "ret", "id": 1, "v": value}, use_bin_type=True)
        _validate(_unpack(packed, _no_ext_hook))
        received = True
    except (ProtocolError, OverflowError, TypeError, ValueError):
        received = False
    assert sendable == received


def _wire_ok(value: object, depth: int) -> bool:
    """The wire's rules, item by item: what a receiver must accept."""
    if depth > MAX_DEPTH:
        return False
    t = type(value)
    if t is int:
        return INT_MIN <= value <= INT_MAX  # type: ignore[operator]
    if t is list:
        return all(_wire_ok(x, depth + 1) for x in value)  # type: ignore[attr-defined]
    if t is dict:
        return all(type(k) is str for k in value) and all(  # type: ignore[attr-defined]
            _wire_ok(v, depth + 1) for v in value.values())  # type: ignore[attr-defined]
    return t in (str, bytes, float, bool, type(None))


def _sendable_ok(value: object, depth: int, max_blob: int = MAX_BLOB) -> bool:
    """The same rules as a sender sees them (tuples, subclasses), with
    values up to ``max_blob`` bytes."""
    if depth > MAX_DEPTH:
        return False
    if isinstance(value, int):
        return INT_MIN <= value <= INT_MAX
    if isinstance(value, list | tuple):
        return all(_sendable_ok(x, depth + 1, max_blob) for x in value)
    if isinstance(value, dict):
        return all(type(k) is str for k in value) and all(
            _sendable_ok(v, depth + 1, max_blob) for v in value.values())
    if isinstance(value, str):
        return len(value.encode()) <= max_blob
    if isinstance(value, bytes):
        return len(value) <= max_blob
    return True


_edge_ints = st.sampled_from([INT_MAX, INT_MAX + 1, INT_MIN, INT_MIN - 1, 0, -1])
_plain_leaves = st.one_of(st.none(), st.booleans(), st.floats(allow_nan=False), st.text(max_size=5),
                          st.binary(max_size=5), st.integers(-5, 5), _edge_ints)
# Runs longer than FEW_ITEMS, of one kind or mixed, at the top or nested near MAX_DEPTH: the
# containers the checks look at in C.
_long = st.one_of(
    st.lists(_plain_leaves, min_size=FEW_ITEMS + 1, max_size=40),
    st.lists(st.one_of(st.integers(-5, 5), _edge_ints), min_size=FEW_ITEMS + 1, max_size=40),
    st.lists(st.text(max_size=6), min_size=FEW_ITEMS + 1, max_size=40),
    st.lists(st.binary(max_size=6), min_size=FEW_ITEMS + 1, max_size=40),
    st.dictionaries(st.text(max_size=4), _plain_leaves, min_size=FEW_ITEMS + 1, max_size=30),
)
_bulk = st.recursive(
    st.one_of(_plain_leaves, _long, st.builds(_nest, _long, st.integers(27, 33)),
              st.builds(_nest, st.sampled_from([[], {}, [[]], [{}]]), st.integers(29, 34))),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.lists(inner, min_size=FEW_ITEMS + 1, max_size=24),
        st.dictionaries(_keys, inner, max_size=3),
        st.tuples(inner),
    ),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_bulk, st.booleans())
def test_long_containers_are_checked_as_each_item_would_be(value: object, tiny_blobs: bool) -> None:
    """The wire checks look at a long container in C (the set of its items'
    types, the range of its ints, its longest str or bytes): they accept and
    refuse exactly what the rules, applied item by item, do. With
    ``tiny_blobs`` the sender's limit on one value is 4 bytes (and the
    length past which it measures a str 1 character, as MAX_BLOB / 4 is)."""
    import protocol._wire as wire

    saved = wire.CHECK_BLOB_LEN, wire.MAX_BLOB
    if tiny_blobs:
        wire.CHECK_BLOB_LEN, wire.MAX_BLOB = 1, 4
    said = ""  # what check_plain said of a container: "plain" (checked), "other" (not looked at), "refused"
    try:
        try:
            check_sendable(value, 1)
            sendable = True
        except (TypeError, ValueError):
            sendable = False
        if isinstance(value, list | tuple | dict):
            try:
                said = "plain" if check_plain(value, 1) else "other"
            except (TypeError, ValueError):
                said = "refused"
    finally:
        wire.CHECK_BLOB_LEN, wire.MAX_BLOB = saved
    assert sendable == _sendable_ok(value, 1, 4 if tiny_blobs else MAX_BLOB)
    if isinstance(value, list | tuple | dict):  # (the broker's export sends a plain container as it is)
        items = value.values() if isinstance(value, dict) else value
        if all(type(x) in (str, bytes, int, float, bool, type(None)) for x in items):
            assert said == ("plain" if sendable else "refused")
        else:
            assert said == "other"
    try:
        packed = msgpack.packb({"t": "ret", "id": 1, "v": value}, use_bin_type=True)
    except (OverflowError, TypeError, ValueError):
        return  # (msgpack itself refuses it: ints past 64 bits unsigned, keys it cannot pack)
    try:
        received = _unpack(packed, _no_ext_hook)
    except ProtocolError:
        return  # (keys msgpack packs but the strict unpacker refuses)
    try:
        _validate(received)
        accepted = True
    except ProtocolError:
        accepted = False
    assert accepted == _wire_ok(received, 0)


def test_an_output_kept_open_past_the_answer_fails_the_call_at_once(tmp_path: Path) -> None:
    """The commit waited up to 5 s for each output pipe to reach EOF, past the
    call's timeout (256 outputs: over 20 minutes), then committed what came."""
    (tmp_path / "out").mkdir()
    with Broker(Policy().allow("out/", Rights.WRITE | Rights.CREATE), root=tmp_path) as b:
        w = b.spawn(KeepsOutputs)
        start = time.monotonic()
        with pytest.raises(OSError, match="still open in the worker after the call returned") as info:
            w.with_timeout(10).outputs(["k1.txt", "k2.txt", "k3.txt"], ["k1.txt", "k2.txt", "k3.txt"], 1.5)
        took = time.monotonic() - start
        assert took < 0.8, f"the call took {took:.2f} s"
        assert info.value.filename == "out/k1.txt"
        assert os.listdir(tmp_path / "out") == []
        # The worker serves on, and an honest call's outputs are committed, data in the pipe and all.
        assert w.outputs(["fine.txt"], [], 0.0) == "returned"
        assert (tmp_path / "out" / "fine.txt").read_bytes() == b"fine.txt"


def test_an_outputs_file_kept_past_the_answer_ends_the_worker(tmp_path: Path) -> None:
    """An output delivered as the file itself (SEEK, FSTAT) was copied at the
    commit, but the worker could keep (dup) its fd, and fill that nameless
    file after the commit: open_files x file_size of disk, freed only when
    the worker ended (red-team round 16, 256 MiB of tmpfs from one worker).
    Its commit now sees the file still open for writing (no read lease) and
    ends the worker, committing nothing."""
    (tmp_path / "out").mkdir()
    with Broker(Policy().allow("out/", FILE_OUTPUT | Rights.CREATE), root=tmp_path) as b:
        w = b.spawn(KeepsOutputs)
        # A copy closed a moment after the answer (a close racing it) is no keeping.
        assert w.outputs(["racing.bin"], ["racing.bin"], 0.02) == "returned"
        assert (tmp_path / "out" / "racing.bin").read_bytes() == b"racing.bin"
        with pytest.raises(WorkerCrashed, match=r"kept the file of its output 'out/k\.bin' open past its answer"):
            w.outputs(["a.txt", "k.bin"], ["k.bin"], 30.0)
        assert w.exit is not None and w.exit.kind == "protocol"
        assert sorted(os.listdir(tmp_path / "out")) == ["racing.bin"]  # neither output of that call
        # A call that fails keeps nothing either; an honest failure leaves the worker serving.
        w = b.spawn(KeepsOutputs)
        for _ in range(3):
            with pytest.raises(ValueError, match="failed while writing"):
                w.fail_with_output_open("partial.bin")
        assert w.outputs(["after.bin"], [], 0.0) == "returned"
        with pytest.raises(WorkerCrashed, match=r"kept the file of its output 'out/failed\.bin'"):
            w.keep_and_fail("failed.bin")
        assert sorted(os.listdir(tmp_path / "out")) == ["after.bin", "racing.bin"]


def test_a_call_that_fails_to_commit_one_output_commits_none(tmp_path: Path) -> None:
    """Outputs were renamed into place one by one: one that failed after
    others (a pipe kept open) left those others committed by a failed call."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("before")
    with Broker(Policy().allow("out/", FILE_OUTPUT | Rights.CREATE), root=tmp_path) as b:
        w = b.spawn(KeepsOutputs)
        with pytest.raises(OSError, match="still open in the worker after the call returned") as info:
            w.outputs(["a.txt", "b.bin", "old.txt", "kept.txt"], ["kept.txt"], 2.0)
        assert info.value.filename == "out/kept.txt"
        assert os.listdir(tmp_path / "out") == ["old.txt"]  # no output, no hidden file
        assert (tmp_path / "out" / "old.txt").read_text() == "before"
        assert w.outputs(["a.txt", "b.bin", "old.txt"], [], 0.0) == "returned"  # all of them, when all can be
        assert sorted(os.listdir(tmp_path / "out")) == ["a.txt", "b.bin", "old.txt"]
        assert [(tmp_path / "out" / n).read_bytes() for n in ("a.txt", "b.bin", "old.txt")] == [
            b"a.txt", b"b.bin", b"old.txt"]


def test_a_directory_at_an_outputs_name_fails_the_call_before_any_rename(tmp_path: Path) -> None:
    """The rename over a directory failed only after the earlier outputs
    were renamed into place."""
    (tmp_path / "out").mkdir()
    with Broker(Policy().allow("out/", Rights.WRITE | Rights.CREATE | Rights.MKDIRAT), root=tmp_path) as b:
        w = b.spawn(KeepsOutputs)
        with pytest.raises(IsADirectoryError) as info:
            w.output_then_directory("d")
        assert os.listdir(tmp_path / "out") == ["d"]  # not a.txt, nor a hidden file
        assert os.listdir(tmp_path / "out" / "d") == []
        assert info.value.filename == "out/d" and "a directory has its name" in str(info.value)


def test_a_commit_that_fails_between_renames_says_what_it_committed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A directory made at a later output's name between the two phases of a
    commit (a worker racing it with MKDIRAT) fails that rename after the
    earlier ones: the audit then said every output was discarded, with one
    on disk, and the caller was not told (red-team round 18)."""
    import logging

    from broker import _outputs

    place = _outputs.PendingOutput.place

    def racing(self: _outputs.PendingOutput, hidden: str) -> None:
        if self.name == "b.txt":  # (made here, between the phases, as the race makes it)
            os.mkdir(self.name, dir_fd=self.dirfd)
        place(self, hidden)

    monkeypatch.setattr(_outputs.PendingOutput, "place", racing)
    caplog.set_level(logging.INFO, logger="privsep.audit")
    (tmp_path / "out").mkdir()
    with Broker(Policy().allow("out/", Rights.WRITE | Rights.CREATE), root=tmp_path) as b:
        w = b.spawn(KeepsOutputs)
        with pytest.raises(IsADirectoryError) as info:
            w.outputs(["a.txt", "b.txt", "c.txt"], [], 0.0)
    assert info.value.committed == ["out/a.txt"]  # type: ignore[attr-defined]
    assert "committed before the failure: 'out/a.txt'" in info.value.__notes__
    assert sorted(os.listdir(tmp_path / "out")) == ["a.txt", "b.txt"]  # b.txt: the directory
    assert (tmp_path / "out" / "a.txt").read_bytes() == b"a.txt"
    commits = [(e["path"], e["decision"], e["reason"]) for e in
               (r.privsep for r in caplog.records if r.name == "privsep.audit") if e["request"] == "commit"]  # type: ignore[attr-defined]  # fmt: skip
    assert commits == [("out/a.txt", "granted", "output committed (a later output of its call failed)"),
                       ("out/b.txt", "failed", "discarded: its call failed"),
                       ("out/c.txt", "failed", "discarded: its call failed")]


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_commit_interrupted_between_renames_puts_every_output_in_place(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, when: str
) -> None:
    """A Ctrl-C raised during a commit's renames (once the first had
    returned, as the interpreter raises one that came during the syscall)
    left the first output in place and none of the others, and the audit
    said all were discarded (a probe: 1 in 150 interrupted calls). The
    renames are finished, then the interrupt is raised. It is raised here
    exactly there, before or after the first rename, by a profile hook."""
    import logging
    import sys

    caplog.set_level(logging.INFO, logger="privsep.audit")
    (tmp_path / "out").mkdir()
    with Broker(Policy().allow("out/", Rights.WRITE | Rights.CREATE), root=tmp_path) as b:
        w = b.spawn(KeepsOutputs)

        def interrupt(frame: Any, event: str, arg: Any) -> None:
            if event == f"c_{'call' if when == 'before' else 'return'}" and arg is os.rename:
                sys.setprofile(None)
                raise KeyboardInterrupt

        sys.setprofile(interrupt)
        try:
            with pytest.raises(KeyboardInterrupt):
                w.outputs(["a.txt", "b.txt", "c.txt"], [], 0.0)
        finally:
            sys.setprofile(None)
        assert w.exit is None and w.outputs(["d.txt"], [], 0.0) == "returned"  # (its call had answered: it lives on)
    assert sorted(os.listdir(tmp_path / "out")) == ["a.txt", "b.txt", "c.txt", "d.txt"]  # no hidden file either
    assert [(tmp_path / "out" / n).read_bytes() for n in ("a.txt", "b.txt", "c.txt")] == [b"a.txt", b"b.txt", b"c.txt"]
    commits = [(e["path"], e["decision"]) for e in
               (r.privsep for r in caplog.records if r.name == "privsep.audit") if e["request"] == "commit"]  # type: ignore[attr-defined]  # fmt: skip
    assert commits == [("out/a.txt", "granted"), ("out/b.txt", "granted"), ("out/c.txt", "granted"),
                       ("out/d.txt", "granted")]


@pytest.mark.parametrize("during", ["link", "rename"])
def test_a_signal_handlers_timeout_during_a_commit_reaches_the_caller(tmp_path: Path, during: str) -> None:
    """A SIGALRM handler's TimeoutError raised during a commit read as a
    failure of the filesystem: "output not committed" (EIO) to the caller,
    or, between two renames, a commit cut short. It is the caller's own
    TimeoutError now; the outputs all or none: none while they are staged
    (linked under hidden names), all once the renames have begun."""
    import signal
    import sys

    def deadline(signum: int, frame: Any) -> None:
        raise TimeoutError("deadline")

    target = os.link if during == "link" else os.rename

    def alarm_in_the_commit(frame: Any, event: str, arg: Any) -> None:
        if event == "c_return" and arg is target:
            sys.setprofile(None)
            signal.raise_signal(signal.SIGALRM)

    (tmp_path / "out").mkdir()
    with Broker(Policy().allow("out/", Rights.WRITE | Rights.CREATE), root=tmp_path) as b:
        w = b.spawn(KeepsOutputs)
        saved = signal.signal(signal.SIGALRM, deadline)
        sys.setprofile(alarm_in_the_commit)
        try:
            with pytest.raises(TimeoutError, match=r"^deadline"):  # (not "[Errno 5] output not committed: ...")
                w.outputs(["a.txt", "b.txt", "c.txt"], [], 0.0)
        finally:
            sys.setprofile(None)
            signal.signal(signal.SIGALRM, saved)
    assert sorted(os.listdir(tmp_path / "out")) == ([] if during == "link" else ["a.txt", "b.txt", "c.txt"])


def test_a_rename_that_fails_leaves_no_hidden_file(tmp_path: Path) -> None:
    """The second phase of commit_all: a rename failing (a filesystem error,
    or a directory made at the name between the phases) left its staged
    hidden file behind, and the outputs after it too."""
    from broker._outputs import commit_all, make_output
    from protocol import Rights as R

    made = []
    for name in ("a", "b", "c"):
        pending, cap = make_output(os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY), name, R.WRITE, name)
        os.write(cap.fileno(), name.encode())
        cap.close()
        made.append(pending)

    def fails(hidden: str) -> None:
        raise OSError(errno.EIO, "the disk went away")

    made[1].place = fails  # type: ignore[method-assign]
    with pytest.raises(OSError, match="the disk went away"):
        commit_all(made)
    assert sorted(os.listdir(tmp_path)) == ["a"]  # renamed before the failure; nothing hidden is left
    assert all(p.tmpfd == -1 and p.dirfd == -1 for p in made)  # every one discarded


def test_a_request_carrying_a_blob_ends_the_worker_unread(tmp_path: Path) -> None:
    with Broker(Policy(), root=tmp_path) as b:
        honest = b.spawn(BlobRequester)
        w = b.spawn(BlobRequester)
        with pytest.raises(WorkerCrashed, match="a 'req' message carries no out-of-band value"):
            w.ask_with_a_blob()
        assert w.exit is not None and w.exit.kind == "protocol"
        assert honest.ping() == "pong"


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="not root: workers share the broker's uid (documented)")


@needs_root
def test_fds_a_worker_parks_in_flight_never_stop_another_worker(tmp_path: Path) -> None:
    """Linux bounds the fds in flight per user, against each sender's
    RLIMIT_NOFILE. Every worker was one uid, so a worker parking 500 made
    every other worker's sending of an fd fail (ETOOMANYREFS): its large
    values, and every spawn (a red-team run). Each worker now has a real
    uid of its own (its effective and filesystem uid, and so what it may
    open, unchanged), and is held to its own share."""
    with Broker(Policy(), root=tmp_path) as b:
        honest = b.spawn(InFlightHog)
        hog = b.spawn(InFlightHog)
        assert honest.sandbox["real_uid"] != hog.sandbox["real_uid"]
        assert hog.ids()[1] == 0  # effective uid (in its namespace) as before
        assert 256 <= hog.park() < 1000  # held to its own RLIMIT_NOFILE, then ETOOMANYREFS
        assert honest.big(1 << 20) == b"z" * (1 << 20)  # travels in a memfd, by SCM_RIGHTS
        assert b.spawn(InFlightHog).big(1 << 20) == b"z" * (1 << 20)  # a spawn's handshake carries an fd


@needs_root
def test_rlimit_nproc_binds_each_worker_alone(tmp_path: Path) -> None:
    """RLIMIT_NPROC never bound a root worker (the kernel exempts kuid 0);
    with a real uid of its own it bounds each worker's threads, and one
    worker at its limit takes nothing from another."""
    with Broker(Policy().with_limits(processes=8), root=tmp_path) as b:
        first, second = b.spawn(InFlightHog), b.spawn(InFlightHog)
        assert 4 <= first.threads(50) < 8  # the process itself (and any thread it keeps) counts
        assert second.threads(3) == 3
        assert first.threads(3) == 3  # the threads it ended gave their places back


def test_a_worker_cannot_take_the_hosts_queued_signal_slots(tmp_path: Path) -> None:
    """A worker inherited the broker's RLIMIT_SIGPENDING (96,365 here), and
    one that made that many timers left every root process on the host unable
    to make a timer or queue a signal (a red-team run). In a user namespace of
    its own it is held to 256."""
    with Broker(Policy(), root=tmp_path) as b:
        hog, other = b.spawn(TimerHog), b.spawn(TimerHog)
        if "user" not in hog.sandbox["namespaces"]:
            pytest.skip("no user namespaces: RLIMIT_SIGPENDING is left as the broker's")
        assert hog.sandbox["rlimits"]["pending_signals"] == 256
        assert hog.timers(100_000) == 256
        assert other.timers(10) == 10
    # and here, outside (the broker's own count is untouched)
    from worker.sandbox._libc import ffi, lib

    tid = ffi.new("int *")
    assert lib.syscall(ffi.cast("long", 222), ffi.cast("long", 1), ffi.NULL, tid) == 0
    lib.syscall(ffi.cast("long", 226), ffi.cast("long", tid[0]))  # timer_delete


NPROC_SCRIPT = """
import json, os, resource, sys
resource.setrlimit(resource.RLIMIT_NPROC, (20, 20))  # a root service's LimitNPROC=20, below root's task count
from concurrent.futures import ThreadPoolExecutor
from broker import Broker, Policy, WorkerHandle
from worker import Worker, rpc


class T(Worker):
    @rpc
    def pool(self, n: int) -> int:
        with ThreadPoolExecutor(max_workers=n) as ex:
            return sum(ex.map(lambda x: x, [1] * n))


if __name__ == "__main__":
    with Broker(Policy(), root=sys.argv[1]) as b:
        w = b.spawn(T)
        print(json.dumps({"threads": w.pool(8), "real_uid": w.sandbox["real_uid"]}))
"""


@needs_root
def test_workers_start_threads_under_a_low_rlimit_nproc(tmp_path: Path) -> None:
    """A worker with a real uid of its own loses root's exemption from
    RLIMIT_NPROC, and its user namespace capped all of root's tasks at the
    broker's limit: under LimitNPROC=110 no worker could start a thread (a
    red-team run). Where the limit is that low it keeps the broker's uid."""
    import json
    import subprocess
    import sys

    script = tmp_path / "nproc.py"
    script.write_text(NPROC_SCRIPT)
    repo = str(Path(__file__).resolve().parent.parent)
    out = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": repo})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1]) == {"threads": 8, "real_uid": None}


def _stuffed(b: Broker) -> WorkerHandle:
    """A worker whose channel queue from the broker is full, no call in flight.
    (The red team filled it with the answers to its own requests, counted with
    FIONREAD; the test fills it directly: the same state.)"""
    import socket

    w = b.spawn(QueueStuffer)
    assert w.answer_and_stop_reading() is None
    sock = w._chan.sock
    with pytest.raises(BlockingIOError):
        for _ in range(100_000):
            sock.send(msgpack.packb({"t": "x"}), socket.MSG_DONTWAIT)
    return w


def test_a_full_queue_does_not_hold_stop_past_its_grace(tree: Path) -> None:
    """The "stop" sent to a worker waited for room in its queue for the
    channel's 10 s send timeout: stop(timeout=2) took 12 s, close() 20 s per
    such worker, one after another (red-team round 15)."""
    with Broker(default_policy(), root=tree) as b:
        w = _stuffed(b)
        start = time.monotonic()
        ex = w.stop(timeout=0.5)
        assert time.monotonic() - start < 2.0
        assert (ex.kind, ex.reason) == ("ok", "stopped (killed after the grace period)")
        stuffed = [_stuffed(b), _stuffed(b)]
        start = time.monotonic()
        b.close(timeout=0.5)
        assert time.monotonic() - start < 3.0
        assert all(s.exit is not None for s in stuffed)


def test_a_full_queue_does_not_block_the_loop_in_astop(tree: Path) -> None:
    """astop() sent its "stop" with the 10 s send timeout on the loop's
    thread: a worker with a full queue stalled the event loop 10 s."""
    import asyncio

    async def main(b: Broker) -> float:
        w = _stuffed(b)
        worst = 0.0
        done = False

        async def ticker() -> None:
            nonlocal worst
            last = time.monotonic()
            while not done:
                await asyncio.sleep(0.005)
                now = time.monotonic()
                worst, last = max(worst, now - last), now

        tick = asyncio.ensure_future(ticker())
        await asyncio.sleep(0.02)
        ex = await w.astop(timeout=0.5)
        assert ex.reason == "stopped (killed after the grace period)"
        others = [_stuffed(b)]
        await b.aclose(timeout=0.5)
        assert others[0].exit is not None
        done = True
        await tick
        return worst

    b = Broker(default_policy(), root=tree)
    try:
        assert asyncio.run(main(b)) < 0.5
    finally:
        b.close()
