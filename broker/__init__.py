"""The privileged side: :class:`Broker`, :class:`Policy`, capabilities."""

from ._broker import UNSANDBOXED, Broker
from ._capability import Capability
from ._exit import WorkerExit
from ._handle import WorkerHandle
from ._policy import Grant, Policy

__all__ = ["UNSANDBOXED", "Broker", "Capability", "Grant", "Policy", "WorkerExit", "WorkerHandle"]
