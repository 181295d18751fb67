"""Strategies: the scheduler's policy at every choice.

A strategy answers two questions, and is told what it needs to answer them:

``pick(options, current, step) -> int``
    Which of ``options`` goes next (its index). ``options`` are the CPUs that can take a step
    and the pending events that may happen now (an IPI delivered, a grace period ending); each
    has a ``key`` that identifies it across schedules (CPU i is i, an IPI delivery to CPU i is
    1000 + i, a grace-period end is 2000), ``is_event`` and ``prompt`` (an event the hardware
    takes at once, an IPI delivery: explore's default, guided.cost()). ``current`` is the CPU
    that asked
    (it continues unless something else is chosen: choosing anything else is a preemption),
    or None; ``step`` is the step number the choice is made at.

``fault(p, current, step) -> int``
    Whether an injected fault of probability ``p`` (strictly between 0 and 1) fires: 1 or 0.

Both answers are recorded, so any schedule replays from its answers alone. A strategy may also
define ``attach(sched)``, called once when its schedule starts (explore's state cache reads the
parked CPUs through it), and ``parks = True`` to be run by the parking scheduler.

A strategy that ``--strategy`` can name is registered with ``@strategy("name")``, a class whose
``prepare(engine, depth)`` returns a factory ``seed -> strategy`` for one scenario (PCT
calibrates there); the default makes ``cls(seed)``. The shipped ``random`` and ``pct`` are
declared that way, in their own modules.
"""

from __future__ import annotations

from typing import Callable

from ptsim.kernel_model.registry import Registry, first_line

# What --strategy, [expect] strategy and the API use when nothing is said: the strategy that
# finds the catalogue's bugs fastest (README's table: benchmarks/first_bug.py). PCT's median
# is lower or equal on every race but D3, D5, D6 and D11, where both need under 5 schedules,
# and random misses D7 in 5000 schedules of every stream and needs ~2500 for D10.
DEFAULT_STRATEGY = "pct"


class Divergence(Exception):
    """A replayed choice is not possible at this point: the token does not fit the run."""


class Pruned(Exception):
    """explore: the schedule reached a state whose every continuation within the preemption
    bound was already explored; the rest of it would repeat known schedules."""


class Strategy:
    """Base class of the shipped strategies (the protocol is duck-typed)."""

    name = ""
    parks = False
    __state_ref_always__ = True  # a policy, not machine state: explore's state cache names it

    def __state_ref__(self):
        return type(self).__name__

    @classmethod
    def prepare(cls, engine, depth: int = 3) -> Callable[[int], "Strategy"]:
        return cls

    def attach(self, sched) -> None:
        return None

    def pick(self, options: list, current, step: int) -> int:
        raise NotImplementedError

    def fault(self, p: float, current, step: int) -> int:
        raise NotImplementedError


class StrategyEntry:
    def __init__(self, name: str, cls: type) -> None:
        self.name = name
        self.cls = cls
        self.doc = first_line(cls.__doc__)
        self.module = cls.__module__


STRATEGIES: Registry[StrategyEntry] = Registry("strategy")


def strategy(name: str, replace: bool = False):
    """Register a strategy class under ``name`` (what --strategy and [expect] strategy take)."""

    def register(cls: type) -> type:
        cls.name = name
        STRATEGIES.add(name, StrategyEntry(name, cls), replace=replace)
        return cls

    return register


from . import pct, random  # noqa: E402,F401  (the shipped strategies register themselves)
