"""The anonymous page-fault path: handle_mm_fault -> do_anonymous_page (mm/memory.c, ~6.14)."""

from __future__ import annotations

from ptsim.kernel_model.locks import down_read, spin_lock, spin_unlock, up_read
from ptsim.kernel_model.machine import kfunc
from ptsim.kernel_model.memory import ZERO_PFN
from ptsim.kernel_model.pagetable import entry_pfn, index, mk_pte, mk_table_entry, present, writable
from ptsim.kernel_model.pgalloc import folio_put, pmd_alloc_one, pte_alloc_one, pte_free, pud_alloc_one
from ptsim.kernel_model.pgtable import (pmd_lock, pmdp_get_lockless, pte_offset_map_lock,
                                        pte_offset_map_rw_nolock, pte_unmap, pte_unmap_unlock,
                                        ptep_get, ptep_get_and_clear, ptep_get_lockless, read_entry,
                                        set_pte_at, write_entry)
from ptsim.kernel_model.tlb import flush_tlb_mm_range

PAGE = 4096


@kfunc
async def __pud_alloc(cpu, mm, pgdp) -> None:
    """Allocate the PUD table for a none pgd entry under mm->page_table_lock."""
    new = await pud_alloc_one(cpu, mm)
    await spin_lock(cpu, mm.page_table_lock)
    if not present(await read_entry(cpu, pgdp, "p4d_present")):
        mm.nr_puds += 1
        await write_entry(cpu, pgdp, mk_table_entry(new), "p4d_populate")
        new = None
    await spin_unlock(cpu, mm.page_table_lock)
    if new is not None:
        await pte_free(cpu, new)


@kfunc
async def __pmd_alloc(cpu, mm, pudp) -> None:
    new = await pmd_alloc_one(cpu, mm)
    await spin_lock(cpu, mm.page_table_lock)  # pud_lock()
    if not present(await read_entry(cpu, pudp, "pud_present")):
        mm.nr_pmds += 1
        await write_entry(cpu, pudp, mk_table_entry(new), "pud_populate")
        new = None
    await spin_unlock(cpu, mm.page_table_lock)
    if new is not None:
        await pte_free(cpu, new)


@kfunc
async def pmd_install(cpu, mm, pmdp, new: int) -> bool:
    """Returns True when the new table was installed (else the caller frees it)."""
    ptl = await pmd_lock(cpu, mm, pmdp)
    installed = False
    if (await pmdp_get_lockless(cpu, pmdp)) == 0:
        mm.nr_ptes += 1  # mm_inc_nr_ptes, then smp_wmb() before pmd_populate
        await write_entry(cpu, pmdp, mk_table_entry(new), "pmd_populate")
        installed = True
    await spin_unlock(cpu, ptl)
    return installed


@kfunc
async def __pte_alloc(cpu, mm, pmdp) -> None:
    new = await pte_alloc_one(cpu, mm)
    if not await pmd_install(cpu, mm, pmdp, new):
        await pte_free(cpu, new)  # a losing racer frees its table


async def pte_alloc(cpu, mm, pmdp) -> None:
    if (await pmdp_get_lockless(cpu, pmdp)) == 0:
        await __pte_alloc(cpu, mm, pmdp)


@kfunc
async def do_anonymous_page(cpu, mm, vma, pmdp, addr: int, write: bool) -> None:
    m = cpu.m
    await pte_alloc(cpu, mm, pmdp)
    folio = None
    if not write:
        entry = mk_pte(ZERO_PFN, False, special=True)  # my_zero_pfn(): never freed
    else:
        await m.point(cpu)
        folio = m.mem.alloc_data(m.who(cpu))  # alloc_anon_folio; refcount 1 belongs to the mapping
        m.ev(cpu, "alloc_folio", pfn=hex(folio))
        entry = mk_pte(folio, True)
    mapped = await pte_offset_map_lock(cpu, mm, pmdp, addr)
    if mapped is None:
        if folio is not None:
            folio_put(m, folio, m.who(cpu), cpu)
        return
    table, ptl = mapped
    ptep = (table, index(1, addr))
    if (await ptep_get(cpu, ptep)) != 0:  # vmf_pte_changed(): someone else faulted it in
        if folio is not None:
            folio_put(m, folio, m.who(cpu), cpu)
        await pte_unmap_unlock(cpu, ptl)
        return
    if folio is not None:
        mm.rss += 1  # inc_mm_counter(MM_ANONPAGES); folio_add_new_anon_rmap
    await set_pte_at(cpu, ptep, entry)
    await pte_unmap_unlock(cpu, ptl)


