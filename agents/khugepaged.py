"""khugepaged and MADV_COLLAPSE (mm/khugepaged.c): the three ways they take a PTE table away.

Sources read (torvalds/linux through the search tool; kernel-notes B7, D4, D6, D7, D12, F10):

* mm/khugepaged.c at commit 00f58104202c (about 6.13/6.14: still has pmd_devmap; retract_page_tables
  without the pmd recheck; collapse_pte_mapped_thp with pte_offset_map_nolock) -- the "before" forms
  and collapse_huge_page, whose order of steps this file follows.
* "mm: fix the race between collapse and PT_RECLAIM under per-vma lock" (Barry Song, 6.17-rc hotfix,
  Fixes a6fde7add78d): vma_start_write() moved before check_pmd_still_valid().
* "mm: khugepaged: recheck pmd state in retract_page_tables()" (seed 001, Dec 2024) and a 7.x-era
  mm/khugepaged.c (collapse.h, file_backed_vma_is_retractable, try_collapse_pte_mapped_thp with
  folio_pte_batch and the step-4 pmd_same recheck when ptl != pml) -- the "after" forms of
  retract_page_tables and try_collapse_pte_mapped_thp, which this file follows.
* "mm/khugepaged: fix GUP-fast interaction by sending IPI" (2ba99c5e0881, 2022): the
  tlb_remove_table_sync_one() after pmdp_collapse_flush() in collapse_huge_page.

Scenario ops (each runs one pmd at addr):

  khugepaged_collapse      khugepaged_scan_mm_slot's step for an anon pmd: mmap_read_lock,
                           hpage_collapse_scan_pmd -> collapse_huge_page
  retract_page_tables      MADV_COLLAPSE / khugepaged on a file or shmem vma: collapse_file's
                           page-cache replacement with the new huge folio locked, then
                           retract_page_tables(mapping, pgoff), then the folio unlock
  collapse_pte_mapped_thp  collapse_single_pmd's SCAN_PTE_MAPPED_HUGEPAGE branch:
                           mmap_read_lock, try_collapse_pte_mapped_thp(install_pmd=false)
  madvise_collapse         MADV_COLLAPSE on a file or shmem range (madvise_collapse, read at
                           torvalds/linux 00f58104202c): per 2 MB, hpage_collapse_scan_file ->
                           collapse_file, then try_collapse_pte_mapped_thp(install_pmd=true),
                           whose none-pmd case goes on to set_huge_pmd -> do_set_pmd

Config keys: collapse_lock_vma_first (the 6.17 fix), collapse_sync_gup_fast (the 2022 fix),
retract_recheck_pmd (seed 001), pte_mapped_thp_recheck_always (ptsim's proposed fix for D12).

Not modelled (nothing in the model takes them or depends on them): mmu notifiers, the anon_vma
lock (no rmap walker of anon memory exists in the model), anon folio locks and LRU isolation
(no one else locks or isolates anon folios here), swap-in (__collapse_huge_page_swapin), memory
cgroups, copy_mc failures, hpage_collapse_scan_file's lockless pre-scan (collapse_file redoes its
checks), readahead of missing file pages (a missing page is a hole the new folio fills, as for
shmem), uffd-armed private vmas (file vmas are MAP_SHARED here), MADV_COLLAPSE of an anon vma (the
khugepaged_collapse op models collapse_huge_page), the find_pmd_or_thp_or_none SCAN_PMD_NULL
case of install_pmd (a missing pmd table: Kiryl Shutsemau's 2025 install_huge_pmd patch, not in
the trees read).
"""

from __future__ import annotations

__kernel_file__ = "mm/khugepaged.c"  # where the kernel functions below live (reports cite it)
__kernel_files__ = {  # the ones that live elsewhere
    "try_to_unmap": "mm/rmap.c",
    "try_to_unmap_flush": "mm/rmap.c",
    "filemap_lock_folio": "include/linux/pagemap.h",
}

from ptsim.kernel_model.errors import NotModelled
from ptsim.kernel_model.filemap import folio_lock, folio_trylock, folio_unlock, mapping_of
from ptsim.kernel_model.footprint import touch
from ptsim.kernel_model.ipi import tlb_remove_table_sync_one
from ptsim.kernel_model.locks import (
    down_read,
    down_write,
    spin_lock,
    spin_lock_nested,
    spin_unlock,
    up_read,
    up_write,
)
from ptsim.kernel_model.memory import DATA, ZERO_PFN
from ptsim.kernel_model.pagetable import (
    _PAGE_ACCESSED,
    PAGE_SIZE,
    PMD_SIZE,
    entry_pfn,
    index,
    leaf,
    mk_huge_pmd,
    present,
    writable,
)
from ptsim.kernel_model.pgalloc import folio_put, pte_free_defer
from ptsim.kernel_model.pgtable import (
    ___pte_offset_map,
    pmd_lock,
    pmd_off,
    pmd_populate,
    pmdp_collapse_flush,
    pmdp_get,
    pmdp_get_lockless,
    pte_lockptr,
    pte_offset_map_lock,
    pte_offset_map_rw_nolock,
    pte_unmap,
    pte_unmap_unlock,
    ptep_get,
    ptep_get_and_clear,
    scan_entries_locked,
    write_entry,
)
from ptsim.kernel_model.registry import Addr, Size, config_key, kfunc, op
from ptsim.kernel_model.tlb import flush_tlb_mm_range

from .fault import do_set_pmd, pgtable_trans_huge_deposit

RETRACT_RECHECK_PMD = config_key(
    "retract_recheck_pmd", (True, False),
    "retract_page_tables rechecks the pmd (check_pmd_state) under the pmd lock before it "
    "collapses it; false is the code before, which PT_RECLAIM's concurrent pmd_clear breaks.",
    "mm: khugepaged: recheck pmd state in retract_page_tables() (PT_RECLAIM series, v6.14)")
COLLAPSE_LOCK_VMA_FIRST = config_key(
    "collapse_lock_vma_first", (True, False),
    "collapse_huge_page write-locks the vma (vma_start_write) before check_pmd_still_valid, so "
    "MADV_DONTNEED under the per-VMA read lock cannot reclaim the table in between.",
    "mm: fix the race between collapse and PT_RECLAIM under per-vma lock (v6.17)")
COLLAPSE_SYNC_GUP_FAST = config_key(
    "collapse_sync_gup_fast", (True, False),
    "collapse_huge_page calls tlb_remove_table_sync_one after pmdp_collapse_flush: an IPI every "
    "IRQ-off GUP-fast walker holds off, even when the flush itself sends none.",
    "mm/khugepaged: fix GUP-fast interaction by sending IPI (2ba99c5e0881, v6.1)")

HPAGE_PMD_NR = 512
HPAGE_PMD_MASK = ~(PMD_SIZE - 1)
USER_END = 1 << 47

# khugepaged_init(): max_ptes_none = HPAGE_PMD_NR - 1 (the collapse control is khugepaged's).
KHUGEPAGED_MAX_PTES_NONE = HPAGE_PMD_NR - 1

