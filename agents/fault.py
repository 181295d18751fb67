"""The page-fault path (mm/memory.c, mm/huge_memory.c, mm/filemap.c, ~6.14): handle_mm_fault ->
do_anonymous_page, do_huge_pmd_anonymous_page for THP, do_fault -> filemap_fault ->
finish_fault for file and shmem mappings (modelled as MAP_SHARED); in a file or shmem vma with
thp = true, finish_fault -> do_set_pmd maps a PMD-sized page-cache folio by a huge pmd."""

from __future__ import annotations

__kernel_file__ = "mm/memory.c"  # where the kernel functions below live (reports cite it)
__kernel_files__ = {  # the ones that live elsewhere
    "do_huge_pmd_anonymous_page": "mm/huge_memory.c",
    "__split_huge_zero_page_pmd": "mm/huge_memory.c",
    "do_huge_pmd_wp_page": "mm/huge_memory.c",
    "filemap_fault": "mm/filemap.c",
    "__split_huge_pmd_file": "mm/huge_memory.c",
    "arch_flush_tlb_before_set_pmd": "arch/x86/mm/tlb.c",
}

from ptsim.kernel_model.errors import NotModelled
from ptsim.kernel_model.filemap import folio_lock, folio_unlock, mapping_of
from ptsim.kernel_model.footprint import begin, touch
from ptsim.kernel_model.locks import lock_vma_or_mmap, spin_lock, spin_unlock, up_read
from ptsim.kernel_model.memory import ZERO_PFN
from ptsim.kernel_model.pagetable import (
    GUARD_PTE,
    PAGE_SIZE,
    PMD_SIZE,
    entry_pfn,
    index,
    leaf,
    mk_huge_pmd,
    mk_pte,
    mk_table_entry,
    present,
    writable,
)
from ptsim.kernel_model.pgalloc import (
    folio_put,
    pmd_alloc_one,
    pte_alloc_one,
    pte_free,
    pud_alloc_one,
)
from ptsim.kernel_model.pgtable import (
    pmd_lock,
    pmdp_get,
    pmdp_get_lockless,
    pte_offset_map_lock,
    pte_offset_map_rw_nolock,
    pte_unmap,
    pte_unmap_unlock,
    ptep_get_and_clear,
    ptep_get_locked,
    ptep_get_lockless,
    read_entry,
    set_pte_at,
    write_entry,
)
from ptsim.kernel_model.registry import Addr, config_key, kfunc, op
from ptsim.kernel_model.tlb import flush_tlb_mm_range, flush_tlb_range

FLUSH_BEFORE_SET_PMD = config_key(
    "flush_before_set_pmd", (False, True),
    "The PT_RECLAIM RFC's arch_flush_tlb_before_set_huge_page / _pte_page: under the pmd lock, "
    "just before set_pmd_at, if a TLB flush is pending for the mm, flush the 2 MB range first "
    "(freed_tables false). Never merged: false is every released kernel.",
    "RFC v1/v2 of the PT_RECLAIM series (2024), dropped before merging")


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
async def arch_flush_tlb_before_set_pmd(cpu, mm, addr: int) -> None:
    """The RFC's arch_flush_tlb_before_set_huge_page / _pte_page (config flush_before_set_pmd):
    under the pmd lock, if a TLB flush is pending for the mm (a zap that cleared the pmd has not
    flushed yet), flush the 2 MB range first, with freed_tables false."""
    if cpu.m.cfg.flush_before_set_pmd and cpu.m.fp is not None:
        touch(cpu.m, ("pending", mm.name))
    if cpu.m.cfg.flush_before_set_pmd and mm.tlb_flush_pending:
        start = addr & ~(PMD_SIZE - 1)
        await flush_tlb_mm_range(cpu, mm, start, start + PMD_SIZE, False)


async def alloc_pmd(cpu, mm, addr: int):
    """pgd_offset -> p4d_alloc -> pud_alloc -> pmd_alloc, as __handle_mm_fault and
    mm_alloc_pmd() in mm/userfaultfd.c do it: each level's entry is read to see if it is none
    (allocating under mm->page_table_lock if so), then read again to step down. Returns the
    pmd pointer."""
    pgdp = (mm.pgd, index(4, addr))
    if not present(await read_entry(cpu, pgdp, "pgd_offset")):
        await __pud_alloc(cpu, mm, pgdp)
    pudp = (entry_pfn(await read_entry(cpu, pgdp, "pgd_offset")), index(3, addr))
    if not present(await read_entry(cpu, pudp, "pud_offset")):
        await __pmd_alloc(cpu, mm, pudp)
    return (entry_pfn(await read_entry(cpu, pudp, "pud_offset")), index(2, addr))


