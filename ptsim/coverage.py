"""The race surface of a scenario: its cross-CPU pairs of conflicting steps, and how much of it
a run of many schedules exercised.

A *site* is where a step happens: (CPU, the innermost kernel function it runs in). Two steps of
different CPUs *conflict* when their footprints (kernel_model/footprint.py) name an object one
of them writes; the *pair* is then (cpu A, function A, cpu B, function B, object kind), with
A's CPU the lower. The object kind is the footprint key's first field ("e" an entry, "t" a whole
table, "k" a folio refcount, ...), and for a lock "l:" plus its name with pfns blanked: pfns
of objects allocated during a schedule differ from schedule to schedule, sites do not.

``profile_pairs(engine)`` finds a scenario's pairs: one profiling schedule per CPU, in which
that CPU runs alone, as far as it can, before the others start (each then runs alone in turn,
lowest first); every step's footprint and site is recorded, and every two conflicting steps of
different CPUs in one profiling schedule make a pair. Opaque steps (those that count as
touching everything) make none. The ``pairs`` strategy steers schedules towards them and
stress and explore report how many were seen in both orders (CoverageTracker):

    {"pairs": N, "both_orders": M, "one_order": K}

N pairs were found by profiling; M of them were exercised in both orders by some schedule
(A's site touched the object before B's conflicting site did, and in another schedule, or
the same one, the other way round), K in one order only.

The profile also names the ``pairs`` strategy's *targets* (``derive_targets``): the points
where a CPU, running first and alone as in its own profiling schedule, is preempted.
"""

from __future__ import annotations

import re
import sys
import weakref
from bisect import bisect_left
from dataclasses import dataclass, field
from itertools import islice

from ptsim.kernel_model.footprint import Footprints, upto_count

from .sched import trio_run
from .strategies import Strategy
from .strategies import pairs as _pairs  # noqa: F401  (registers the ``pairs`` strategy)


class SiteFootprints(Footprints):
    """Footprints that also note each precise step's site: ``funcs[step]`` the kernel function
    its CPU runs in and ``ords[step]`` how many precise steps that CPU began in that function
    before it (the occurrence the ``pairs`` strategy aims at)."""

    __slots__ = ("m", "funcs", "ords", "counts", "locks", "acc")

    def __init__(self, m, locks: bool = False) -> None:
        super().__init__()
        self.m = m
        self.acc: Accesses | None = None  # explore's record of the run (CoverageTracker.record)
        self.funcs: dict[int, str] = {}
        self.ords: dict[int, int] = {}
        self.counts: dict[tuple[int, str], int] = {}
        # step -> held_locks() of its CPU as the step began (profiling schedules only)
        self.locks: dict[int, frozenset] | None = {} if locks else None

    def event(self, step: int, key: int, background: bool = False) -> None:
        if background:  # a grace period's end: no site, and no pair (see Footprints.event)
            self.cur = -1
            return
        super().event(step, key)

    def begin(self, step: int, cpu: int) -> None:
        super().begin(step, cpu)
        note_site(self, self.m, step, cpu)
        if self.locks is not None:
            self.locks[step] = held_locks(self.m, cpu)


def site_of(m, cpu: int, frame=None) -> str:
    """The kernel function CPU ``cpu`` runs in (Cpu.func()), its stack walked from ``frame``
    (default: the caller's) when that CPU is the one running."""
    return m.cpus[cpu].func("-", frame if frame is not None else sys._getframe(1))


def note_site(rec, m, step: int, cpu: int) -> None:
    func = rec.funcs[step] = site_of(m, cpu)
    site = (cpu, func)
    n = rec.counts.get(site, 0)
    rec.ords[step] = n
    rec.counts[site] = n + 1


class SiteNotes:
    """The sites of a schedule whose Footprints someone else made (explore's GuidedStrategy):
    noted through the footprints' ``watch`` hook, chained in front of the owner's. Steps up to
    ``upto`` are the run this one branched from (the same choices): its accesses (Accesses)
    stand for them, so they are not walked again (most of a run under explore re-plays its
    prefix, and the stack walk is the cost)."""

    def __init__(self, m, fp: Footprints, upto: int = 0) -> None:
        self.funcs: dict[int, str] = {}  # step -> site, for the steps after ``upto``
        self.acc: Accesses | None = None  # this run's, once it is over (CoverageTracker.record)
        funcs = self.funcs
        inner = fp.watch
        cpus = m.cpus

        def watch(step: int, cpu: int) -> None:
            if step > upto:
                # (site_of, without its call.) The walk starts at the caller of
                # Footprints.begin, the only caller of this hook: this frame and begin's are no
                # kernel function's.
                funcs[step] = cpus[cpu].func("-", sys._getframe(2))
            if inner is not None:
                inner(step, cpu)

        fp.watch = watch


