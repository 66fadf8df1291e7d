"""The privileged side: :class:`Broker`, :class:`Policy`, capabilities."""

import logging

from worker.sandbox._spec import Limits

from ._broker import UNSANDBOXED, Broker
from ._capability import Capability
from ._exit import WorkerExit
from ._handle import WorkerHandle
from ._policy import Grant, Policy
from ._pool import PoolBroken, WorkerPool

__all__ = [
    "UNSANDBOXED",
    "Broker",
    "Capability",
    "Grant",
    "Limits",
    "Policy",
    "PoolBroken",
    "WorkerExit",
    "WorkerHandle",
    "WorkerPool",
]

# A library never prints on its own: users attach handlers to "privsep".
logging.getLogger("privsep").addHandler(logging.NullHandler())
