"""Message schema: every message is a map with a type tag ``t``.

Each side checks every message it receives against the set of types the
peer may send, with exact keys and value types. A message that does not fit
is a :class:`ProtocolError`.
"""

from __future__ import annotations

from typing import Any

from ._errors import ProtocolError

_ANY = object()

# type tag -> {key: expected python type or _ANY}
_SCHEMAS: dict[str, dict[str, Any]] = {
    # broker -> worker
    "call": {"id": int, "m": str, "a": list, "k": dict},
    "rep": {"id": int, "v": _ANY},
    "rerr": {"id": int, "e": dict},
    "stop": {},
    "cfg": {"out": bool},  # right after "ready": forward print() output ("out") or not
    # worker -> broker
    "ready": {"v": int, "pid": int, "sandbox": dict, "notify": _ANY, "err": _ANY},  # err: its stderr pipe
    "fail": {"e": dict},
    "ret": {"id": int, "v": _ANY},
    "err": {"id": int, "e": dict},
    "req": {"id": int, "op": str, "a": dict},
    "out": {"s": str, "x": str},  # a line a worker printed (stream, text), while a call runs
}

FROM_BROKER = frozenset({"call", "rep", "rerr", "stop", "cfg"})
FROM_WORKER = frozenset({"ready", "fail", "ret", "err", "req", "out"})

# worker -> broker requests and their argument schemas
REQUESTS: dict[str, dict[str, Any]] = {
    "open": {"path": str, "rights": int},
    "create": {"path": str, "rights": int},
    "stat": {"path": str},
    "listdir": {"path": str, "at": int},  # at: where the page starts (0: a new listing)
    "mkdir": {"path": str, "exist_ok": bool},  # exist_ok: an existing directory answers as made
    "opendir": {"path": str, "rights": int},
    # beneath a directory proxy (a directory granted after entry), by its id
    "dopen": {"dir": int, "path": str, "rights": int},
    "dcreate": {"dir": int, "path": str, "rights": int},
    "dstat": {"dir": int, "path": str},
    "dlist": {"dir": int, "path": str, "at": int},
    "dunlink": {"dir": int, "path": str},
    "dmkdir": {"dir": int, "path": str, "exist_ok": bool},
    "dclose": {"dir": int},  # the worker is done with a proxy it asked for: the broker lets it go
}

_ERR_KEYS = {
    "type": str,
    "msg": str,
    "errno": (int, type(None)),
    "filename": (str, type(None)),
    "tb": str,
    "base": str,  # nearest ancestor the receiver knows (builtin or privsep's)
}


def _check_fields(obj: dict[str, Any], schema: dict[str, Any], what: str) -> None:
    if obj.keys() != schema.keys():
        raise ProtocolError(f"{what}: expected keys {sorted(schema)}, got {sorted(obj)}")
    for key, expected in schema.items():
        if expected is _ANY:
            continue
        value = obj[key]
        if isinstance(value, bool) and expected is int:
            raise ProtocolError(f"{what}: {key} must be an integer")
        if not isinstance(value, expected):
            raise ProtocolError(f"{what}: {key} has the wrong type {type(value).__name__}")


# Per type without nested maps to check: (exact key set, (key, exact type) for each typed key). The
# hot messages (call, ret, rep) pass in one pass; anything else takes the full check below.
_FAST: dict[str, tuple[frozenset[str], tuple[tuple[str, type], ...]]] = {
    tag: (frozenset({"t", *schema}), tuple((k, v) for k, v in schema.items() if v is not _ANY))
    for tag, schema in _SCHEMAS.items()
    if "e" not in schema and tag != "req"
}
# The same for requests, by op: (exact argument key set, (key, exact type) for each).
_REQ_KEYS = frozenset({"t", *_SCHEMAS["req"]})
_FAST_REQ: dict[str, tuple[frozenset[str], tuple[tuple[str, type], ...]]] = {
    op: (frozenset(schema), tuple(schema.items())) for op, schema in REQUESTS.items()
}


def check_message(msg: Any, allowed: frozenset[str]) -> dict[str, Any]:
    """Return ``msg`` if it is a well-formed message of an allowed type."""
    if type(msg) is not dict:
        raise ProtocolError(f"message must be a map, not {type(msg).__name__}")
    tag = msg.get("t")
    if type(tag) is not str:
        raise ProtocolError("message type tag must be a string")
    fast = _FAST.get(tag)
    if fast is not None and tag in allowed and msg.keys() == fast[0]:
        for key, typ in fast[1]:
            if type(msg[key]) is not typ:
                break
        else:
            return msg
    elif tag == "req" and tag in allowed and msg.keys() == _REQ_KEYS and type(msg["id"]) is int:
        op, args = msg["op"], msg["a"]
        shape = _FAST_REQ.get(op) if type(op) is str else None  # (an op of another type may not even hash)
        if shape is not None and type(args) is dict and args.keys() == shape[0]:
            for key, typ in shape[1]:
                if type(args[key]) is not typ:
                    break
            else:
                return msg
    if tag not in allowed:
        raise ProtocolError(f"unexpected message type {tag!r}")
    schema = _SCHEMAS[tag]
    if len(msg) != len(schema) + 1:
        raise ProtocolError(f"'{tag}' message: expected keys {sorted(schema)}, got {sorted(msg)}")
    for key, expected in schema.items():
        if key not in msg:
            raise ProtocolError(f"'{tag}' message: missing {key!r}")
        if expected is _ANY:
            continue
        value = msg[key]
        if (type(value) is bool and expected is int) or not isinstance(value, expected):
            raise ProtocolError(f"'{tag}' message: {key} has the wrong type {type(value).__name__}")
    if "e" in schema:
        _check_fields(msg["e"], _ERR_KEYS, f"error in '{tag}'")
    if tag == "req":
        req = REQUESTS.get(msg["op"])
        if req is None:
            raise ProtocolError(f"unknown request {msg['op']!r}")
        _check_fields(msg["a"], req, f"request '{msg['op']}'")
    return msg
