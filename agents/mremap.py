"""mremap(2)'s page-table move: move_page_tables -> move_pgt_entry(NORMAL_PMD) -> move_normal_pmd,
with the PTE-level fallback move_ptes (mm/mremap.c).

Source read: torvalds/linux mm/mremap.c at commit 000c0691ec6a (about 6.16/6.17: struct
pagetable_move_control, should_take_rmap_locks), which carries Jann Horn's fix "mm/mremap: fix
move_normal_pmd/retract_page_tables race" (Oct 2024, Fixes 1d65b771bc08, Project Zero 371047675);
the fix's diff from mm-commits for the code before it (config mremap_recheck_pmd).

  move_page_tables:  get_old_pmd (NULL if pmd_none), alloc_new_pmd, classify *old_pmd;
                     a table and a PMD-sized extent: move_pgt_entry(NORMAL_PMD), which takes the
                     rmap locks (i_mmap_rwsem for writing on a file vma) -- after the pmd was
                     read and the decision made; failing that, "if (pmd_none(*old_pmd))
                     continue", else pte_alloc(new_pmd) and move_ptes
  move_normal_pmd:   new pmd must be none (WARN), old_ptl = pmd_lock(old), new_ptl nested if
                     distinct, pmd = *old_pmd, [fix: "Racing with collapse?" bail unless it is
                     a present non-leaf entry], pmd_clear(old), pmd_populate(new,
                     pmd_pgtable(pmd)), flush_tlb_range(old range), unlock

Without the recheck, a retract_page_tables() that ran between the classification and the rmap
locks leaves *old_pmd none, and pmd_populate installs pfn 0 as a page table (D8).

The scenario op moves one PMD-sized, PMD-aligned range from addr to dst inside one mm, under
mmap_lock held for writing with both vmas write-locked (move_vma's vma_start_write; the new vma
copy_vma makes is write-locked too). The vma at dst stands for copy_vma's new vma: for a file,
give it the same file and pgoff as the source so that the moved ptes and the rmap agree. mremap
unmaps the destination first (MREMAP_FIXED), so a destination with present ptes is not modelled.
Not modelled: the vma bookkeeping (copy_vma, unmap of the source vma afterwards), huge pmds
(move_huge_pmd), the anon_vma lock, mmu notifiers, uffd remap events.
"""

from __future__ import annotations

__kernel_file__ = "mm/mremap.c"  # where the kernel functions below live (reports cite it)

from ptsim.kernel_model.errors import NotModelled
from ptsim.kernel_model.locks import down_write, spin_lock_nested, spin_unlock, up_write
from ptsim.kernel_model.pagetable import PAGE_SIZE, PMD_SIZE, entry_pfn, index, leaf, present
from ptsim.kernel_model.pgtable import (
    pmd_clear,
    pmd_lock,
    pmd_lockptr,
    pmd_populate,
    pte_offset_map_lock,
    pte_offset_map_rw_nolock,
    pte_unmap,
    pte_unmap_unlock,
    ptep_get,
    ptep_get_and_clear,
    read_entry,
    scan_entries_locked,
    set_pte_at,
)
from ptsim.kernel_model.registry import PmdAddr, config_key, kfunc, op
from ptsim.kernel_model.tlb import flush_tlb_range

from .fault import alloc_pmd, pte_alloc

MREMAP_RECHECK_PMD = config_key(
    "mremap_recheck_pmd", (True, False),
    "move_normal_pmd rechecks that the old pmd still points to a page table after taking the "
    "rmap locks; false is the code before, where a concurrent retract makes it populate the "
    "new pmd from a stale or none value.",
    "mm/mremap: fix move_normal_pmd/retract_page_tables race (Oct 2024, Fixes 1d65b771bc08)")

EAGAIN = -11


@kfunc
async def get_old_pmd(cpu, mm, addr: int):
    """get_old_pud (pgd, p4d, pud none_or_clear_bad), pmd_offset; NULL if pmd_none(*pmd)."""
    pgd = await read_entry(cpu, (mm.pgd, index(4, addr)), "pgd_none_or_clear_bad")
    if not present(pgd):
        return None
    pud = await read_entry(cpu, (entry_pfn(pgd), index(3, addr)), "pud_none_or_clear_bad")
    if not present(pud):
        return None
    pmdp = (entry_pfn(pud), index(2, addr))
    if await read_entry(cpu, pmdp, "pmd_none") == 0:
        return None
    return pmdp


