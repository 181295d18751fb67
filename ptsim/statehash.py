"""explore's state cache: prune a schedule when it reaches a state already explored.

A state is everything the rest of a schedule depends on: the machine (frames, tables, locks,
TLBs, RCU, pending IPIs, the step count that max_steps counts), where every CPU is in its code
(each coroutine of its task: position, locals and value stack, so a half-finished loop or
expression is part of it), and which CPU asked the scheduler (the non-preempting default
follows it). Fields that only feed reports (who allocated or freed a frame, the per-object
history, hazards already noted, when an IPI was sent) are left out: two states that differ only
there have the same futures.

Sound with explore's depth-first order: when a state comes back, every continuation of its
first visit that stays within the preemption bound has been explored already (the branches
below a state are deeper than the branch that brought the search back to it, so they were
taken first); if it comes back with no more preemptions spent than before, its future holds
nothing new. A state that cannot be read exactly (a value of a kind this module does not know,
a CPU task that is running) is never cached, so it is never pruned.

It needs every CPU parked at the moment of the choice, which the explorer's scheduler provides
(engine.ParkingSched): a running coroutine's value stack cannot be read.
"""

from __future__ import annotations

import gc
import hashlib
import pickle
import types
from collections import deque

from .strategies import Pruned

# Model classes say themselves which fields are not state and how they are named where a CPU's
# locals refer to them (__state_skip__, __state_ref__, __state_ref_always__: see
# kernel_model/snapshot.py); so do the scheduler, the engine and the strategies.


class Unreadable(Exception):
    """A part of the state this module cannot canonicalise: the state is not cached."""


def _fields(obj) -> list[tuple[str, object]]:
    names = list(getattr(obj, "__dict__", {}))
    for klass in type(obj).__mro__:
        names += [s for s in getattr(klass, "__slots__", ()) if s != "__dict__"]
    if not names:
        raise Unreadable(type(obj).__name__)
    skip = getattr(type(obj), "__state_skip__", ())
    out = [(n, getattr(obj, n, None)) for n in set(names) if n not in skip]
    view = getattr(type(obj), "__state_view__", None)
    if view is not None:
        out += view(obj)
    return sorted(out)


def _plain(items) -> bool:
    """Only ints (or only strs): kept as they are, sorted where order does not matter."""
    kinds = set(map(type, items))
    return kinds == {int} or kinds == {str}


class _Canon:
    """Turns a piece of state into nested tuples of plain values. Model objects that the machine
    state already holds (CPUs, the machine, the scheduler) stand for themselves by name when a
    CPU's locals refer to them."""

    def __init__(self, refs: bool = False) -> None:
        self.active: set[int] = set()
        # In a CPU's locals, objects whose content the machine state already holds stand for
        # themselves by name (a task refers to them; their content is hashed once).
        self.refs = refs

    def __call__(self, obj):
        if obj is None or type(obj) in (int, str, bool, float, bytes):
            return obj
        kind = type(obj).__name__
        ref = getattr(type(obj), "__state_ref__", None)
        if ref is not None and (self.refs or getattr(type(obj), "__state_ref_always__", False)):
            return ref(obj)
        if isinstance(obj, (types.FrameType, types.CodeType)):
            return kind  # a frame's own code and frame object: position is read separately
        if isinstance(obj, (types.CoroutineType, types.GeneratorType)):
            raise Unreadable(f"a {kind} held as a value")  # its progress is state we cannot see
        if isinstance(obj, (types.FunctionType, types.MethodType, types.BuiltinFunctionType)):
            return self._callable(obj)
        if isinstance(obj, range):  # a loop's range, held by its frame
            return ("range", obj.start, obj.stop, obj.step)
        if isinstance(obj, types.CellType):  # a closure variable of a parked frame
            try:
                return ("cell", self(obj.cell_contents))
            except ValueError:
                return ("cell",)
        if type(obj).__module__.startswith("trio"):
            return kind  # trio's own task plumbing (task_status, cancel scopes): no model state
        key = id(obj)
        if key in self.active:
            raise Unreadable(f"a cycle through {kind}")
        self.active.add(key)
        try:
            if isinstance(obj, (tuple, list, deque)):
                if _plain(obj):  # frame arrays and table entries: the bulk of the state
                    return (kind, tuple(obj))
                return (kind, tuple(self(x) for x in obj))
            if isinstance(obj, dict):
                if _plain(obj):
                    keys = sorted(obj)
                else:
                    keys = sorted(obj, key=lambda k: repr(self(k)))
                return (kind, tuple((self(k), self(obj[k])) for k in keys))
            if isinstance(obj, (set, frozenset)):
                if _plain(obj):
                    return (kind, tuple(sorted(obj)))
                return (kind, tuple(sorted((self(x) for x in obj), key=repr)))
            if hasattr(obj, "__next__") and hasattr(obj, "__reduce__"):
                return (kind, self(obj.__reduce__()[1:]))  # iterators: what is left, where
            return (kind, tuple((name, self(value)) for name, value in _fields(obj)))
        finally:
            self.active.discard(key)

    def _callable(self, fn):
        if isinstance(fn, types.MethodType):
            return ("method", fn.__func__.__qualname__, self(fn.__self__))
        if isinstance(fn, types.FunctionType):
            cells = tuple(self(c) for c in fn.__closure__ or ())  # empty cells too
            return ("fn", fn.__module__, fn.__qualname__, cells)
        return ("builtin", getattr(fn, "__qualname__", repr(fn)))


