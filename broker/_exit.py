"""How a worker ended: one structured value the caller and the log both read."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field

from protocol import PolicyViolation, WorkerCrashed, WorkerTimeout

#: How the reason of a worker that could not start begins: its setup() or its
#: sandbox entry raised (reported by the worker itself), which a pool takes for
#: its initializer failing.
SETUP_FAILED = "setup or sandbox entry"


@dataclass(frozen=True)
class WorkerExit:
    """The end of a worker.

    ``kind`` is one of ``"ok"`` (stopped when asked), ``"violation"`` (the
    sandbox stopped it; ``syscall`` and ``args`` say for what), ``"signal"``,
    ``"timeout"``, ``"oom"``, ``"protocol"`` (it broke the wire rules),
    ``"cancelled"`` (its caller stopped waiting for a call: the task was
    cancelled or the thread interrupted) and ``"crashed"`` (any other exit).
    ``last_output``: with ``Broker(worker_output=True)``, what a worker that
    did not stop cleanly had written to its stderr and not yet sent (a fatal
    error's report, faulthandler's traceback), at most 4096 characters.
    """

    kind: str
    reason: str
    exit_code: int | None = None
    signal: int | None = None
    syscall: str | None = None
    args: tuple[int, ...] = field(default_factory=tuple)
    last_output: str = ""

    def __post_init__(self) -> None:
        # One type whichever way the end was learnt: a wait status gives an int.
        if self.signal is not None and self.signal in signal.Signals._value2member_map_:
            object.__setattr__(self, "signal", signal.Signals(self.signal))

    def __str__(self) -> str:
        """``kind: reason``, as a log line or a message shows it (the repr
        keeps every field): ``print(handle.exit)`` printed the dataclass."""
        return f"{self.kind}: {self.reason}"

    @classmethod
    def from_status(cls, status: int, kind: str | None = None, reason: str = "") -> WorkerExit:
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
            if kind is None and sig == signal.SIGXCPU:
                return cls("timeout", "CPU time limit reached (SIGXCPU; Limits.cpu_seconds bounds the CPU time of "
                                      "the worker's whole life, not of one call)", signal=sig)
            if kind is None:
                kind = "violation" if sig == signal.SIGSYS else "signal"
            return cls(kind, reason or f"killed by {name}", signal=sig)
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
        if kind is None:
            kind = "ok" if code == 0 else "crashed"
        return cls(kind, reason or f"exited with status {code}", exit_code=code)

    def error(self, who: str, *, later: bool = False) -> WorkerCrashed:
        """The exception a pending call raises, or (``later``) a call made
        after the end: the same class, saying the worker is gone."""
        text = f"worker {who}: {self.reason}"
        if later:
            text = f"worker {who} has already ended ({self.reason}); a call needs a live worker: spawn another"
        if self.kind == "violation":
            return PolicyViolation(text, self, syscall=self.syscall or "?", args=self.args)
        if self.kind == "timeout":
            return WorkerTimeout(text, self)
        return WorkerCrashed(text, self)


def returncode_text(code: int | None) -> str:
    """How a helper process (the zygote, the restricted opener) ended, from
    its ``Popen.returncode``."""
    if code is None:
        return "status unknown"
    return f"killed by signal {-code}" if code < 0 else f"exit status {code}"
