"""The sandboxed side: subclass :class:`Worker`, mark methods with :func:`rpc`."""

from ._client import BrokerClient, StatResult
from ._files import Directory, FdDirectory, ProxyDirectory
from ._rpc import Worker, rpc

__all__ = ["BrokerClient", "Directory", "FdDirectory", "ProxyDirectory", "StatResult", "Worker", "rpc"]
