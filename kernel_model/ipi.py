"""Inter-processor interrupts: smp_call_function_many(..., wait=1).

A target runs the handler only between its steps and only with IRQs on; whether a pending IPI
is delivered now is a scheduler choice. Idle CPUs take it at once. The sender waits (with IRQs
on, so it still takes IPIs itself) until every target has run the handler.
"""

from __future__ import annotations

from .footprint import begin_pinned, opaque
from .waits import WaitReason


class Ipi:
    __slots__ = ("sender", "func", "args", "name", "pending", "step")
    __state_skip__ = frozenset({"step"})  # when it was sent: reports only

    def __init__(self, sender: int, func, args: tuple, name: str, step: int) -> None:
        self.sender = sender
        self.func = func
        self.args = args
        self.name = name
        self.pending: set[int] = set()
        self.step = step


class IpiDelivery:
    """A pending event: the oldest IPI pending on ``cpu`` is handled now (it has IRQs on)."""

    is_event = True
    # Prompt: the hardware takes an IPI at the target's next instruction boundary with IRQs on
    # (about a microsecond, a few memory accesses), so explore's non-preempting default delivers
    # it at once and counts every step that runs while it could be taken as a deviation
    # (ptsim/strategies/guided.py, cost()). A target with IRQs off holds it for free.
    prompt = True
    eager = False
    __slots__ = ("cpu", "key")

    def __init__(self, cpu) -> None:
        self.cpu = cpu
        self.key = 1000 + cpu.id

    def fire(self) -> None:
        m = self.cpu.m
        fp = m.fp
        if fp is not None:  # the handler (a TLB flush, or nothing) touches its CPU's TLB only
            fp.event(m.step, self.key)
            fp.touch(m.step, ("tlb", self.cpu.id), True)
            fp.touch(m.step, ("ipi", self.cpu.id), True)
            fp.touch(m.step, ("irq", self.cpu.id), False)  # it needs IRQs on there
            # Whose wait it acknowledges: explore never sleeps a delivery to the CPU waiting
            # for it (ptsim/explore.py). A read: two acknowledgements of one sender commute
            # (each takes its own CPU out of the IPI's pending set; the sender goes on after
            # the last, in either order).
            fp.touch(m.step, ("ipi-sender", self.cpu.ipis[0].sender), False)
        deliver_ipi(m, self.cpu)


class IpiWait(WaitReason):
    __slots__ = ("ipi",)

    def __init__(self, ipi: Ipi) -> None:
        self.ipi = ipi

    def describe(self, m) -> str:
        targets = ", ".join(f"CPU{t} ({'IRQs off' if not m.cpus[t].irqs_on else 'IRQs on'})"
                            for t in sorted(self.ipi.pending))
        return f"waits for {self.ipi.name} IPI acknowledgement from {targets}"


def deliver_ipi(m, target) -> None:
    """Run the oldest pending IPI handler on target (an engine event)."""
    ipi = target.ipis.popleft()
    m.events_live -= 1
    target.irq.append(ipi.name)
    try:
        ipi.func(target, *ipi.args)
    finally:
        target.irq.pop()
    ipi.pending.discard(target.id)
    if m.log is not None:
        m.ev(target, "ipi_handled", ipi=ipi.name, sender=ipi.sender)


async def smp_call_function_many(cpu, targets, func, args: tuple, name: str, wait: bool = True):
    m = cpu.m
    await m.point(cpu)
    fp = m.fp
    if fp is not None:
        # Precise when it waits (its step ends there): its preemption count (quiescence),
        # and per target whether it is idle, then the IPI queued on it or, on an idle CPU,
        # the handler run at once (its TLB: a flush, or nothing). Queuing conflicts with other
        # senders' queuing on that CPU (the handlers run in queue order), not with the
        # delivery of an IPI queued before: delivery takes the oldest, so the two commute.
        begin_pinned(m, cpu)
        for target in targets:
            if target is not cpu:
                fp.touch(m.step, ("idle", target.id), False)
                fp.touch(m.step, ("tlb", target.id) if target.idle else ("ipiq", target.id),
                         True)
    cpu.preempt += 1
    ipi = Ipi(cpu.id, func, args, name, m.step)
    for target in targets:
        if target is cpu:
            continue
        if target.idle:
            target.irq.append(name)
            try:
                func(target, *args)
            finally:
                target.irq.pop()
            if m.log is not None:
                m.ev(target, "ipi_handled", ipi=name, sender=cpu.id, idle=True)
        else:
            target.ipis.append(ipi)
            m.events_live += 1
            ipi.pending.add(target.id)
    if m.log is not None:  # the sorted lists cost more than the rest of the send
        m.ev(cpu, "smp_call_function", ipi=name,
             targets=sorted(t.id for t in targets if t is not cpu), pending=sorted(ipi.pending))
    if wait and ipi.pending:
        await m.wait(cpu, lambda: not ipi.pending, IpiWait(ipi))
    elif fp is not None:  # its step runs on into the caller's code
        opaque(m)
    cpu.preempt -= 1


def empty_fn(target) -> None:
    return None


async def tlb_remove_table_sync_one(cpu) -> None:
    """IPI every online CPU and wait: 'not an RCU grace period, but sufficient for software
    page-table walkers that rely on IRQ disabling' (mm/mmu_gather.c)."""
    await smp_call_function_many(cpu, cpu.m.cpus, empty_fn, (), "tlb_remove_table_smp_sync")
