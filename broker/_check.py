"""``privsep check``: what this kernel gives and which layers a worker gets.

Uses the same probes as the test suite's skips (``worker.sandbox.probe``).
The minimum for running workers at all is a seccomp filter, NO_NEW_PRIVS and
openat2 (the broker resolves every worker path with it); without them the
exit status is 1.
"""

from __future__ import annotations

import json as _json
import sys
from typing import Any

from worker.sandbox import probe

from ._cgroup import probe as cgroup_probe


def _layers(p: dict[str, Any]) -> list[str]:
    layers = ["rlimits"]
    if p["namespaces"]:
        layers.append("namespaces:" + ",".join(p["namespaces"]))
    layers += ["capabilities", "no_new_privs"]
    if p["landlock_abi"]:
        layers.append(f"landlock:abi{p['landlock_abi']}")
    if p["seccomp"]:
        layers.append("seccomp:notify" if p["user_notif"] else "seccomp:kill")
    return layers


def _yes(v: object) -> str:
    return "yes" if v else "NO"


def run_check(json: bool = False) -> int:
    """Print the probe results (human text or JSON); return the exit status."""
    p = dict(probe())
    p["worker_layers"] = _layers(p)
    missing = [name for name, ok in (("seccomp filter", p["seccomp"]), ("no_new_privs", p["no_new_privs"]),
                                     ("openat2", p["openat2"])) if not ok]
    p["missing_minimum"] = missing
    cg = cgroup_probe()
    p["memory_cgroup"] = {"version": cg.version, "parent": cg.parent, "reason": cg.reason}
    if json:
        print(_json.dumps(p, indent=2, sort_keys=True))
        return 1 if missing else 0
    feats = p["landlock_features"]
    lines = [
        f"kernel                {p['kernel']} ({p['machine']})",
        f"seccomp filter        {_yes(p['seccomp'])}",
        f"  user notification   {_yes(p['user_notif'])}"
        + ("" if p["user_notif"] else "  (violations kill with SIGSYS; the syscall is not named)"),
        f"  ADDFD               {_yes(p['addfd'])}",
        f"  WAIT_KILLABLE_RECV  {_yes(p['wait_killable_recv'])}",
        f"no_new_privs          {_yes(p['no_new_privs'])}",
        f"Landlock ABI          {p['landlock_abi'] or 'NONE'}"
        + (f"  (errata {p['landlock_errata']:#x})" if p["landlock_abi"] else ""),
    ]
    lines += [f"  {name:<20}{_yes(ok)}" for name, ok in feats.items()]
    lines += [
        f"namespaces            {','.join(p['namespaces']) or 'NONE'}",
        f"openat2               {_yes(p['openat2'])}",
        f"memory cgroups        {cg.describe()}  (for Limits.memory)",
        "",
        "a worker gets         " + " -> ".join(p["worker_layers"]),
    ]
    if not p["landlock_abi"]:
        lines.append("warning: no Landlock: directory grants cannot be confined; @fs-at is refused")
    if missing:
        lines.append("MINIMUM NOT MET: missing " + ", ".join(missing))
    else:
        lines.append("minimum met (seccomp filter + no_new_privs + openat2)")
    print("\n".join(lines))
    sys.stdout.flush()
    return 1 if missing else 0
