"""`lazy_tlb`: a kernel thread runs on a CPU that keeps the user mm loaded lazily.

x86 context_switch() to a kernel thread calls enter_lazy_tlb(): the CPU stays in mm_cpumask
and keeps its TLB and paging-structure caches. Flushes that free no tables skip it
(should_flush_tlb); a flush that frees tables must reach it, because 'CPUs in lazy TLB mode
[may trip] up on the new contents of what used to be page tables, while doing a speculative
memory access' (native_flush_tlb_multi). The hardware walks speculatively through whatever the
paging-structure caches still hold: that is what this agent does, one walk per step.
"""

from __future__ import annotations

__kernel_file__ = "arch/x86/mm/tlb.c"  # where the kernel functions below live (reports cite it)

from ptsim.kernel_model.footprint import begin, touch
from ptsim.kernel_model.memory import PAGETABLE
from ptsim.kernel_model.registry import kfunc, op
from ptsim.kernel_model.tlb import PSC_SHIFT, TLB_USE_AFTER_FREE, psc_unpack


async def speculative_walk(cpu, mm, turn: int) -> None:
    """The hardware reads an entry of a table that a cached paging-structure entry points at."""
    m = cpu.m
    await m.point(cpu)
    # Its own caches, then the life of the table it walks into (a table's free writes it).
    if m.fp is not None:
        begin(m, cpu)
        touch(m, ("tlb", cpu.id))
    psc = cpu.tlb(mm.name).psc
    if not psc:
        return
    key, table = sorted(psc.items(), key=lambda kv: psc_unpack(kv[0]))[turn % len(psc)]
    level, prefix = psc_unpack(key)
    touch(m, ("f", table))  # the life of the table it walks into (a free writes it)
    if m.mem.kind[table] != PAGETABLE:
        addr = prefix << PSC_SHIFT[level]
        raise m.bug(TLB_USE_AFTER_FREE, cpu,
                    f"CPU{cpu.id} (lazy TLB) speculative page walk for {addr:#x} through a stale "
                    f"paging-structure cache entry into {m.mem.describe(table)}",
                    obj=m.mem.describe(table), keys=(("pt", table),), pfns=(table,),
                    access=f"speculative walk reads table {table:#x}")
    m.ev(cpu, "speculative_walk", table=hex(table), level=level)


@op("lazy_tlb")
@kfunc
async def lazy_tlb(cpu, *, steps: int = 100) -> None:
    """A kernel thread with the mm loaded lazily for ``steps`` steps: this CPU stays in
    mm_cpumask, its hardware may walk speculatively through cached paging-structure entries."""
    m = cpu.m
    mm = cpu.mm
    await m.point(cpu)
    cpu.lazy = True  # enter_lazy_tlb(): mm stays loaded, this CPU stays in mm_cpumask
    m.ev(cpu, "enter_lazy_tlb", mm=mm.name)
    for turn in range(steps):
        await speculative_walk(cpu, mm, turn)
    await m.point(cpu)
    # Back to a user task of this mm: switch_mm_irqs_off() sees a stale tlb_gen and flushes.
    cpu.lazy = False
    cpu.tlb(mm.name).flush_all()
    m.ev(cpu, "leave_lazy_tlb", mm=mm.name)
