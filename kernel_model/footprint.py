"""Step footprints: what each step read and wrote, for explore's partial-order reduction and for
the conflict pairs of the ``pairs`` strategy and the coverage figure.

A step is everything a CPU does from one scheduling point to the next. Most steps are *opaque*:
they count as touching everything, so no reduction ever reorders them. A step is *precise* only
when the primitive that began it (``begin``: the page-table entry accessors, GUP-fast's folio
grab, the hardware walker; ``begin_pinned``: locks, IRQ and RCU read-side changes) names every
object it touches, and the code that runs on in the same step names what it touches too
(``touch``), or makes the step opaque (``opaque``). A *pinned* precise step has a footprint for
conflicts but is never put to sleep (see begin_pinned, and the fault injections).

Which objects need naming in a precise step: those that some precise step writes. Everything
else that precise steps read (the VMA list, a table's kind and level, the locks, RCU, other
CPUs' TLBs) is written only by opaque steps (freeing, flushing, RCU callbacks, munmap's VMA
removal), and an opaque step conflicts with every step anyway. The mm counters (rss,
nr_ptes, ...) are only ever added to during a schedule and read at its end: additions commute,
so they are no object of a footprint.

Objects are named by tuples:
    ("e", pfn, idx)  one entry of a page table
    ("t", pfn)       a whole table's entries (a scan of all 512): every entry write writes it too
    ("k", pfn)       a data folio's reference count (and what it means: freed at zero)
    ("p", pfn)       which entry links table pfn in (the bad-pmd sanitizer's map)
    ("d", pfn, idx)  the tables deposited under a huge pmd
    ("l", name)      a spinlock or rw-semaphore
    ("tlb", cpu)     a CPU's TLB and paging-structure caches (its walks fill them, an IPI's
                     flush handler empties them)
    ("ipi", cpu)     the IPIs pending on a CPU (their delivery)
    ("ipiq", cpu)    the order IPIs are queued on a CPU in (senders; delivery takes the oldest)
    ("idle", cpu)    whether a CPU's agents are done (its last step: then IPIs run at once)
    ("f", pfn)       a table's life: every access to the table reads it, its free writes it
    ("alloc",)       which frame the next allocation takes
    ("rcu",)         the grace period (its end: an event that is no CPU's step)
    ("irq", cpu)     a CPU's IRQ flag (whether an IPI may be delivered to it)

Nothing is recorded unless a consumer set ``m.fp`` (explore with reduction, coverage): the
primitives test ``m.fp is not None`` first, one attribute load on the hot path.
"""

from __future__ import annotations

from bisect import bisect_right


class Footprints:
    """The footprints of one schedule's steps, by step number (``m.step`` during the step)."""

    __slots__ = ("cur", "fp", "steps", "cpus", "pinned", "watch")

    def __init__(self) -> None:
        self.cur = -1  # the precise step being recorded, or -1
        self.fp: dict | None = None
        self.steps: dict[int, dict] = {}  # step -> {object: written?}; absent: opaque
        self.cpus: dict[int, int] = {}  # step -> the CPU that ran it (precise steps)
        self.pinned: set[int] = set()  # precise steps that may not be put to sleep
        # Called as each precise step begins (explore: a CPU that runs while asleep, because
        # it was the only thing that could run, ends the schedule).
        self.watch = None

    def begin(self, step: int, cpu: int) -> None:
        if self.watch is not None:
            self.watch(step, cpu)
        self.cur = step
        self.fp = self.steps[step] = {}
        self.cpus[step] = cpu

    def event(self, step: int, key: int, background: bool = False) -> None:
        """A pending event (an IPI delivery) fires as step ``step``: precise, named by its
        option key, and no CPU's step. A ``background`` event (a grace period's end) opens no
        window a preemption could aim at: recorders of the race surface (ptsim/coverage.py)
        leave it opaque, as it was to them before it had a footprint."""
        self.cur = step
        self.fp = self.steps[step] = {}
        self.cpus[step] = key

    def pin(self, step: int) -> None:
        if step == self.cur:
            self.pinned.add(step)

    def sleepable(self, step: int) -> bool:
        return step in self.steps and step not in self.pinned

    def touch(self, step: int, key: tuple, write: bool) -> None:
        if step == self.cur:
            fp = self.fp
            if write or key not in fp:
                fp[key] = write

    def opaque(self, step: int) -> None:
        if step == self.cur:
            del self.steps[step]
            del self.cpus[step]
            self.cur = -1

    def of(self, step: int) -> dict | None:
        """The footprint of step ``step``, or None where it was opaque."""
        return self.steps.get(step)


def upto_count(by_step: dict, upto: int) -> int:
    """How many of ``by_step``'s keys, which ascend (steps, in the order they ran), are at most
    ``upto``: ``dict(islice(by_step.items(), n))`` then copies them at C speed, where a
    comprehension tested every key (explore's branches inherit their parent's steps)."""
    return bisect_right(list(by_step), upto)


def conflict(a: dict | None, b: dict | None) -> bool:
    """Do two steps' footprints conflict (one writes what the other reads or writes)? An opaque
    step conflicts with every step."""
    if a is None or b is None:
        return True
    if len(b) < len(a):
        a, b = b, a
    for key, write in a.items():
        other = b.get(key)
        if other is not None and (write or other):
            return True
    return False


# -- what primitives call (each a no-op unless a consumer is recording) -------------------------

def begin(m, cpu) -> None:
    """The step ``cpu`` just began is precise: its primitive names what it touches."""
    fp = m.fp
    if fp is not None:
        fp.begin(m.step, cpu.id)


def begin_pinned(m, cpu, *keys: tuple) -> None:
    """The step ``cpu`` just began is precise, writes ``keys`` (or nothing another CPU's
    precise step reads), and changes whether this CPU is quiescent for RCU (IRQs, preemption,
    RCU nesting: a lock, an IRQ flag, rcu_read_lock). While a grace period runs it may not be
    put to sleep: the scheduler samples every CPU's quiescence at each choice, and moving the
    step would change what the samples saw. Whether it lets another CPU run (a lock) needs no
    pin: every step that takes or waits for the same lock conflicts with it."""
    fp = m.fp
    if fp is not None:
        fp.begin(m.step, cpu.id)
        if m.rcu.gp_active:
            fp.pinned.add(m.step)
        for key in keys:
            fp.fp[key] = True


def touch(m, key: tuple, write: bool = False) -> None:
    fp = m.fp
    if fp is not None:
        fp.touch(m.step, key, write)


def opaque(m) -> None:
    """This step does something no footprint names: it conflicts with every step."""
    fp = m.fp
    if fp is not None:
        fp.opaque(m.step)
