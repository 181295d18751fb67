"""Strategy ``pct``: probabilistic concurrency testing (Burckhardt et al., ASPLOS 2010)."""

from __future__ import annotations

import math
import random

from . import Strategy, strategy
from .random import RandomStrategy

# PCT's estimate k of how many real choices a schedule makes is the most that any of this many
# random calibration runs made.
CALIBRATION_RUNS = 5


# PCT draws its priorities and change points as random.Random's shuffle and sample draw them
# (CPython 3.11 to 3.13: the same calls of getrandbits, so the same schedule for each seed, as
# tests/test_schedule_reuse.py checks), written out: the two methods' own overhead (a method
# call per draw, sample's checks of its population and its set-size arithmetic) was an eighth
# of PCT's set-up per schedule.

def _below(getrandbits):
    """random.Random._randbelow: an int in [0, n), for n > 0."""

    def below(n: int) -> int:
        bits = n.bit_length()
        r = getrandbits(bits)
        while r >= n:
            r = getrandbits(bits)
        return r

    return below


def _sample(below, n: int, count: int) -> list[int]:
    """random.Random.sample(range(1, n + 1), count), drawn by ``below``."""
    result = [0] * count
    setsize = 21  # sample's bound for a pool rather than a set of drawn indices
    if count > 5:
        setsize += 4 ** math.ceil(math.log(count * 3, 4))
    if n <= setsize:
        pool = list(range(1, n + 1))
        for i in range(count):
            j = below(n - i)
            result[i] = pool[j]
            pool[j] = pool[n - i - 1]
    else:
        selected: set[int] = set()
        for i in range(count):
            j = below(n)
            while j in selected:
                j = below(n)
            selected.add(j)
            result[i] = j + 1
    return result


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
        below = _below(self.rng.getrandbits)
        for i in range(len(order) - 1, 0, -1):  # rng.shuffle(order)
            j = below(i + 1)
            order[i], order[j] = order[j], order[i]
        self.prio = {key: depth + rank for rank, key in enumerate(order)}
        k = max(k, 1)
        count = min(depth - 1, k)
        # The change points in order, each (choice number, the low priority given there), and
        # a last one past them all: a choice number 0 is never reached.
        self.changes = list(zip(sorted(_sample(below, k, count)), range(depth - 1, 0, -1)))
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
