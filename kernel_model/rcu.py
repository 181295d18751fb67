"""Consolidated RCU (v4.20+): rcu_read_lock, IRQ-off and preempt-off regions are all readers.

A grace period ends only after every CPU has been seen quiescent (outside rcu_read_lock,
with IRQs on and preemption enabled, or idle) since it began. Callbacks queued while a grace
period is running wait for the next one, so a reader that began before call_rcu() is always
waited for. When a grace period ends (a scheduler choice), its callbacks run.
"""

from __future__ import annotations

from .footprint import begin_pinned, opaque
from .lean import lean_step
from .snapshot import Snapshotted
from .waits import WaitReason


class Rcu(Snapshotted):
    def __state_ref__(self):
        return "Rcu"

    def __init__(self) -> None:
        self.gp_active = False
        self.gp_seq = 0
        self.qs: set[int] = set()
        self.cbs_gp: list[tuple] = []  # callbacks the running grace period will release
        self.cbs_next: list[tuple] = []  # queued during it: they need the next grace period

    def pending(self) -> bool:
        return self.gp_active or bool(self.cbs_next)


class GracePeriodEnd:
    """A pending event: the running grace period ends now and its callbacks run."""

    is_event = True
    # Not prompt: a grace period takes milliseconds, thousands of steps, so ending it late is the
    # kernel's ordinary case and costs nothing; ending it ahead of a CPU that could go on is the
    # deviation (a preemption).
    prompt = False
    # Eager: where no CPU could go on (every option free), it is the default, so that the
    # CPUs' branches there can put it to sleep (ptsim/explore.py defers them).
    eager = True
    key = 2000
    __slots__ = ("m",)

    def __init__(self, m) -> None:
        self.m = m

    def fire(self) -> None:
        m = self.m
        fp = m.fp
        if fp is not None:
            # Precise: its callbacks name what they touch (a table's free: pgalloc.py) or make
            # it opaque. No precise step reads the RCU state: the steps that change a CPU's
            # quiescence are pinned while a grace period runs (footprint.begin_pinned).
            fp.event(m.step, self.key, background=True)
            fp.touch(m.step, ("rcu",), True)
        end_gp(m)


class RcuWait(WaitReason):
    __slots__ = ()

    def describe(self, m) -> str:
        readers = [f"CPU{x.id}" for x in m.cpus if not x.quiescent()]
        return ("waits in synchronize_rcu for a grace period held off by "
                f"{', '.join(readers) or 'nobody'}")


def _start_gp(m) -> None:
    rcu = m.rcu
    rcu.gp_active = True
    m.events_live += 1  # its end may become pending
    m.lean = None  # the grace period's end may become a real scheduler choice
    rcu.gp_seq += 1
    rcu.cbs_gp, rcu.cbs_next = rcu.cbs_next, []
    rcu.qs = {c.id for c in m.cpus if c.quiescent()}
    if m.log is not None:
        m.ev(None, "gp_start", gp=rcu.gp_seq)


def call_rcu(cpu, fn, *args, name: str = "") -> None:
    """Queue fn(m, *args, queued_by) to run after a grace period."""
    m = cpu.m
    if m.fp is not None:  # the callback queue, and a grace period's start reads every CPU's state
        opaque(m)
    rcu = m.rcu
    rcu.cbs_next.append((fn, args, m.who(cpu, name or fn.__name__), name or fn.__name__))
    if m.log is not None:
        m.ev(cpu, "call_rcu", cb=name or fn.__name__)
    if not rcu.gp_active:
        _start_gp(m)


def note_quiescent(m) -> bool:
    """Record every CPU seen quiescent now; True when the running grace period may end."""
    rcu = m.rcu
    if not rcu.gp_active:
        return False
    qs = rcu.qs
    for c in m.cpus:
        if c.id not in qs and c.quiescent():
            qs.add(c.id)
    return len(qs) == len(m.cpus)


def end_gp(m) -> None:
    """The grace period ends; its callbacks run (rcu_do_batch), then the next one starts."""
    rcu = m.rcu
    if m.log is not None:
        m.ev(None, "gp_end", gp=rcu.gp_seq, callbacks=len(rcu.cbs_gp))
    cbs, rcu.cbs_gp = rcu.cbs_gp, []
    rcu.gp_active = False
    m.events_live -= 1
    for fn, args, queued_by, name in cbs:
        fn(m, *args, queued_by)
    if rcu.cbs_next:
        if m.fp is not None:  # the next grace period samples every CPU's quiescence
            opaque(m)
        _start_gp(m)
    else:
        m.lean = m.solo


def rcu_barrier(m) -> None:
    """End-of-run drain: let every grace period end and every callback run."""
    while m.rcu.pending():
        if not m.rcu.gp_active:
            _start_gp(m)
        # Every task of the model has finished: all CPUs are idle, hence quiescent.
        end_gp(m)


async def rcu_read_lock(cpu) -> None:
    m = cpu.m
    if not lean_step(m, cpu):
        await m.point(cpu)
    if m.fp is not None:
        begin_pinned(m, cpu)  # its quiescence: the grace period's end is an event
    cpu.rcu_depth += 1
    if m.log is not None:
        m.ev(cpu, "rcu_read_lock")


async def rcu_read_unlock(cpu) -> None:
    m = cpu.m
    if not lean_step(m, cpu):
        await m.point(cpu)
    if m.fp is not None:
        begin_pinned(m, cpu)  # its quiescence: the grace period's end is an event
    cpu.rcu_depth -= 1
    if m.log is not None:
        m.ev(cpu, "rcu_read_unlock")


def _mark_done(m, flag: list, queued_by) -> None:
    if m.fp is not None:  # it lets the CPU waiting in synchronize_rcu run: no key names that
        opaque(m)
    flag[0] = True


async def synchronize_rcu(cpu) -> None:
    m = cpu.m
    await m.point(cpu)
    done = [False]
    call_rcu(cpu, _mark_done, done, name="wakeme_after_rcu")
    await m.wait(cpu, lambda: done[0], RcuWait())