SCAN_SUCCEED = "SCAN_SUCCEED"
SCAN_FAIL = "SCAN_FAIL"
SCAN_PMD_NULL = "SCAN_PMD_NULL"
SCAN_PMD_NONE = "SCAN_PMD_NONE"  # SCAN_NO_PTE_TABLE in the 7.x tree
SCAN_PMD_MAPPED = "SCAN_PMD_MAPPED"
SCAN_EXCEED_NONE_PTE = "SCAN_EXCEED_NONE_PTE"
SCAN_PTE_NON_PRESENT = "SCAN_PTE_NON_PRESENT"
SCAN_PTE_UFFD_WP = "SCAN_PTE_UFFD_WP"
SCAN_PAGE_RO = "SCAN_PAGE_RO"
SCAN_LACK_REFERENCED_PAGE = "SCAN_LACK_REFERENCED_PAGE"
SCAN_PAGE_NULL = "SCAN_PAGE_NULL"
SCAN_PAGE_COUNT = "SCAN_PAGE_COUNT"
SCAN_PAGE_LOCK = "SCAN_PAGE_LOCK"
SCAN_PAGE_ANON = "SCAN_PAGE_ANON"
SCAN_PAGE_COMPOUND = "SCAN_PAGE_COMPOUND"
SCAN_VMA_NULL = "SCAN_VMA_NULL"
SCAN_VMA_CHECK = "SCAN_VMA_CHECK"
SCAN_ADDRESS_RANGE = "SCAN_ADDRESS_RANGE"
SCAN_TRUNCATED = "SCAN_TRUNCATED"
SCAN_PAGE_FILLED = "SCAN_PAGE_FILLED"
SCAN_PTE_MAPPED_HUGEPAGE = "SCAN_PTE_MAPPED_HUGEPAGE"


# -- helpers shared by the three paths ---------------------------------------------------------

@kfunc
async def check_pmd_state(cpu, pmdp) -> str:
    """The pmd value checks split out of find_pmd_or_thp_or_none (Jann Horn's refactoring in
    seed 001): none, not present, a huge pmd, or a PTE table."""
    pmde = await pmdp_get_lockless(cpu, pmdp)
    if pmde == 0:
        return SCAN_PMD_NONE
    if not present(pmde):
        return SCAN_PMD_NULL
    if leaf(pmde):
        return SCAN_PMD_MAPPED
    return SCAN_SUCCEED


@kfunc
async def find_pmd_or_thp_or_none(cpu, mm, addr: int):
    """mm_find_pmd (pgd, p4d, pud present), then check_pmd_state. Returns (result, pmdp)."""
    pmdp = await pmd_off(cpu, mm, addr)
    if pmdp is None:
        return SCAN_PMD_NULL, None
    return await check_pmd_state(cpu, pmdp), pmdp


def _pmd_range_in_vma(vma, haddr: int) -> bool:
    """thp_vma_suitable_order(vma, haddr, PMD_ORDER): the aligned 2 MB lies inside the vma."""
    return vma.start <= haddr and haddr + PMD_SIZE <= vma.end


def linear_page_index(vma, addr: int) -> int:
    return vma.pgoff + (addr - vma.start) // PAGE_SIZE


def _scan(cpu, event: str, result: str, **fields) -> str:
    cpu.m.ev(cpu, event, result=result, **fields)
    return result


# -- anon: hpage_collapse_scan_pmd -> collapse_huge_page ---------------------------------------

@kfunc
async def hugepage_vma_revalidate(cpu, mm, addr: int, expect_anon: bool):
    """Returns (result, vma). The vma must still exist, cover the aligned 2 MB, allow THP
    (VM_HUGEPAGE: the vma's `thp` permission) and, for anon collapse, be anonymous (the anon_vma
    check: an anon vma whose pages were faulted in has one)."""
    await cpu.m.point(cpu)  # find_vma under mmap_lock
    vma = mm.find_vma(addr)
    if vma is None or vma not in mm.vmas:
        return SCAN_VMA_NULL, None
    if not _pmd_range_in_vma(vma, addr):
        return SCAN_ADDRESS_RANGE, vma
    if not vma.thp:
        return SCAN_VMA_CHECK, vma
    if expect_anon and vma.type != "anon":
        return SCAN_PAGE_ANON, vma
    return SCAN_SUCCEED, vma


@kfunc
async def check_pmd_still_valid(cpu, mm, addr: int, pmdp) -> str:
    result, new_pmdp = await find_pmd_or_thp_or_none(cpu, mm, addr)
    if result != SCAN_SUCCEED:
        return result
    if new_pmdp != pmdp:
        return SCAN_FAIL
    return SCAN_SUCCEED


def _is_refcount_suitable(m, folio: int) -> bool:
    """folio_ref_count(folio) == folio_mapcount(folio): a small anon folio mapped once has one
    reference; a GUP pin adds one."""
    if m.fp is not None:
        touch(m, ("k", folio))
    return m.mem.refcount[folio] == 1


@kfunc
async def hpage_collapse_scan_pmd(cpu, mm, vma, addr: int):
    """Called with mmap_lock held for reading. Returns (result, mmap_locked): on SCAN_SUCCEED
    collapse_huge_page ran and returned with mmap_lock released."""
    m = cpu.m
    result, pmdp = await find_pmd_or_thp_or_none(cpu, mm, addr)
    if result != SCAN_SUCCEED:
        return _scan(cpu, "hpage_collapse_scan_pmd", result), True
    mapped = await pte_offset_map_lock(cpu, mm, pmdp, addr)
    if mapped is None:
        return _scan(cpu, "hpage_collapse_scan_pmd", SCAN_PMD_NULL), True
    table, ptl = mapped
    entries = scan_entries_locked(cpu, table)  # the 512 ptep_get() under ptl: one step
    none_or_zero = referenced = 0
    writable_seen = False
    result = SCAN_SUCCEED
    for pteval in entries:
        if pteval == 0 or (present(pteval) and entry_pfn(pteval) == ZERO_PFN):
            none_or_zero += 1
            if none_or_zero <= KHUGEPAGED_MAX_PTES_NONE:  # !userfaultfd_armed(vma)
                continue
            result = SCAN_EXCEED_NONE_PTE
            break
        if not present(pteval):
            raise NotModelled("khugepaged scan of a swap pte (__collapse_huge_page_swapin)")
        if writable(pteval):
            writable_seen = True
        folio = m.mem.folio(entry_pfn(pteval))
        if m.mem.kind[folio] != DATA:
            result = SCAN_PAGE_NULL
            break
        if folio != entry_pfn(pteval) or folio in m.mem.order:
            raise NotModelled("khugepaged collapse of a PTE-mapped large anon folio")
        if not _is_refcount_suitable(m, folio):
            result = SCAN_PAGE_COUNT
            break
        if pteval & _PAGE_ACCESSED:  # pte_young
            referenced += 1
    if result == SCAN_SUCCEED:
        if not writable_seen:
            result = SCAN_PAGE_RO
        elif not referenced:
            result = SCAN_LACK_REFERENCED_PAGE
    await pte_unmap_unlock(cpu, ptl)
    _scan(cpu, "hpage_collapse_scan_pmd", result)
    if result == SCAN_SUCCEED:
        await collapse_huge_page(cpu, mm, addr, referenced, 0)
        return result, False
    return result, True