@kfunc
async def wp_page_copy(cpu, mm, vma, pmdp, addr: int, orig: int) -> None:
    """Break COW of the zero page: a new folio replaces it, ptep_clear_flush() first so that
    no two TLBs ever hold different translations for the address (the wp_page_copy comment)."""
    m = cpu.m
    await m.point(cpu)
    folio = m.mem.alloc_data(m.who(cpu))
    m.ev(cpu, "alloc_folio", pfn=hex(folio))
    mapped = await pte_offset_map_lock(cpu, mm, pmdp, addr)
    if mapped is None:
        folio_put(m, folio, m.who(cpu), cpu)
        return
    table, ptl = mapped
    ptep = (table, index(1, addr))
    if (await ptep_get(cpu, ptep)) == orig:
        await ptep_get_and_clear(cpu, ptep)  # ptep_clear_flush
        await flush_tlb_mm_range(cpu, mm, addr, addr + PAGE, False)  # flush_tlb_page
        mm.rss += 1
        await set_pte_at(cpu, ptep, mk_pte(folio, True))
        old = entry_pfn(orig)
        if old != ZERO_PFN:
            folio_put(m, old, m.who(cpu), cpu)
    else:
        folio_put(m, folio, m.who(cpu), cpu)
    await pte_unmap_unlock(cpu, ptl)


@kfunc
async def handle_pte_fault(cpu, mm, vma, pmdp, addr: int, write: bool) -> None:
    if (await pmdp_get_lockless(cpu, pmdp)) == 0:
        await do_anonymous_page(cpu, mm, vma, pmdp, addr, write)  # do_pte_missing
        return
    mapped = await pte_offset_map_rw_nolock(cpu, mm, pmdp, addr)
    if mapped is None:
        return  # the pmd changed under us: return and let the access fault again
    table, _pmdval, ptl = mapped
    ptep = (table, index(1, addr))
    orig = await ptep_get_lockless(cpu, ptep)
    if orig == 0:
        await pte_unmap(cpu)
        await do_anonymous_page(cpu, mm, vma, pmdp, addr, write)
        return
    await spin_lock(cpu, ptl)
    if (await ptep_get(cpu, ptep)) != orig:  # pte_same() stands in for a pmd recheck
        await pte_unmap_unlock(cpu, ptl)
        return
    if write and not writable(orig):
        await pte_unmap_unlock(cpu, ptl)  # do_wp_page drops the lock before copying
        await wp_page_copy(cpu, mm, vma, pmdp, addr, orig)
        return
    await pte_unmap_unlock(cpu, ptl)  # only the accessed/dirty bits would change


@kfunc
async def handle_mm_fault(cpu, mm, addr: int, write: bool) -> None:
    """lock_vma_under_rcu() (the per-VMA read lock), then __handle_mm_fault."""
    vma = mm.find_vma(addr)
    if vma is None:
        return
    await down_read(cpu, vma.vm_lock)
    pgdp = (mm.pgd, index(4, addr))
    if not present(await read_entry(cpu, pgdp, "pgd_offset")):
        await __pud_alloc(cpu, mm, pgdp)
    pud_table = entry_pfn(await read_entry(cpu, pgdp, "pgd_offset"))
    pudp = (pud_table, index(3, addr))
    if not present(await read_entry(cpu, pudp, "pud_offset")):
        await __pmd_alloc(cpu, mm, pudp)
    pmd_table = entry_pfn(await read_entry(cpu, pudp, "pud_offset"))
    await handle_pte_fault(cpu, mm, vma, (pmd_table, index(2, addr)), addr, write)
    await up_read(cpu, vma.vm_lock)


async def fault(cpu, mm, addr: int, write: bool = False) -> None:
    """Scenario op `fault`: one call of handle_mm_fault."""
    await handle_mm_fault(cpu, mm, addr, write)
