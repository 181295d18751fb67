"""Per-CPU TLBs and paging-structure caches, and the hardware page walker.

The model keeps 4 KB and 2 MB leaf translations and the three x86 paging-structure caches
(PML4E, PDPTE, PDE: each maps an address prefix to the next table's pfn). Nothing is evicted:
a stale entry stays until a flush removes it, which is exactly the window the kernel's flush
rules exist to close.
"""

from __future__ import annotations

from .footprint import begin_pinned
from .ipi import smp_call_function_many
from .memory import DATA, PAGETABLE, ZERO
from .pagetable import _PAGE_PRESENT, _PAGE_PSE, _PAGE_RW, PAGE_SHIFT, PMD_SHIFT, entry_pfn
from .registry import bug_kind, config_key
from .waits import WaitReason

TLB_FLUSH = config_key(
    "tlb_flush", ("ipi", "broadcast"),
    "How remote TLBs are invalidated. ipi: flush_tlb_multi interrupts every target CPU and waits "
    "for its handler, which an IRQ-off CPU runs only once it re-enables IRQs (native x86). "
    "broadcast: the hardware (INVLPGB + TLBSYNC) or the hypervisor (paravirt flush) invalidates "
    "every CPU's entries without interrupting it, so IRQ-off software walkers are not waited for.",
    "broadcast: paravirt flushes (KVM, Hyper-V, Xen) and AMD INVLPGB (x86, v6.15)")
FLUSH_FREED_TABLES_TO_LAZY = config_key(
    "flush_freed_tables_to_lazy", (True, False),
    "A flush that frees page tables also interrupts lazy-TLB CPUs (their paging-structure "
    "caches may hold the freed tables); false skips lazy CPUs on every flush.",
    "false: no released x86 kernel; native_flush_tlb_multi sends freed_tables flushes to lazy "
    "CPUs since the 2018 lazy-TLB rework (v4.19)")

PMD_FLUSH_FREED_TABLES = config_key(
    "pmd_flush_freed_tables", (True, False),
    "x86 flush_tlb_range() passes freed_tables = true, as it must when it is used to zap a "
    "normal pmd together with the table it points at (pmdp_collapse_flush in "
    "retract_page_tables, collapse_huge_page and try_collapse_pte_mapped_thp; "
    "move_normal_pmd): native_flush_tlb_multi then interrupts lazy-TLB CPUs too, and their "
    "paging-structure caches drop the table. false is the kernel before the fix: "
    "flush_tlb_range passes false, lazy CPUs are skipped (should_flush_tlb) and may keep the "
    "table that retract_page_tables then frees. Orthogonal to flush_freed_tables_to_lazy, "
    "which says what a flush with freed_tables does.",
    "x86/mm: Fix flush_tlb_range() when used for zapping normal PMDs (3ef938c35035, Jann "
    "Horn, v6.15-rc1; Cc stable, review patches seen for 5.15, 6.6, 6.12 and 6.13). Fixes "
    "016c4d92cd16 (x86/mm/tlb: Add freed_tables argument to flush_tlb_mm_range, 2018)")

TLB_USE_AFTER_FREE = bug_kind(
    "tlb-use-after-free",
    "a CPU used a TLB or paging-structure cache entry that points at a freed page: a user "
    "access through a stale leaf entry to a freed data page, or any walk (speculative ones on "
    "lazy CPUs included) through a stale paging-structure entry into a freed table. A lazy CPU "
    "merely holding a stale leaf entry is no bug")
MIXED_TLB_SIZES = bug_kind(
    "mixed-tlb-sizes", "one CPU's TLB holds a 4K and a 2M translation for the same address "
    "(Intel 317080, AMD erratum 383)", cls="hazard")
TLB_DIVERGENCE = bug_kind(
    "tlb-divergence",
    "a CPU fills a translation for an address while another (non-lazy) CPU's TLB still maps it "
    "to a different frame, and that stale frame is no longer safe to reach: it has been freed "
    "(or reused), or no TLB flush is pending for the mm (mm->tlb_flush_pending is 0), so the "
    "flush that should have removed the entry has come and gone. Not reported: the ordinary "
    "mmu_gather window (zap_pte_range cleared the pte, the folio is still queued in the gather "
    "and freed only after tlb_flush_mmu's flush), where the stale entry reaches a page the "
    "kernel still holds: mm/mmu_gather.c delays the free past the flush exactly so that such "
    "entries are harmless, and a user racing its own MADV_DONTNEED may see either page. Nor a "
    "lazy-TLB CPU's stale leaf entry: x86 leaves those on purpose and flushes them on switch "
    "back (tlb-use-after-free covers any use of one)",
    cls="hazard")