def site_notes(m):
    """Where a schedule's step sites are noted: the footprints a site-aware recorder (the
    ``pairs`` strategy, or this function earlier) already keeps, footprints of its own when
    nobody records them, or notes chained onto another recorder's (explore's)."""
    if isinstance(m.fp, SiteFootprints):
        return m.fp
    if m.fp is None:
        m.fp = SiteFootprints(m)
        return m.fp
    return SiteNotes(m, m.fp)


_PFN = re.compile(r"(pfn)?(0x[0-9a-fA-F]+|[0-9]+)")


def kind_of(key: tuple) -> str:
    """The kind of a footprint's object, stable across schedules."""
    if key[0] == "l":
        return "l:" + _PFN.sub("#", str(key[1]))
    return key[0]


def conflicting_pairs(fps: Footprints, funcs: dict[int, str]):
    """Every two conflicting precise steps of different CPUs in one schedule, as
    ``(pair, first, step_a, step_b, key)``: ``pair`` the pair's identity, ``first`` 0 when A's
    site (the lower CPU's) touched the object first, else 1. For each object, and each two
    distinct sites touching it, the first time each order happens."""
    by_key: dict[tuple, list[tuple[int, int, bool]]] = {}
    cpus = fps.cpus
    for step in sorted(fps.steps):
        fp = fps.steps[step]
        cpu = cpus[step]
        for key, write in fp.items():
            by_key.setdefault(key, []).append((step, cpu, write))
    out = []
    for key in sorted(by_key, key=repr):
        seen: dict[tuple[int, str], tuple[int, bool, bool]] = {}  # site -> (step, any write...)
        done = set()
        kind = kind_of(key)
        for step, cpu, write in by_key[key]:
            site = (cpu, funcs.get(step, "-"))
            for (ocpu, ofunc), (ostep, owrote) in list(seen.items()):
                if ocpu == cpu or not (write or owrote):
                    continue
                if ocpu < cpu:
                    pair, first, sa, sb = (ocpu, ofunc, cpu, site[1], kind), 0, ostep, step
                else:
                    pair, first, sa, sb = (cpu, site[1], ocpu, ofunc, kind), 1, step, ostep
                if (pair, first) not in done:
                    done.add((pair, first))
                    out.append((pair, first, sa, sb, key))
            old = seen.get(site)
            if old is None:
                seen[site] = (step, write)
            elif write and not old[1]:
                seen[site] = (step, True)
    return out


@dataclass
class Pair:
    """One cross-CPU pair of conflicting sites, as profiling found it."""

    ident: tuple  # (cpu A, function A, cpu B, function B, object kind)
    rarity: int  # the fewest steps of a profiling schedule that touched its object
    instances: list = field(default_factory=list)  # sorted (occurrence at A, occurrence at B)


@dataclass(frozen=True)
class Target:
    """Where the ``pairs`` strategy preempts: CPU ``cpu``, run first and alone as in its own
    profiling schedule, is preempted the ``occ``-th time (from 0) it is chosen to step while in
    kernel function ``func``. ``klass`` says how likely the window is to matter (0 first, see
    derive_targets); ``rank`` orders targets within a class, rarest pair first."""

    cpu: int
    func: str
    occ: int
    klass: int
    rank: tuple


@dataclass
class Profile:
    pairs: list[Pair]  # rarest first
    runs: int  # profiling schedules run
    sites: frozenset = frozenset()  # (cpu, function) of every step of some pair
    site_steps: int = 0  # the most steps at those sites that one profiling schedule ran
    steps: int = 0  # the most choices one profiling schedule made
    targets: list = field(default_factory=list)  # Target, by (klass, rank)

    @property
    def idents(self) -> list[tuple]:
        return [p.ident for p in self.pairs]


class SoloStrategy(Strategy):
    """A profiling schedule: CPU ``first`` runs whenever it can; when it cannot, a pending
    event (an IPI delivery, a grace period's end) goes first, then the lowest other CPU. No
    injected fault fires. ``picks`` notes every choice that let a CPU step, as (cpu, function,
    how many times before that CPU was chosen in that function, the step it then ran): the
    coordinates the ``pairs`` strategy's targets are given in."""

    name = "solo"

    def __init__(self, first: int) -> None:
        self.first = first
        self.fps: SiteFootprints | None = None
        self.m = None
        self.picks: list[tuple[int, str, int, int]] = []
        self._occ: dict[tuple[int, str], int] = {}

    def attach(self, sched) -> None:
        self.m = sched.m
        self.fps = sched.m.fp = SiteFootprints(sched.m, locks=True)

    def _rank(self, option) -> tuple:
        if option.key == self.first:
            return (0, 0)
        return (1, option.key) if option.is_event else (2, option.key)

    def pick(self, options: list, current, step: int) -> int:
        best = min(range(len(options)), key=lambda i: self._rank(options[i]))
        option = options[best]
        if not option.is_event:
            site = (option.key, option.func())
            n = self._occ.get(site, 0)
            self._occ[site] = n + 1
            self.picks.append((option.key, site[1], n, step + 1))  # the CPU steps as step + 1
        return best

    def fault(self, p: float, current, step: int) -> int:
        return 0


