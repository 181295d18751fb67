"""MADV_DONTNEED with PT_RECLAIM: madvise_dontneed_single_vma -> zap_page_range_single ->
unmap_page_range -> zap_pmd_range -> zap_pte_range, and mm/pt_reclaim.c.

Modelled on mm/memory.c and mm/pt_reclaim.c of ~6.14 after the Feb 2025 fix ("mm: pgtable:
fix incorrect reclaim of non-empty PTE pages"); zap_rescan_after_break=false restores the
code before it. pt_reclaim_code selects the shape of the reclaim code: "try_to_free_pte" is
mm/pt_reclaim.c as in 6.14-6.19 (torvalds/linux e65d9626f9bb); "zap_empty_pte_table" is its 2026
form in mm/memory.c (akpm/mm, Jan 2026: "mm: move pte table reclaim code to memory.c" and
"mm/memory: handle non-split locks correctly in zap_empty_pte_table()"), which differs only
when ptl == pml: the fast path then clears the pmd under the ptl it already holds.
"""

from __future__ import annotations

__kernel_file__ = "mm/memory.c"  # where the kernel functions below live (reports cite it)
__kernel_files__ = {  # the ones that live elsewhere
    "try_get_and_clear_pmd": "mm/pt_reclaim.c",
    "free_pte": "mm/pt_reclaim.c",
    "try_to_free_pte": "mm/pt_reclaim.c",
    "zap_huge_pmd": "mm/huge_memory.c",
    "zap_deposited_table": "mm/huge_memory.c",
    "madvise_dontneed_single_vma": "mm/madvise.c",
}

from dataclasses import dataclass
from itertools import compress

from ptsim.kernel_model.errors import NotModelled
from ptsim.kernel_model.footprint import begin, touch
from ptsim.kernel_model.locks import (
    down_read,
    spin_lock_nested,
    spin_trylock,
    spin_unlock,
    try_vma_read_lock,
    up_read,
)
from ptsim.kernel_model.memory import TABLE_INDICES, ZERO_PFN
from ptsim.kernel_model.mmu_gather import (
    MMU_GATHER_BATCH_FULL,
    pte_free_tlb,
    tlb_finish_mmu,
    tlb_flush_mmu,
    tlb_flush_mmu_tlbonly,
    tlb_gather_mmu,
    tlb_remove_folio,
    tlb_remove_pmd_tlb_entry,
    tlb_remove_tlb_entry,
)
from ptsim.kernel_model.pagetable import (
    _PAGE_DIRTY,
    _PAGE_PRESENT,
    PAGE_SIZE,
    PMD_SIZE,
    entry_pfn,
    index,
    is_guard_pte_marker,
    leaf,
    pmd_addr_end,
    present,
)
from ptsim.kernel_model.pgalloc import pte_free
from ptsim.kernel_model.pgtable import (
    pmd_clear,
    pmd_lock,
    pmd_lockptr,
    pmd_off,
    pmdp_get,
    pmdp_get_lockless,
    pte_offset_map_lock,
    pte_offset_map_rw_nolock,
    pte_unmap,
    pte_unmap_unlock,
    ptep_get_and_clear,
    read_entry,
    scan_entries_locked,
    write_entry,
)
from ptsim.kernel_model.registry import Addr, Size, config_key, fault, kfunc, op

from .fault import __split_huge_pmd_file, pgtable_trans_huge_withdraw

PT_RECLAIM = config_key(
    "pt_reclaim", (True, False),
    "CONFIG_PT_RECLAIM: MADV_DONTNEED frees the PTE tables it leaves empty (zap_pte_range with "
    "reclaim_pt, mm/pt_reclaim.c).",
    "mm: pgtable: reclaim empty PTE page in madvise(MADV_DONTNEED) (v6.14; x86 selects it)",
    kconfig="CONFIG_PT_RECLAIM")
ZAP_RESCAN_AFTER_BREAK = config_key(
    "zap_rescan_after_break", (True, False),
    "When zap_pte_range drops the PTE lock mid-table (need_resched, a full batch), it no longer "
    "trusts its own scan: the table is freed only by the slow path, which rescans all 512 "
    "entries under the pmd and PTE locks. false is the code before, which freed a table a "
    "concurrent fault had refilled.",
    "mm: pgtable: fix incorrect reclaim of non-empty PTE pages (Feb 2025, v6.14)")