# INVLPG of more than this many pages becomes a full flush (tlb_single_page_flush_ceiling).
FLUSH_CEILING = 33

# paging-structure cache levels: the table level a cached entry points at -> its address shift
PSC_SHIFT = {1: 21, 2: 30, 3: 39}
_PSC_ORDER = ((1, 21), (2, 30), (3, 39))  # deepest first


# A paging-structure cache entry's tag packs the address prefix and the level it points at in
# one int, (addr >> PSC_SHIFT[level]) << 2 | level: the walker builds several per access, and
# ints hash without a tuple. The walker spells the expression out where it needs one.


def psc_unpack(key: int) -> tuple[int, int]:
    """(level pointed at, address prefix) of a paging-structure cache tag."""
    return key & 3, key >> 2
_LEVEL_SHIFT = (0, 12, 21, 30, 39)
_MAPPABLE = (DATA, ZERO)  # frame kinds a user access may reach


class Tlb:
    __slots__ = ("pte", "huge", "psc")

    def __init__(self) -> None:
        self.pte: dict[int, int] = {}  # vpn -> pte value
        self.huge: dict[int, int] = {}  # addr >> 21 -> pmd value
        self.psc: dict[int, int] = {}  # tag (level pointed at, addr prefix) -> table pfn

    def __getstate__(self):
        return (dict(self.pte), dict(self.huge), dict(self.psc))

    def __setstate__(self, state):
        self.pte, self.huge, self.psc = state

    def flush_range(self, start: int, end: int) -> None:
        """INVLPG per page, or a full flush past the ceiling. Either way x86 drops every
        paging-structure cache entry of the PCID (kernel-notes F6)."""
        npages = (end - start) >> PAGE_SHIFT
        if npages > FLUSH_CEILING:
            self.flush_all()
            return
        for vpn in range(start >> PAGE_SHIFT, end >> PAGE_SHIFT):
            self.pte.pop(vpn, None)
        for key in range(start >> PMD_SHIFT, ((end - 1) >> PMD_SHIFT) + 1):
            self.huge.pop(key, None)
        self.psc.clear()

    def flush_all(self) -> None:
        self.pte.clear()
        self.huge.clear()
        self.psc.clear()

    def invalidate_address(self, addr: int) -> None:
        """What a page fault does for the faulting address before the handler runs."""
        self.pte.pop(addr >> PAGE_SHIFT, None)
        self.huge.pop(addr >> PMD_SHIFT, None)
        psc = self.psc
        if psc:
            psc.pop((addr >> 21) << 2 | 1, None)  # the tags of levels 1, 2, 3
            psc.pop((addr >> 30) << 2 | 2, None)
            psc.pop((addr >> 39) << 2 | 3, None)


def _check_data(cpu, pfn: int, addr: int, write: bool) -> None:
    m = cpu.m
    kind = m.mem.kind[pfn]
    if kind == DATA or kind == ZERO:
        return
    access = "write" if write else "read"
    raise m.bug(TLB_USE_AFTER_FREE, cpu,
                f"CPU{cpu.id} user {access} at {addr:#x} through a stale TLB entry to "
                f"{m.mem.describe(pfn)}",
                obj=f"data page pfn {pfn:#x} (va {addr:#x})", keys=(("page", pfn),), pfns=(pfn,),
                access=f"user {access} {addr:#x} -> pfn {pfn:#x}")


def translate(tlb: Tlb, addr: int) -> int | None:
    """The frame a TLB maps addr to, or None."""
    val = tlb.pte.get(addr >> PAGE_SHIFT)
    if val is not None:
        return entry_pfn(val)
    val = tlb.huge.get(addr >> PMD_SHIFT)
    if val is not None:
        return entry_pfn(val) + ((addr >> PAGE_SHIFT) & 511)
    return None