def held_locks(m, cpu: int) -> frozenset:
    """The locks CPU ``cpu`` holds, as (name, "w") for a spinlock or an rw-semaphore held for
    writing and (name, "r") for one held for reading (a semaphore the model does not let us
    look up counts as read: shared)."""
    c = m.cpus[cpu]
    spins = {lock.name for lock in c.held}
    sems = {}
    for mm in m.mms.values():
        sems[mm.mmap_lock.name] = mm.mmap_lock
        for vma in mm.vmas:
            sems[vma.vm_lock.name] = vma.vm_lock
    out = set()
    for _cls, name in c.lockdep:
        if name in spins:
            out.add((name, "w"))
        else:
            sem = sems.get(name)
            out.add((name, "w" if sem is not None and sem.writer == cpu else "r"))
    return frozenset(out)


def excludes(a: frozenset, b: frozenset) -> bool:
    """Whether two CPUs holding lock sets ``a`` and ``b`` cannot both hold them at once."""
    names = {name for name, mode in a if mode == "w"}
    return any(name in names or (mode == "w" and (name, "r") in a) for name, mode in b)


_PROFILES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def profile_pairs(engine) -> Profile:
    """The scenario's cross-CPU conflicting pairs (computed once per engine): one profiling
    schedule per CPU that has agents."""
    profile = _PROFILES.get(engine)
    if profile is not None:
        return profile
    firsts = [cpu for cpu, calls in enumerate(engine.workload.calls(engine.fresh())) if calls]
    found: dict[tuple, Pair] = {}
    runs = 0
    recorded = []
    solos = []

    async def run_all():
        nonlocal runs
        for first in firsts:
            solo = SoloStrategy(first)
            try:
                await engine.run_schedule(solo)
            except Exception:  # noqa: BLE001  (a run the model cannot finish still profiles)
                pass
            runs += 1
            fps = solo.fps
            recorded.append(fps)
            solos.append(solo)
            touched: dict[tuple, int] = {}
            for fp in fps.steps.values():
                for key in fp:
                    touched[key] = touched.get(key, 0) + 1
            for ident, _first, sa, sb, key in conflicting_pairs(fps, fps.funcs):
                pair = found.get(ident)
                if pair is None:
                    pair = found[ident] = Pair(ident, touched[key])
                pair.rarity = min(pair.rarity, touched[key])
                inst = (fps.ords.get(sa, 0), fps.ords.get(sb, 0))
                if inst not in pair.instances:
                    pair.instances.append(inst)

    trio_run(run_all)
    pairs = sorted(found.values(), key=lambda p: (p.rarity, repr(p.ident)))
    for pair in pairs:
        pair.instances.sort()
    sites = frozenset(site for p in pairs for site in (p.ident[:2], p.ident[2:4]))
    site_steps = max((sum(1 for n, c in fps.cpus.items() if (c, fps.funcs.get(n)) in sites)
                      for fps in recorded), default=0)
    steps = max((len(fps.cpus) for fps in recorded), default=0)
    targets = derive_targets(solos, pairs)
    profile = _PROFILES[engine] = Profile(pairs, runs, sites, site_steps, steps, targets)
    return profile


def _accesses(solo, step: int) -> tuple[dict[str, bool], bool]:
    """The object kinds a profiling step touched ({kind: written?}), and whether it read an
    entry of an upper-level table (one whose entries link page tables in)."""
    kinds: dict[str, bool] = {}
    upper = False
    level = solo.m.mem.level
    for key, write in solo.fps.steps[step].items():
        kind = kind_of(key)
        kinds[kind] = kinds.get(kind, False) or write
        if key[0] == "e" and not write and level.get(key[1], 1) >= 2:
            upper = True
    return kinds, upper


def _tables_used(solo) -> frozenset:
    """The tables CPU ``solo.first`` touched (an entry, the whole table) in its own profiling
    schedule."""
    fps = solo.fps
    return frozenset(key[1] for step, fp in fps.steps.items() if fps.cpus[step] == solo.first
                     for key in fp if key[0] in ("e", "t"))


