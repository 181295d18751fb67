"""Strategy ``pct``: probabilistic concurrency testing (Burckhardt et al., ASPLOS 2010)."""

from __future__ import annotations

import math
from _random import Random as _Random

from . import Strategy, strategy
from .random import RandomStrategy

# PCT's estimate k of how many real choices a schedule makes is the most that any of this many
# random calibration runs made.
CALIBRATION_RUNS = 5


# PCT draws its priorities and change points as random.Random's shuffle and sample draw them
# (CPython 3.11 to 3.13: the same calls of getrandbits, so the same schedule for each seed, as
# tests/test_schedule_reuse.py checks), written out: the two methods' own overhead (a method
# call per draw, sample's checks of its population and its set-size arithmetic) was an eighth
# of PCT's set-up per schedule. What depends only on the scenario (the keys, k, the depth) is
# laid out once (_Plan), and the generator is random.Random's C base class, seeded the same way
# without the Python-level seed() around it: seeding the Mersenne Twister is now most of PCT's
# set-up (~5 of ~9 us per D1 schedule).

class _Plan:
    """What PCT's set-up draws, laid out once per scenario (the keys, depth and k are the same
    for every seed): the bit widths of the shuffle's draws, the change points' low priorities,
    and which of sample's two algorithms applies. ``make(seed)`` is then a strategy for one
    schedule at the cost of little more than seeding its generator (most of what is left)."""

    def __init__(self, cls, depth: int, keys: list[int], k: int) -> None:
        self.cls = cls
        self.depth = depth
        self.keys = list(keys)
        # rng.shuffle: for i from n-1 down to 1, j = _randbelow(i + 1), drawn with the bit
        # width of i + 1 and redrawn while above i.
        self.shuffle = [(i, (i + 1).bit_length()) for i in range(len(self.keys) - 1, 0, -1)]
        k = max(k, 1)
        self.k = k
        self.count = count = min(depth - 1, k)
        self.lows = list(range(depth - 1, 0, -1))[:count]
        setsize = 21  # sample's bound for a pool rather than a set of drawn indices
        if count > 5:
            setsize += 4 ** math.ceil(math.log(count * 3, 4))
        self.pooled = k <= setsize
        self.k_bits = k.bit_length()
        self.ranks = range(depth, depth + len(self.keys))  # priority of each shuffled key

    def make(self, seed: int) -> "PctStrategy":
        strategy = object.__new__(self.cls)
        self.start(strategy, seed)
        return strategy

    def start(self, strategy, seed: int) -> None:
        """Set ``strategy`` up for ``seed``: random.Random(seed)'s shuffle of the keys and
        sample of the change points, written out (tests/test_schedule_reuse.py checks they draw
        the same). The generator is the C one random.Random wraps, seeded the same way: PCT
        calls only its getrandbits and random."""
        rng = strategy.rng = _Random(seed)
        getrandbits = rng.getrandbits
        order = self.keys[:]
        for i, bits in self.shuffle:
            j = getrandbits(bits)
            while j > i:
                j = getrandbits(bits)
            order[i], order[j] = order[j], order[i]
        strategy.prio = dict(zip(order, self.ranks))
        # The change points in order, each (choice number, the low priority given there), and
        # a last one past them all: a choice number 0 is never reached.
        changes = list(zip(sorted(self._sample(getrandbits)), self.lows))
        changes.append((0, 0))
        strategy.changes = changes
        strategy.next_change = changes[0][0]
        strategy.steps = 0

    def _sample(self, getrandbits) -> list[int]:
        """random.Random.sample(range(1, k + 1), count): _randbelow's draws written out (each
        redrawn while out of range, and with a set of drawn indices, while already drawn)."""
        n, count = self.k, self.count
        if self.pooled:
            pool = list(range(1, n + 1))
            result = [0] * count
            for i in range(count):
                size = n - i
                bits = size.bit_length()
                j = getrandbits(bits)
                while j >= size:
                    j = getrandbits(bits)
                result[i] = pool[j]
                pool[j] = pool[size - 1]
            return result
        bits = self.k_bits
        drawn: list[int] = []
        for _ in range(count):
            j = getrandbits(bits)
            while j >= n or j in drawn:
                j = getrandbits(bits)
            drawn.append(j)
        return [j + 1 for j in drawn]


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
        _Plan(type(self), depth, keys, k).start(self, seed)

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
        if cls.__init__ is not PctStrategy.__init__:  # a subclass that sets more up: call it
            return lambda seed: cls(seed, depth, keys, k)
        return _Plan(cls, depth, keys, k).make

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