MADV_DONTNEED_LOCK = config_key(
    "madv_dontneed_lock", ("vma", "mmap"),
    "What MADV_DONTNEED holds: the per-VMA read lock (vma) or mmap_lock for reading (mmap).",
    "mm: use per_vma lock for MADV_DONTNEED (a6fde7add78d, v6.17)")
PT_RECLAIM_CODE = config_key(
    "pt_reclaim_code", ("try_to_free_pte", "zap_empty_pte_table"),
    "The shape of PT_RECLAIM's code. try_to_free_pte: mm/pt_reclaim.c of 6.14-6.19 (read at "
    "torvalds/linux e65d9626f9bb): zap_pte_range's fast path try_get_and_clear_pmd trylocks pml "
    "while holding ptl -- with one page_table_lock (ptl == pml) the trylock of the lock it holds "
    "always fails, so every reclaim takes the slow path try_to_free_pte (pmd_lock, rescan, "
    "pmd_clear). zap_empty_pte_table: the 2026 mm/memory.c form (akpm/mm mm-unstable, Jan 2026: "
    "\"mm: move pte table reclaim code to memory.c\", then \"mm/memory: handle non-split locks "
    "correctly in zap_empty_pte_table()\"): the fast path is `if (ptl != pml && "
    "!spin_trylock(pml)) return false;`, so with ptl == pml it clears the pmd at once under the "
    "ptl it holds; the slow path zap_pte_table_if_empty is try_to_free_pte's body. With split "
    "ptlocks the two shapes take the same steps. The default is the form of the newest "
    "torvalds/linux copy read (mm/pt_reclaim.c at e65d9626f9bb), which user modules patching "
    "free_pte rely on; the 2026 form was read only in akpm/mm (mm-unstable, Jan 2026) and an "
    "undated 2026 mm/memory.c, and whether it has reached a tagged release was not verified.",
    "mm/memory: handle non-split locks correctly in zap_empty_pte_table() (akpm/mm, Jan 2026)")
NEED_RESCHED = fault(
    "need_resched",
    "zap_pte_range sees need_resched() at an iteration: it drops the PTE lock, flushes what it "
    "batched and reschedules before it goes on")


@dataclass
class ZapDetails:
    reclaim_pt: bool = False
    even_cows: bool = True
    # ZAP_FLAG_DROP_MARKER (zap_drop_markers()): unmap_vmas (munmap, exit) sets it, so guard
    # markers go with the mapping; MADV_DONTNEED's madvise_dontneed_single_vma does not, and a
    # zap leaves them in place (zap_nonpresent_ptes).
    drop_markers: bool = True


def reclaim_pt_is_enabled(m, start: int, end: int, details: ZapDetails | None) -> bool:
    return (m.cfg.pt_reclaim and details is not None and details.reclaim_pt
            and end - start >= PMD_SIZE)


# -- mm/pt_reclaim.c ---------------------------------------------------------------------------

@kfunc
async def try_get_and_clear_pmd(cpu, mm, pmdp):
    """Called with ptl held: only a trylock of pml is possible (lock order is pml, then ptl).
    Returns the old pmd value, or None if pml was busy. No TLB flush here."""
    pml = pmd_lockptr(cpu.m, mm, pmdp)
    if not await spin_trylock(cpu, pml):
        return None
    pmdval = await pmdp_get_lockless(cpu, pmdp)
    await pmd_clear(cpu, pmdp)
    await spin_unlock(cpu, pml)
    return pmdval


@kfunc
async def free_pte(cpu, mm, addr: int, tlb, pmdval: int) -> None:
    await pte_free_tlb(cpu, tlb, entry_pfn(pmdval), addr)
    mm.nr_ptes -= 1  # mm_dec_nr_ptes