def machine_state(m, canon: _Canon, refs: _Canon) -> tuple:
    fields = [(name, canon(value)) for name, value in _fields(m) if name != "cpus"]
    cpus = tuple(tuple((n, refs(v)) for n, v in _fields(c) if n != "m") for c in m.cpus)
    # lockdep's graph decides future lock-order reports; who first took each edge does not.
    deps = tuple(sorted(m.lock_deps))
    return (tuple(fields), cpus, deps)


def task_state(task, canon: _Canon) -> tuple:
    """A parked CPU task: for every coroutine (or generator-based coroutine) of its await chain,
    its code, the instruction it waits at, and its locals and value stack in frame order (gc
    sees them while it is suspended). trio's own frames at the bottom are the same for every
    parked task and end the walk."""
    chain = []
    obj = task.coro
    while obj is not None:
        if isinstance(obj, types.CoroutineType):
            frame, running, awaited = obj.cr_frame, obj.cr_running, obj.cr_await
        elif isinstance(obj, types.GeneratorType):
            frame, running, awaited = obj.gi_frame, obj.gi_running, obj.gi_yieldfrom
        else:
            chain.append(canon(obj))
            break
        if frame is None:
            break  # finished
        if running:
            raise Unreadable("a running task")
        if frame.f_globals.get("__name__", "").startswith("trio"):
            break
        values = tuple(canon(v) for v in gc.get_referents(obj)
                       if v is not awaited and not isinstance(v, types.FrameType))
        chain.append((frame.f_code.co_qualname, frame.f_lasti, values))
        obj = awaited
    return tuple(chain)


def fingerprint(sched, cur) -> bytes:
    refs = _Canon(refs=True)
    tasks = tuple(None if t is None or sched.cpus[i].idle else task_state(t, refs)
                  for i, t in enumerate(sched.tasks))
    state = (machine_state(sched.m, _Canon(), refs), tasks, None if cur is None else cur.id)
    return hashlib.blake2b(pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL),
                           digest_size=16).digest()


class StateCache:
    """States seen so far, with the fewest preemptions spent on reaching each.

    Hashing a state costs about as much as a few hundred steps, so the cache pays only where
    states come back often, and with partial-order reduction most branches that would come back
    to a known state are never taken. Two counts decide, never time, so that the same command
    explores the same schedules on any machine:

    - the bound: the command line turns the cache on from ``FROM_BOUND`` preemptions. On the
      catalogue at K = 2 the cached search was 2-5 times slower than the plain one (hit rates
      of 7-16 %), on D1 at K = 4 as fast, at K = 5 and 6 1.6 and 2.6 times faster;
    - its own hit rate: after ``PROBE`` visits it stays on only if at least one visit in
      ``PAYS_EVERY`` was a hit; otherwise it turns itself off for the rest of the search
      (plain depth-first search from there on, which is always sound).

    ``bound`` None (the API's and the tests' explicit caches) skips the first rule."""

    PROBE = 300
    PAYS_EVERY = 20
    FROM_BOUND = 5

    def __init__(self, bound: int | None = None) -> None:
        # state -> the visits that explored it: (preemptions spent, the CPUs asleep there)
        self.seen: dict[bytes, list[tuple[int, frozenset]]] = {}
        self.hits = 0
        self.visits = 0
        self.unreadable = 0
        self.active = bound is None or bound >= self.FROM_BOUND

    def visit(self, strategy, cont) -> None:
        """GuidedStrategy's on_point hook: called before each choice past the prefix.

        With partial-order reduction a state is a hit only if an earlier visit spent no more
        preemptions and had no CPU asleep that is awake now: a sleeping CPU's step was not
        explored below that visit (an equivalent schedule elsewhere covered it), so the
        earlier visit covers this one only if the same steps are asleep here too (Godefroid's
        stateful sleep sets)."""
        if not self.active:
            return
        self.visits += 1
        if self.visits == self.PROBE and self.hits * self.PAYS_EVERY < self.visits:
            self.active = False
            return
        try:
            key = fingerprint(strategy.sched, strategy.cur)
        except Unreadable:
            self.unreadable += 1
            return
        spent = strategy.preemptions
        asleep = strategy.asleep() if strategy.reduce else frozenset()
        visits = self.seen.get(key)
        if visits is None:
            self.seen[key] = [(spent, asleep)]
            return
        for before, slept in visits:
            if before <= spent and slept <= asleep:
                self.hits += 1
                raise Pruned()
        # Keep only the visits this one does not cover.
        visits[:] = [(b, z) for b, z in visits if not (spent <= b and asleep <= z)]
        visits.append((spent, asleep))


def terminal_hash(m, bug_kind: str | None = None) -> bytes:
    """A finished schedule's final state (and the bug it ended on): two schedules that differ
    only in the order of independent steps end in the same one, which is how the tests check
    that partial-order reduction loses no outcome."""
    refs = _Canon(refs=True)
    state = (machine_state(m, _Canon(), refs), bug_kind)
    return hashlib.blake2b(pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL),
                           digest_size=16).digest()
