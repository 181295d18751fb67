"""Schedulers' choice policies: random, PCT, replay, and the guided policy of explore/shrink.

A strategy answers two questions: which of the enabled options runs next (a CPU step, an IPI
delivery, a grace-period end) and whether a fault with probability p fires. The engine records
every answer that was a real choice, so any run can be replayed from its choices alone.
"""

from __future__ import annotations

import random


def option_key(opt) -> int:
    """A stable identity for PCT priorities: CPUs, then IPI delivery per CPU, then RCU."""
    if type(opt) is tuple:
        return 1000 + opt[1].id if opt[0] == "ipi" else 2000
    return opt.id


class RandomStrategy:
    name = "random"

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def pick(self, opts: list) -> int:
        return self.rng.randrange(len(opts))

    def fault(self, p: float) -> int:
        return 1 if self.rng.random() < p else 0


class PctStrategy:
    """Probabilistic concurrency testing (Burckhardt et al., ASPLOS 2010).

    Every option source gets a random distinct priority >= depth; the highest-priority enabled
    option runs. At d-1 change points, drawn uniformly from the first k steps that had a real
    choice, the option about to run drops to priority d-i. k comes from a calibration run.
    """

    name = "pct"

    def __init__(self, seed: int, depth: int, keys: list[int], k: int) -> None:
        self.rng = random.Random(seed)
        order = list(keys)
        self.rng.shuffle(order)
        self.prio = {key: depth + rank for rank, key in enumerate(order)}
        k = max(k, 1)
        count = min(depth - 1, k)
        self.change_points = dict(zip(sorted(self.rng.sample(range(1, k + 1), count)),
                                      range(depth - 1, 0, -1)))
        self.steps = 0

    def pick(self, opts: list) -> int:
        self.steps += 1
        prio = self.prio
        keys = [option_key(o) for o in opts]
        best = max(range(len(opts)), key=lambda i: prio[keys[i]])
        low = self.change_points.get(self.steps)
        if low is not None:
            prio[keys[best]] = low
            best = max(range(len(opts)), key=lambda i: prio[keys[i]])
        return best

    def fault(self, p: float) -> int:
        return 1 if self.rng.random() < p else 0


class Divergence(Exception):
    """A replayed choice is not possible at this point: the token does not fit the run."""


class ReplayStrategy:
    name = "replay"

    def __init__(self, choices: list[int]) -> None:
        self.choices = choices
        self.pos = 0
        self.step = 0  # set by the engine before each pick, for messages

    def _next(self, limit: int, what: str) -> int:
        if self.pos >= len(self.choices):
            raise Divergence(f"the token's choices end before step {self.step} ({what})")
        value = self.choices[self.pos]
        if value >= limit:
            raise Divergence(f"choice {self.pos} ({value}) is impossible at step {self.step}: "
                             f"{what} has only {limit} options")
        self.pos += 1
        return value

    def pick(self, opts: list) -> int:
        return self._next(len(opts), "the scheduler")

    def fault(self, p: float) -> int:
        return self._next(2, "a fault injection")

    def leftover(self) -> int:
        return len(self.choices) - self.pos


class CountingStrategy(RandomStrategy):
    """A PCT calibration run: a random schedule that counts its real choices."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.count = 0

    def pick(self, opts: list) -> int:
        self.count += 1
        return super().pick(opts)


class Pruned(Exception):
    """explore: the schedule reached a state whose every continuation within the preemption
    bound was already explored; the rest of it would repeat known schedules."""


class GuidedStrategy:
    """explore and shrink: follow a prefix of choices, then never preempt.

    After the prefix the CPU that could continue does (a preemption is a switch away from it);
    when it cannot (it blocked, finished, or nothing has run yet) the first option runs, and an
    injected fault does not fire. Every choice point is recorded as (number of options, index of
    the CPU that could continue or None, index chosen, preemptions before it), which is what
    the explorer branches on. ``on_point`` (explore's state cache) is called before each choice
    past the prefix and may raise Pruned.
    """

    name = "guided"

    def __init__(self, prefix=(), on_point=None) -> None:
        self.prefix = prefix
        self.on_point = on_point
        self.parks = on_point is not None  # the state cache needs every CPU parked (ParkingSched)
        self.sched = None  # set by the scheduler
        self.points: list[tuple[int, int | None, int, int]] = []
        self.decisions: list = []  # what each choice chose: an option_key, or ("fault", 0|1)
        self.preemptions = 0
        self.cur = None  # the CPU that asked the scheduler (set by Sched before pick())
        self.step = 0

    def _wanted(self, pos: int, keys: list, default: int) -> int:
        """The index to take at choice ``pos`` (past the prefix: the default)."""
        if pos < len(self.prefix):
            idx = self.prefix[pos]
            if idx >= len(keys):
                raise Divergence(f"choice {pos} ({idx}) is impossible at step {self.step}: "
                                 f"only {len(keys)} options")
            return idx
        return default

    def _choose(self, keys: list, cont: int | None) -> int:
        pos = len(self.points)
        default = 0 if cont is None else cont
        if pos >= len(self.prefix) and self.on_point is not None:
            self.on_point(self, cont)
        idx = self._wanted(pos, keys, default)
        self.points.append((len(keys), cont, idx, self.preemptions))
        self.decisions.append(keys[idx])
        if cont is not None and idx != cont:
            self.preemptions += 1
        return idx

    def pick(self, opts: list) -> int:
        cur = self.cur
        cont = next((i for i, o in enumerate(opts) if o is cur), None)
        return self._choose([option_key(o) for o in opts], cont)

    def fault(self, p: float) -> int:
        return self._choose([("fault", 0), ("fault", 1)], None)


class SteeredStrategy(GuidedStrategy):
    """shrink: steered by decisions (which CPU or event goes, whether a fault fires) rather than
    option indices, so that dropping or changing one decision leaves the others meaning what
    they meant. A decision that is not possible where it falls, or None, takes the
    non-preempting default; past the list, the default."""

    def __init__(self, decisions: list) -> None:
        super().__init__(())
        self.steer = decisions

    def _wanted(self, pos: int, keys: list, default: int) -> int:
        want = self.steer[pos] if pos < len(self.steer) else None
        return keys.index(want) if want is not None and want in keys else default
