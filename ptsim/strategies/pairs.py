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

    def __call__(self, seed: int) -> "PairsStrategy":
        return PairsStrategy(seed, self.depth, self.keys, self.profile)


@strategy("pairs")
class PairsStrategy(Strategy):
    """Runs each CPU's agents alone, records each step's footprint, derives the cross-CPU pairs
    of conflicting steps, and schedules preemptions just before them, rare pairs first. Its
    profiling runs count as schedules.

    Seed s targets pair (s // 2) mod N of the N pairs, rarest first, in one of its two orders
    (s mod 2). To make B's site run before A's (the order the profile did not show), the CPU
    of A is preempted just before it steps in A's function for the occurrence profiling saw,
    and the CPU of B runs on until it has stepped at B's site; then A's CPU goes first again.
    Around that the schedule is PCT's: random priorities (from the seed) and, at depth 3 or
    more, a random priority change point in half the schedules."""

    def __init__(self, seed: int, depth: int, keys: list[int], profile) -> None:
        from ptsim.coverage import kind_of

        self.kind_of = kind_of
        self.rng = rng = random.Random(seed)
        order = list(keys)
        rng.shuffle(order)
        self.top = depth + len(order)
        self.prio = {key: depth + rank for rank, key in enumerate(order)}
        self.phase = 2  # 0: before the preemption, 1: the other CPU runs to its site, 2: done
        self.fps = None
        self.m = None
        pairs = profile.pairs
        if pairs:
            n = len(pairs)
            pair = pairs[(seed // 2) % n]
            ca, fa, cb, fb, kind = pair.ident
            oa, ob = pair.instances[rng.randrange(len(pair.instances))]
            if seed % 2 == 0:  # B's site first: preempt A's CPU before its site
                self.x, self.fx, self.ox, self.y, self.fy, self.oy = ca, fa, oa, cb, fb, ob
            else:
                self.x, self.fx, self.ox, self.y, self.fy, self.oy = cb, fb, ob, ca, fa, oa
            self.kind = kind
            self.phase = 0
        self.checked = 0  # footprints read up to this step (phase 1)
        self.change = None
        if depth >= 3 and rng.random() < 0.5:
            self.change = rng.randrange(1, 2 * max(len(keys), 1) * 8)
        self.picks = 0

    @classmethod
    def prepare(cls, engine, depth: int = 3):
        from ptsim.coverage import profile_pairs

        return PairsFactory(depth, engine.option_keys, profile_pairs(engine))

    def attach(self, sched) -> None:
        from ptsim.coverage import SiteFootprints

        self.m = sched.m
        if self.phase != 2:
            self.fps = sched.m.fp = SiteFootprints(sched.m)

    def _best(self, options: list) -> int:
        prio = self.prio
        return max(range(len(options)), key=lambda i: prio[options[i].key])

    def _y_done(self, step: int) -> bool:
        """Has Y stepped at its site (its function, an object of the pair's kind) since the
        preemption?"""
        fps = self.fps
        done = False
        for n in range(self.checked + 1, step + 1):
            if fps.cpus.get(n) == self.y and fps.funcs.get(n) == self.fy \
                    and fps.ords.get(n, 0) >= self.oy:
                fp = fps.steps.get(n)
                if fp is not None and any(self.kind_of(k) == self.kind for k in fp):
                    done = True
        self.checked = step
        return done

    def pick(self, options: list, current, step: int) -> int:
        self.picks += 1
        prio = self.prio
        if self.change is not None and self.picks == self.change:
            prio[options[self._best(options)].key] = 0
        best = self._best(options)
        if self.phase == 0:
            opt = options[best]
            if opt.key == self.x:
                cpu = self.m.cpus[self.x]
                if cpu.func() == self.fx and self.fps.counts.get((self.x, self.fx), 0) >= self.ox:
                    prio[self.x] = 1  # preempted just before its site
                    prio[self.y] = self.top + 1
                    self.phase = 1
                    self.checked = step
                    best = self._best(options)
        elif self.phase == 1:
            if self._y_done(step) or all(o.key != self.y for o in options):
                prio[self.x] = self.top + 2  # back first, right after Y's site
                prio[self.y] = 0  # and Y waits until the rest has run
                self.phase = 2
                best = self._best(options)
        return best

    def fault(self, p: float, current, step: int) -> int:
        return 1 if self.rng.random() < p else 0