def _stale_windows(solo, mine: list, i: int, upper_writes: dict, used: frozenset) -> dict:
    """The check-then-use windows that f's step ``mine[i]`` opens on a table-linking entry E
    it read, as {index j in ``mine``: tier}: preempt f just after its step ``mine[j]``.

    Another CPU writes E (the same entry, in some profiling schedule, and not only after f
    wrote it itself: a fault that links a new table in after f's reclaim answers f, it does
    not race with f's read), and

    - if f itself writes E later (check then act: collapse, reclaim, retract), the read is
      its last read of E before that write whose value the writers can still change before
      the write: one after which f does not hold, all the way to the write, a lock that every
      other CPU's write of E is made under (Eraser's lock sets: the pmd or pte lock). The
      window opens where f first holds no such lock: at once after the read (D4, D6), or
      where f drops the lock and takes it again before acting (D12). Earlier reads the kernel
      checks again; a read under a lock held to the write is part of the act
      (pmdp_get_and_clear);
    - otherwise f uses what it read before it reads E again, and holds no such lock just
      after the read: it touches the table E linked, its entries or its split ptlock (which
      lives in the table's page), or anything but locks and upper-level entries. A read that
      f repeats before any use (a walk that rereads the pmd) leaves nothing stale; a recheck
      under the pte lock lets no writer in.

    Tier 0: some such write of E unlinks a table f touched (f may go on using a table the
    other unlinks and frees: the use-after-free shape); tier 1 the rest (the other links a
    new table in). Two more (2, 3) where f reads E again under the lock between the window
    and its write: that read may be a recheck (D4's fix) or only the read of what to clear
    (its bug), which footprints cannot tell apart, so such windows come after those that no
    read follows."""
    fps, level = solo.fps, solo.m.mem.level
    f = solo.first

    def window(j: int) -> frozenset:  # the locks f holds just after its step mine[j]
        for pick in mine[j + 1:]:
            if pick[3] in fps.locks:
                return fps.locks[pick[3]]
        return frozenset()

    def uses(k: tuple) -> bool:
        # (an entry read reads its table's life too: "f" of an upper-level table is no use)
        if k[0] == "lockdep" or (k[0] in ("e", "f") and level.get(k[1], 1) >= 2):
            return False
        if k[0] == "l":  # a lock is a use of a table when it lives in one (a split ptlock)
            return any(int(m.group(2), 0) in level for m in _PFN.finditer(str(k[1])))
        return True

    later = [j for j in range(i + 1, len(mine)) if mine[j][3] in fps.steps]
    out: dict[int, int] = {}
    for key, write in fps.steps[mine[i][3]].items():
        if write or key[0] != "e" or level.get(key[1], 1) < 2:
            continue
        others = [(locks, unlinks) for cpu, locks, unlinks, after in upper_writes.get(key, ())
                  if cpu != f and f not in after]
        if not others:
            continue

        def open_to(j: int) -> list:  # the writes of E that f's locks after mine[j] allow
            return [unlinks for locks, unlinks in others if not excludes(window(j), locks)]

        act = next((j for j in later if fps.steps[mine[j][3]].get(key)), None)
        opened, writers = None, []
        if act is not None:
            if any(key in fps.steps[mine[j][3]] and j < act for j in later):
                # a later read before the act: this one counts only if every later one is
                # made and held under the writers' lock up to the act
                rereads = [j for j in later if j < act and key in fps.steps[mine[j][3]]]
                if any(open_to(k) for r in rereads for k in range(r, act)):
                    continue
            for j in range(i, act):
                writers = open_to(j)
                if writers:
                    opened = j
                    break
            # f reads E again under the lock before it writes: maybe a recheck (D4's fixed
            # code), maybe only the read of what to free (its buggy code): after the windows
            # that nothing reads again
            recheck = any(opened is not None and opened < j < act
                          and key in fps.steps[mine[j][3]] for j in later)
        else:
            recheck = False
            writers = open_to(i)
            if not writers:
                continue
            used_first = False
            for j in later:
                fp = fps.steps[mine[j][3]]
                if key in fp:
                    break
                used_first = used_first or any(uses(k) for k in fp)
            else:
                used_first = True
            if not used_first:
                continue
            opened = i
        if opened is None:
            continue
        tier = 2 * recheck + (0 if any(unlinks & used for unlinks in writers) else 1)
        out[opened] = min(out.get(opened, tier), tier)
    return out