async def _pte_offset_map_lock_copy(cpu, mm, pmdval: int, addr: int):
    """pte_offset_map_lock(mm, &_pmd, ...) on collapse_huge_page's on-stack copy of the pmd:
    the map and the pmd_same recheck read the copy, which nobody else can change."""
    mapped = await ___pte_offset_map(cpu, None, addr, pmdval_copy=pmdval)
    if mapped is None:
        return None
    table = mapped[0]
    ptl = pte_lockptr(cpu.m, mm, pmdval)
    await spin_lock_nested(cpu, ptl)
    return table, ptl


@kfunc
async def __collapse_huge_page_isolate(cpu, vma, addr: int, table: int) -> str:
    """Called with the detached table's ptl held: every pte must map a small anon folio whose
    only reference is this mapping ('this process cannot get an additional pin on the page':
    that is what the tlb_remove_table_sync_one() before it guarantees against GUP-fast)."""
    m = cpu.m
    entries = scan_entries_locked(cpu, table)
    none_or_zero = referenced = 0
    writable_seen = False
    for pteval in entries:
        if pteval == 0 or (present(pteval) and entry_pfn(pteval) == ZERO_PFN):
            none_or_zero += 1
            if none_or_zero <= KHUGEPAGED_MAX_PTES_NONE:
                continue
            return _scan(cpu, "collapse_isolate", SCAN_EXCEED_NONE_PTE)
        if not present(pteval):
            return _scan(cpu, "collapse_isolate", SCAN_PTE_NON_PRESENT)
        folio = m.mem.folio(entry_pfn(pteval))
        if m.mem.kind[folio] != DATA:
            return _scan(cpu, "collapse_isolate", SCAN_PAGE_NULL)
        if folio in m.mem.order:
            raise NotModelled("khugepaged collapse of a PTE-mapped large anon folio")
        # folio_trylock + folio_isolate_lru: nobody else locks or isolates anon folios here.
        if not _is_refcount_suitable(m, folio):
            return _scan(cpu, "collapse_isolate", SCAN_PAGE_COUNT, pfn=hex(folio),
                         refcount=m.mem.refcount[folio])
        if pteval & _PAGE_ACCESSED:
            referenced += 1
        if writable(pteval):
            writable_seen = True
    if not writable_seen:
        return _scan(cpu, "collapse_isolate", SCAN_PAGE_RO)
    if not referenced:
        return _scan(cpu, "collapse_isolate", SCAN_LACK_REFERENCED_PAGE)
    return _scan(cpu, "collapse_isolate", SCAN_SUCCEED)


@kfunc
async def __collapse_huge_page_copy_succeeded(cpu, mm, table: int, addr: int, ptl) -> None:
    """The contents are copied (nothing to do in the model); now each small page goes: none and
    zero-page ptes add one page to the rss (the huge page maps them now), present ones are
    cleared under ptl ('ptl mostly unnecessary'), lose their rmap and their reference."""
    m = cpu.m
    for i, pteval in enumerate(list(scan_entries_locked(cpu, table))):
        if pteval == 0 or entry_pfn(pteval) == ZERO_PFN:
            mm.rss += 1  # add_mm_counter(MM_ANONPAGES, 1)
            if pteval != 0:
                await spin_lock(cpu, ptl)
                await ptep_get_and_clear(cpu, (table, i))  # ptep_clear
                await spin_unlock(cpu, ptl)
            continue
        page = entry_pfn(pteval)
        # release_pte_folio: unlock, putback_lru (not modelled)
        await spin_lock(cpu, ptl)
        await ptep_get_and_clear(cpu, (table, i))  # ptep_clear
        await spin_unlock(cpu, ptl)  # folio_remove_rmap_pte under it
        await m.point(cpu)
        folio_put(m, page, m.who(cpu, "free_page_and_swap_cache"), cpu)  # free_page_and_swap_cache


@kfunc
async def collapse_huge_page(cpu, mm, addr: int, referenced: int, unmapped: int) -> str:
    """mm/khugepaged.c collapse_huge_page (00f58104202c, plus the 6.17 vma_start_write move under
    collapse_lock_vma_first). Entered with mmap_lock held for reading; returns with it released.

    The pmd is cleared by pmdp_collapse_flush under the pmd lock, the old table is isolated
    through the on-stack copy _pmd, and on success becomes the deposit of the new huge pmd
    (nr_ptes unchanged). On failure, pmd_populate(mm, pmd, pmd_pgtable(_pmd)) puts it back --
    which installs pfn 0 as a table when _pmd was none (D6)."""
    m = cpu.m
    vma_locked = None
    await up_read(cpu, mm.mmap_lock)  # "Before allocating the hugepage, release the mmap_lock"
    await m.point(cpu)
    folio = m.mem.alloc_huge_data(m.who(cpu, "alloc_charge_folio"))  # alloc_charge_folio
    m.ev(cpu, "alloc_folio", pfn=hex(folio), order=9)

    await down_read(cpu, mm.mmap_lock)
    result, vma = await hugepage_vma_revalidate(cpu, mm, addr, True)
    if result != SCAN_SUCCEED:
        await up_read(cpu, mm.mmap_lock)
        return await _collapse_out_nolock(cpu, folio, result)
    result, pmdp = await find_pmd_or_thp_or_none(cpu, mm, addr)
    if result != SCAN_SUCCEED:
        await up_read(cpu, mm.mmap_lock)
        return await _collapse_out_nolock(cpu, folio, result)
    await up_read(cpu, mm.mmap_lock)
    # "Prevent all access to pagetables with the exception of gup_fast later handled by the
    # ptep_clear_flush and the VM handled by the anon_vma lock + PG_lock."
    await down_write(cpu, mm.mmap_lock)
    result, vma = await hugepage_vma_revalidate(cpu, mm, addr, True)
    if result != SCAN_SUCCEED:
        return await _collapse_out_up_write(cpu, mm, vma_locked, folio, result)
    if m.cfg.collapse_lock_vma_first:
        # The 6.17 fix: MADV_DONTNEED (PT_RECLAIM) runs under the per-VMA read lock only, so
        # the pmd check must happen after the vma is write-locked.
        await down_write(cpu, vma.vm_lock)  # vma_start_write
        vma_locked = vma
    result = await check_pmd_still_valid(cpu, mm, addr, pmdp)
    if result != SCAN_SUCCEED:
        m.ev(cpu, "collapse_pmd_invalid", result=result)
        return await _collapse_out_up_write(cpu, mm, vma_locked, folio, result)
    if not m.cfg.collapse_lock_vma_first:
        await down_write(cpu, vma.vm_lock)  # vma_start_write, too late (a6fde7add78d .. 6.17)
        vma_locked = vma
    # anon_vma_lock_write; mmu_notifier_invalidate_range_start: not modelled

    pmd_ptl = await pmd_lock(cpu, mm, pmdp)  # "probably unnecessary"
    _pmd = await pmdp_collapse_flush(cpu, mm, pmdp, addr)
    await spin_unlock(cpu, pmd_ptl)
    m.ev(cpu, "collapse_pmd_cleared", pmd=hex(_pmd))
    if m.cfg.collapse_sync_gup_fast:
        await tlb_remove_table_sync_one(cpu)

    mapped = await _pte_offset_map_lock_copy(cpu, mm, _pmd, addr)
    if mapped is not None:
        table, pte_ptl = mapped
        result = await __collapse_huge_page_isolate(cpu, vma, addr, table)
        await spin_unlock(cpu, pte_ptl)
    else:
        result = SCAN_PMD_NULL
    if result != SCAN_SUCCEED:
        if mapped is not None:
            await pte_unmap(cpu)
        await spin_lock(cpu, pmd_ptl)
        # BUG_ON(!pmd_none(*pmd)); "Use pmd_populate for that"
        await pmd_populate(cpu, pmdp, entry_pfn(_pmd))  # pmd_pgtable(_pmd)
        await spin_unlock(cpu, pmd_ptl)
        # anon_vma_unlock_write
        return await _collapse_out_up_write(cpu, mm, vma_locked, folio, result)
    # anon_vma_unlock_write: "All pages are isolated and locked so anon_vma rmap can't run"
    await __collapse_huge_page_copy_succeeded(cpu, mm, table, addr, pte_ptl)
    await pte_unmap(cpu)
    pgtable = entry_pfn(_pmd)  # pmd_pgtable(_pmd)
    await spin_lock(cpu, pmd_ptl)
    # BUG_ON(!pmd_none(*pmd)); folio_add_new_anon_rmap; folio_add_lru_vma
    pgtable_trans_huge_deposit(m, pmdp, pgtable)
    await write_entry(cpu, pmdp, mk_huge_pmd(folio, True), "set_pmd_at")
    await spin_unlock(cpu, pmd_ptl)
    m.ev(cpu, "collapse_huge_page_done", pfn=hex(folio), deposit=hex(pgtable))
    return await _collapse_out_up_write(cpu, mm, vma_locked, None, SCAN_SUCCEED)


