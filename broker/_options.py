"""Checking the numbers a caller gives (timeouts, rates, counts) where
they are given.

They are used long after: a NaN, an infinity or a string found in the
middle of a call broke the wait for its answer or the check of a request,
and the worker was ended for it (or a pool's thread died, and its futures
waited for ever). ``poll()`` takes at most 2**31 - 1 milliseconds, so longer
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


def rate(value: Any, what: str) -> float | None:
    """Events per second: None (unlimited), or a positive number; an
    infinite rate is unlimited."""
    if value is None:
        return None
    per_second = _seconds(value, what)
    if per_second <= 0:
        raise ValueError(f"{what} must be positive (None: unlimited), not {value!r}")
    return None if math.isinf(per_second) else per_second


def count(value: Any, what: str, *, zero: bool = False) -> int:
    """A whole number: positive (or zero, with ``zero``)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    if value < 0 or (value == 0 and not zero):
        raise ValueError(f"{what} must be {'zero or more' if zero else 'positive'}, not {value!r}")
    return value


def optional_count(value: Any, what: str, *, zero: bool = False) -> int | None:
    """None (no bound), or ``count()``."""
    return None if value is None else count(value, f"{what} (or None)", zero=zero)


def _seconds(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{what} must be a number, not {type(value).__name__}")
    try:
        seconds = float(value)
    except OverflowError:  # an int past any float
        seconds = math.inf if value > 0 else -math.inf
    if math.isnan(seconds):
        raise ValueError(f"{what} must be a number, not NaN")
    return seconds


__all__ = ["MAX_TIMEOUT", "call_timeout", "count", "optional_count", "rate", "wait_timeout"]