async def _clear_pte_table_if_empty(cpu, mm, pmdp, addr: int):
    """The body both reclaim code shapes share (6.14-6.19 try_to_free_pte, 2026
    zap_pte_table_if_empty): pmd_lock, pte_offset_map_rw_nolock, ptl if it is not pml, the 512
    pte_none() checks under ptl, pmd_clear. Returns the old pmd value, or None. No kfunc: the
    steps belong to whichever kernel function calls it."""
    m = cpu.m
    pml = await pmd_lock(cpu, mm, pmdp)
    mapped = await pte_offset_map_rw_nolock(cpu, mm, pmdp, addr)
    if mapped is None:
        await spin_unlock(cpu, pml)
        return None
    table, pmdval, ptl = mapped
    if ptl is not pml:
        await spin_lock_nested(cpu, ptl)
    await m.point(cpu)
    if m.fp is not None:  # the scan declares what it reads
        begin(m, cpu)
    if any(scan_entries_locked(cpu, table)):
        await pte_unmap_unlock(cpu, ptl)
        if ptl is not pml:
            await spin_unlock(cpu, pml)
        return None
    await pte_unmap(cpu)
    await pmd_clear(cpu, pmdp)
    if ptl is not pml:
        await spin_unlock(cpu, ptl)
    await spin_unlock(cpu, pml)
    return pmdval


@kfunc
async def try_to_free_pte(cpu, mm, pmdp, addr: int, tlb) -> None:
    """Slow path: pml held from before the map until the clear, so no pmd_same recheck."""
    pmdval = await _clear_pte_table_if_empty(cpu, mm, pmdp, addr)
    if pmdval is not None:
        await free_pte(cpu, mm, addr, tlb, pmdval)


# -- mm/memory.c, 2026 form (pt_reclaim_code = "zap_empty_pte_table") ----------------------------

@kfunc
async def zap_empty_pte_table(cpu, mm, pmdp, ptl):
    """Called with ptl held: `if (ptl != pml && !spin_trylock(pml)) return false;` then
    pmdp_get and pmd_clear, and pml dropped only if it is not ptl. With ptl == pml the pmd is
    cleared under the lock the zap holds. Returns the old pmd value, or None."""
    pml = pmd_lockptr(cpu.m, mm, pmdp)
    if ptl is not pml and not await spin_trylock(cpu, pml):
        return None
    pmdval = await pmdp_get(cpu, pmdp)
    await pmd_clear(cpu, pmdp)
    if ptl is not pml:
        await spin_unlock(cpu, pml)
    return pmdval


@kfunc
async def zap_pte_table_if_empty(cpu, mm, pmdp, addr: int):
    """try_to_free_pte's body without the free: pmd_lock, pte_offset_map_rw_nolock, ptl if it
    is not pml, the 512 pte_none checks, pmd_clear. Returns the old pmd value, or None."""
    return await _clear_pte_table_if_empty(cpu, mm, pmdp, addr)


# -- mm/memory.c ---------------------------------------------------------------------------------

@dataclass
class ZapPass:
    """zap_pte_range's per-pass locals that do_zap_pte_range updates (and two inputs)."""
    rss: int = 0
    force_flush: bool = False
    force_break: bool = False
    any_skipped: bool = False  # the entry just processed was left in place
    rare: bool = False  # any_skipped or force_break: the loop looks at them only then
    drop_markers: bool = True  # zap_drop_markers(details)
    may_batch_full: bool = False  # the mmu_gather_batch_full fault has a probability