@kfunc
async def pmd_install(cpu, mm, pmdp, new: int, addr: int) -> bool:
    """Returns True when the new table was installed (else the caller frees it)."""
    ptl = await pmd_lock(cpu, mm, pmdp)
    installed = False
    if (await pmdp_get_lockless(cpu, pmdp)) == 0:
        mm.nr_ptes += 1  # mm_inc_nr_ptes, then smp_wmb() before pmd_populate
        await arch_flush_tlb_before_set_pmd(cpu, mm, addr)
        await write_entry(cpu, pmdp, mk_table_entry(new), "pmd_populate")
        installed = True
    await spin_unlock(cpu, ptl)
    return installed


@kfunc
async def __pte_alloc(cpu, mm, pmdp, addr: int) -> None:
    new = await pte_alloc_one(cpu, mm)
    if not await pmd_install(cpu, mm, pmdp, new, addr):
        await pte_free(cpu, new)  # a losing racer frees its table


async def pte_alloc(cpu, mm, pmdp, addr: int) -> None:
    if (await pmdp_get_lockless(cpu, pmdp)) == 0:
        await __pte_alloc(cpu, mm, pmdp, addr)


@kfunc
async def do_anonymous_page(cpu, mm, vma, pmdp, addr: int, write: bool) -> None:
    m = cpu.m
    await pte_alloc(cpu, mm, pmdp, addr)
    folio = None
    if not write:
        entry = mk_pte(ZERO_PFN, False, special=True)  # my_zero_pfn(): never freed
    else:
        await m.point(cpu)
        if m.fp is not None:  # the allocator; the new folio is no one else's yet
            begin(m, cpu)
            touch(m, ("alloc",), True)
        folio = m.mem.alloc_data(m.who(cpu))  # alloc_anon_folio; refcount 1 belongs to the mapping
        if m.log is not None:
            m.ev(cpu, "alloc_folio", pfn=hex(folio))
        entry = mk_pte(folio, True)
    mapped = await pte_offset_map_lock(cpu, mm, pmdp, addr)
    if mapped is None:
        if folio is not None:
            folio_put(m, folio, m.who(cpu), cpu)
        return
    table, ptl = mapped
    ptep = (table, index(1, addr))
    if ptep_get_locked(cpu, ptep) != 0:  # vmf_pte_changed(): someone else faulted it in
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
    if m.fp is not None:  # the allocator; the new folio is no one else's yet
        begin(m, cpu)
        touch(m, ("alloc",), True)
    folio = m.mem.alloc_data(m.who(cpu))
    if m.log is not None:
        m.ev(cpu, "alloc_folio", pfn=hex(folio))
    mapped = await pte_offset_map_lock(cpu, mm, pmdp, addr)
    if mapped is None:
        folio_put(m, folio, m.who(cpu), cpu)
        return
    table, ptl = mapped
    ptep = (table, index(1, addr))
    if ptep_get_locked(cpu, ptep) == orig:
        await ptep_get_and_clear(cpu, ptep)  # ptep_clear_flush
        await flush_tlb_mm_range(cpu, mm, addr, addr + PAGE_SIZE, False)  # flush_tlb_page
        mm.rss += 1
        await set_pte_at(cpu, ptep, mk_pte(folio, True))
        old = entry_pfn(orig)
        if old != ZERO_PFN:
            folio_put(m, old, m.who(cpu), cpu)
    else:
        folio_put(m, folio, m.who(cpu), cpu)
    await pte_unmap_unlock(cpu, ptl)


async def do_pte_missing(cpu, mm, vma, pmdp, addr: int, write: bool) -> None:
    if vma.type == "anon":
        await do_anonymous_page(cpu, mm, vma, pmdp, addr, write)
    else:
        await do_fault(cpu, mm, vma, pmdp, addr, write)