def _check_fill(cpu, mm_name: str, tlb: Tlb, addr: int, huge: bool) -> None:
    """The TLB hazards of kernel-notes D9: Intel 317080 / AMD erratum 383 forbid holding a 4K and
    a 2M translation for one address; wp_page_copy's comment forbids two CPUs holding different
    translations for one address."""
    m = cpu.m
    if huge:
        base = (addr >> PMD_SHIFT) << (PMD_SHIFT - PAGE_SHIFT)
        small = tlb.pte and next((v for v in range(base, base + 512) if v in tlb.pte), None)
        if small:
            m.hazard(MIXED_TLB_SIZES, cpu, f"CPU{cpu.id} TLB holds a 2M translation for "
                     f"{addr:#x} and a 4K one for {small << PAGE_SHIFT:#x} inside it",
                     obj=f"va {addr & ~((1 << PMD_SHIFT) - 1):#x}")
    elif (addr >> PMD_SHIFT) in tlb.huge:
        m.hazard(MIXED_TLB_SIZES, cpu, f"CPU{cpu.id} TLB holds a 4K and a 2M translation for "
                 f"{addr:#x}", obj=f"va {addr:#x}")
    if len(m.cpus) > 1:
        mine = translate(tlb, addr)
        for other in m.cpus:
            theirs = other.tlbs.get(mm_name)
            if other is cpu or theirs is None:
                continue
            if m.fp is not None:  # the divergence hazard reads the other CPU's TLB
                m.fp.touch(m.step, ("tlb", other.id), False)
            pfn = translate(theirs, addr)
            if pfn is not None and pfn != mine and not other.lazy:
                why = _divergence(m, mm_name, pfn)
                if why:
                    m.hazard(TLB_DIVERGENCE, cpu, f"CPU{cpu.id} maps {addr:#x} to pfn {mine:#x} "
                             f"while CPU{other.id}'s TLB still maps it to pfn {pfn:#x}, {why}",
                             obj=f"va {addr:#x}")


def _divergence(m, mm_name: str, pfn: int) -> str:
    """Why another CPU's stale translation to ``pfn`` is a hazard, or "" when it is the
    mmu_gather window the kernel allows.

    The line follows mm/mmu_gather.c (tlb_flush_mmu: tlb_flush_mmu_tlbonly, then
    tlb_flush_mmu_free -> tlb_batch_pages_flush): pages a zap unmapped are freed only after
    the TLB flush, so that a stale entry on another CPU reaches a page the gather still pins,
    and mm->tlb_flush_pending (inc_tlb_flush_pending in tlb_gather_mmu, dec in
    tlb_finish_mmu after the flush) tells everyone such entries may exist. A stale frame
    that is freed breaks the first rule; a stale entry with no flush pending outlived the
    flush that should have removed it. Frame reuse shows as a freed frame here: the
    allocator's quarantine (memory.QUARANTINE) keeps a freed frame free for 4096 frees."""
    mem = m.mem
    if m.fp is not None:  # the frame's life and the pending count decide
        m.fp.touch(m.step, ("k", mem.folio(pfn)), False)
        m.fp.touch(m.step, ("pending", mm_name), False)
    kind = mem.kind[pfn]
    if kind != DATA and kind != ZERO:
        return f"{mem.describe(pfn)}: the frame was freed while a TLB still maps it"
    mm = m.mms.get(mm_name)
    if mm is not None and not mm.tlb_flush_pending:
        return ("with no TLB flush pending for the mm: the entry survived the flush that "
                "should have removed it")
    return ""


def _walk_fault(cpu, table: int, level: int, addr: int, cached: bool) -> None:
    m = cpu.m
    how = "a stale paging-structure cache entry" if cached else "a live upper-level entry"
    raise m.bug(TLB_USE_AFTER_FREE, cpu,
                f"CPU{cpu.id} hardware page walk for {addr:#x} through {how} into "
                f"{m.mem.describe(table)}",
                obj=m.mem.describe(table), keys=(("pt", table),), pfns=(table,),
                access=f"hardware walk of {addr:#x} reads table {table:#x}")