async def _collapse_out_up_write(cpu, mm, vma_locked, folio, result: str) -> str:
    """out_up_write: mmap_write_unlock, which also ends the vma write lock (vma_end_write_all)."""
    if vma_locked is not None:
        await up_write(cpu, vma_locked.vm_lock)
    await up_write(cpu, mm.mmap_lock)
    return await _collapse_out_nolock(cpu, folio, result)


async def _collapse_out_nolock(cpu, folio, result: str) -> str:
    m = cpu.m
    if folio is not None:
        await m.point(cpu)
        folio_put(m, folio, m.who(cpu), cpu)
    m.ev(cpu, "collapse_huge_page", result=result)
    return result


@op("khugepaged_collapse")
async def khugepaged_collapse(cpu, *, addr: Addr) -> None:
    """khugepaged_scan_mm_slot's work on the anon pmd at addr: mmap_read_lock (the kernel
    trylocks it and moves on if it fails; the model waits), thp_vma_allowable_order,
    hpage_collapse_scan_pmd -> collapse_huge_page."""
    mm = cpu.mm
    haddr = addr & HPAGE_PMD_MASK
    await down_read(cpu, mm.mmap_lock)
    vma = mm.find_vma(haddr)
    if vma is None or vma.type != "anon" or not vma.thp or not _pmd_range_in_vma(vma, haddr):
        cpu.m.ev(cpu, "khugepaged_skip", addr=hex(haddr))
        await up_read(cpu, mm.mmap_lock)
        return
    result, mmap_locked = await hpage_collapse_scan_pmd(cpu, mm, vma, haddr)
    if mmap_locked:
        await up_read(cpu, mm.mmap_lock)
    cpu.m.ev(cpu, "khugepaged_result", result=result)


# -- file and shmem: collapse_file -> retract_page_tables ----------------------------------------

def _rmap_vmas(m, mapping, first: int, last: int) -> list:
    """vma_interval_tree_foreach(vma, &mapping->i_mmap, first, last): every vma of every mm that
    maps a pgoff in [first, last] of the file, in pgoff order. (A vma leaves the model's tree
    when munmap detaches it from its mm.)"""
    found = []
    for name in sorted(m.mms):
        for vma in m.mms[name].vmas:
            if vma.file != mapping.name:
                continue
            npages = (vma.end - vma.start) // PAGE_SIZE
            if vma.pgoff <= last and first < vma.pgoff + npages:
                found.append(vma)
    found.sort(key=lambda v: (v.pgoff, v.mm, v.start))
    return found


def file_backed_vma_is_retractable(vma) -> bool:
    """No anon_vma (MAP_SHARED vmas have none), not registered with uffd-wp, no guard regions."""
    return not vma.uffd_wp



@kfunc
async def try_to_unmap(cpu, mapping, folio: int, pgoff: int, batch: dict) -> None:
    """try_to_unmap(folio, TTU_IGNORE_MLOCK | TTU_BATCH_FLUSH) of a small page cache folio:
    rmap_walk_file under i_mmap_lock_read, try_to_unmap_one in every vma that maps pgoff:
    page_vma_mapped_walk (map and lock the pte), clear it, defer the TLB flush to
    try_to_unmap_flush (batch collects the address range per mm), drop the file rss, the rmap
    and the mapping's reference."""
    m = cpu.m
    await down_read(cpu, mapping.i_mmap_rwsem)
    for vma in _rmap_vmas(m, mapping, pgoff, pgoff):
        mm = m.mms[vma.mm]
        address = vma.start + (pgoff - vma.pgoff) * PAGE_SIZE
        pmdp = await pmd_off(cpu, mm, address)
        if pmdp is None:
            continue
        pmdval = await pmdp_get_lockless(cpu, pmdp)
        if not present(pmdval) or leaf(pmdval):
            continue
        mapped = await pte_offset_map_lock(cpu, mm, pmdp, address)
        if mapped is None:
            continue
        table, ptl = mapped
        ptep = (table, index(1, address))
        pteval = await ptep_get(cpu, ptep)
        if present(pteval) and entry_pfn(pteval) == folio:
            await ptep_get_and_clear(cpu, ptep)  # + set_tlb_ubc_flush_pending
            lo, hi = batch.get(mm.name, (address, address + PAGE_SIZE))
            batch[mm.name] = (min(lo, address), max(hi, address + PAGE_SIZE))
            mm.rss -= 1  # dec_mm_counter(mm, mm_counter_file(folio))
            folio_put(m, folio, m.who(cpu), cpu)  # folio_remove_rmap_pte; folio_put
            m.ev(cpu, "try_to_unmap_one", mm=mm.name, addr=hex(address), pfn=hex(folio))
        await pte_unmap_unlock(cpu, ptl)
    await up_read(cpu, mapping.i_mmap_rwsem)