@kfunc
async def do_zap_pte_range(cpu, tlb, vma, table: int, addr: int, end: int, zp: ZapPass) -> int:
    """Skip a run of none ptes (one step: entries read under ptl), then zap one pte: a present
    one (zap_present_ptes -> zap_present_folio_ptes) or a non-present one (zap_nonpresent_ptes).

    mm/memory.c as read in a 6.14-era tree (zap_present_folio_ptes, zap_nonpresent_ptes,
    do_zap_pte_range): __tlb_remove_folio_pages() returning true (the batch is full and
    tlb_next_batch cannot add one: the mmu_gather_batch_full fault) sets force_flush and
    force_break; the folio is already queued. zap_nonpresent_ptes sets any_skipped first and
    clears it (zap_install_uffd_wp_if_needed, false here) only when it zapped the entry; a
    guard marker (is_guard_swp_entry) is kept unless zap_drop_markers(details). The model's only
    non-present entries are guard markers; swap and migration entries, which a reclaim_pt zap
    would clear (any_skipped false), are not modelled."""
    m = cpu.m
    entries = scan_entries_locked(cpu, table)
    i = index(1, addr)
    max_nr = (end - addr) // PAGE_SIZE
    nr = 0
    if entries[i] == 0:
        await m.point(cpu)
        if m.fp is not None:  # reads the entries scanned, under ptl
            begin(m, cpu)
            touch(m, ("t", table))
        window = entries[i:i + max_nr]
        # All none (the usual rest of a table): list.count's identity test finds it at C speed.
        if window.count(0) == len(window):
            nr = max_nr
        else:
            nr = next(compress(TABLE_INDICES, window))
        if m.log is not None:
            m.ev(cpu, "skip_none_ptes", table=hex(table), idx=i, nr=nr)
        if nr == max_nr:
            return nr
        i += nr
        addr += nr * PAGE_SIZE
    if not entries[i] & _PAGE_PRESENT:  # zap_nonpresent_ptes
        if is_guard_pte_marker(entries[i]) and not zp.drop_markers:
            # "Ordinary zapping should not remove guard PTE markers."
            zp.any_skipped = zp.rare = True
            if m.log is not None:
                m.ev(cpu, "zap_skip_marker", table=hex(table), idx=i)
            return nr + 1
        await write_entry(cpu, (table, i), 0, "clear_not_present_full_ptes")
        return nr + 1
    ptent = await ptep_get_and_clear(cpu, (table, i))  # ptep_get_and_clear_full
    tlb_remove_tlb_entry(tlb, addr)
    pfn = entry_pfn(ptent)
    if pfn != ZERO_PFN:  # present (tested above, under ptl); vm_normal_page(): zero page special
        zp.rss -= 1
        if vma.type != "anon" and ptent & _PAGE_DIRTY:
            # zap_present_folio_ptes: a dirty file folio's rmap removal is delayed until after
            # the TLB flush (tlb_delay_rmap), which must then happen before ptl is dropped.
            zp.force_flush = True
        tlb_remove_folio(tlb, pfn)  # rmap removed; the reference is dropped after the flush
        if zp.may_batch_full and m.choose_fault(cpu, MMU_GATHER_BATCH_FULL):
            zp.force_flush = zp.force_break = zp.rare = True  # __tlb_remove_folio_pages: true
            if m.log is not None:
                m.ev(cpu, "mmu_gather_batch_full", pages=len(tlb.pages))
    return nr + 1


