"""Systematic exploration: every schedule with at most K preemptions, depth first.

Stateless model checking in the manner of CHESS (Musuvathi and Qadeer, PLDI 2007): a schedule is
its list of choices; each run follows a prefix and then the non-preempting default
(GuidedStrategy), and every choice point past the prefix becomes a branch point for the choices
not taken, as long as the preemptions it costs stay within the bound (guided.cost()). An IPI
that a CPU could take now is taken at once, as the hardware takes it at the next instruction
boundary: running any step while it waits costs one preemption (a delay). Otherwise switching
to another CPU when the current one could have continued costs one, and so does letting a
grace period end ahead of it; the choice of who runs after a CPU blocks or finishes, and the
outcome of an injected fault, cost none. Exploring deepest branch points first makes it a
depth-first search, which the state cache relies on (see StateCache).
"""

from __future__ import annotations

from dataclasses import dataclass

from ptsim.kernel_model.footprint import conflict

from .engine import Engine
from .sched import trio_run
from .strategies import Pruned
from .strategies.guided import NO_SLEEP, GuidedStrategy, SleepBlocked
from .strategies.guided import cost as step_cost


@dataclass
class Exploration:
    complete: bool = False  # every schedule within the bound was explored
    schedules: int = 0  # schedules run to their end (or to their bug)
    pruned: int = 0  # schedules cut short at a state already explored
    reduced: int = 0  # branches not taken: an equivalent schedule covers them (sleep sets)
    steps: int = 0


DEFAULT_FAULTS = 2


class Node:
    """What the branches of one choice point share: the sleep set they start from, and, at a
    free choice (no CPU could go on, so every option costs nothing), the IPI deliveries already
    explored there, which later siblings put to sleep (see the README's exploration section for
    why only these, and the continuing CPU's step, may sleep)."""

    __slots__ = ("base", "done", "free", "gp", "raced")

    def __init__(self, base: dict, free: bool = False) -> None:
        self.base = base
        self.done: dict = {}
        self.free = free
        # Where the run took an eager event (a grace period's end) at this free choice: its
        # step and footprint. The CPUs' branches here are then deferred: they are run only if
        # some schedule below the event's branch has a step that conflicts with it after it
        # (``raced``: races_after(), checked in search() for every run below it).
        self.gp: tuple[int, dict] | None = None
        self.raced = False

    def sleep(self) -> dict:
        return {**self.base, **self.done} if self.done else self.base


ROOT_NODE = Node(NO_SLEEP)


class Parent:
    """One run, as its branches see it: its choice points and step footprints, and, per CPU
    that preempted the continuing CPU at some point of it, the last such branch that ended
    blocked without adding a branch of its own (a *barren* branch): the footprints of the
    preempting CPU's steps there.

    If preempting A at point j by B let B run steps b1..bk and then ended because A was asleep,
    and A's steps between an earlier point i and j touch nothing b1..bk touch, then preempting A
    at i runs the same b1..bk (they read nothing A wrote in between) and ends the same way (A's
    step at i, asleep, touches nothing they touch either): the branch at i is skipped without
    running it. Depth-first order runs the branch at j first."""

    __slots__ = ("strategy", "barren")

    def __init__(self, strategy: GuidedStrategy) -> None:
        self.strategy = strategy
        self.barren: dict = {}  # B's key -> (point j, A's key, B's footprints)

    def note_barren(self, i: int, run: GuidedStrategy) -> None:
        """The branch at point i ended blocked, adding no branch: remember it if only the
        preempting CPU ran, every step of it precise, until the preempted CPU was due."""
        s = self.strategy
        cont = s.points[i][1]
        if run.blocked is None or cont is None:
            return
        a_key, b_key = s.keys[i][cont], run.keys[i][run.points[i][2]]
        end, who = run.blocked
        if who != a_key:
            return
        fps = run.footprints
        b_fps = []
        for n in range(run.steps[i] + 1, end):
            fp = fps.steps.get(n)
            if fp is None or fps.cpus.get(n) != b_key:
                return
            b_fps.append(fp)
        self.barren[b_key] = (i, a_key, b_fps)

    def skips(self, i: int, alt: int, node: Node) -> bool:
        """Would the branch taking option ``alt`` at point i end blocked and barren, as the
        same CPU's branch at a later point did?"""
        s = self.strategy
        cont = s.points[i][1]
        if cont is None:
            return False
        b_key, a_key = s.keys[i][alt], s.keys[i][cont]
        seen = self.barren.get(b_key)
        if seen is None or a_key not in node.base:
            return False
        j, a_then, b_fps = seen
        if j <= i or a_then != a_key:
            return False
        for p in range(i, j):  # A went on at every choice in between
            n, c, chosen, _ = s.points[p]
            if c is None or chosen != c or s.keys[p][c] != a_key:
                return False
        fps = s.footprints
        for n in range(s.steps[i] + 1, s.steps[j] + 1):  # A's steps from i up to j
            fp = fps.steps.get(n)
            if fp is None or fps.cpus.get(n) != a_key or any(conflict(fp, b) for b in b_fps):
                return False
        self.barren[b_key] = (i, a_key, b_fps)
        return True