def file_thp_suitable(vma, addr: int) -> bool:
    """thp_vma_suitable_order(vma, haddr, PMD_ORDER) for a file vma: the aligned 2 MB lies inside
    the vma and the file offset is 2 MB-aligned at the same place (vm_start >> PAGE_SHIFT minus
    vm_pgoff is a multiple of HPAGE_PMD_NR)."""
    haddr = addr & ~(PMD_SIZE - 1)
    return (vma.start <= haddr and haddr + PMD_SIZE <= vma.end
            and ((vma.start // PAGE_SIZE) - vma.pgoff) % 512 == 0)


def add_huge_folio_to_page_cache(m, cpu, mapping, pgoff: int) -> int | None:
    """shmem_get_folio_gfp -> shmem_alloc_and_add_folio with HPAGE_PMD_ORDER allowed (mm/shmem.c,
    6.14; for a regular file, do_sync_mmap_readahead's VM_HUGEPAGE branch, ra->order =
    HPAGE_PMD_ORDER, mm/filemap.c): a PMD-sized folio for the aligned 512 pages around pgoff,
    added to the page cache only if none of them is cached (shmem_add_to_page_cache fails with
    -EEXIST otherwise and the kernel falls back to order 0, as here). The page cache then holds
    one reference per page (folio_nr_pages). Returns the head, or None to fall back."""
    start = pgoff & ~511
    pages = mapping.pages
    if any(pages.get(i) is not None for i in range(start, start + 512)):
        return None
    head = m.mem.alloc_huge_data(m.who(cpu, "shmem_alloc_folio"))
    m.mem.refcount[head] += 511
    for i in range(512):
        pages[start + i] = head + i
    if m.log is not None:
        m.ev(cpu, "add_to_page_cache", file=mapping.name, pgoff=start, pfn=hex(head), order=9)
    return head


@kfunc
async def filemap_fault(cpu, mapping, pgoff: int, huge: bool = False) -> tuple[int, int]:
    """Find or add the page cache page, take a reference for the caller and lock its folio.
    Returns (folio head, page). The folio lock sleeps while khugepaged holds it. huge: the vma
    allows a PMD-sized folio here (thp = true, file_thp_suitable): a missing page comes as part of
    one (add_huge_folio_to_page_cache) when none of its 512 pages is cached."""
    m = cpu.m
    mem = m.mem
    while True:
        await m.point(cpu)
        page = mapping.pages.get(pgoff)
        if page is None and huge and add_huge_folio_to_page_cache(m, cpu, mapping, pgoff):
            page = mapping.pages[pgoff]
        if page is None:
            page = mem.alloc_data(m.who(cpu))  # the page cache's reference
            mapping.pages[pgoff] = page
            if m.log is not None:
                m.ev(cpu, "add_to_page_cache", file=mapping.name, pgoff=pgoff, pfn=hex(page))
        folio = mem.folio(page)
        if m.fp is not None:
            touch(m, ("k", folio), True)
        mem.refcount[folio] += 1
        await folio_lock(cpu, mapping, folio)
        if mapping.pages.get(pgoff) == page:
            return folio, page
        # The folio was replaced (e.g. collapsed) while we slept on its lock: look again.
        await folio_unlock(cpu, mapping, folio)
        folio_put(m, folio, m.who(cpu), cpu)


@kfunc
async def do_set_pmd(cpu, mm, vma, pmdp, addr: int, folio: int, write: bool) -> bool:
    """do_set_pmd(vmf, folio, page) (mm/memory.c, 6.14; unchanged in shape through 6.17 but for
    the folio argument): map a PMD-sized page-cache folio by a huge pmd. Falls back (False) when
    the 2 MB does not fit the vma (thp_vma_suitable_order) or the folio is not PMD-sized; else
    under pmd_lock, only if the pmd is still none: add_mm_counter(mm_counter_file,
    HPAGE_PMD_NR), folio_add_file_rmap_pmd, set_pmd_at (writable if the fault writes: pmd_mkdirty
    + maybe_pmd_mkwrite). No table is deposited: arch_needs_pgtable_deposit() is false on x86
    (powerpc's hash MMU only), so there is no vmf->prealloc_pte to deposit. A pmd found populated
    returns VM_FAULT_FALLBACK too (ret is set to 0 only after set_pmd_at); the reference the
    caller holds becomes the mapping's. The RFC hook arch_flush_tlb_before_set_pmd runs before
    set_pmd_at as in do_huge_pmd_anonymous_page (flush_before_set_pmd, default false)."""
    m = cpu.m
    haddr = addr & ~(PMD_SIZE - 1)
    if not file_thp_suitable(vma, haddr) or m.mem.order.get(folio) != 9:
        return False
    ptl = await pmd_lock(cpu, mm, pmdp)
    if (await pmdp_get(cpu, pmdp)) != 0:
        await spin_unlock(cpu, ptl)
        return False
    mm.rss += 512  # add_mm_counter(mm, mm_counter_file(folio), HPAGE_PMD_NR)
    await arch_flush_tlb_before_set_pmd(cpu, mm, haddr)
    await write_entry(cpu, pmdp, mk_huge_pmd(folio, write), "set_pmd_at")
    await spin_unlock(cpu, ptl)
    return True


@kfunc
async def finish_fault(cpu, mm, vma, pmdp, addr: int, page: int, write: bool) -> bool:
    """Map the page; returns False if the pte was populated meanwhile (the caller's reference is
    then dropped). With the pmd none, a PMD-sized folio in a thp = true vma goes to do_set_pmd
    first (finish_fault: if (pmd_none(*vmf->pmd)) { if (folio_test_pmd_mappable(folio)) { ret =
    do_set_pmd(); if (ret != VM_FAULT_FALLBACK) return ret; } ...). thp = false is read as a vma
    where THP is not allowed; the kernel's do_set_pmd checks only vma_thp_disabled (VM_NOHUGEPAGE,
    prctl), so a PMD-sized folio already cached would be pmd-mapped there too: the model keeps the
    PTE path for thp = false (a simplification, which catalogue D12's setup relies on)."""
    if (await pmdp_get_lockless(cpu, pmdp)) == 0:
        if vma.thp:
            folio = cpu.m.mem.folio(page)
            if cpu.m.mem.order.get(folio) == 9 and await do_set_pmd(cpu, mm, vma, pmdp, addr,
                                                                     folio, write):
                return True
        await pte_alloc(cpu, mm, pmdp, addr)
    mapped = await pte_offset_map_lock(cpu, mm, pmdp, addr)
    if mapped is None:
        return False
    table, ptl = mapped
    ptep = (table, index(1, addr))
    if ptep_get_locked(cpu, ptep) != 0:
        await pte_unmap_unlock(cpu, ptl)
        return False
    mm.rss += 1  # inc_mm_counter(mm_counter_file()); folio_add_file_rmap_ptes
    await set_pte_at(cpu, ptep, mk_pte(page, write))
    await pte_unmap_unlock(cpu, ptl)
    return True


@kfunc
async def do_fault(cpu, mm, vma, pmdp, addr: int, write: bool) -> None:
    """do_read_fault / do_shared_fault: __do_fault (filemap_fault), finish_fault, unlock."""
    m = cpu.m
    mapping = mapping_of(m, vma.file)
    pgoff = vma.pgoff + (addr - vma.start) // PAGE_SIZE
    folio, page = await filemap_fault(cpu, mapping, pgoff,
                                      vma.thp and file_thp_suitable(vma, addr))
    installed = await finish_fault(cpu, mm, vma, pmdp, addr, page, write)
    await folio_unlock(cpu, mapping, folio)
    if not installed:
        folio_put(m, folio, m.who(cpu), cpu)


@kfunc
async def handle_pte_fault(cpu, mm, vma, pmdp, addr: int, write: bool) -> bool:
    """Returns False for VM_FAULT_SIGSEGV (a guard marker), else True."""
    if (await pmdp_get_lockless(cpu, pmdp)) == 0:
        await do_pte_missing(cpu, mm, vma, pmdp, addr, write)
        return True
    mapped = await pte_offset_map_rw_nolock(cpu, mm, pmdp, addr)
    if mapped is None:
        return True  # the pmd changed under us: return and let the access fault again
    table, _pmdval, ptl = mapped
    ptep = (table, index(1, addr))
    orig = await ptep_get_lockless(cpu, ptep)
    if orig == 0:
        await pte_unmap(cpu)
        await do_pte_missing(cpu, mm, vma, pmdp, addr, write)
        return True
    if orig == GUARD_PTE:
        # !pte_present -> do_swap_page -> handle_pte_marker (v6.13+): a guard marker is
        # VM_FAULT_SIGSEGV. (The model makes no other non-present entry: no swap or migration.)
        await pte_unmap(cpu)
        if cpu.m.log is not None:
            cpu.m.ev(cpu, "handle_pte_marker", addr=hex(addr), marker="guard")
        return False
    await spin_lock(cpu, ptl)
    if ptep_get_locked(cpu, ptep) != orig:  # pte_same() stands in for a pmd recheck
        await pte_unmap_unlock(cpu, ptl)
        return True
    if write and not writable(orig):
        if vma.type != "anon":
            # wp_page_shared: a shared mapping's page becomes writable in place.
            await set_pte_at(cpu, ptep, mk_pte(entry_pfn(orig), True))
            await pte_unmap_unlock(cpu, ptl)
            return True
        await pte_unmap_unlock(cpu, ptl)  # do_wp_page drops the lock before copying
        await wp_page_copy(cpu, mm, vma, pmdp, addr, orig)
        return True
    await pte_unmap_unlock(cpu, ptl)  # only the accessed/dirty bits would change
    return True


# -- THP (mm/huge_memory.c) -----------------------------------------------------------------------

def thp_vma_suitable(vma, addr: int) -> bool:
    """thp_vma_allowable_order() and thp_vma_suitable_order(): THP allowed for this anon vma
    (the `thp` permission, VM_HUGEPAGE / VM_NOHUGEPAGE) and the aligned 2 MB fits inside it."""
    haddr = addr & ~(PMD_SIZE - 1)
    return vma.type == "anon" and vma.thp and vma.start <= haddr and haddr + PMD_SIZE <= vma.end


def pgtable_trans_huge_deposit(m, pmdp, pgtable: int) -> None:
    if m.fp is not None:
        touch(m, ("d", *pmdp), True)
    m.deposits.setdefault(pmdp, []).append(pgtable)


def pgtable_trans_huge_withdraw(m, pmdp) -> int:
    if m.fp is not None:
        touch(m, ("d", *pmdp), True)
    tables = m.deposits[pmdp]
    pgtable = tables.pop()
    if not tables:
        del m.deposits[pmdp]
    return pgtable


@kfunc
async def do_huge_pmd_anonymous_page(cpu, mm, vma, pmdp, addr: int, write: bool) -> None:
    m = cpu.m
    haddr = addr & ~(PMD_SIZE - 1)
    if write:
        await m.point(cpu)
        if m.fp is not None:  # the allocator; the new folio is no one else's yet
            begin(m, cpu)
            touch(m, ("alloc",), True)
        folio = m.mem.alloc_huge_data(m.who(cpu))  # vma_alloc_folio(HPAGE_PMD_ORDER)
        if m.log is not None:
            m.ev(cpu, "alloc_folio", pfn=hex(folio), order=9)
    else:
        if m.fp is not None:  # the first use allocates it
            touch(m, ("alloc",), True)
        folio = m.mem.huge_zero_folio()  # mm_get_huge_zero_folio(): read faults map it
    pgtable = await pte_alloc_one(cpu, mm)  # deposited for a later split
    ptl = await pmd_lock(cpu, mm, pmdp)
    if (await pmdp_get(cpu, pmdp)) != 0:  # someone else populated the pmd
        await spin_unlock(cpu, ptl)
        if write:
            folio_put(m, folio, m.who(cpu), cpu)
        await pte_free(cpu, pgtable)
        return
    pgtable_trans_huge_deposit(m, pmdp, pgtable)
    await arch_flush_tlb_before_set_pmd(cpu, mm, haddr)
    await write_entry(cpu, pmdp, mk_huge_pmd(folio, write), "set_pmd_at")
    if write:
        mm.rss += 512  # add_mm_counter(MM_ANONPAGES, HPAGE_PMD_NR)
    mm.nr_ptes += 1  # mm_inc_nr_ptes: the deposited table
    await spin_unlock(cpu, ptl)


@kfunc
async def __split_huge_zero_page_pmd(cpu, mm, pmdp, haddr: int) -> None:
    """Called under the pmd lock: clear and flush the huge zero pmd first (so no CPU ever holds
    a 2M and a 4K translation together), then fill the withdrawn deposited table with 512
    zero-page ptes while it is private to this CPU, then link it."""
    m = cpu.m
    await write_entry(cpu, pmdp, 0, "pmdp_huge_clear_flush")
    await flush_tlb_range(cpu, mm, haddr, haddr + PMD_SIZE)  # flush_pmd_tlb_range
    pgtable = pgtable_trans_huge_withdraw(m, pmdp)
    await m.point(cpu)  # the 512 set_pte_at into a table no other CPU can reach yet
    m.mem.entries[pgtable][:] = [mk_pte(ZERO_PFN, False, special=True)] * 512
    await write_entry(cpu, pmdp, mk_table_entry(pgtable), "pmd_populate")


@kfunc
async def __split_huge_pmd_file(cpu, mm, vma, pmdp, haddr: int) -> None:
    """__split_huge_pmd_locked() for a file or shmem vma (mm/huge_memory.c, 6.14), called under
    the pmd lock: a file huge pmd is not split into ptes but unmapped (pmdp_huge_clear_flush:
    clear, then flush_pmd_tlb_range), no deposited table to zap on x86
    (arch_needs_pgtable_deposit), folio_remove_rmap_pmd, folio_put of the mapping's reference,
    add_mm_counter(mm_counter_file, -HPAGE_PMD_NR). The pages refault from the page cache."""
    m = cpu.m
    old = await write_entry(cpu, pmdp, 0, "pmdp_huge_clear_flush")
    await flush_tlb_range(cpu, mm, haddr, haddr + PMD_SIZE)  # flush_pmd_tlb_range
    mm.rss -= 512
    folio_put(m, entry_pfn(old), m.who(cpu), cpu)


@kfunc
async def do_huge_pmd_wp_page(cpu, mm, vma, pmdp, addr: int, orig_pmd: int) -> None:
    """A write to the huge zero page: split it into zero-page ptes and fall back to the pte
    fault path (wp_page_copy then replaces the one page written). Other read-only huge pmds
    (anon THP shared after fork) are not modelled."""
    m = cpu.m
    if not m.mem.is_zero(entry_pfn(orig_pmd)):
        raise NotModelled("a write fault on a read-only anon huge pmd (do_huge_pmd_wp_page)")
    ptl = await pmd_lock(cpu, mm, pmdp)  # __split_huge_pmd
    if (await pmdp_get(cpu, pmdp)) == orig_pmd:
        await __split_huge_zero_page_pmd(cpu, mm, pmdp, addr & ~(PMD_SIZE - 1))
    await spin_unlock(cpu, ptl)


@kfunc
async def handle_mm_fault(cpu, mm, addr: int, write: bool) -> bool:
    """lock_vma_under_rcu() (the per-VMA read lock, a trylock), falling back to mmap_lock
    (lock_mm_and_find_vma) as do_user_addr_fault does (kernel_model/locks.py
    lock_vma_or_mmap), then __handle_mm_fault. Returns False where the kernel would send
    SIGSEGV: no vma, or none left at addr once the fallback holds mmap_lock (munmap)."""
    vma, lock = await lock_vma_or_mmap(cpu, mm, addr)
    if vma is None:
        return False
    pmdp = await alloc_pmd(cpu, mm, addr)
    pmdval = await pmdp_get_lockless(cpu, pmdp)
    ok = True  # False: VM_FAULT_SIGSEGV from handle_pte_fault (a guard marker)
    if pmdval == 0 and thp_vma_suitable(vma, addr):
        await do_huge_pmd_anonymous_page(cpu, mm, vma, pmdp, addr, write)  # create_huge_pmd
    elif present(pmdval) and leaf(pmdval):
        if write and not writable(pmdval):
            if vma.type != "anon":
                # wp_huge_pmd: a shared file vma without ->huge_fault (shmem) splits the pmd,
                # i.e. unmaps it, and the pte level refaults it (do_shared_fault -> finish_fault)
                ptl = await pmd_lock(cpu, mm, pmdp)  # __split_huge_pmd
                if (await pmdp_get(cpu, pmdp)) == pmdval:
                    await __split_huge_pmd_file(cpu, mm, vma, pmdp, addr & ~(PMD_SIZE - 1))
                await spin_unlock(cpu, ptl)
            else:
                await do_huge_pmd_wp_page(cpu, mm, vma, pmdp, addr, pmdval)
            await handle_pte_fault(cpu, mm, vma, pmdp, addr, write)  # VM_FAULT_FALLBACK
        # else huge_pmd_set_accessed(): nothing this model tracks changes
    else:
        ok = await handle_pte_fault(cpu, mm, vma, pmdp, addr, write)
    await up_read(cpu, lock)  # vma_end_read or mmap_read_unlock
    return ok


@op("fault")
async def fault(cpu, *, addr: Addr, write: bool = False) -> None:
    """handle_mm_fault at addr: do_anonymous_page, or pte_alloc + pmd_install for a missing
    table, or __do_huge_pmd_anonymous_page in a THP vma; file and shmem pages through
    filemap_fault and finish_fault."""
    await handle_mm_fault(cpu, cpu.mm, addr, write)
