"""GUP-fast (mm/gup.c, ~6.12-6.15): a lockless walk with IRQs off.

'With interrupts disabled, we block page table pages from being freed from under us': the
flush IPI of a table free cannot complete while this CPU has IRQs off, and consolidated RCU
cannot end a grace period. A flush that sends no IPI (INVLPGB, paravirt) voids the first.
"""

from __future__ import annotations

__kernel_file__ = "mm/gup.c"  # where the kernel functions below live (reports cite it)

from ptsim.kernel_model.footprint import begin, begin_pinned
from ptsim.kernel_model.memory import DATA
from ptsim.kernel_model.pagetable import (
    _PAGE_SPECIAL,
    PAGE_SIZE,
    entry_pfn,
    index,
    leaf,
    present,
    writable,
)
from ptsim.kernel_model.pgalloc import folio_put
from ptsim.kernel_model.pgtable import (
    ___pte_offset_map,
    pmdp_get,
    pmdp_get_lockless,
    pte_unmap,
    ptep_get,
    ptep_get_lockless,
    read_entry,
)
from ptsim.kernel_model.registry import Addr, kfunc, op


async def local_irq_save(cpu) -> bool:
    await cpu.m.point(cpu)
    if cpu.m.fp is not None:
        begin_pinned(cpu.m, cpu, ("irq", cpu.id))
    flags = cpu.irqs_on
    cpu.irqs_on = False
    cpu.m.ev(cpu, "local_irq_save")
    return flags


async def local_irq_restore(cpu, flags: bool) -> None:
    await cpu.m.point(cpu)
    if cpu.m.fp is not None:
        begin_pinned(cpu.m, cpu, ("irq", cpu.id))
    cpu.irqs_on = flags
    cpu.m.ev(cpu, "local_irq_restore")


async def try_grab_folio_fast(cpu, pfn: int, refs: int = 1) -> bool:
    """folio_try_get(): reading a freed page's refcount is fine (struct page is permanent);
    a count of zero makes the grab fail."""
    m = cpu.m
    await m.point(cpu)
    pfn = m.mem.folio(pfn)
    if m.fp is not None:
        m.fp.begin(m.step, cpu.id)
        m.fp.touch(m.step, ("k", pfn), True)
    if m.mem.kind[pfn] != DATA or m.mem.refcount[pfn] == 0:
        m.ev(cpu, "try_grab_folio", pfn=hex(pfn), ok=False)
        return False
    m.mem.refcount[pfn] += refs
    m.ev(cpu, "try_grab_folio", pfn=hex(pfn), ok=True)
    return True


@kfunc
async def gup_fast_pte_range(cpu, pmd: int, pmdp, addr: int, end: int, write: bool,
                             pages: list) -> bool:
    mapped = await ___pte_offset_map(cpu, pmdp, addr, pmdval_copy=pmd)  # pte_offset_map(&pmd)
    if mapped is None:
        return False
    table = mapped[0]
    ok = True
    while addr != end:
        ptep = (table, index(1, addr))
        pte = await ptep_get_lockless(cpu, ptep)
        if not present(pte) or (write and not writable(pte)) or pte & _PAGE_SPECIAL:
            ok = False
            break
        pfn = entry_pfn(pte)
        if not await try_grab_folio_fast(cpu, pfn):
            ok = False
            break
        # 'pin the page, then check the pte (and the pmd: the table may be being freed) has
        # not changed' -- this makes the result right, not the walk memory-safe.
        if (await pmdp_get(cpu, pmdp)) != pmd or (await ptep_get(cpu, ptep)) != pte:
            folio_put(cpu.m, pfn, cpu.m.who(cpu), cpu)  # gup_put_folio
            ok = False
            break
        pages.append(pfn)
        addr += PAGE_SIZE
    await pte_unmap(cpu)
    return ok


@kfunc
async def gup_fast_pmd_leaf(cpu, pmd: int, pmdp, addr: int, end: int, write: bool,
                            pages: list) -> bool:
    """Grab one reference per subpage on the folio, then recheck the pmd."""
    m = cpu.m
    if write and not writable(pmd):
        return False
    folio = entry_pfn(pmd)
    if m.mem.is_zero(folio):
        return False  # the huge zero page is special
    nr = (end - addr) // PAGE_SIZE
    if not await try_grab_folio_fast(cpu, folio, nr):
        return False
    if (await pmdp_get(cpu, pmdp)) != pmd:
        for _ in range(nr):
            folio_put(m, folio, m.who(cpu), cpu)
        return False
    pages.extend([folio] * nr)
    return True


@kfunc
async def gup_fast_pmd_range(cpu, pudval: int, addr: int, end: int, write: bool,
                             pages: list) -> bool:
    pmdp = (entry_pfn(pudval), index(2, addr))
    pmd = await pmdp_get_lockless(cpu, pmdp)
    if not present(pmd):
        return False
    if leaf(pmd):
        return await gup_fast_pmd_leaf(cpu, pmd, pmdp, addr, end, write, pages)
    return await gup_fast_pte_range(cpu, pmd, pmdp, addr, end, write, pages)


@kfunc
async def gup_fast_pgd_range(cpu, mm, addr: int, end: int, write: bool, pages: list) -> bool:
    pgd = await read_entry(cpu, (mm.pgd, index(4, addr)), "pgdp_get")
    if not present(pgd):
        return False
    pud = await read_entry(cpu, (entry_pfn(pgd), index(3, addr)), "pudp_get")
    if not present(pud):
        return False
    return await gup_fast_pmd_range(cpu, pud, addr, end, write, pages)


@kfunc
async def gup_fast(cpu, mm, addr: int, nr_pages: int, write: bool) -> list[int]:
    pages: list[int] = []
    end = addr + nr_pages * PAGE_SIZE
    flags = await local_irq_save(cpu)
    while addr < end:  # one pmd at a time, as the pgd..pmd range walkers do
        next_ = min((addr + (1 << 21)) & ~((1 << 21) - 1), end)
        if not await gup_fast_pgd_range(cpu, mm, addr, next_, write, pages):
            break
        addr = next_
    await local_irq_restore(cpu, flags)
    return pages


@op("gup_fast")
async def gup_fast_op(cpu, *, addr: Addr, nr_pages: int = 1, write: bool = False) -> None:
    """gup_fast: local_irq_save, a lockless walk, try_grab_folio and the pmd/pte recheck, for
    nr_pages pages from addr; then the pages are unpinned (the caller is done with them)."""
    pages = await gup_fast(cpu, cpu.mm, addr, nr_pages, write)
    m = cpu.m
    for pfn in pages:
        await m.point(cpu)
        if m.fp is not None:  # folio_put declares the folio (and makes a free opaque)
            begin(m, cpu)
        folio_put(m, pfn, m.who(cpu, "unpin_user_page"), cpu)
