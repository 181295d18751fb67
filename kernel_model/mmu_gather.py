"""struct mmu_gather (mm/mmu_gather.c, ~6.15, x86): batched TLB flushing and freeing.

Data folios wait in the page batch until after the TLB flush. Page tables go through
tlb_remove_table (table_free "rcu" or "semi_rcu") or, as x86 native did before 6.15, through
tlb_remove_page (table_free "page": freed right after the flush, protected only by the flush
IPI that IRQ-off walkers hold off).
"""

from __future__ import annotations

__kernel_file__ = "mm/mmu_gather.c"  # where the kernel functions below live (reports cite it)
__kernel_files__ = {  # the ones that live elsewhere
    "pte_free_tlb": "include/asm-generic/tlb.h",
    "pmd_free_tlb": "include/asm-generic/tlb.h",
    "pud_free_tlb": "include/asm-generic/tlb.h",
    "tlb_flush_mmu_tlbonly": "include/asm-generic/tlb.h",
}

from .footprint import touch
from .ipi import tlb_remove_table_sync_one
from .pagetable import PAGE_SIZE
from .pgalloc import check_table_empty, folio_put, free_table_page, pagetable_dtor, pte_free
from .rcu import call_rcu
from .registry import config_key, fault, kfunc
from .tlb import flush_tlb_mm_range

TABLE_FREE = config_key(
    "table_free", ("rcu", "semi_rcu", "page"),
    "How mmu_gather frees page tables. rcu: always after an RCU grace period, the single-table "
    "fallback included (PT_RECLAIM's __tlb_remove_table_one, v6.14). semi_rcu: the batch by RCU, "
    "but when the batch page cannot be allocated, one table is freed right after an IPI to every "
    "CPU (tlb_remove_table_sync_one), which rcu_read_lock() walkers do not hold off. page: "
    "tlb_remove_page right after the TLB flush, protected only by the flush IPI that IRQ-off "
    "walkers hold off (x86 native before v6.15).",
    "x86: Make MMU_GATHER_RCU_TABLE_FREE unconditional (a37259732a7d, v6.15)")
PTLOCK_FREE = config_key(
    "ptlock_free", ("rcu", "immediate"),
    "rcu: the split ptlock is destroyed with its table page, whenever and however that page is "
    "freed (pagetable_dtor in __tlb_remove_table). immediate: already when pte_free_tlb queues "
    "the table, before the flush and any grace period (the Dec 2024 syzbot use-after-free).",
    "mm: move pagetable_*_dtor() to __tlb_remove_table() (Dec 2024, before PT_RECLAIM shipped "
    "in v6.14)")
MMU_GATHER_BATCH_FULL = fault(
    "mmu_gather_batch_full",
    "__tlb_remove_folio_pages finds the page batch full and tlb_next_batch cannot add another "
    "(MAX_GATHER_BATCH_COUNT reached, or its GFP_NOWAIT page allocation failed) when "
    "zap_pte_range queues a folio: force_flush and force_break, so zap_pte_range flushes the "
    "TLB under the PTE lock (tlb_flush_mmu_tlbonly), drops it, frees the batched pages and "
    "tables (tlb_flush_mmu) and resumes the range at the next entry (mm/memory.c and "
    "mm/mmu_gather.c, 6.14)")
TABLE_BATCH_ALLOC_FAIL = fault(
    "table_batch_alloc_fail",
    "mmu_gather cannot allocate its table batch page (__get_free_page(GFP_NOWAIT)) and takes "
    "the single-table path, tlb_remove_table_one")

# Tables per mmu_table_batch page: (PAGE_SIZE - header) / sizeof(void *).
MAX_TABLE_BATCH = 509


class MmuGather:
    def __init__(self, mm) -> None:
        self.mm = mm
        self.start = 1 << 64
        self.end = 0
        self.freed_tables = False
        self.fullmm = False  # set by tlb_finish_mmu when mm_tlb_flush_nested (x86: flush all)
        self.pages: list[tuple[int, bool]] = []  # (pfn, is_table), freed after the flush
        self.batch: list[int] | None = None