def races_after(run: GuidedStrategy, gp: tuple[int, dict]) -> bool:
    """Does a step of ``run`` after the eager event's step ``gp[0]`` conflict with it (an
    opaque step does)? Up to the step it blocked at, if it did (that one never ran). A run
    that ended on a bug counts as a race: ending there, it leaves the event's later place
    (after the bug, which is never reached) to the deferred branches."""
    start, fp = gp
    if run.sched.bug is not None:
        return True
    fps = run.footprints
    last = run.blocked[0] - 1 if run.blocked is not None else run.sched.m.step
    steps = fps.steps
    for n in range(start + 1, last + 1):
        other = steps.get(n)
        if other is None or conflict(other, fp):
            return True
    return False


def branches(strategy: GuidedStrategy, prefix_len: int, bound: int,
             fault_bound: int | None = None) -> tuple[list[tuple], int]:
    """The branches this run adds to the search, each (prefix, Node), and how many it
    leaves out as asleep: at every choice point past its own prefix, each choice not taken whose
    preemption cost stays within the bound, and, at a fault injection, firing it only while
    fewer than ``fault_bound`` faults fired before. A choice whose CPU is asleep there is left
    out (an equivalent schedule covers it). Deeper points come last, so a LIFO stack explores
    them first."""
    points, faults, prompt = strategy.points, strategy.faults, strategy.prompt
    reduce = strategy.reduce
    taken = [p[2] for p in points]
    out = []
    reduced = 0
    parent = Parent(strategy) if reduce else None
    for i in range(prefix_len, len(points)):
        n, cont, chosen, before = points[i]
        if reduce:
            asleep = strategy.sleeps[i]
            keys = strategy.keys[i]
            if strategy.echoes(i):
                continue
        alts = []
        for alt in range(n - 1, -1, -1):
            if alt == chosen:
                continue
            cost = before + step_cost(cont, alt, prompt[i])
            if cost > bound:
                continue
            if fault_bound is not None and faults[i] is not None \
                    and alt == 1 and faults[i] + 1 > fault_bound:
                continue
            if reduce and asleep and keys[alt] in asleep:
                reduced += 1
                continue
            alts.append(alt)
        if not alts:
            continue  # (most points past the bound: no node, no sleep set for no branch)
        node = ROOT_NODE
        if reduce:
            node = Node(strategy.sleep_after(i), free=cont is None and asleep is not None)
            if node.free:
                fp = strategy.event_step(i, chosen)
                if fp is not None:
                    node.done[keys[chosen]] = fp
                    if strategy.eager.get(i) == chosen:
                        node.gp = (strategy.steps[i] + 1, fp)
                        node.raced = races_after(strategy, node.gp)
                        strategy.watching.append((i, node))
        before_i = tuple(taken[:i])
        for alt in alts:
            out.append((before_i + (alt,), node, parent))
    return out, reduced


