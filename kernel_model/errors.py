"""What a sanitizer raises when it sees a bug, and what the model raises for paths it does not
cover."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Finding:
    """One sanitizer report, like a KASAN or lockdep splat.

    ``cpu``/``func``/``step`` name the bad access; ``obj`` the object; ``history`` the earlier
    steps that freed or changed it, each a dict with cpu, func, step and what happened.
    """

    kind: str
    summary: str
    cpu: int | None = None
    func: str | None = None
    step: int = 0
    obj: str = ""
    history: list[dict] = field(default_factory=list)
    pfns: tuple[int, ...] = ()
    detail: list[str] = field(default_factory=list)
    backtrace: tuple[str, ...] = ()
    access: str = ""  # the bad access itself, e.g. 'spin_lock(ptl(PTE 0x5))'


class BugFound(Exception):
    """Raised at the bad access; the engine stops the schedule there."""

    def __init__(self, finding: Finding):
        super().__init__(finding.summary)
        self.finding = finding


class NotModelled(Exception):
    """A scenario asks for an operation, VMA type or config value this model does not cover yet."""


class SetupBlocked(Exception):
    """A [[setup]] entry tried to wait: setup runs one entry at a time, so nothing could end it."""