@kfunc
async def zap_pte_range(cpu, tlb, vma, pmdp, addr: int, end: int, details) -> int:
    """mm/memory.c zap_pte_range as read in a 6.14-era tree (with "mm: pgtable: fix incorrect
    reclaim of non-empty PTE pages"): per entry, `if (any_skipped) can_reclaim_pt = false;` and
    `if (unlikely(force_break)) { addr += nr * PAGE_SIZE; direct_reclaim = false; break; }`;
    after the loop the fast path, then with force_flush tlb_flush_mmu_tlbonly before
    pte_unmap_unlock and tlb_flush_mmu after it, and `goto retry` while addr != end (the fast
    path is then off). So a table with an entry the zap leaves in place (a guard marker) is
    never reclaimed, and a full batch (mmu_gather_batch_full) is D2's other way to drop ptl."""
    m = cpu.m
    mm = tlb.mm
    start = addr
    can_reclaim_pt = reclaim_pt_is_enabled(m, start, end, details)
    rescan = m.cfg.zap_rescan_after_break
    in_memory_c = m.cfg.pt_reclaim_code == "zap_empty_pte_table"
    direct_reclaim = rescan  # before the fix it started false and only the fast path set it
    pmdval = None
    drop_markers = details is not None and details.drop_markers  # zap_drop_markers()
    may_batch_full = m.flt.mmu_gather_batch_full > 0.0
    while True:  # retry:
        mapped = await pte_offset_map_lock(cpu, mm, pmdp, addr)
        if mapped is None:
            return addr
        table, ptl = mapped
        zp = ZapPass(drop_markers=drop_markers, may_batch_full=may_batch_full)
        may_resched = m.flt.need_resched > 0.0  # else need_resched() is never true
        while True:
            if may_resched and m.fp is not None:  # either way: the next pass scans the table
                touch(m, ("t", table))
            if may_resched and m.choose_fault(cpu, NEED_RESCHED, covered=True):
                if m.log is not None:
                    m.ev(cpu, "need_resched")
                if rescan:
                    direct_reclaim = False
                break
            nr = await do_zap_pte_range(cpu, tlb, vma, table, addr, end, zp)
            addr += nr * PAGE_SIZE
            if zp.rare:
                if zp.any_skipped:  # an entry stays: the table is not empty
                    can_reclaim_pt = False
                    zp.any_skipped = zp.rare = False
                if zp.force_break:  # the page batch is full: flush, drop ptl, resume at addr
                    if rescan:
                        direct_reclaim = False
                    break
            if addr == end:
                break
        if can_reclaim_pt and addr == end and (direct_reclaim or not rescan):
            if in_memory_c:
                pmdval = await zap_empty_pte_table(cpu, mm, pmdp, ptl)
            else:
                pmdval = await try_get_and_clear_pmd(cpu, mm, pmdp)
            direct_reclaim = pmdval is not None
        mm.rss += zp.rss  # add_mm_rss_vec
        # The page batch grows as needed (tlb_next_batch allocates up to MAX_GATHER_BATCH_COUNT
        # batch pages); the mmu_gather_batch_full fault stands for the times it cannot.
        if zp.force_flush:
            await tlb_flush_mmu_tlbonly(cpu, tlb)  # "Do the actual TLB flush before dropping ptl"
        await pte_unmap_unlock(cpu, ptl)
        if zp.force_flush:
            # tlb_flush_mmu: the pages batched so far, and the tables queued so far in this
            # gather (tlb_table_flush -> call_rcu), are freed now, mid-zap.
            if m.log is not None and zp.force_break:
                m.ev(cpu, "zap_force_break", addr=hex(addr))
            await tlb_flush_mmu(cpu, tlb)
        if addr != end:
            continue  # cond_resched(); goto retry -- ptl was dropped
        break
    if can_reclaim_pt:
        if in_memory_c:
            if not direct_reclaim:
                pmdval = await zap_pte_table_if_empty(cpu, mm, pmdp, start)
            if pmdval is not None:
                await pte_free_tlb(cpu, tlb, entry_pfn(pmdval), addr)  # addr == end, as read
                mm.nr_ptes -= 1  # mm_dec_nr_ptes
        elif direct_reclaim:
            await free_pte(cpu, mm, start, tlb, pmdval)
        else:
            await try_to_free_pte(cpu, mm, pmdp, start, tlb)
    return addr


@kfunc
async def zap_deposited_table(cpu, mm, pmdp) -> None:
    await pte_free(cpu, pgtable_trans_huge_withdraw(cpu.m, pmdp))
    mm.nr_ptes -= 1  # mm_dec_nr_ptes


@kfunc
async def zap_huge_pmd(cpu, tlb, vma, pmdp, addr: int) -> bool:
    """mm/huge_memory.c: under the pmd lock (__pmd_trans_huge_lock), clear the huge pmd, free
    the deposited table and queue the folio for release after the flush. A file or shmem huge
    pmd (zap_huge_pmd of 6.14, the !folio_test_anon branch) has no deposited table on x86
    (zap_deposited_table only if arch_needs_pgtable_deposit()): add_mm_counter(mm_counter_file,
    -HPAGE_PMD_NR), folio_remove_rmap_pmd, and the mapping's reference goes with
    tlb_remove_page_size after the flush; no table is freed, the page cache keeps its own."""
    m = cpu.m
    mm = tlb.mm
    ptl = await pmd_lock(cpu, mm, pmdp)
    if not leaf(await pmdp_get(cpu, pmdp)):
        await spin_unlock(cpu, ptl)
        return False
    orig = await write_entry(cpu, pmdp, 0, "pmdp_huge_get_and_clear_full")
    tlb_remove_pmd_tlb_entry(tlb, addr)
    folio = entry_pfn(orig)
    if vma.type == "anon":  # folio_test_anon, or the huge zero folio of an anon vma
        await zap_deposited_table(cpu, mm, pmdp)
    if not m.mem.is_zero(folio):
        mm.rss -= 512  # add_mm_counter(MM_ANONPAGES or mm_counter_file, -HPAGE_PMD_NR)
    await spin_unlock(cpu, ptl)
    if not m.mem.is_zero(folio):
        tlb_remove_folio(tlb, folio)  # tlb_remove_page_size(HPAGE_PMD_SIZE)
    return True