def _retire(strategy: GuidedStrategy) -> None:
    """The run is over and its branches are on the stack: what its children read of it (points,
    footprints, sites) stays, its machine goes. Left reachable from the run, which lives as long
    as its subtree is searched, every machine was traversed by the cyclic GC in each collection
    of its generation (its tables and frame lists: thousands of entries each): 2.4 of D9's first
    15 s of search, 1.1 s once released (it is then freed by reference counting here)."""
    sched = strategy.sched
    if sched is None:
        return
    m = sched.m
    strategy.end_step = m.step  # how far it ran (sched.m.step while it had its machine)
    m.release()
    if m.fp is not None:
        m.fp.watch = None  # coverage's site hook holds the machine's CPUs (SiteNotes)
    strategy.sched = None


async def search(engine: Engine, preemptions: int, max_schedules: int | None = None,
                 on_result=None, cache=None, faults: int | None = None,
                 reduce: bool = False, on_end=None,
                 found: Exploration | None = None) -> Exploration:
    """Depth-first over every schedule with at most ``preemptions`` preemptions, inside the
    caller's trio run (shrink's bounded searches run here too).

    ``on_result(index, result)`` sees each finished schedule as it ends (stress's Tally) and
    stops the search by returning True; ``cache`` is a StateCache, or None to explore without
    state hashing; ``faults`` bounds the injected faults that fire in one schedule (None: no
    bound); ``reduce`` turns on partial-order reduction (sleep sets); ``on_end(machine,
    result)`` sees each finished schedule's final machine (the tests' terminal states).
    ``found`` is filled in as the search goes (the caller keeps its counts when on_result ends
    the search by raising, as --time does)."""
    found = Exploration() if found is None else found
    stack: list[tuple[tuple[int, ...], Node, Parent | None]] = [((), ROOT_NODE, None)]
    while stack:
        if max_schedules is not None and found.schedules >= max_schedules:
            return found
        prefix, node, parent = stack.pop()
        if node.gp is not None and not node.raced:
            found.reduced += 1  # deferred, and nothing below the event's branch raced with it
            continue
        if parent is not None and parent.skips(len(prefix) - 1, prefix[-1], node):
            found.reduced += 1
            continue
        hook = cache.visit if cache is not None and cache.active else None
        strategy = GuidedStrategy(prefix, hook, node.sleep(), reduce)
        if parent is not None:  # its steps up to the branch point are the parent run's
            strategy.lineage = (parent.strategy, parent.strategy.steps[len(prefix) - 1])
            # the eager events it runs after, as its parent did: those before its branch point
            strategy.watching = [(j, n) for j, n in parent.strategy.watching
                                 if j < len(prefix) - 1 and not n.raced]
        pruned = False
        try:
            result = await engine.run_schedule(strategy)
        except SleepBlocked:
            found.reduced += 1
            result = None
        except Pruned:
            found.pruned += 1
            result = None
            pruned = True  # its future was explored elsewhere, maybe not below the event
        for _j, watched in strategy.watching:
            if not watched.raced:
                watched.raced = pruned or races_after(strategy, watched.gp)
        if result is not None:
            found.steps += result.steps
            found.schedules += 1
            if on_end is not None:
                on_end(strategy.sched.m, result)
            if on_result is not None and on_result(found.schedules - 1, result):
                return found  # the caller has what it wanted (shrink's search)
        if node.free and len(strategy.points) >= len(prefix):
            # This branch fired an IPI delivery at a free choice: its later siblings sleep it.
            fp = strategy.event_step(len(prefix) - 1, prefix[-1])
            if fp is not None:
                node.done[strategy.keys[len(prefix) - 1][prefix[-1]]] = fp
        more, reduced = branches(strategy, len(prefix), preemptions, faults)
        found.reduced += reduced
        if parent is not None and result is None and not more and strategy.blocked:
            parent.note_barren(len(prefix) - 1, strategy)
        stack.extend(more)
        _retire(strategy)
    found.complete = True
    return found


def explore(engine: Engine, preemptions: int, max_schedules: int | None = None,
            on_result=None, cache=None, faults: int | None = DEFAULT_FAULTS,
            reduce: bool = True, on_end=None, found: Exploration | None = None) -> Exploration:
    """search() in a trio run of its own; at most ``faults`` injected faults fire per schedule
    (None: no bound)."""
    return trio_run(search, engine, preemptions, max_schedules, on_result, cache, faults,
                    reduce, on_end, found)
