"""Policies: immutable values that say what workers may ask for.

A policy is a set of grants (a directory, ending in ``/``, or a single file,
each with rights) plus the sandbox settings every worker runs under. Build
it with chained calls; each returns a new policy and validates at once,
raising :class:`PolicyError` with the reason.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

from protocol import NotCapable, PolicyError, Rights
from protocol._paths import split_relative
from worker.sandbox import Limits, SandboxSpec

# Rights that only make sense on a directory grant.
_DIR_ONLY = Rights.CREATE | Rights.UNLINKAT | Rights.MKDIRAT | Rights.RENAMEAT | Rights.LOOKUP


@dataclass(frozen=True)
class Grant:
    """One entry of a policy: ``path`` (components beneath root) and rights."""

    parts: tuple[str, ...]
    is_dir: bool
    rights: Rights

    @property
    def display(self) -> str:
        text = "/".join(self.parts)
        return (text + "/" if text else "./") if self.is_dir else text


class Policy:
    """What workers may ask the broker for, and the sandbox they run in."""

    __slots__ = ("_grants", "_sandbox", "_weaker")
    _grants: tuple[Grant, ...]
    _sandbox: SandboxSpec
    _weaker: Rights

    def __init__(
        self, *, sandbox: SandboxSpec | None = None, _grants: tuple[Grant, ...] = (), _weaker: Rights = Rights.NONE
    ):
        object.__setattr__(self, "_grants", _grants)
        object.__setattr__(self, "_sandbox", sandbox if sandbox is not None else SandboxSpec())
        object.__setattr__(self, "_weaker", Rights(_weaker))

    def _copy(
        self,
        *,
        sandbox: SandboxSpec | None = None,
        _grants: tuple[Grant, ...] | None = None,
        _weaker: Rights | None = None,
    ) -> Policy:
        return Policy(
            sandbox=self._sandbox if sandbox is None else sandbox,
            _grants=self._grants if _grants is None else _grants,
            _weaker=self._weaker if _weaker is None else _weaker,
        )

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Policy is immutable; allow() returns a new policy")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("Policy is immutable")

    # -- building ---------------------------------------------------------
    def allow(self, path: str, rights: Rights) -> Policy:
        """Grant ``rights`` on ``path`` (relative to the broker's root).

        A path ending in ``/`` (or ``""``) grants a directory: the rights then
        apply to what lies beneath it. Any other path grants one file.
        Granting the same path twice unites the rights.
        """
        if not isinstance(rights, Rights):
            raise PolicyError(f"rights must be a Rights value, not {type(rights).__name__}")
        if not rights:
            raise PolicyError(f"allow({path!r}): empty rights grant nothing")
        if not isinstance(path, str):
            if isinstance(path, os.PathLike):  # a trailing '/' (a directory grant) cannot be told from it
                raise PolicyError(
                    f"allow({path!r}): a policy path must be a str, whose trailing '/' says a directory is "
                    f"granted: write f'{{path}}/' to grant a directory, str(path) to grant one file"
                )
            raise PolicyError(f"a policy path must be a str, not {type(path).__name__}")
        if not path:  # (an f-string whose directory came out empty, say: not a grant of everything)
            raise PolicyError("allow(''): an empty policy path; the whole root is './'")
        try:
            parts = split_relative(path, what="policy path")
        except NotCapable as exc:
            raise PolicyError(f"allow({path!r}): {exc.strerror}") from None
        is_dir = path == "." or path.endswith("/")
        if not is_dir and rights & _DIR_ONLY:
            what = Rights(rights & _DIR_ONLY).describe()
            raise PolicyError(f"allow({path!r}): {what} need a directory grant (end the path with '/')")
        grants = list(self._grants)
        for i, g in enumerate(grants):
            if g.parts == parts:
                if g.is_dir != is_dir:
                    raise PolicyError(f"allow({path!r}): granted both as a file and as a directory")
                grants[i] = Grant(parts, is_dir, g.rights | rights)
                break
        else:
            grants.append(Grant(parts, is_dir, rights))
        return self._copy(_grants=tuple(grants))

    def with_sandbox(self, **changes: Any) -> Policy:
        """A copy with sandbox settings changed (see ``SandboxSpec``)."""
        try:
            spec = replace(self._sandbox, **changes)
        except TypeError as exc:
            raise PolicyError(str(exc)) from None
        return self._copy(sandbox=spec)

    def with_limits(self, **changes: Any) -> Policy:
        """A copy with resource limits changed (see ``Limits``)."""
        try:
            limits = replace(self._sandbox.limits, **changes)
        except TypeError as exc:
            raise PolicyError(str(exc)) from None
        return self.with_sandbox(limits=limits)

    def accept_weaker(self, rights: Rights) -> Policy:
        """Named acceptance: where Linux cannot enforce one of ``rights`` for
        a grant exactly (see the rights table), deliver the grant anyway
        with that right enforced more weakly (dropped when it cannot be
        granted, unrestricted when its absence cannot be enforced) instead
        of refusing it with ``UnsupportedRights``."""
        if not isinstance(rights, Rights) or not rights:
            raise PolicyError("accept_weaker() takes a non-empty Rights value")
        return self._copy(_weaker=self._weaker | rights)

    @property
    def weaker(self) -> Rights:
        """Rights the policy accepts to see enforced more weakly."""
        return self._weaker

    def __or__(self, other: Policy) -> Policy:
        if not isinstance(other, Policy):
            return NotImplemented
        out = self._copy(_weaker=self._weaker | other._weaker)
        for g in other._grants:
            out = out.allow(g.display, g.rights)
        return out

    # -- reading ----------------------------------------------------------
    @property
    def grants(self) -> tuple[Grant, ...]:
        return self._grants

    @property
    def sandbox(self) -> SandboxSpec:
        return self._sandbox

    @property
    def limits(self) -> Limits:
        return self._sandbox.limits

    def lookup(self, parts: tuple[str, ...], rights: Rights = Rights.NONE) -> tuple[Grant, tuple[str, ...]]:
        """The grant a request for ``rights`` on ``parts`` is resolved beneath,
        and the rest of the path: the most specific grant covering the path
        that gives all of ``rights`` (a file grant, else the deepest
        directory). Grants add up: a narrower grant never takes away what a
        wider one gives. One request is resolved beneath one grant, so rights
        split between two grants are not combined.

        Raises :class:`NotCapable` when no grant covers the path, or none
        covering it gives all of ``rights``.
        """
        want = int(rights)
        best: Grant | None = None
        covering: list[Grant] = []
        for g in self._grants:
            n = len(g.parts)
            if (parts[:n] == g.parts) if g.is_dir else (parts == g.parts):
                covering.append(g)
                if not want & ~int(g.rights) and (best is None or _specificity(g) > _specificity(best)):
                    best = g
        if best is None:
            raise NotCapable(_refusal(covering, rights, self._file_grant_above(parts)), filename="/".join(parts))
        return best, parts[len(best.parts) :] if best.is_dir else ()

    def _file_grant_above(self, parts: tuple[str, ...]) -> Grant | None:
        """A file grant naming a directory above ``parts`` (``allow("data")``
        meant as ``allow("data/")``): said in the refusal, which is all a user sees."""
        for g in self._grants:
            if not g.is_dir and len(g.parts) < len(parts) and parts[: len(g.parts)] == g.parts:
                return g
        return None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Policy) and (self._grants, self._sandbox, self._weaker) == (
            other._grants,
            other._sandbox,
            other._weaker,
        )

    def __hash__(self) -> int:
        return hash((self._grants, self._sandbox, self._weaker))

    def __repr__(self) -> str:
        inner = ", ".join(f"{g.display!r}: {g.rights.describe()}" for g in self._grants)
        return f"Policy({{{inner}}})"


def lacks(where: str, granted: Rights, rights: Rights) -> str:
    """Why ``rights`` are refused where only ``granted`` are: the text of a denial."""
    return f"{where} grants {granted.describe()}, not {Rights(int(rights) & ~int(granted)).describe()}"


def _specificity(g: Grant) -> tuple[int, bool]:
    return len(g.parts), not g.is_dir  # (a file grant of a path beats a directory grant named the same)


def _refusal(covering: list[Grant], rights: Rights, file_above: Grant | None = None) -> str:
    if not covering:
        if file_above is not None:
            name = file_above.display
            return (f"no grant in the policy covers this path: {name!r} is granted as a single file "
                    f"(a directory grant ends in '/': {name + '/'!r})")
        return "no grant in the policy covers this path"
    covering.sort(key=_specificity, reverse=True)
    if len(covering) == 1:
        g = covering[0]
        return lacks(f"the policy's {g.display!r}", g.rights, rights)
    each = ", ".join(f"{g.display!r} {g.rights.describe()}" for g in covering)
    return f"no one grant of the policy covering this path gives {rights.describe()} (it has {each})"