@kfunc
async def try_to_unmap_flush(cpu, batch: dict) -> None:
    """arch_tlbbatch_flush: one flush for every mm a batched try_to_unmap_one touched (x86
    flushes all the batch's CPUs; no table is freed)."""
    m = cpu.m
    for name in sorted(batch):
        start, end = batch[name]
        await flush_tlb_mm_range(cpu, m.mms[name], start, end, False)
    batch.clear()


@kfunc
async def retract_page_tables(cpu, mapping, pgoff: int) -> None:
    """retract_page_tables(mapping, pgoff), 7.x form (seed 001's recheck under
    retract_recheck_pmd; without it, the 00f58104202c form). No mmap or vma lock: the i_mmap
    lock keeps the vmas, the new huge folio's lock keeps faults from refilling the range."""
    m = cpu.m
    recheck = m.cfg.retract_recheck_pmd
    await down_read(cpu, mapping.i_mmap_rwsem)  # i_mmap_lock_read
    for vma in _rmap_vmas(m, mapping, pgoff, pgoff):
        addr = vma.start + ((pgoff - vma.pgoff) << 12)
        if addr & (PMD_SIZE - 1) or vma.end < addr + PMD_SIZE:
            continue
        mm = m.mms[vma.mm]
        result, pmdp = await find_pmd_or_thp_or_none(cpu, mm, addr)
        if result != SCAN_SUCCEED:
            continue
        # hpage_collapse_test_exit(mm): mm_users never drops to zero in the model
        if not file_backed_vma_is_retractable(vma):
            continue
        m.ev(cpu, "retract_found_table", mm=mm.name, addr=hex(addr))
        # mmu_notifier_invalidate_range_start: not modelled
        pml = await pmd_lock(cpu, mm, pmdp)
        success = False
        pgt_pmd = 0
        if recheck:
            # "we only need to recheck if the state of pmd entry still meets our
            # requirements, rather than checking pmd_same() like elsewhere"
            state = await check_pmd_state(cpu, pmdp)
            if state != SCAN_SUCCEED:
                m.ev(cpu, "retract_pmd_changed", mm=mm.name, addr=hex(addr), result=state)
                await spin_unlock(cpu, pml)  # drop_pml
                continue
        # ptl = pte_lockptr(mm, pmd): derived from *pmd -- for a none pmd, the "lock" of pfn 0
        ptl = pte_lockptr(m, mm, await pmdp_get(cpu, pmdp))
        if ptl is not pml:
            await spin_lock_nested(cpu, ptl)  # spin_lock_nested(SINGLE_DEPTH_NESTING)
        if file_backed_vma_is_retractable(vma):  # repeated under ptl
            # Its flush_tlb_range reaches lazy-TLB CPUs only since 3ef938c35035 (v6.15,
            # pmd_flush_freed_tables): before, a lazy CPU's paging-structure cache keeps the
            # table that pte_free_defer below frees (catalogue D13).
            pgt_pmd = await pmdp_collapse_flush(cpu, mm, pmdp, addr)
            # pmdp_get_lockless_sync(): an IPI only on 32-bit PAE
            success = True
        if ptl is not pml:
            await spin_unlock(cpu, ptl)
        await spin_unlock(cpu, pml)
        if success:
            mm.nr_ptes -= 1  # mm_dec_nr_ptes
            # page_table_check_pte_clear_range; pte_free_defer(mm, pmd_pgtable(pgt_pmd))
            pte_free_defer(cpu, entry_pfn(pgt_pmd))
            m.ev(cpu, "retract_table", mm=mm.name, addr=hex(addr), pfn=hex(entry_pfn(pgt_pmd)))
    await up_read(cpu, mapping.i_mmap_rwsem)


@kfunc
async def collapse_file(cpu, mm, addr: int, mapping, start: int, is_khugepaged: bool = True) -> str:
    """The part of collapse_file() (7.x form) that page tables depend on: lock the new huge folio,
    lock and unmap the small folios of [start, start + 512) from every mapping, re-check holes,
    replace the range in the page cache with the new folio (folio_ref_add(HPAGE_PMD_NR - 1):
    the page cache holds one reference per page), retract_page_tables() with the folio still
    locked, unlock it, then free the old folios."""
    m = cpu.m
    mem = m.mem
    end = start + HPAGE_PMD_NR
    await m.point(cpu)
    new_folio = mem.alloc_huge_data(m.who(cpu, "alloc_charge_folio"))  # alloc_charge_folio
    m.ev(cpu, "alloc_folio", pfn=hex(new_folio), order=9)
    await folio_lock(cpu, mapping, new_folio)  # __folio_set_locked: nobody can see it yet
    pagelist: list[tuple[int, int]] = []
    holes: list[int] = []
    batch: dict = {}
    result = SCAN_SUCCEED
    if not any(mapping.pages.get(i) is not None for i in range(start, end)):
        result = SCAN_TRUNCATED  # "extent has been truncated or hole-punched"
    for index_ in range(start, end):
        if result != SCAN_SUCCEED:
            break
        page = mapping.pages.get(index_)
        if page is None:
            # nr_none++ (a file page would be read ahead first). The holes are checked again
            # under the xarray lock before the page cache is changed, so a run of them costs
            # no step here.
            holes.append(index_)
            continue
        await m.point(cpu)  # xas_load under the xarray lock
        page = mapping.pages.get(index_)
        if page is None:
            holes.append(index_)
            continue
        if mem.folio(page) in mem.order:
            result = SCAN_PTE_MAPPED_HUGEPAGE if mem.folio(page) == page else SCAN_PAGE_COMPOUND
            break
        if not await folio_trylock(cpu, mapping, page):
            result = SCAN_PAGE_LOCK
            break
        if m.fp is not None:
            touch(m, ("k", page), True)
        mem.refcount[page] += 1  # folio_get
        pagelist.append((index_, page))
        # folio_isolate_lru, filemap_release_folio: not modelled
        await try_to_unmap(cpu, mapping, page, index_, batch)
        await m.point(cpu)  # xas_lock_irq
        # "We control 2 + nr_pages references to the folio": our pin and the page cache's (the
        # LRU isolation reference is not modelled). Any other is a racing user: give up.
        if m.fp is not None:
            touch(m, ("k", page))
        if mem.refcount[page] != 2:
            m.ev(cpu, "collapse_file_page_count", pfn=hex(page), refcount=mem.refcount[page])
            result = SCAN_PAGE_COUNT
            break
    await try_to_unmap_flush(cpu, batch)
    if result == SCAN_SUCCEED and holes:
        # nr_none: under i_mmap_lock_read and the xarray lock, the holes must still be holes
        await down_read(cpu, mapping.i_mmap_rwsem)
        await m.point(cpu)
        if any(mapping.pages.get(i) is not None for i in holes):
            result = SCAN_PAGE_FILLED
        await up_read(cpu, mapping.i_mmap_rwsem)
    if result != SCAN_SUCCEED:
        return await _collapse_file_rollback(cpu, mapping, new_folio, pagelist, result)
    # folio_mark_uptodate; folio_ref_add(new_folio, HPAGE_PMD_NR - 1); xas_store: one step
    # under the xarray lock
    await m.point(cpu)
    if m.fp is not None:
        touch(m, ("k", new_folio), True)
    mem.refcount[new_folio] += HPAGE_PMD_NR - 1
    for i in range(HPAGE_PMD_NR):
        mapping.pages[start + i] = new_folio + i
    m.ev(cpu, "collapse_file_replaced", file=mapping.name, pgoff=start, pfn=hex(new_folio))
    await retract_page_tables(cpu, mapping, start)
    # "If MADV_COLLAPSE, adjust result to call collapse_pte_mapped_thp()"
    result = SCAN_SUCCEED if is_khugepaged else SCAN_PTE_MAPPED_HUGEPAGE
    await folio_unlock(cpu, mapping, new_folio)
    # "The collapse has succeeded, so free the old folios."
    for _, page in pagelist:
        await folio_unlock(cpu, mapping, page)
        await m.point(cpu)
        folio_put(m, page, m.who(cpu), cpu)  # folio_put_refs(folio, 2 + nr): our pin ...
        folio_put(m, page, m.who(cpu), cpu)  # ... and the page cache's
    m.ev(cpu, "collapse_file", result=result)
    return result