def _rcu_free_tables(m, tables: list[int], queued_by: tuple) -> None:
    """tlb_remove_table_rcu / __tlb_remove_table_one_rcu: runs after a grace period."""
    cpu_id, func, step = queued_by
    who = (None, f"RCU callback (queued by CPU{cpu_id} in {func} at step {step})", m.step)
    for pfn in tables:
        free_table_page(m, pfn, who)


def tlb_gather_mmu(cpu, mm) -> MmuGather:
    if cpu.m.fp is not None:  # read by the RFC's flush before set_pmd_at
        touch(cpu.m, ("pending", mm.name), True)
    mm.tlb_flush_pending += 1  # inc_tlb_flush_pending
    return MmuGather(mm)


def tlb_remove_tlb_entry(tlb: MmuGather, addr: int) -> None:
    tlb.start = min(tlb.start, addr)
    tlb.end = max(tlb.end, addr + PAGE_SIZE)


def tlb_remove_pmd_tlb_entry(tlb: MmuGather, addr: int) -> None:
    start = addr & ~((1 << 21) - 1)
    tlb.start = min(tlb.start, start)
    tlb.end = max(tlb.end, start + (1 << 21))


def tlb_remove_folio(tlb: MmuGather, pfn: int) -> None:
    """__tlb_remove_folio_pages: the mapping's reference is dropped after the flush."""
    tlb.pages.append((pfn, False))


@kfunc
async def tlb_flush_mmu_tlbonly(cpu, tlb: MmuGather) -> None:
    if tlb.end <= tlb.start:
        return
    await flush_tlb_mm_range(cpu, tlb.mm, tlb.start, tlb.end, tlb.freed_tables)
    tlb.start, tlb.end, tlb.freed_tables = 1 << 64, 0, False  # __tlb_reset_range


@kfunc
async def tlb_table_invalidate(cpu, tlb: MmuGather) -> None:
    # tlb_needs_table_invalidate(): hardware walkers' paging-structure caches must be
    # invalidated before the table can be freed.
    await tlb_flush_mmu_tlbonly(cpu, tlb)


@kfunc
async def tlb_remove_table_one(cpu, table: int) -> None:
    m = cpu.m
    if m.cfg.table_free == "rcu":
        # PT_RECLAIM's __tlb_remove_table_one: call_rcu(&ptdesc->pt_rcu_head, ...)
        call_rcu(cpu, _rcu_free_tables, [table], name="__tlb_remove_table_one_rcu")
    else:
        # semi-RCU: 'IPI cannot be synchronized with rcu_read_lock() in pte_offset_map()'
        await tlb_remove_table_sync_one(cpu)
        await pte_free(cpu, table)  # __tlb_remove_table(): immediately


@kfunc
async def tlb_table_flush(cpu, tlb: MmuGather) -> None:
    if tlb.batch:
        await tlb_table_invalidate(cpu, tlb)
        batch, tlb.batch = tlb.batch, None
        call_rcu(cpu, _rcu_free_tables, batch, name="tlb_remove_table_rcu")


@kfunc
async def tlb_remove_table(cpu, tlb: MmuGather, table: int) -> None:
    m = cpu.m
    if tlb.batch is None:
        # __get_free_page(GFP_NOWAIT | __GFP_NOWARN) for the batch may fail.
        if m.choose_fault(cpu, TABLE_BATCH_ALLOC_FAIL):
            if m.log is not None:
                m.ev(cpu, "table_batch_alloc_failed")
            await tlb_table_invalidate(cpu, tlb)
            await tlb_remove_table_one(cpu, table)
            return
        tlb.batch = []
    tlb.batch.append(table)
    if len(tlb.batch) == MAX_TABLE_BATCH:
        await tlb_table_flush(cpu, tlb)


