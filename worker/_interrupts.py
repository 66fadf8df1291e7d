"""A wait that an interrupt must not leave half done.

A Ctrl-C (or a signal handler's own exception) raised in a reap's wait left
the child a zombie for good: the sandbox probe's namespace child, the
restricted opener. The wait is finished first, then the interrupt raised.
"""

from __future__ import annotations

from collections.abc import Callable


def through_interrupts(wait: Callable[[], object], done_on: tuple[type[BaseException], ...] = ()) -> None:
    """Call ``wait`` until it returns (or raises one of ``done_on``: nothing
    left to wait for); an interrupt that came meanwhile is raised then."""
    interrupted: BaseException | None = None
    while True:
        try:
            wait()
            break
        except done_on:
            break
        except BaseException as exc:
            interrupted = interrupted or exc
    if interrupted is not None:
        raise interrupted
