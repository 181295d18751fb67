"""Strategy ``random``: a uniform choice among the options at every choice."""

from __future__ import annotations

import random

from . import Strategy, strategy


@strategy("random")
class RandomStrategy(Strategy):
    """Uniform choice among the runnable CPUs and pending events at every choice; each fault
    fires with its probability."""

    # It keeps none of its options, scheduler or machine after a schedule: run_seeds may take
    # the machine apart then (engine._forgets).
    forgets_schedule = True

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def pick(self, options: list, current, step: int) -> int:
        return self.rng.randrange(len(options))

    def fault(self, p: float, current, step: int) -> int:
        return 1 if self.rng.random() < p else 0