async def _collapse_file_rollback(cpu, mapping, new_folio: int, pagelist, result: str) -> str:
    m = cpu.m
    for _, page in pagelist:
        await folio_unlock(cpu, mapping, page)
        await m.point(cpu)
        folio_put(m, page, m.who(cpu), cpu)  # folio_putback_lru; folio_put (our pin)
    await folio_unlock(cpu, mapping, new_folio)
    await m.point(cpu)
    folio_put(m, new_folio, m.who(cpu), cpu)
    m.ev(cpu, "collapse_file", result=result)
    return result


@op("retract_page_tables")
async def retract_page_tables_op(cpu, *, addr: Addr) -> None:
    """khugepaged on a file or shmem mapping: the vma at addr is looked up under mmap_lock,
    which is dropped before hpage_collapse_scan_file -> collapse_file (as
    khugepaged_scan_mm_slot and madvise_collapse do); collapse_file ends in
    retract_page_tables over every vma mapping the 2 MB-aligned pgoff range, in every mm."""
    m = cpu.m
    mm = cpu.mm
    await down_read(cpu, mm.mmap_lock)
    vma = mm.find_vma(addr)
    await up_read(cpu, mm.mmap_lock)
    if vma is None or vma.file is None:
        m.ev(cpu, "retract_skip", addr=hex(addr), why="not a file or shmem vma")
        return
    start = linear_page_index(vma, addr) & ~(HPAGE_PMD_NR - 1)
    await collapse_file(cpu, mm, addr, mapping_of(m, vma.file), start)


# -- collapse_pte_mapped_thp ----------------------------------------------------------------------

PTE_MAPPED_THP_RECHECK_ALWAYS = config_key(
    "pte_mapped_thp_recheck_always", (False, True),
    "try_collapse_pte_mapped_thp's step 4 (mm/khugepaged.c) takes pml and rechecks "
    "pmd_same(pgt_pmd, pmdp_get_lockless(pmd)) only inside `if (ptl != pml)`, after "
    "spin_lock_nested(ptl): with one page_table_lock (ptl == pml) the lock dropped after step 2 is "
    "retaken with no recheck, and PT_RECLAIM can clear the pmd in between (catalogue D12). "
    "true is the fix ptsim proposes: the recheck also when ptl == pml (its failure path, "
    "flush_tlb_mm and goto unlock, already unlocks ptl == pml correctly). false is the code as "
    "read: the recheck under `if (ptl != pml)` came with \"mm: khugepaged: "
    "collapse_pte_mapped_thp() use pte_offset_map_rw_nolock()\" (Qi Zheng, v6.13) and is "
    "unchanged in a 2026 mm/khugepaged.c (try_collapse_pte_mapped_thp, enum scan_result).",
    "proposed for D12 (docs/findings/d12-collapse-pte-mapped-thp-ptl-eq-pml.md); not in any tree")

@kfunc
async def filemap_lock_folio(cpu, mapping, pgoff: int):
    """__filemap_get_folio(FGP_LOCK): a reference, then the folio lock (sleeping), then the
    check that the folio still caches pgoff (else unlock, put and look again). None if absent."""
    m = cpu.m
    while True:
        await m.point(cpu)
        page = mapping.pages.get(pgoff)
        if page is None:
            return None
        folio = m.mem.folio(page)
        if m.fp is not None:
            touch(m, ("k", folio), True)
        m.mem.refcount[folio] += 1
        await folio_lock(cpu, mapping, folio)
        if m.mem.folio(mapping.pages.get(pgoff, -1)) == folio:
            return folio
        await folio_unlock(cpu, mapping, folio)
        folio_put(m, folio, m.who(cpu), cpu)


# _try_collapse_locked's way of saying "goto maybe_install_pmd" (step 5 is its caller's)
_MAYBE_INSTALL_PMD = "maybe_install_pmd"


@kfunc
async def set_huge_pmd(cpu, mm, vma, haddr: int, pmdp, folio: int) -> str:
    """set_huge_pmd(vma, haddr, pmd, folio) (mm/khugepaged.c at 00f58104202c; the folio lock and
    mmap_lock held): do_set_pmd with vmf.flags = 0, a read-only huge pmd (SCAN_FAIL if it falls
    back, e.g. the pmd is no longer none), then folio_get for the new mapping (get_page in the
    tree read)."""
    m = cpu.m
    if not await do_set_pmd(cpu, mm, vma, pmdp, haddr, folio, False):
        return SCAN_FAIL
    await m.point(cpu)
    if m.fp is not None:
        touch(m, ("k", folio), True)
    m.mem.refcount[folio] += 1
    m.ev(cpu, "set_huge_pmd", addr=hex(haddr), pfn=hex(folio))
    return SCAN_SUCCEED


class _PteMapped:
    """The state try_collapse_pte_mapped_thp's exit labels look at."""

    __slots__ = ("mapped", "ptl", "ptl_locked", "pml", "nr_mapped_ptes", "notified", "pmdp")

    def __init__(self) -> None:
        self.mapped = False  # start_pte mapped (inside rcu_read_lock)
        self.ptl = None
        self.ptl_locked = False
        self.pml = None
        self.nr_mapped_ptes = 0
        self.notified = False
        self.pmdp = None  # the pmd step 5 (maybe_install_pmd) installs into


