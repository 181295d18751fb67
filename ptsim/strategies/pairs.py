"""Strategy ``pairs``: PCT whose change points fall where the CPUs' steps conflict."""

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

    def __call__(self, seed: int) -> "PairsStrategy":
        return PairsStrategy(seed, self.depth, self.keys, self.profile)


@strategy("pairs")
class PairsStrategy(Strategy):
    """Runs each CPU's agents alone, records each step's footprint, derives the cross-CPU pairs
    of conflicting steps (ptsim/coverage.py), and schedules preemptions just before them. Its
    profiling runs count as schedules.

    The schedule is PCT's (random CPU priorities, depth - 1 change points where the CPU about to
    run drops to the lowest priorities), except that change points are counted only at *site*
    choices: where the CPU about to run is about to step at a site (CPU, kernel function) of
    some conflicting pair. PCT draws its change points among all k choices of a schedule; a race
    needs its preemption at one of the few choices just before a conflicting step, and drawing
    among those (about ``site_steps`` of them, from the profile, without PCT's calibration runs)
    raises the chance of each change point landing there by k / site_steps."""

    def __init__(self, seed: int, depth: int, keys: list[int], profile) -> None:
        self.rng = rng = random.Random(seed)
        order = list(keys)
        rng.shuffle(order)
        self.prio = {key: depth + rank for rank, key in enumerate(order)}
        self.sites = profile.sites
        k = max(profile.site_steps, 1)
        count = min(depth - 1, k)
        self.change_points = dict(zip(sorted(rng.sample(range(1, k + 1), count)),
                                      range(depth - 1, 0, -1)))
        self.at_sites = 0
        self.m = None

    @classmethod
    def prepare(cls, engine, depth: int = 3):
        from ptsim.coverage import profile_pairs

        return PairsFactory(depth, engine.option_keys, profile_pairs(engine))

    def attach(self, sched) -> None:
        self.m = sched.m

    def pick(self, options: list, current, step: int) -> int:
        prio = self.prio
        keys = [o.key for o in options]
        best = max(range(len(options)), key=lambda i: prio[keys[i]])
        option = options[best]
        if not option.is_event and (option.key, option.func()) in self.sites:
            self.at_sites += 1
            low = self.change_points.get(self.at_sites)
            if low is not None:
                prio[keys[best]] = low
                best = max(range(len(options)), key=lambda i: prio[keys[i]])
        return best

    def fault(self, p: float, current, step: int) -> int:
        return 1 if self.rng.random() < p else 0
