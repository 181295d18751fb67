"""Strategy ``pairs``: preemptions aimed at the scenario's cross-CPU conflicting pairs."""

from __future__ import annotations

import random

from . import Strategy, strategy


class PairsFactory:
    """``seed -> PairsStrategy`` for one scenario; ``profiling_runs`` is what profiling cost
    (schedules, counted as schedules by benchmarks/first_bug_pairs.py)."""

    def __init__(self, depth: int, keys: list[int], profile) -> None:
        self.depth = depth
        self.keys = keys
        self.profile = profile
        self.profiling_runs = profile.runs
        self.plan = Plan(profile.targets)

    def __call__(self, seed: int) -> "PairsStrategy":
        return PairsStrategy(seed, self.depth, self.keys, self.profile, self.plan)


class Plan:
    """Which target schedule n aims at: a fixed cycle, so that consecutive seeds (a stress
    run's schedules) aim at different targets instead of drawing with repeats.

    The targets' classes (ptsim/coverage.py, derive_targets) take turns in proportion to
    ``WEIGHTS`` (a smooth weighted round robin over one period of sum(WEIGHTS) schedules);
    the last slot of each period is a PCT schedule, the net for races that need more than one
    preemption or a fault the directed schedules do not draw. Within a class the targets come
    in their order (by tier, then rarest pair first) and wrap around."""

    # Class 0 (check-then-use windows on a table-linking entry: f read a pmd that another CPU
    # can rewrite and will use or act on it unchecked) and class 1 (f touched a table's
    # entries and will unlink the table while another CPU touches them) get three turns each
    # per period, class 2 (any other conflicting access) two, class 3 (before the first
    # conflict, after a lock) one, PCT one: 10 schedules, a divisor of 1,000,000. These
    # weights were chosen on the catalogue (benchmarks/first_bug_pairs.py, both stream bases):
    # the window that finds D1, D3, D4, D6, D7 and D12 is the first (often the only) of class
    # 0; D2's and D9's are in class 1; D5 and D8 have theirs in classes 0 and 2.
    WEIGHTS = (3, 3, 2, 1)
    PCT_WEIGHT = 1

    def __init__(self, targets: list) -> None:
        self.classes = [[t for t in targets if t.klass == k] for k in range(len(self.WEIGHTS))]
        weights = [w if c else 0 for w, c in zip(self.WEIGHTS, self.classes)]
        weights.append(self.PCT_WEIGHT)
        self.weights = weights
        total = sum(weights)
        current = [0] * len(weights)
        self.pattern: list[int] = []
        for _ in range(total):
            for c, w in enumerate(weights):
                current[c] += w
            c = max(range(len(weights)), key=lambda i: (current[i], -i))
            current[c] -= total
            self.pattern.append(c)
        # before[i][c]: how many of the first i slots of a period went to class c
        self.before = [[self.pattern[:i].count(c) for c in range(len(weights))]
                       for i in range(total)]

    def target(self, n: int):
        """The target of schedule ``n`` (its seed), or None for a PCT schedule."""
        total = len(self.pattern)
        slot = n % total
        c = self.pattern[slot]
        if c == len(self.classes):
            return None
        k = (n // total) * self.weights[c] + self.before[slot][c]
        targets = self.classes[c]
        return targets[k % len(targets)]


@strategy("pairs")
class PairsStrategy(Strategy):
    """Runs each CPU's agents alone, records each step's footprint, derives the cross-CPU pairs
    of conflicting steps (ptsim/coverage.py), and schedules preemptions just before them. Its
    profiling runs count as schedules.

    Rare pairs first: schedule n aims at one target (Plan), in the profile's order within each
    class. CPU f runs first, exactly as in its own profiling schedule (f whenever it can, else
    pending events, then the other CPUs lowest first), up to
    the choice where it is about to take the step the target names; there f drops to the
    lowest priority, so the other CPUs run, in a random order, until they finish or wait for
    f, and f goes on after them. That puts the others' conflicting steps inside the window
    the target names (right after f read a pointer to a page table, say), which a race
    between two accesses needs and which a random change point hits once in k choices.

    One schedule in ``sum(Plan.WEIGHTS) + 1`` (fewer where a class is empty) is PCT's
    instead (random CPU priorities, depth - 1 change points), drawn only at *site* choices,
    where the CPU about to run steps at a site (CPU, kernel function) of some pair (about
    ``site_steps`` of them, from the profile, not PCT's k of all choices). Injected faults
    fire at random with their probability in every schedule, as in PCT."""

    def __init__(self, seed: int, depth: int, keys: list[int], profile, plan: Plan) -> None:
        self.rng = rng = random.Random(seed)
        self.target = target = plan.target(seed)
        cpus = sorted(k for k in keys if k < 1000)
        others = [k for k in cpus if target is None or k != target.cpu]
        rng.shuffle(others)
        self.sites = profile.sites
        self.at_sites = 0
        self.change_points: dict[int, int] = {}
        if target is None:
            order = list(keys)
            rng.shuffle(order)
            self.prio = {key: depth + rank for rank, key in enumerate(order)}
            k = max(profile.site_steps, 1)
            count = min(depth - 1, k)
            self.change_points = dict(zip(sorted(rng.sample(range(1, k + 1), count)),
                                          range(depth - 1, 0, -1)))
            return
        # Until the preemption the order is the profiling schedule's (events before CPUs,
        # lowest key first), so that f reaches the target along the path the profile saw;
        # after it the others' order is this seed's.
        n = len(keys)
        self.prio = {key: 2 * n + (n - rank) for rank, key in enumerate(sorted(keys))}
        for key in cpus:
            if key != target.cpu:
                self.prio[key] = n - sorted(cpus).index(key)
        self.prio[target.cpu] = 4 * n
        self.after = {key: 1 + rank for rank, key in enumerate(reversed(others))}
        self.cpu = target.cpu
        self.occ: dict[str, int] = {}

    @classmethod
    def prepare(cls, engine, depth: int = 3):
        from ptsim.coverage import profile_pairs

        return PairsFactory(depth, engine.option_keys, profile_pairs(engine))

    def pick(self, options: list, current, step: int) -> int:
        prio = self.prio
        ranks = [prio[o.key] for o in options]
        best = ranks.index(max(ranks))
        option = options[best]
        if self.target is None:
            return self._pct(options, ranks, best, option)
        if option.key == self.cpu and not option.is_event:
            # Count as the profile did (SoloStrategy.picks): the times f was chosen in this
            # function; only until the preemption, after which self.cpu is None.
            func = option.func()
            n = self.occ.get(func, 0)
            if func == self.target.func and n == self.target.occ:
                self._preempt()
                ranks = [prio[o.key] for o in options]
                return ranks.index(max(ranks))
            self.occ[func] = n + 1
        return best

    def _preempt(self) -> None:
        prio = self.prio
        for key, rank in self.after.items():
            prio[key] = rank + 1
        prio[self.cpu] = 0
        self.cpu = None

    def _pct(self, options, ranks, best, option) -> int:
        if not option.is_event and (option.key, option.func()) in self.sites:
            self.at_sites += 1
            low = self.change_points.get(self.at_sites)
            if low is not None:
                self.prio[option.key] = ranks[best] = low
                best = ranks.index(max(ranks))
        return best

    def fault(self, p: float, current, step: int) -> int:
        return 1 if self.rng.random() < p else 0
