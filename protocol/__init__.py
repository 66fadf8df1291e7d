"""privsep's shared vocabulary: rights, errors, messages and framing.

Pure Python; imports nothing from ``worker`` or ``broker``.
"""

from ._errors import (
    MessageTooLarge,
    NotCapable,
    PolicyError,
    PolicyViolation,
    PrivsepError,
    ProtocolError,
    RemoteError,
    SandboxError,
    UnsupportedRights,
    WorkerCrashed,
    WorkerTimeout,
)
from ._rights import Rights

__version__ = "0.1.0"

__all__ = [
    "MessageTooLarge",
    "NotCapable",
    "PolicyError",
    "PolicyViolation",
    "PrivsepError",
    "ProtocolError",
    "RemoteError",
    "Rights",
    "SandboxError",
    "UnsupportedRights",
    "WorkerCrashed",
    "WorkerTimeout",
    "__version__",
]