@kfunc
async def try_collapse_pte_mapped_thp(cpu, mm, addr: int, install_pmd: bool = False) -> str:
    """try_collapse_pte_mapped_thp (7.x form), mmap_lock held for reading. Step 1 checks, under
    pte_offset_map_lock, that every pte maps the right subpage of the locked PMD-sized folio;
    step 2 re-maps with pte_offset_map_rw_nolock, locks ptl, rechecks pmd_same and clears the
    ptes; ptl is dropped (the table stays mapped: rcu_read_lock); step 4 takes pml and -- only
    if ptl != pml -- ptl again with a pmd_same recheck; then pmdp_collapse_flush and
    pte_free_defer of pmd_pgtable(pgt_pmd). D12 asks whether the ptl == pml case (no split
    ptlocks) lets reclaim clear the pmd between the two (it does: catalogue D12);
    pte_mapped_thp_recheck_always rechecks in that case too (the proposed fix)."""
    m = cpu.m
    haddr = addr & HPAGE_PMD_MASK
    vma = mm.find_vma(haddr)  # vma_lookup
    if vma is None or vma.file is None or not _pmd_range_in_vma(vma, haddr):
        return _scan(cpu, "collapse_pte_mapped_thp", SCAN_VMA_CHECK)
    result, pmdp = await find_pmd_or_thp_or_none(cpu, mm, haddr)
    if result == SCAN_PMD_MAPPED:
        return _scan(cpu, "collapse_pte_mapped_thp", result)
    if vma.uffd_wp:  # userfaultfd_protected(vma)
        return _scan(cpu, "collapse_pte_mapped_thp", SCAN_PTE_UFFD_WP)
    mapping = mapping_of(m, vma.file)
    folio = await filemap_lock_folio(cpu, mapping, linear_page_index(vma, haddr))
    if folio is None:
        return _scan(cpu, "collapse_pte_mapped_thp", SCAN_PAGE_NULL)
    st = _PteMapped()
    result = await _try_collapse_locked(cpu, mm, vma, haddr, folio, st)
    if result is _MAYBE_INSTALL_PMD:
        # step 5: install pmd entry
        result = (await set_huge_pmd(cpu, mm, vma, haddr, st.pmdp, folio) if install_pmd
                  else SCAN_SUCCEED)
    # drop_folio:
    await folio_unlock(cpu, mapping, folio)
    await m.point(cpu)
    folio_put(m, folio, m.who(cpu), cpu)
    return _scan(cpu, "collapse_pte_mapped_thp", result)


async def _try_collapse_locked(cpu, mm, vma, haddr: int, folio: int, st: _PteMapped) -> str:
    m = cpu.m
    mem = m.mem
    if mem.order.get(folio) != 9:
        return SCAN_PAGE_COMPOUND
    result, pmdp = await find_pmd_or_thp_or_none(cpu, mm, haddr)
    st.pmdp = pmdp
    if result == SCAN_PMD_NONE:
        # "All pte entries have been removed and pmd cleared." goto maybe_install_pmd
        return _MAYBE_INSTALL_PMD
    if result != SCAN_SUCCEED:
        return result
    mapped = await pte_offset_map_lock(cpu, mm, pmdp, haddr)
    if mapped is None:  # "mmap_lock + page lock should prevent this"
        return SCAN_FAIL
    table, ptl = mapped
    st.mapped, st.ptl, st.ptl_locked = True, ptl, True
    # step 1: check all mapped PTEs are to the right huge page
    for i, ptent in enumerate(scan_entries_locked(cpu, table)):
        if ptent == 0:
            continue
        if not present(ptent):
            return await _abort(cpu, mm, folio, st, SCAN_PTE_NON_PRESENT)
        if entry_pfn(ptent) != folio + i:  # folio_page(folio, i) != vm_normal_page()
            return await _abort(cpu, mm, folio, st, SCAN_FAIL)
    await pte_unmap_unlock(cpu, ptl)
    st.mapped = st.ptl_locked = False
    st.notified = True  # mmu_notifier_invalidate_range_start
    # uffd-armed private vma: pml taken now -- file vmas are MAP_SHARED in the model
    mapped = await pte_offset_map_rw_nolock(cpu, mm, pmdp, haddr)
    if mapped is None:
        return await _abort(cpu, mm, folio, st, SCAN_FAIL)
    table, pgt_pmd, ptl = mapped
    st.mapped, st.ptl = True, ptl
    await spin_lock(cpu, ptl)
    st.ptl_locked = True
    if await pmdp_get_lockless(cpu, pmdp) != pgt_pmd:
        m.ev(cpu, "pte_mapped_thp_pmd_changed", step=2)
        return await _abort(cpu, mm, folio, st, SCAN_FAIL)
    # step 2: clear page table and adjust rmap
    for i, ptent in enumerate(list(scan_entries_locked(cpu, table))):
        if ptent == 0:
            continue
        if not present(ptent):
            return await _abort(cpu, mm, folio, st, SCAN_PTE_NON_PRESENT)
        if entry_pfn(ptent) != folio + i:
            return await _abort(cpu, mm, folio, st, SCAN_FAIL)
        await ptep_get_and_clear(cpu, (table, i))  # clear_ptes; folio_remove_rmap_ptes
        st.nr_mapped_ptes += 1
    await spin_unlock(cpu, ptl)  # if (!pml) spin_unlock(ptl): start_pte stays mapped
    st.ptl_locked = False
    m.ev(cpu, "pte_mapped_thp_cleared", nr=st.nr_mapped_ptes)
    # step 3: set proper refcount and mm_counters
    if st.nr_mapped_ptes:
        if m.fp is not None:
            touch(m, ("k", folio), True)
        mem.refcount[folio] -= st.nr_mapped_ptes  # folio_ref_sub
        mm.rss -= st.nr_mapped_ptes  # add_mm_counter(mm, mm_counter_file(folio), -nr)
    # step 4: remove empty page table
    pml = await pmd_lock(cpu, mm, pmdp)
    st.pml = pml
    if ptl is not pml:
        await spin_lock_nested(cpu, ptl)
    st.ptl_locked = True  # ptl is held either way (ptl == pml: it is pml)
    if ptl is not pml or m.cfg.pte_mapped_thp_recheck_always:
        if await pmdp_get_lockless(cpu, pmdp) != pgt_pmd:
            m.ev(cpu, "pte_mapped_thp_pmd_changed", step=4)
            await flush_tlb_mm_range(cpu, mm, 0, USER_END, True)  # flush_tlb_mm
            return await _unlock(cpu, st, SCAN_FAIL)  # goto unlock
    else:
        m.ev(cpu, "pte_mapped_thp_no_recheck", why="ptl == pml")
    pgt_pmd = await pmdp_collapse_flush(cpu, mm, pmdp, haddr)
    # pmdp_get_lockless_sync(): an IPI only on 32-bit PAE
    await pte_unmap_unlock(cpu, ptl)
    st.mapped = st.ptl_locked = False
    if ptl is not pml:
        await spin_unlock(cpu, pml)
    mm.nr_ptes -= 1  # mm_dec_nr_ptes
    pte_free_defer(cpu, entry_pfn(pgt_pmd))  # pte_free_defer(mm, pmd_pgtable(pgt_pmd))
    m.ev(cpu, "pte_mapped_thp_retracted", pfn=hex(entry_pfn(pgt_pmd)))
    return _MAYBE_INSTALL_PMD


async def _abort(cpu, mm, folio: int, st: _PteMapped, result: str) -> str:
    """abort: undo step 2's accounting (the ptes stay cleared; flush them), then unlock:."""
    if st.nr_mapped_ptes:
        await flush_tlb_mm_range(cpu, mm, 0, USER_END, True)  # flush_tlb_mm
        if cpu.m.fp is not None:
            touch(cpu.m, ("k", folio), True)
        cpu.m.mem.refcount[folio] -= st.nr_mapped_ptes
        mm.rss -= st.nr_mapped_ptes
    return await _unlock(cpu, st, result)