def _emptied_tables(solo, mine: list, filled: dict) -> dict[int, bool]:
    """{index i in ``mine``: True} for f's steps that touch the entries of a page table T
    that f unlinks later (it writes the entry that linked T, ("p", T), after touching T) while
    another CPU touches T's entries: f's view of T's contents (empty, say) decides the unlink,
    and another CPU can fill T in between (a read there is a fault's first step, which writes
    the entry if f cleared it: the nonempty-table-freed shape of D2, and D9's reclaim)."""
    fps, f = solo.fps, solo.first
    unlinked_at: dict[int, int] = {}  # T -> the last index at which f unlinks it
    touched: set = set()
    for j, pick in enumerate(mine):
        fp = fps.steps.get(pick[3])
        if fp is None:
            continue
        for key, write in fp.items():
            if key[0] == "p" and write and key[1] in touched:
                unlinked_at[key[1]] = j
        touched.update(key[1] for key in fp if key[0] in ("e", "t"))
    out = {}
    for i, pick in enumerate(mine):
        fp = fps.steps.get(pick[3])
        if fp is None:
            continue
        for key in fp:
            if key[0] in ("e", "t") and unlinked_at.get(key[1], -1) > i \
                    and filled.get(key[1], set()) - {f}:
                out[i] = True
    return out


def derive_targets(solos: list, pairs: list[Pair]) -> list[Target]:
    """The ``pairs`` strategy's preemption points, from the profiling schedules (SoloStrategy,
    each with its footprints and picks) and the pairs found in them.

    A step of CPU f in f's own profiling schedule (f first) is *relevant* when its site is a
    site of some pair and it touches that pair's kind of object. Preempting f anywhere between
    two relevant steps gives the same schedules up to reordering independent steps, so each
    such window is one target, preempted at its start: just before f's first relevant step
    (the other CPUs' conflicting steps all go first), and just after each relevant step (they
    all come between it and f's next one). Classes, tried in proportion to their weight
    (Plan.WEIGHTS in ptsim/strategies/pairs.py):

    0. a check-then-use window on a table-linking entry (_stale_windows): f read a pmd (or
       any upper-level entry) that another CPU writes, does not hold a lock every such write
       is made under, and will use what it read (lock the table's split ptlock, walk it) or
       act on it (clear it, free the table) without reading it again first; preempted where
       the window opens (just after the read, or where f drops the lock before acting). This
       is the shape of D1, D3, D4, D6, D7 and D12: the lock sets are Eraser's, the window
       the TOCTOU pair a Snowboard PMC names (a write of the entry against the read);
    1. just after f touched the entries of a page table it unlinks later, while another CPU
       touches them (_emptied_tables): f's view of the table decides the unlink, the other
       CPU can fill it meanwhile (D2, D9);
    2. just after any other access to a conflicting object (a lock excepted): the others see
       what f left half done, or f goes on with what it read;
    3. the rest: before f's first relevant step, and just after it took a lock.

    Within a class, by tier (class 0: a window no recheck closes before one the code reads
    again under the lock, and one whose writer unlinks a table f touched before one whose
    writer links a new one in), then the rarest pair first: fewest instances (the product of
    how many profiling steps of each site touched the kind), then fewest steps that touched
    its object. Entries of tables that exist before the agents start have the same key in
    every profiling schedule, so reads and writes of one entry are matched by key; the locks
    each step began with are recorded by the profiling schedules (SiteFootprints.locks)."""
    counts: dict[tuple, int] = {}
    for solo in solos:
        fps = solo.fps
        seen: dict[tuple, int] = {}
        for step in sorted(fps.steps):
            site = (fps.cpus[step], fps.funcs.get(step, "-"))
            for kind in sorted({kind_of(key) for key in fps.steps[step]}):
                seen[(site, kind)] = seen.get((site, kind), 0) + 1
        for k, n in seen.items():
            counts[k] = max(counts.get(k, 0), n)
    # Who writes each table-linking entry, and under which locks: (cpu, held_locks()) per
    # write, from every profiling schedule (entries of tables that exist before the agents
    # start have the same key in all of them).
    upper_writes: dict[tuple, set] = {}
    filled: dict[int, set] = {}  # table pfn -> the CPUs that touch its entries
    for solo in solos:
        fps, level = solo.fps, solo.m.mem.level
        wrote: dict[tuple, set] = {}  # entry -> the CPUs that wrote it so far, this schedule
        for step in sorted(fps.steps):
            fp, cpu = fps.steps[step], fps.cpus[step]
            unlinks = frozenset(k[1] for k, w in fp.items() if w and k[0] == "p")
            for key in fp:
                if key[0] == "e":
                    filled.setdefault(key[1], set()).add(cpu)
            for key, write in fp.items():
                if write and key[0] == "e" and level.get(key[1], 1) >= 2:
                    # a write that follows another CPU's (a fault that links a new table in
                    # after the other unlinked the old) answers that CPU's write: it does not
                    # race with that CPU's earlier read
                    upper_writes.setdefault(key, set()).add(
                        (cpu, fps.locks.get(step, frozenset()), unlinks,
                         frozenset(wrote.get(key, ())) - {cpu}))
                    wrote.setdefault(key, set()).add(cpu)
    by_site: dict[tuple, list] = {}
    for pair in pairs:
        a, b, kind = pair.ident[:2], pair.ident[2:4], pair.ident[4]
        rank = (counts.get((a, kind), 1) * counts.get((b, kind), 1), pair.rarity)
        by_site.setdefault(a, []).append((rank, kind, b))
        by_site.setdefault(b, []).append((rank, kind, a))
    found: dict[tuple, tuple[int, tuple]] = {}

    def note(point: tuple, klass: int, rank: tuple) -> None:
        old = found.get(point)
        if old is None or (klass, rank) < old:
            found[point] = (klass, rank)

    for solo in solos:
        f, fps = solo.first, solo.fps
        mine = [p for p in solo.picks if p[0] == f]
        used = _tables_used(solo)
        emptied = _emptied_tables(solo, mine, filled)
        relevant = []  # (index in mine, [(klass after it, rank)], rank before it)
        windows = []  # (index in mine, rank): class 0, preempt just after that step
        for i, (_cpu, _func, _occ, step) in enumerate(mine):
            if step not in fps.steps:
                continue
            site = (f, fps.funcs.get(step, "-"))
            kinds, upper = _accesses(solo, step)
            stale = _stale_windows(solo, mine, i, upper_writes, used) if upper else {}
            after, before = [], None
            for rank, kind, other in by_site.get(site, ()):
                if kind not in kinds:
                    continue
                if kind.startswith("l:"):
                    klass = 3
                else:
                    klass = 1 if emptied.get(i) else 2
                after.append((klass, (0, *rank)))
                before = (0, *rank) if before is None else min(before, (0, *rank))
                if kind == "e":
                    for j, tier in stale.items():
                        windows.append((j, (tier, *rank)))
            if after:
                relevant.append((i, after, before))
        for j, rank in windows:
            if j + 1 < len(mine):
                note(mine[j + 1][:3], 0, rank)
        for n, (i, after, before) in enumerate(relevant):
            if n == 0:
                note(mine[i][:3], 3, before)
            if i + 1 < len(mine):
                for klass, rank in after:
                    note(mine[i + 1][:3], klass, rank)
    targets = [Target(cpu, func, occ, klass, rank)
               for (cpu, func, occ), (klass, rank) in found.items()]
    targets.sort(key=lambda t: (t.klass, t.rank, t.cpu, t.func, t.occ))
    return targets