@kfunc
async def alloc_new_pmd(cpu, mm, addr: int):
    """alloc_new_pud (p4d_alloc, pud_alloc), pmd_alloc: the destination pmd pointer."""
    return await alloc_pmd(cpu, mm, addr)


def _mapping(m, vma):
    from ptsim.kernel_model.filemap import mapping_of
    return mapping_of(m, vma.file) if vma.file is not None else None


@kfunc
async def take_rmap_locks(cpu, vma) -> None:
    """i_mmap_lock_write on a file vma (anon_vma_lock_write: not modelled). This is what keeps
    retract_page_tables, an rmap walker that holds no mmap_lock, away from the move."""
    mapping = _mapping(cpu.m, vma)
    if mapping is not None:
        await down_write(cpu, mapping.i_mmap_rwsem)


@kfunc
async def drop_rmap_locks(cpu, vma) -> None:
    mapping = _mapping(cpu.m, vma)
    if mapping is not None:
        await up_write(cpu, mapping.i_mmap_rwsem)


@kfunc
async def move_normal_pmd(cpu, mm, vma, old_addr: int, old_pmd, new_pmd) -> bool:
    m = cpu.m
    # "The destination pmd shouldn't be established, free_pgtables() should have released it."
    if await read_entry(cpu, new_pmd, "pmd_none") != 0:
        m.ev(cpu, "move_normal_pmd_warn", why="destination pmd not none")
        return False
    if vma.uffd_wp:  # vma_has_uffd_without_event_remap(vma): recurse to the ptes instead
        return False
    # "We don't have to worry about the ordering of src and dst ptlocks because exclusive
    # mmap_lock prevents deadlock."
    old_ptl = await pmd_lock(cpu, mm, old_pmd)
    new_ptl = pmd_lockptr(m, mm, new_pmd)
    if new_ptl is not old_ptl:
        await spin_lock_nested(cpu, new_ptl)
    res = False
    pmd = await read_entry(cpu, old_pmd, "pmdp_get")  # pmd = *old_pmd
    if m.cfg.mremap_recheck_pmd and (not present(pmd) or leaf(pmd)):
        # "Racing with collapse?"
        m.ev(cpu, "move_normal_pmd_racing_collapse", pmd=hex(pmd))
    else:
        await pmd_clear(cpu, old_pmd)  # "Clear the pmd"
        res = True
        # VM_BUG_ON(!pmd_none(*new_pmd))
        # pmd_populate(mm, new_pmd, pmd_pgtable(pmd))
        await pmd_populate(cpu, new_pmd, entry_pfn(pmd))
        # flush_tlb_range: freed_tables = true on x86 since 3ef938c35035 (v6.15; kernel-notes
        # F6), false before it (pmd_flush_freed_tables)
        await flush_tlb_range(cpu, mm, old_addr, old_addr + PMD_SIZE)
        m.ev(cpu, "move_normal_pmd", table=hex(entry_pfn(pmd)))
    if new_ptl is not old_ptl:
        await spin_unlock(cpu, new_ptl)
    await spin_unlock(cpu, old_ptl)
    return res


@kfunc
async def move_pgt_entry(cpu, mm, vma, old_addr: int, old_pmd, new_pmd) -> bool:
    """NORMAL_PMD: should_take_rmap_locks() is true for it."""
    await take_rmap_locks(cpu, vma)
    moved = await move_normal_pmd(cpu, mm, vma, old_addr, old_pmd, new_pmd)
    await drop_rmap_locks(cpu, vma)
    return moved


