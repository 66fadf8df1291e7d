"""Checking the timeouts a caller gives, where they are given.

A timeout is used long after it is given: a NaN, an infinity or a string
found in the middle of a call broke the wait for its answer, and the worker
was ended for it. ``poll()`` takes at most 2**31 - 1 milliseconds, so longer
timeouts are no limit at all (calls) or that bound (waits that must end).
"""

from __future__ import annotations

import math
from typing import Any

#: About 24 days: the longest wait one poll() can express.
MAX_TIMEOUT = (2**31 - 1) / 1000


def call_timeout(value: Any, what: str) -> float | None:
    """A call's timeout: None (no limit), or positive seconds. An infinite
    one, or one past ``MAX_TIMEOUT``, is no limit."""
    if value is None:
        return None
    seconds = _seconds(value, what)
    if seconds <= 0:
        raise ValueError(f"{what} must be positive, not {value!r}")
    return None if seconds > MAX_TIMEOUT else seconds


def wait_timeout(value: Any, what: str, *, zero: bool = False) -> float:
    """A wait that must end: positive seconds (or zero, with ``zero``), at
    most ``MAX_TIMEOUT``."""
    if value is None:
        raise TypeError(f"{what} must be a number of seconds, not None")
    seconds = _seconds(value, what)
    if seconds < 0 or (seconds == 0 and not zero):
        raise ValueError(f"{what} must be {'zero or more' if zero else 'positive'}, not {value!r}")
    return min(seconds, MAX_TIMEOUT)


def _seconds(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{what} must be a number of seconds, not {type(value).__name__}")
    try:
        seconds = float(value)
    except OverflowError:  # an int past any float
        seconds = math.inf if value > 0 else -math.inf
    if math.isnan(seconds):
        raise ValueError(f"{what} must be a number of seconds, not NaN")
    return seconds


__all__ = ["MAX_TIMEOUT", "call_timeout", "wait_timeout"]
