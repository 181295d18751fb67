"""shrink: the smallest schedule we can find that still shows the same kind of bug.

A schedule is steered by its decisions (which CPU or event goes at each choice, whether an
injected fault fires; strategies.SteeredStrategy) and runs on with the non-preempting default
once they run out. Greedy passes, repeated while any of them helps:

1. cut the tail: the shortest run of leading decisions that still shows the bug (everything
   after it is the default, so no preemption is left there);
2. remove preemptions: each decision that switched away from a CPU that could have continued
   is replaced by letting that CPU continue;
3. drop choices: each remaining decision is deleted, shifting the later ones one choice earlier.

Greedy edits cannot trade several preemptions for a different single one, so then a bounded
explore with 0, 1, ... preemptions (fewer than the best so far, within a budget of schedules)
looks for a schedule of the same kind, and the passes trim what it finds.

A candidate is kept when it shows the same kind and is smaller: fewer preemptions first, then
fewer context switches, then fewer steps. The result is a plain token (the choice indices of
the shrunk run), which replays on its own like any other.
"""

from __future__ import annotations

from dataclasses import dataclass

from .engine import Engine, RunResult
from .sched import trio_run
from .strategies.guided import GuidedStrategy, SteeredStrategy


@dataclass
class Shrunk:
    kind: str
    before: "Candidate"
    after: "Candidate"
    schedules: int = 0  # schedules the shrinking ran

    def summary(self) -> str:
        """Which measures got smaller (or that none did)."""
        changes = [f"{name} {a} -> {b}" for name, a, b in (
            ("preemptions", self.before.preemptions, self.after.preemptions),
            ("context switches", self.before.switches, self.after.switches),
            ("steps", self.before.result.steps, self.after.result.steps)) if b < a]
        return (", ".join(changes) or "nothing got smaller") + \
            f" ({self.schedules} schedules tried)"


# Schedules run and stress (and a failing pytest expectation) may spend shrinking one finding.
DEFAULT_BUDGET = 2000


class _Spent(Exception):
    """The shrink budget is used up: the best schedule so far is the result."""


@dataclass
class Candidate:
    decisions: list
    result: RunResult
    preemptions: int
    switches: int
    preempted: list[int]  # choice positions that switched away from a CPU that could go on

    @property
    def size(self) -> tuple[int, int, int]:
        return (self.preemptions, self.switches, self.result.steps)


def kind_of(result: RunResult) -> str | None:
    """What a schedule shows: its bug, else its first hazard."""
    if result.bug is not None:
        return result.bug.kind
    return result.hazards[0].kind if result.hazards else None


def _switches(runners: list) -> int:
    """How often the CPU that runs changes (events in between do not count)."""
    return sum(1 for a, b in zip(runners, runners[1:]) if a != b)


def shrink(engine: Engine, choices: list[int], max_rounds: int = 10,
           search_budget: int = 2000, budget: int | None = None,
           on_schedule=None) -> Shrunk:
    """Raises ValueError if the schedule shows neither a bug nor a hazard. ``search_budget``
    caps the schedules the bounded explores may run, all bounds together; ``budget``, if
    given, caps every schedule shrinking runs (counted, so the result never depends on the
    machine's speed)."""
    spent = 0

    async def run(strategy) -> Candidate:
        nonlocal spent
        if budget is not None and spent >= budget:
            raise _Spent()
        spent += 1
        if on_schedule is not None:
            on_schedule(spent)
        result = await engine.run_schedule(strategy)
        preempted = [i for i, (_n, cont, idx, _b) in enumerate(strategy.points)
                     if cont is not None and idx != cont]
        return Candidate(list(strategy.decisions), result, strategy.preemptions,
                         _switches(strategy.runners), preempted)

    async def search() -> Shrunk:
        nonlocal spent
        first = await run(GuidedStrategy(tuple(choices)))
        kind = kind_of(first.result)
        if kind is None:
            raise ValueError("the token's schedule shows no bug or hazard")
        best = first

        async def attempt(decisions: list) -> bool:
            nonlocal best
            cand = await run(SteeredStrategy(decisions))
            if kind_of(cand.result) == kind and cand.size < best.size:
                best = cand
                return True
            return False

        async def passes() -> None:
            for _ in range(max_rounds):
                start = best.size
                for cut in range(len(best.decisions)):  # 1. the shortest steering prefix
                    if await attempt(best.decisions[:cut]):
                        break
                for i in reversed(best.preempted):  # 2. let the CPU that could go on do so
                    if i < len(best.decisions):
                        await attempt(best.decisions[:i] + [None] + best.decisions[i + 1:])
                i = len(best.decisions) - 1
                while i >= 0:  # 3. drop single decisions
                    await attempt(best.decisions[:i] + best.decisions[i + 1:])
                    i = min(i, len(best.decisions)) - 1
                if best.size == start:
                    return

        try:
            await passes()
            # Greedy edits cannot always trade several preemptions for one elsewhere: search.
            left = search_budget
            per_bound = max(1, search_budget // max(best.preemptions, 1))
            for bound in range(best.preemptions):
                if budget is not None:
                    left = min(left, budget - spent - 1)
                if left <= 0:
                    break
                hit, used = await _fewest_preemptions(engine, kind, bound, min(per_bound, left))
                spent += used
                left -= used
                if hit is not None:
                    cand = await run(GuidedStrategy(tuple(hit.choices)))
                    if cand.size < best.size:
                        best = cand
                        await passes()
                    break
        except _Spent:
            pass
        return Shrunk(kind, first, best, spent)

    return trio_run(search)


async def _fewest_preemptions(engine: Engine, kind: str, bound: int, budget: int):
    """The first schedule (depth first) with at most ``bound`` preemptions showing ``kind``,
    or None; and how many schedules that took."""
    from .explore import search

    hits: list[RunResult] = []

    def shows_kind(_index: int, result: RunResult) -> bool:
        if kind_of(result) == kind:
            hits.append(result)
        return bool(hits)

    # Without the state cache: for a few thousand short schedules plain search is faster.
    found = await search(engine, bound, budget, shows_kind)
    return (hits[0] if hits else None), found.schedules