@kfunc
async def zap_pmd_range(cpu, tlb, vma, addr: int, end: int, details) -> None:
    mm = tlb.mm
    while addr != end:
        next_ = pmd_addr_end(addr, end)
        pmdp = await pmd_off(cpu, mm, addr)
        if pmdp is None:
            addr = next_
            continue
        pmdval = await read_entry(cpu, pmdp, "pmd_none")
        if present(pmdval) and leaf(pmdval):
            if next_ - addr != PMD_SIZE and vma.type != "anon":
                # __split_huge_pmd of a file huge pmd unmaps it; the pte level then finds none
                ptl = await pmd_lock(cpu, mm, pmdp)
                if (await pmdp_get(cpu, pmdp)) == pmdval:
                    await __split_huge_pmd_file(cpu, mm, vma, pmdp, addr & ~(PMD_SIZE - 1))
                await spin_unlock(cpu, ptl)
            else:
                if next_ - addr != PMD_SIZE:
                    raise NotModelled("a zap of part of a huge pmd (__split_huge_pmd)")
                if await zap_huge_pmd(cpu, tlb, vma, pmdp, addr):
                    addr = next_
                    continue
            pmdval = await read_entry(cpu, pmdp, "pmd_none")  # it changed: fall through
        if pmdval == 0 or not present(pmdval):
            addr = next_
            continue
        addr = await zap_pte_range(cpu, tlb, vma, pmdp, addr, next_, details)
        # addr != next: the table went away under pte_offset_map_lock; look at the pmd again.


@kfunc
async def unmap_page_range(cpu, tlb, vma, addr: int, end: int, details) -> None:
    # tlb_start_vma / tlb_end_vma: x86 merges VMAs (MMU_GATHER_MERGE_VMAS), so the flush
    # waits for tlb_finish_mmu.
    await zap_pmd_range(cpu, tlb, vma, addr, end, details)


@kfunc
async def zap_page_range_single(cpu, vma, addr: int, size: int, details) -> None:
    mm = cpu.m.mms[vma.mm]
    end = addr + size
    tlb = tlb_gather_mmu(cpu, mm)
    await unmap_page_range(cpu, tlb, vma, max(addr, vma.start), min(end, vma.end), details)
    await tlb_finish_mmu(cpu, tlb)


@kfunc
async def madvise_dontneed_single_vma(cpu, vma, start: int, end: int) -> None:
    details = ZapDetails(reclaim_pt=True, even_cows=True, drop_markers=False)
    await zap_page_range_single(cpu, vma, start, end - start, details)


@op("madvise_dontneed")
async def madvise_dontneed(cpu, *, addr: Addr, len: Size) -> None:
    """madvise(addr, len, MADV_DONTNEED) under the per-VMA read lock (6.17+,
    madv_dontneed_lock="vma") or mmap_lock read (6.14, "mmap"): madvise_dontneed_single_vma ->
    zap_page_range_single -> zap_pte_range, which with pt_reclaim frees the PTE tables it
    leaves empty (mm/pt_reclaim.c, fast and slow paths). With the per-VMA lock, madvise_lock's
    try_vma_read_lock (kernel_model/locks.py) trylocks the one vma covering the range and
    falls back to mmap_lock read (a writer holds or waits for the vma lock, the range spans
    more than one vma, or uffd is armed)."""
    mm = cpu.mm
    end = addr + len
    if cpu.m.cfg.madv_dontneed_lock == "vma":
        vma = await try_vma_read_lock(cpu, mm, addr, end)
        if vma is not None:
            await madvise_dontneed_single_vma(cpu, vma, addr, end)
            await up_read(cpu, vma.vm_lock)  # madvise_unlock: vma_end_read
            return
    else:
        await down_read(cpu, mm.mmap_lock)
    for vma in mm.vmas_in(addr, end):  # madvise_walk_vmas under mmap_lock read
        await madvise_dontneed_single_vma(cpu, vma, max(addr, vma.start), min(end, vma.end))
    await up_read(cpu, mm.mmap_lock)
