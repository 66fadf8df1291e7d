"""The ``Worker`` base class and the ``@rpc`` marker."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

if TYPE_CHECKING:
    from ._client import BrokerClient

F = TypeVar("F", bound=Callable[..., Any])

_RPC_ATTR = "__privsep_rpc__"


def rpc(fn: F) -> F:
    """Mark a ``Worker`` method as callable from the broker.

    Arguments and return values travel as msgpack: None, bool, int (64-bit),
    float, str, bytes, lists/tuples and str-keyed dicts, plus files,
    directories and capabilities, which travel as file descriptors.
    """
    inner = fn.__func__ if isinstance(fn, (staticmethod, classmethod)) else fn  # (@rpc above one of them)
    if not callable(inner):
        raise TypeError("@rpc decorates a method")
    code = getattr(inner, "__code__", None)
    flags = code.co_flags if code is not None else 0
    for flag, what, instead in _NOT_ONE_ANSWER:
        if flags & flag:
            name = getattr(inner, "__qualname__", repr(inner))
            raise TypeError(f"@rpc method {name} is {what}: a call is answered with one value; {instead}")
    setattr(inner, _RPC_ATTR, True)  # (what the class attribute gives: pool.submit(Cls.method) finds it)
    return fn


# Functions whose call returns an object that cannot travel (code flags, as in ``inspect``).
_NOT_ONE_ANSWER = (
    (0x80, "an async def", "run the coroutine inside it with asyncio.run()"),
    (0x200, "an async generator", "collect its items into a list"),
    (0x20, "a generator", "return a list of its items"),
)


def is_rpc(fn: object) -> bool:
    return bool(getattr(fn, _RPC_ATTR, False))


_INSTANCE_NAMES = frozenset({"broker", "grants"})  # set on each worker instance


class Worker:
    """Base class for code that runs in a sandboxed worker process.

    Subclass it, mark the methods the broker may call with :func:`rpc`, and
    put imports and warm-up in :meth:`setup`, which runs in the child before
    the sandbox is entered. Inside a call, ``self.broker`` asks the broker for
    resources; every request is checked against the broker's policy.
    """

    rpc_methods: ClassVar[frozenset[str]] = frozenset()
    #: True promises that ``__init__`` and ``setup()`` only prepare this
    #: process (imports, warm-up, settings of its own) and touch nothing
    #: outside it. The zygote may then make the worker ahead of any spawn
    #: request, in a pre-forked spare that the broker may throw away unused:
    #: the spare runs ``setup()`` and enters the sandbox while it waits, which
    #: takes both off the spawn path. A class that overrides neither method
    #: gets this without asking; spawns with grants never do. Inherited like
    #: any attribute: a subclass whose setup() breaks the promise sets False.
    setup_ahead: ClassVar[bool] = False
    broker: BrokerClient
    #: Grants held since spawn, by name: files and ``Directory`` objects.
    grants: dict[str, Any]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        names = set()
        for klass in reversed(cls.__mro__):
            for name, value in vars(klass).items():
                if isinstance(value, (staticmethod, classmethod)) and is_rpc(value.__func__):
                    value = value.__func__  # (@rpc beneath @staticmethod or @classmethod)
                elif isinstance(value, property) and is_rpc(value.fget):
                    raise TypeError(f"@rpc method {cls.__name__}.{name} is a property: a call needs a method")
                if is_rpc(value):
                    if name.startswith("_"):
                        raise TypeError(f"@rpc method {cls.__name__}.{name} must not start with '_'")
                    if name in _INSTANCE_NAMES:
                        raise TypeError(f"@rpc method {cls.__name__}.{name} would be hidden by the worker's "
                                        f"self.{name}: choose another name")
                    names.add(name)
                elif name in names and not is_rpc(value):
                    names.discard(name)  # overridden without @rpc: no longer callable
        cls.rpc_methods = frozenset(names)

    def setup(self) -> None:
        """Runs once in the child, before the sandbox. Import and warm up here."""