async def _unlock(cpu, st: _PteMapped, result: str) -> str:
    if st.mapped:
        if st.ptl_locked:
            await pte_unmap_unlock(cpu, st.ptl)
        else:
            await pte_unmap(cpu)
    if st.pml is not None and st.pml is not st.ptl:
        await spin_unlock(cpu, st.pml)
    # mmu_notifier_invalidate_range_end if notified
    return result


@op("collapse_pte_mapped_thp")
async def collapse_pte_mapped_thp(cpu, *, addr: Addr) -> None:
    """collapse_single_pmd's SCAN_PTE_MAPPED_HUGEPAGE branch: mmap_read_lock,
    try_collapse_pte_mapped_thp(mm, addr, install_pmd = false as for khugepaged),
    mmap_read_unlock."""
    mm = cpu.mm
    await down_read(cpu, mm.mmap_lock)
    await try_collapse_pte_mapped_thp(cpu, mm, addr, False)
    await up_read(cpu, mm.mmap_lock)


@kfunc
async def hpage_collapse_scan_file(cpu, mm, addr: int, mapping, start: int) -> str:
    """hpage_collapse_scan_file (00f58104202c), MADV_COLLAPSE's control (is_khugepaged false: no
    max_ptes_none limit): a lockless walk of the page cache range under rcu_read_lock, one step
    here; a PMD-sized folio whose index is start is SCAN_PTE_MAPPED_HUGEPAGE ("Maybe PMD-mapped"),
    another large folio SCAN_PAGE_COMPOUND; otherwise collapse_file. (Its LRU and refcount checks
    are left to collapse_file, which repeats them with the folios locked.)"""
    m = cpu.m
    mem = m.mem
    await m.point(cpu)
    for index_ in range(start, start + HPAGE_PMD_NR):
        page = mapping.pages.get(index_)
        if page is None:
            continue
        head = mem.folio(page)
        if head in mem.order:
            ok = mem.order[head] == 9 and mapping.pages.get(start) == head
            return SCAN_PTE_MAPPED_HUGEPAGE if ok else SCAN_PAGE_COMPOUND
    return await collapse_file(cpu, mm, addr, mapping, start, is_khugepaged=False)


@op("madvise_collapse")
async def madvise_collapse(cpu, *, addr: Addr, len: Size) -> None:
    """madvise(addr, len, MADV_COLLAPSE) on a file or shmem vma: madvise_collapse()
    (mm/khugepaged.c, read at torvalds/linux 00f58104202c), entered with mmap_lock held for
    reading. For each 2 MB-aligned pmd in the range: the vma is looked up (revalidated after the
    first), mmap_lock is dropped, hpage_collapse_scan_file -> collapse_file (the small folios
    become one PMD-sized page-cache folio; retract_page_tables takes the page tables of every
    mapping away), and on SCAN_PTE_MAPPED_HUGEPAGE mmap_read_lock,
    collapse_pte_mapped_thp(mm, addr, install_pmd = true), mmap_read_unlock: its step 4 removes
    a PTE table still mapping the folio and step 5 (set_huge_pmd) maps the folio by a huge pmd.
    The result switch continues on the whitelisted results and stops on others; out_maybelock
    takes mmap_lock again for madvise's unlock. Simplified: the thp_vma_allowable_order check
    (MADV_COLLAPSE ignores the sysfs setting; VM_NOHUGEPAGE is not modelled apart from thp), and
    madvise_collapse of an anon vma (NotModelled: the khugepaged_collapse op)."""
    m = cpu.m
    mm = cpu.mm
    end = addr + len
    hstart = (addr + PMD_SIZE - 1) & HPAGE_PMD_MASK
    hend = end & HPAGE_PMD_MASK
    await down_read(cpu, mm.mmap_lock)  # madvise: MADV_COLLAPSE takes mmap_lock for reading
    vma = mm.find_vma(addr)
    if vma is None or vma.file is None:
        await up_read(cpu, mm.mmap_lock)
        if vma is not None:
            raise NotModelled("madvise_collapse of an anon vma (use khugepaged_collapse)")
        return
    mmap_locked = True
    for haddr in range(hstart, hend, PMD_SIZE):
        if not mmap_locked:
            await down_read(cpu, mm.mmap_lock)
            mmap_locked = True
            vma = mm.find_vma(haddr)  # hugepage_vma_revalidate
            if vma is None or vma.file is None or not _pmd_range_in_vma(vma, haddr):
                m.ev(cpu, "madvise_collapse", addr=hex(haddr), result=SCAN_VMA_NULL)
                break  # goto out_nolock
            hend = min(hend, vma.end & HPAGE_PMD_MASK)
            if haddr >= hend:
                break
        mapping = mapping_of(m, vma.file)
        pgoff = linear_page_index(vma, haddr)
        await up_read(cpu, mm.mmap_lock)
        mmap_locked = False
        result = await hpage_collapse_scan_file(cpu, mm, haddr, mapping, pgoff)
        if result == SCAN_PTE_MAPPED_HUGEPAGE:
            await down_read(cpu, mm.mmap_lock)
            result = await try_collapse_pte_mapped_thp(cpu, mm, haddr, True)
            await up_read(cpu, mm.mmap_lock)
        m.ev(cpu, "madvise_collapse", addr=hex(haddr), result=result)
        if result not in _MADVISE_COLLAPSE_CONTINUE:
            break  # "Other error, exit": goto out_maybelock
    if not mmap_locked:
        await down_read(cpu, mm.mmap_lock)  # out_maybelock: "Caller expects us to hold mmap_lock"
    await up_read(cpu, mm.mmap_lock)


# madvise_collapse's handle_result: the results after which it goes on to the next pmd
_MADVISE_COLLAPSE_CONTINUE = frozenset({
    SCAN_SUCCEED, SCAN_PMD_MAPPED, SCAN_PMD_NULL, SCAN_PTE_NON_PRESENT, SCAN_PTE_UFFD_WP,
    SCAN_PAGE_RO, SCAN_LACK_REFERENCED_PAGE, SCAN_PAGE_NULL, SCAN_PAGE_COUNT, SCAN_PAGE_LOCK,
    SCAN_PAGE_COMPOUND})


@op("madvise_collapse_pmd")
async def madvise_collapse_pmd(cpu, *, addr: Addr) -> None:
    """madvise(addr & ~(2 MB - 1), 2 MB, MADV_COLLAPSE): madvise_collapse of the one pmd range at
    addr. It takes the parameters of collapse_pte_mapped_thp, so a variant can run the kernel's
    real entry into try_collapse_pte_mapped_thp (MADV_COLLAPSE: install_pmd = true) in its
    place: replace = { collapse_pte_mapped_thp = "madvise_collapse_pmd" } (catalogue D12)."""
    await madvise_collapse(cpu, addr=addr & HPAGE_PMD_MASK, len=PMD_SIZE)