async def hw_access(cpu, mm, addr: int, write: bool) -> bool:
    """One user load or store: TLB lookup, hardware walk on a miss, then the data access.

    Returns False when the access faults (entry not present, or a write to a read-only one).
    Each level of the walk is a step, so other CPUs' writes interleave with it; but an
    interrupt is taken only at an instruction boundary, so while the instruction (and its walk)
    is in flight this CPU takes no IPI and reports no RCU quiescent state: a flush that waits
    for this CPU's acknowledgement therefore waits for the walk to finish.
    """
    m = cpu.m
    if cpu is m.lean:  # lean_step(), inlined
        m.step += 1
        if m.step > m.max_steps:
            raise m.livelock(cpu)
    else:
        await m.point(cpu)
    fp = m.fp
    if fp is not None:  # a TLB hit touches only this CPU's own TLB
        fp.begin(m.step, cpu.id)
        fp.touch(m.step, ("tlb", cpu.id), False)
    tlb = cpu.tlbs.get(mm.name) or cpu.tlb(mm.name)
    vpn = addr >> PAGE_SHIFT
    val = tlb.pte.get(vpn)
    if val is None:
        val = tlb.huge.get(addr >> PMD_SHIFT)
        if val is not None:  # a 2M translation: the subpage's frame
            vpn_pfn = (val >> PAGE_SHIFT) + (vpn & 511)
    else:
        vpn_pfn = val >> PAGE_SHIFT
    if val is not None:
        if write and not val & _PAGE_RW:
            return False
        _check_data(cpu, val >> PAGE_SHIFT, addr, write)
        if m.log is not None:
            m.ev(cpu, "user_access", addr=hex(addr), write=write, pfn=hex(vpn_pfn), via="tlb")
        return True

    if fp is not None:  # IRQs off: its quiescence, and whether an IPI may reach it
        fp.touch(m.step, ("irq", cpu.id), True)
        if m.rcu.gp_active:
            fp.pin(m.step)
    irqs = cpu.irqs_on
    cpu.irqs_on = False
    cpu.in_insn = True
    # TLB miss: the walk starts at the deepest paging-structure cache entry that covers addr.
    psc = tlb.psc
    level, table, cached = 4, mm.pgd, False
    for psc_level, shift in _PSC_ORDER:
        hit = psc.get((addr >> shift) << 2 | psc_level)
        if hit is not None:
            level, table, cached = psc_level, hit, True
            break
    mem = m.mem
    kind = mem.kind
    first = True
    while True:
        idx = (addr >> _LEVEL_SHIFT[level]) & 511
        if first:
            first = False
            if fp is not None:
                fp.touch(m.step, ("e", table, idx), False)
                fp.touch(m.step, ("f", table), False)
                fp.touch(m.step, ("tlb", cpu.id), True)
        else:
            if cpu is m.lean:  # lean_step(), inlined
                m.step += 1
                if m.step > m.max_steps:
                    raise m.livelock(cpu)
            else:
                await m.point(cpu)
                fp = m.fp  # (explore records from its branch point on: it may start here)
            if fp is not None:  # a level of its own: precise unless it ends the walk
                fp.begin(m.step, cpu.id)
                fp.touch(m.step, ("e", table, idx), False)
                fp.touch(m.step, ("f", table), False)
                fp.touch(m.step, ("tlb", cpu.id), True)  # the caches it fills
        if kind[table] != PAGETABLE:
            _walk_fault(cpu, table, level, addr, cached)
        entry = mem.entries[table][idx]
        if m.log is not None:
            m.ev(cpu, "hw_walk", level=level, table=hex(table), addr=hex(addr), val=hex(entry),
                 cached=cached)
        if not entry & _PAGE_PRESENT:
            break
        if level == 1 or (level == 2 and entry & _PAGE_PSE):
            if write and not entry & _PAGE_RW:
                break
            if level == 1:
                tlb.pte[vpn] = entry
                if tlb.huge or len(m.cpus) > 1:  # else no hazard is possible: skip the call
                    _check_fill(cpu, mm.name, tlb, addr, False)
            else:
                tlb.huge[addr >> PMD_SHIFT] = entry
                _check_fill(cpu, mm.name, tlb, addr, True)
            if kind[entry >> PAGE_SHIFT] not in _MAPPABLE:
                _check_data(cpu, entry >> PAGE_SHIFT, addr, write)
            if m.log is not None:
                m.ev(cpu, "user_access", addr=hex(addr), write=write, pfn=hex(entry >> PAGE_SHIFT),
                     via="walk")
            if fp is not None:
                fp.touch(m.step, ("irq", cpu.id), True)
                if m.rcu.gp_active:
                    fp.pin(m.step)
            cpu.irqs_on = irqs
            cpu.in_insn = False
            return True
        table = entry >> PAGE_SHIFT
        level -= 1
        cached = False
        psc[(addr >> _LEVEL_SHIFT[level + 1]) << 2 | level] = table
    if fp is not None:
        fp.touch(m.step, ("irq", cpu.id), True)
        if m.rcu.gp_active:
            fp.pin(m.step)
    cpu.irqs_on = irqs
    cpu.in_insn = False
    return False