async def _free_table_tlb(cpu, tlb: MmuGather, table: int, addr: int, what: str) -> None:
    """p?d_free_tlb(): tlb_flush_p?d_range(addr); freed_tables = 1; __p?d_free_tlb."""
    m = cpu.m
    await m.point(cpu)
    check_table_empty(m, table, m.who(cpu), cpu)
    tlb_remove_tlb_entry(tlb, addr)
    tlb.freed_tables = True
    m.remember(("pt", table), cpu, f"{what} queued it for freeing")
    if m.cfg.ptlock_free == "immediate":
        # Before the dtor moved into __tlb_remove_table: ___pte_free_tlb ran
        # pagetable_pte_dtor -> ptlock_free at once (the Dec 2024 syzbot report).
        pagetable_dtor(m, table, m.who(cpu))
    if m.log is not None:
        m.ev(cpu, what, pfn=hex(table), mode=m.cfg.table_free)
    if m.cfg.table_free == "page":
        tlb.pages.append((table, True))  # tlb_remove_page(): freed after the flush
    else:
        await tlb_remove_table(cpu, tlb, table)


@kfunc
async def pte_free_tlb(cpu, tlb: MmuGather, table: int, addr: int) -> None:
    await _free_table_tlb(cpu, tlb, table, addr, "pte_free_tlb")


@kfunc
async def pmd_free_tlb(cpu, tlb: MmuGather, table: int, addr: int) -> None:
    await _free_table_tlb(cpu, tlb, table, addr, "pmd_free_tlb")


@kfunc
async def pud_free_tlb(cpu, tlb: MmuGather, table: int, addr: int) -> None:
    await _free_table_tlb(cpu, tlb, table, addr, "pud_free_tlb")


@kfunc
async def tlb_batch_pages_flush(cpu, tlb: MmuGather) -> None:
    m = cpu.m
    if not tlb.pages:
        return
    await m.point(cpu)
    pages, tlb.pages = tlb.pages, []
    who = m.who(cpu)
    for pfn, is_table in pages:
        if is_table:
            free_table_page(m, pfn, who, cpu)
        else:
            folio_put(m, pfn, who, cpu)


@kfunc
async def tlb_flush_mmu(cpu, tlb: MmuGather) -> None:
    await tlb_flush_mmu_tlbonly(cpu, tlb)
    # tlb_flush_mmu_free
    await tlb_table_flush(cpu, tlb)
    await tlb_batch_pages_flush(cpu, tlb)


# x86 tlb_flush(): a fullmm gather flushes 0..TLB_FLUSH_ALL (arch/x86/include/asm/tlb.h).
TLB_FLUSH_ALL = 1 << 64


def mm_tlb_flush_nested(m, mm) -> bool:
    """include/linux/mm_types.h: atomic_read(&mm->tlb_flush_pending) > 1 -- another mmu_gather
    of this mm (inc_tlb_flush_pending in tlb_gather_mmu) has not finished yet."""
    if m.fp is not None:
        touch(m, ("pending", mm.name))
    return mm.tlb_flush_pending > 1


@kfunc
async def tlb_finish_mmu(cpu, tlb: MmuGather) -> None:
    """mm/mmu_gather.c tlb_finish_mmu (read in the 6.14-era tree and unchanged since 7a30df49f63a,
    "mm: mmu_gather: remove __tlb_reset_range() for force flush", v5.2): if mm_tlb_flush_nested,
    another thread may be batching PTE changes of the same range under a shared lock and this
    gather cannot tell what it should have flushed, so `tlb->fullmm = 1; __tlb_reset_range(tlb);
    tlb->freed_tables = 1;` and x86 tlb_flush() then flushes the whole mm (start 0, end
    TLB_FLUSH_ALL) with freed_tables, which reaches lazy-TLB CPUs too. Then tlb_flush_mmu and
    dec_tlb_flush_pending."""
    m = cpu.m
    if mm_tlb_flush_nested(m, tlb.mm):
        tlb.fullmm = True
        tlb.start, tlb.end = 0, TLB_FLUSH_ALL  # __tlb_reset_range + x86 tlb_flush() for fullmm
        tlb.freed_tables = True
        if m.log is not None:
            m.ev(cpu, "mm_tlb_flush_nested", mm=tlb.mm.name, pending=tlb.mm.tlb_flush_pending)
    await tlb_flush_mmu(cpu, tlb)
    if cpu.m.fp is not None:
        touch(cpu.m, ("pending", tlb.mm.name), True)
    tlb.mm.tlb_flush_pending -= 1  # dec_tlb_flush_pending