# An access, packed into one int: step, site id, object id and whether it wrote, in that order
# from the top bits, so that a run's accesses sort by step. One tuple of ints per run, which
# the cyclic GC stops tracking: explore keeps the accesses of every run whose branches are
# still to run, and a container per object or access made each of its collections longer.
KEY_BITS = 24
SITE_BITS = 16
_KEY_MASK = (1 << KEY_BITS) - 1
_SITE_SHIFT = KEY_BITS + 1
_SITE_MASK = (1 << SITE_BITS) - 1
_STEP_SHIFT = SITE_BITS + KEY_BITS + 1


class Accesses:
    """One run's accesses at the open sites of a coverage tracker (CoverageTracker.record), in
    step order, packed. Those up to the step it shares with the run it branched from are that
    run's. ``since``: the accesses after this step may give orders the tracker has not counted
    (those before were counted with the run it branched from, once that one was ``added``)."""

    __slots__ = ("flat", "since", "added")

    def __init__(self, flat: tuple, since: int) -> None:
        self.flat = flat
        self.since = since
        self.added = False


class CoverageTracker:
    """Which of a profile's pairs the schedules seen so far exercised, and in which orders."""

    def __init__(self, profile: Profile) -> None:
        self.known = set(profile.idents)
        self.orders: dict[tuple, set[int]] = {}
        self.key_ids: dict[tuple, int] = {}  # footprint object -> its id
        self.key_kinds: list[str] = []  # id -> kind_of() the object
        self.site_ids: dict[tuple[int, str], int] = {}  # (cpu, function) -> its id
        self.sites: list[tuple[int, str]] = []  # id -> (cpu, function)
        for ident in sorted(self.known):
            for site in (ident[:2], ident[2:4]):
                if site not in self.site_ids:
                    self.site_ids[site] = len(self.sites)
                    self.sites.append(site)
        self._open()

    def add(self, fps: Footprints | None, funcs: dict[int, str]) -> None:
        """The orders of the known pairs one whole schedule exercised: conflicting_pairs()'s
        reading, without the order of its result (a set takes them) and without the objects
        and sites that can add nothing."""
        if fps is not None:
            self.check(self.record(fps, funcs))

    def record(self, fps: Footprints, funcs: dict[int, str], base: Accesses | None = None,
               upto: int = 0) -> Accesses:
        """A run's accesses that can still give a known pair an order it lacks: those at a
        site of such a pair, to an object of such a pair's kind (sites and kinds only ever
        close, so what is passed over now can add nothing later either). Steps up to
        ``upto`` are ``base``'s (explore's branch re-plays its parent's steps): only the
        later ones are read, ``funcs`` has their sites."""
        key_ids, key_kinds, wanted, open_ids = self.key_ids, self.key_kinds, self.wanted, \
            self.open_ids
        steps, cpus = fps.steps, fps.cpus
        if base is None:
            flat, since, start = [], -1, 0
        else:
            flat = list(base.flat[:bisect_left(base.flat, (upto + 1) << _STEP_SHIFT)])
            since = upto if base.added else min(upto, base.since)
            start = upto_count(steps, upto)
        for step, fp in islice(steps.items(), start, None):
            sid = open_ids.get((cpus[step], funcs.get(step, "-")))
            if sid is None:
                continue
            packed = (step << SITE_BITS | sid) << KEY_BITS
            for key, write in fp.items():
                kid = key_ids.get(key)
                if kid is None:
                    kid = key_ids[key] = len(key_kinds)
                    key_kinds.append(kind_of(key))
                if key_kinds[kid] in wanted:
                    flat.append((packed | kid) << 1 | write)
        return Accesses(tuple(flat), since)

    def check(self, acc: Accesses) -> None:
        """Count the orders ``acc``'s run exercised whose later access comes after
        ``acc.since`` (the earlier ones were counted with the run it branched from)."""
        since, flat = acc.since, acc.flat
        acc.added = True
        key_kinds, wanted = self.key_kinds, self.wanted
        late = {packed >> 1 & _KEY_MASK
                for packed in islice(flat, bisect_left(flat, (since + 1) << _STEP_SHIFT), None)}
        late = [kid for kid in late if key_kinds[kid] in wanted]
        if not late:
            return
        by_key: dict[int, list[int]] = {kid: [] for kid in late}
        for packed in flat:
            seen = by_key.get(packed >> 1 & _KEY_MASK)
            if seen is not None:
                seen.append(packed)
        orders = self.orders
        new = False
        for kid, accesses in by_key.items():
            later = wanted[key_kinds[kid]]
            seen_at: dict[int, int] = {}  # site id -> whether it wrote, from its first access
            for access in accesses:
                sid = access >> _SITE_SHIFT & _SITE_MASK
                partners = later.get(sid)
                if partners is None:
                    continue  # in no known pair that lacks an order (any more)
                write = access & 1
                if partners and access >> _STEP_SHIFT > since:
                    for osid, (ident, first) in partners.items():
                        owrote = seen_at.get(osid)
                        if owrote is not None and (write or owrote):
                            got = orders.get(ident)
                            if got is None:
                                orders[ident] = {first}
                                new = True
                            elif first not in got:
                                got.add(first)
                                new = True
                if write or sid not in seen_at:
                    seen_at[sid] = write or seen_at.get(sid, 0)
        if new:
            self._open()

    def _open(self) -> None:
        """Per object kind, the orders of the known pairs not seen yet (``wanted``): for each
        site of a pair that lacks one, the sites whose access before an access there would
        make such an order ({earlier site id: (pair, order)}, empty where the site's own
        accesses only come first). An access at any other site can add nothing, and a kind
        without such pairs is not read at all. (Most pairs are seen both ways early in a
        search: later schedules read little.)"""
        self.wanted = {}  # kind -> {site id: {earlier site id: (ident, order)}}
        ids = self.site_ids
        for ident in sorted(self.known):
            got = self.orders.get(ident, ())
            if len(got) == 2:
                continue
            a, b = ids[ident[:2]], ids[ident[2:4]]
            sites = self.wanted.setdefault(ident[4], {})
            sites.setdefault(a, {})
            sites.setdefault(b, {})
            if 0 not in got:  # A's site first, then B's
                sites[b][a] = (ident, 0)
            if 1 not in got:
                sites[a][b] = (ident, 1)
        # (cpu, function) -> id, of any kind's open sites
        self.open_ids = {self.sites[i]: i for i in sorted(set().union(*self.wanted.values()))}

    def figure(self) -> dict:
        both = sum(1 for v in self.orders.values() if len(v) == 2)
        return {"pairs": len(self.known), "both_orders": both,
                "one_order": len(self.orders) - both}