@kfunc
async def move_ptes(cpu, mm, vma, old_addr: int, extent: int, old_pmd, new_pmd, new_addr: int,
                    need_rmap_locks: bool) -> int:
    """The PTE-level move: old table locked by pte_offset_map_lock, new one mapped with
    pte_offset_map_rw_nolock ('we already hold the exclusive mmap_lock, so this new_pte page is
    stable') and locked nested if distinct; present ptes are moved and the old range flushed
    before the ptls are dropped."""
    err = 0
    if need_rmap_locks:
        await take_rmap_locks(cpu, vma)
    mapped = await pte_offset_map_lock(cpu, mm, old_pmd, old_addr)
    if mapped is None:
        err = EAGAIN
    else:
        old_table, old_ptl = mapped
        new_mapped = await pte_offset_map_rw_nolock(cpu, mm, new_pmd, new_addr)
        if new_mapped is None:
            await pte_unmap_unlock(cpu, old_ptl)
            err = EAGAIN
        else:
            new_table, _dummy, new_ptl = new_mapped
            if new_ptl is not old_ptl:
                await spin_lock_nested(cpu, new_ptl)
            first = index(1, old_addr)
            dst_first = index(1, new_addr)
            npages = extent // PAGE_SIZE
            old_entries = scan_entries_locked(cpu, old_table)[first:first + npages]
            todo = [i for i, val in enumerate(old_entries) if val != 0]
            force_flush = False
            for i in todo:
                if await ptep_get(cpu, (new_table, dst_first + i)) != 0:
                    raise NotModelled("mremap onto a destination with ptes "
                                      "(MREMAP_FIXED unmaps it first)")
                # get_and_clear_full_ptes
                pte = await ptep_get_and_clear(cpu, (old_table, first + i))
                if present(pte):
                    force_flush = True
                await set_pte_at(cpu, (new_table, dst_first + i), pte)  # move_pte, set_ptes
            if force_flush:
                await flush_tlb_range(cpu, mm, old_addr, old_addr + extent)
            if new_ptl is not old_ptl:
                await spin_unlock(cpu, new_ptl)
            await pte_unmap(cpu)  # pte_unmap(new_ptep - 1)
            await pte_unmap_unlock(cpu, old_ptl)
    if need_rmap_locks:
        await drop_rmap_locks(cpu, vma)
    return err


@kfunc
async def move_page_tables(cpu, mm, vma, old_addr: int, new_vma, new_addr: int, length: int) -> int:
    """One PMD-sized extent at a time (the PUD-level move needs a 1 GB extent: never here).
    Returns the bytes whose page tables were moved or found empty."""
    m = cpu.m
    old_end = old_addr + length
    start = old_addr
    while old_addr < old_end:
        extent = min(PMD_SIZE - (old_addr & (PMD_SIZE - 1)), old_end - old_addr,
                     PMD_SIZE - (new_addr & (PMD_SIZE - 1)))
        old_pmd = await get_old_pmd(cpu, mm, old_addr)
        if old_pmd is not None:
            new_pmd = await alloc_new_pmd(cpu, mm, new_addr)
            while True:  # again:
                val = await read_entry(cpu, old_pmd, "pmd_trans_huge")
                if present(val) and leaf(val):
                    raise NotModelled("mremap of a huge pmd (move_huge_pmd)")
                if extent == PMD_SIZE:
                    # "If the extent is PMD-sized, try to speed the move by moving at the PMD
                    # level if possible."
                    if await move_pgt_entry(cpu, mm, vma, old_addr, old_pmd, new_pmd):
                        break
                if await read_entry(cpu, old_pmd, "pmd_none") == 0:
                    m.ev(cpu, "move_page_tables_pmd_none", addr=hex(old_addr))
                    break
                await pte_alloc(cpu, mm, new_pmd, new_addr)
                if await move_ptes(cpu, mm, vma, old_addr, extent, old_pmd, new_pmd, new_addr,
                                   False) >= 0:
                    break
        old_addr += extent
        new_addr += extent
    return old_addr - start


@op("mremap_move_pmd")
async def mremap_move_pmd(cpu, *, addr: PmdAddr, dst: PmdAddr) -> None:
    """mremap(addr, 2M, 2M, MREMAP_MAYMOVE | MREMAP_FIXED, dst): move_vma -> move_page_tables ->
    move_normal_pmd for the one pmd, under mmap_lock held for writing."""
    m = cpu.m
    mm = cpu.mm
    await down_write(cpu, mm.mmap_lock)
    vma = mm.find_vma(addr)
    new_vma = mm.find_vma(dst)
    if vma is None or new_vma is None:
        m.ev(cpu, "mremap_skip", why="no vma")
        await up_write(cpu, mm.mmap_lock)
        return
    await down_write(cpu, vma.vm_lock)  # vma_start_write(vma) in move_vma
    if new_vma is not vma:
        await down_write(cpu, new_vma.vm_lock)  # the new vma is write-locked
    moved = await move_page_tables(cpu, mm, vma, addr, new_vma, dst, PMD_SIZE)
    m.ev(cpu, "mremap_moved", bytes=moved)
    # mmap_write_unlock -> vma_end_write_all
    if new_vma is not vma:
        await up_write(cpu, new_vma.vm_lock)
    await up_write(cpu, vma.vm_lock)
    await up_write(cpu, mm.mmap_lock)
