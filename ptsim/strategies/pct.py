"""Strategy ``pct``: probabilistic concurrency testing (Burckhardt et al., ASPLOS 2010)."""

from __future__ import annotations

import random

from . import Strategy, strategy
from .random import RandomStrategy

# PCT's estimate k of how many real choices a schedule makes is the most that any of this many
# random calibration runs made.
CALIBRATION_RUNS = 5


class CountingStrategy(RandomStrategy):
    """A PCT calibration run: a random schedule that counts its real choices."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.count = 0

    def pick(self, options: list, current, step: int) -> int:
        self.count += 1
        return super().pick(options, current, step)


@strategy("pct")
class PctStrategy(Strategy):
    """Probabilistic concurrency testing: every option source gets a random priority and the
    highest-priority option runs, except at depth - 1 random change points, where the option
    about to run drops to a low priority. Finds bugs of depth d with a probability bound."""

    # Its priorities are by option key: it keeps no option, scheduler or machine after a
    # schedule, and run_seeds may take the machine apart then (engine._forgets).
    forgets_schedule = True

    def __init__(self, seed: int, depth: int, keys: list[int], k: int) -> None:
        self.rng = random.Random(seed)
        order = list(keys)
        self.rng.shuffle(order)
        self.prio = {key: depth + rank for rank, key in enumerate(order)}
        k = max(k, 1)
        count = min(depth - 1, k)
        # The change points in order, each (choice number, the low priority given there), and
        # a last one past them all: a choice number 0 is never reached.
        self.changes = list(zip(sorted(self.rng.sample(range(1, k + 1), count)),
                                range(depth - 1, 0, -1)))
        self.changes.append((0, 0))
        self.next_change = self.changes[0][0]
        self.steps = 0

    @classmethod
    def prepare(cls, engine, depth: int = 3):
        """Calibrate k once per scenario: one run undercounts when the CPU with the short path
        happens to go first, and change points past its count could then never be drawn."""
        counts = []
        for seed in range(CALIBRATION_RUNS):
            counter = CountingStrategy(seed)
            engine.run_schedule_sync(counter)
            counts.append(counter.count)
        k = max(max(counts), 1)
        keys = engine.option_keys
        return lambda seed: cls(seed, depth, keys, k)

    def pick(self, options: list, current, step: int) -> int:
        """The first option of the highest priority (as max over the indices gives). It runs
        at nearly every step of a schedule with two CPUs at work: two options are compared
        directly, and the change points are looked at only when the next one is due."""
        self.steps += 1
        if self.steps == self.next_change:
            return self._change(options)
        prio = self.prio
        if len(options) == 2:
            return 1 if prio[options[1].key] > prio[options[0].key] else 0
        ranks = [prio[o.key] for o in options]
        return ranks.index(max(ranks))

    def _change(self, options: list) -> int:
        """A change point: the option about to run drops to its low priority for good."""
        prio = self.prio
        ranks = [prio[o.key] for o in options]
        best = ranks.index(max(ranks))
        low = self.changes.pop(0)[1]
        self.next_change = self.changes[0][0]
        prio[options[best].key] = ranks[best] = low
        return ranks.index(max(ranks))

    def fault(self, p: float, current, step: int) -> int:
        return 1 if self.rng.random() < p else 0