def describe(cov: dict) -> str:
    """The text line stress and explore print."""
    return (f"coverage: {cov['both_orders']} of {cov['pairs']} conflicting cross-CPU pairs seen "
            f"in both orders ({cov['one_order']} in one)")


class Covering(Strategy):
    """Wraps a strategy so that its schedule records footprints and sites for a tracker; the
    choices are the wrapped strategy's own."""

    def __init__(self, inner, tracker: CoverageTracker) -> None:
        self.inner = inner
        self.tracker = tracker
        self.parks = inner.parks
        self.fps = None
        self.notes = None

    def attach(self, sched) -> None:
        self.inner.attach(sched)
        self.notes = site_notes(sched.m)
        self.fps = sched.m.fp

    def pick(self, options: list, current, step: int) -> int:
        return self.inner.pick(options, current, step)

    def fault(self, p: float, current, step: int) -> int:
        return self.inner.fault(p, current, step)

    def done(self) -> None:
        if self.fps is not None:
            self.tracker.add(self.fps, self.notes.funcs)
        self.fps = self.notes = None


def run_seeds_covered(engine, seeds, strategy: str, depth: int, on_result,
                      tracker: CoverageTracker, stop_on_first: bool = False) -> None:
    """Engine.run_seeds with every schedule's footprints fed to ``tracker``."""
    factory = engine._factory(strategy, depth)

    async def batch():
        for seed in seeds:
            covering = Covering(factory(seed), tracker)
            result = await engine.run_schedule(covering, seed)
            covering.done()
            on_result(result)
            if stop_on_first and result.bug is not None:
                break

    trio_run(batch)


