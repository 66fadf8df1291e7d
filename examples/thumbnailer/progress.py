"""Progress display and the end-of-run summary (no privsep, no Pillow)."""

from __future__ import annotations

import os
import shutil
import time
from typing import Any, TextIO


def safe(text: str) -> str:
    """``text`` fit for a terminal: control characters (newlines, ANSI escapes) shown as escapes."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class Progress:
    """A one-line progress bar on a terminal, plain log lines otherwise.

    On a TTY the bar is redrawn in place (on ``stream``, normally stderr) and
    rejections are printed above it as they happen; when ``stream`` is not a
    terminal every file gets one line, so logs and CI output stay readable.
    """

    def __init__(self, stream: TextIO, total: int, *, enabled: bool = True, tty: bool | None = None):
        self.stream = stream
        self.total = total
        self.done = 0
        self.rejected = 0
        self.enabled = enabled
        self.tty = stream.isatty() if tty is None else tty
        self.started = time.monotonic()
        self._last_draw = 0.0
        self._drawn = False

    def _width(self) -> int:
        try:
            return max(40, min(shutil.get_terminal_size((80, 24)).columns, 160))
        except OSError:
            return 80

    def update(self, name: str, ok: bool, detail: str) -> None:
        """Record one finished file: ``ok`` and a short ``detail`` (output or reason)."""
        self.done += 1
        name, detail = safe(name), safe(detail)
        if not ok:
            self.rejected += 1
        if not self.enabled:
            return
        if not self.tty:
            status = "ok      " if ok else "REJECTED"
            self.stream.write(f"[{self.done}/{self.total}] {status} {name}: {detail}\n")
            self.stream.flush()
            return
        if not ok:
            self._clear()
            self.stream.write(f"  rejected {name}: {detail}\n")
        now = time.monotonic()
        if ok and self.done < self.total and now - self._last_draw < 0.05:
            return  # redraw at most 20 times a second
        self._last_draw = now
        self._draw(name)

    def _clear(self) -> None:
        if self._drawn:
            self.stream.write("\r\x1b[2K")
            self._drawn = False

    def _draw(self, name: str) -> None:
        width = self._width()
        fraction = self.done / self.total if self.total else 1.0
        elapsed = time.monotonic() - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        counts = f" {self.done}/{self.total} {fraction:4.0%} {rate:5.1f}/s"
        if self.rejected:
            counts += f" {self.rejected} rejected"
        bar_width = max(10, min(40, width - len(counts) - 30))
        filled = round(bar_width * fraction)
        bar = "[" + "#" * filled + "." * (bar_width - filled) + "]"
        room = width - len(bar) - len(counts) - 3
        shown = name if len(name) <= room else "..." + name[-max(0, room - 3) :]
        self.stream.write("\r\x1b[2K" + bar + counts + ("  " + shown if room > 8 else ""))
        self.stream.flush()
        self._drawn = True

    def finish(self) -> None:
        if self.enabled and self.tty:
            self._clear()
            self.stream.flush()


def fmt_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def describe_sandbox(sandbox: dict[str, Any] | None) -> list[str]:
    """Turn a worker's sandbox report (what it applied at entry) into short human lines."""
    if not sandbox:
        return ["(no sandbox report available)"]
    layers = sandbox.get("layers")
    if not isinstance(layers, list):
        return [f"{k}: {_short(v)}" for k, v in sandbox.items()] or ["(empty sandbox report)"]
    if not layers:
        return ["NONE: the workers ran without a sandbox"]
    lines = []
    for layer in layers:
        name, _, detail = str(layer).partition(":")
        if name == "rlimits" and isinstance(sandbox.get("rlimits"), dict):
            limits = sandbox["rlimits"]
            parts = [
                f"{key.replace('_', ' ')} {fmt_bytes(v) if key in ('address_space', 'file_size') and v else v}"
                for key, v in limits.items()
                if v is not None
            ]
            lines.append("rlimits: " + ", ".join(parts))
        elif name == "namespaces":
            lines.append("namespaces: " + detail.replace(",", ", "))
        elif name == "landlock":
            lines.append(f"Landlock: {detail.replace('abi', 'ABI ')} (no file system access beyond the grants)")
        elif name == "seccomp":
            insns = sandbox.get("seccomp_insns")
            what = "deny-by-default syscall filter" + (f" ({insns} BPF instructions)" if insns else "")
            violation = sandbox.get("violation")
            lines.append(f"seccomp: {what}, mode {detail or '?'}" + (f", violations: {violation}" if violation else ""))
        elif name == "capsicum":
            lines.append("Capsicum capability mode")
        elif name == "capabilities" and not detail:
            lines.append("capabilities: all dropped (a root broker's workers keep none)")
        elif name == "no_new_privs" and not detail:
            lines.append("no_new_privs (no exec can gain privileges)")
        else:
            lines.append(str(layer).replace(":", ": ", 1) if detail else str(layer))
    if isinstance(sandbox.get("entry_us"), int | float):
        lines.append(f"(entered in {sandbox['entry_us'] / 1000:.1f} ms per worker)")
    return lines


def _short(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={_short(v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return ", ".join(_short(v) for v in value) if value else "none"
    if value is True:
        return "yes"
    if value is False or value is None:
        return "no"
    return str(value)


def render_summary(report: dict[str, Any]) -> str:
    """The human-readable end-of-run summary."""
    counts = report["counts"]
    out = []
    seconds = report["seconds"]
    out.append(
        ("Interrupted: " if report.get("interrupted") else "")
        + f"{counts['converted']} converted, {counts['rejected']} rejected"
        + (f", {counts['skipped']} skipped (not image files)" if counts["skipped"] else "")
        + f" in {seconds:.2f} s ({report['images_per_second']:.1f} images/s"
        + f", {report['workers']} sandboxed worker{'s' if report['workers'] != 1 else ''})"
    )
    total_bytes = sum(item.get("bytes", 0) for item in report["converted"])
    out.append(
        f"Output: {report['output']}/ ({report['format']}, fitting {report['size']}x{report['size']}, "
        f"{fmt_bytes(total_bytes)} written)"
    )
    if report["rejected"]:
        out.append("Rejected:")
        name_w = min(32, max(len(r["input"]) for r in report["rejected"]))
        kind_w = max(len(r["kind"]) for r in report["rejected"])
        for item in report["rejected"]:
            out.append(f"  {safe(item['input']):<{name_w}}  {item['kind']:<{kind_w}}  {safe(item['reason'])}")
    if report.get("workers_replaced"):
        out.append(f"Workers replaced after dying or being killed: {report['workers_replaced']}")
    out.append("Sandbox layers the workers ran under:")
    out.extend("  " + line for line in describe_sandbox(report.get("sandbox")))
    for note in report.get("notes", []):
        out.append(f"Note: {note}")
    return "\n".join(out) + os.linesep