class TlbSyncWait(WaitReason):
    __slots__ = ()

    def describe(self, m) -> str:
        walkers = [f"CPU{c.id}" for c in m.cpus if c.in_insn]
        return ("waits in TLBSYNC for the hardware walks in flight on "
                f"{', '.join(walkers) or 'nobody'}")


def flush_tlb_func(target, mm_name: str, start: int, end: int) -> None:
    """The IPI handler of a remote TLB shootdown."""
    tlb = target.tlbs.get(mm_name)
    if tlb is not None:
        tlb.flush_range(start, end)
    if target.m.log is not None:
        target.m.ev(target, "flush_tlb_func", mm=mm_name, start=hex(start), end=hex(end))


async def flush_tlb_range(cpu, mm, start: int, end: int) -> None:
    """x86 flush_tlb_range(vma, start, end) (arch/x86/include/asm/tlbflush.h): the macro calls
    flush_tlb_mm_range(vma->vm_mm, start, end, stride, freed_tables) with freed_tables = true
    since 3ef938c35035 ("x86/mm: Fix flush_tlb_range() when used for zapping normal PMDs",
    v6.15-rc1, Cc stable), false before it (pmd_flush_freed_tables). Its commit
    message: the path "collapse_pte_mapped_thp -> pmdp_collapse_flush -> flush_tlb_range" zaps
    a pmd that points at a page table; with false, native_flush_tlb_multi takes the
    should_flush_tlb branch and skips lazy-TLB CPUs, whose paging-structure caches keep the
    table (catalogue D13). The generic flush_pmd_tlb_range, which x86 does not override, is
    this macro too."""
    await flush_tlb_mm_range(cpu, mm, start, end, cpu.m.cfg.pmd_flush_freed_tables)


async def flush_tlb_mm_range(cpu, mm, start: int, end: int, freed_tables: bool) -> None:
    """x86 flush_tlb_mm_range: flush locally, then the other CPUs in mm_cpumask.

    tlb_flush="ipi": flush_tlb_multi IPIs the targets and waits for each to run the handler,
    which an IRQ-off CPU does only after re-enabling IRQs. Lazy-TLB CPUs are skipped unless the
    flush frees tables and flush_freed_tables_to_lazy holds.
    tlb_flush="broadcast": INVLPGB or a hypervisor flush invalidates every CPU's entries
    without interrupting anyone, so it waits for no IRQ-off walker.
    """
    m = cpu.m
    await m.point(cpu)
    broadcast = m.cfg.tlb_flush == "broadcast"
    targets = []
    if not broadcast:
        reach_lazy = freed_tables and m.cfg.flush_freed_tables_to_lazy
        targets = [c for c in m.cpus if c is not cpu and c.id in mm.cpumask
                   and (reach_lazy or not c.lazy)]
        if targets and m.fp is not None:
            # Precise when it sends IPIs: the step ends where smp_call_function_many sends
            # them, and until then changes this CPU's preemption count (its quiescence) and
            # its own TLB. (mm_cpumask and the lazy flags are changed by opaque steps only.)
            begin_pinned(m, cpu, ("tlb", cpu.id))
    cpu.preempt += 1  # get_cpu()
    cpu.tlb(mm.name).flush_range(start, end)
    if m.log is not None:
        m.ev(cpu, "flush_tlb_mm_range", mm=mm.name, start=hex(start), end=hex(end),
             freed_tables=freed_tables, mode=m.cfg.tlb_flush)
    if broadcast:
        # INVLPGB + TLBSYNC: complete once every CPU has dropped the translations, walks that
        # are in flight included; no CPU is interrupted, so IRQ-off software walkers are not
        # waited for.
        others = [c for c in m.cpus if c is not cpu]
        if any(c.in_insn for c in others):
            await m.wait(cpu, lambda: not any(c.in_insn for c in others), TlbSyncWait())
        for other in m.cpus:
            if other is not cpu and mm.name in other.tlbs:
                other.tlbs[mm.name].flush_range(start, end)
    elif targets:
        await smp_call_function_many(cpu, targets, flush_tlb_func, (mm.name, start, end),
                                     "flush_tlb_func")
    cpu.preempt -= 1