class _CoveredEngine:
    """An engine seen through explore's search(): every GuidedStrategy it runs notes its steps'
    sites (chained onto the footprints the strategy records with reduction on, or on
    footprints of its own without), and its accesses are recorded once it is over, whether it
    finished or not (its branches read them: Accesses)."""

    def __init__(self, engine, tracker: CoverageTracker, notes: dict) -> None:
        self._engine = engine
        self._tracker = tracker
        self._notes = notes  # id(machine) -> SiteNotes / SiteFootprints, until on_end

    def __getattr__(self, name):
        return getattr(self._engine, name)

    @staticmethod
    def _base(strategy) -> tuple[Accesses | None, int]:
        """The accesses of the run ``strategy``'s branched from, and the last step they
        share (None, 0: it shares none, or the parent recorded none)."""
        lineage = getattr(strategy, "lineage", None)
        if lineage is None or lineage[0].notes is None or lineage[0].notes.acc is None:
            return None, 0
        return lineage[0].notes.acc, lineage[1]

    async def run_schedule(self, strategy, seed=None, log=False):
        inner_attach = strategy.attach
        notes = self._notes
        made = []

        def attach(sched):
            inner_attach(sched)
            # (a branch records nothing until its branch point: m.fp is set there)
            fp = getattr(strategy, "footprints", None) or sched.m.fp
            base, upto = self._base(strategy)
            if base is not None and fp is not None and not isinstance(fp, SiteFootprints):
                rec = SiteNotes(sched.m, fp, upto)
            else:
                rec, base, upto = site_notes(sched.m), None, 0
            notes[id(sched.m)] = strategy.notes = rec
            made.append((rec, sched.m, base, upto))

        strategy.attach = attach
        try:
            return await self._engine.run_schedule(strategy, seed, log)
        finally:
            for rec, m, base, upto in made:
                if m.fp is not None:
                    rec.acc = self._tracker.record(m.fp, rec.funcs, base, upto)
            made.clear()  # (the strategy keeps attach, and with it this list: not the machine)


def explore_coverage(engine, wanted: bool = True):
    """(engine for search(), its on_end hook, the tracker) for an explore that measures
    coverage, or (engine, None, None) for one that does not."""
    if not wanted:
        return engine, None, None
    tracker = CoverageTracker(profile_pairs(engine))
    return (*covered_explore(engine, tracker), tracker)


def covered_explore(engine, tracker: CoverageTracker):
    """(engine for search(), on_end hook) that feed each finished schedule to ``tracker``."""
    notes: dict = {}

    def on_end(machine, result) -> None:
        rec = notes.pop(id(machine), None)
        if rec is not None and rec.acc is not None:
            tracker.check(rec.acc)
        notes.clear()  # schedules cut short (pruned, asleep) leave theirs behind

    return _CoveredEngine(engine, tracker, notes), on_end
