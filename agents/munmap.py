"""munmap(2): __vm_munmap -> do_vmi_munmap -> do_vmi_align_munmap (mm/vma.c, mm/memory.c, ~6.14).

  vms_gather_munmap_vmas:   vma_start_write each VMA in the range, detach it (vma_mark_detached,
                            vma_iter_clear_gfp: it leaves the mm's VMA tree)
  vms_complete_munmap_vmas: vms_clear_ptes:
                              tlb_gather_mmu
                              unmap_vmas   -> unmap_single_vma -> unmap_page_range with
                                              details {even_cows, ZAP_FLAG_DROP_MARKER}, no
                                              reclaim_pt: zap_pte_range never frees tables here
                              free_pgtables -> free_pgd_range -> free_p4d_range -> free_pud_range
                                              -> free_pmd_range -> free_pte_range
                              tlb_finish_mmu
                            remove_vma; mmap unlock

free_pte_range clears the pmd with NO lock at all (kernel-notes B8 and F3: the one documented
exception to "every pmd write happens under the pmd lock"); safety comes from the detached VMA
(no new walker can find the range) plus the mmu_gather free mode. Upper tables go too when the
floor/ceiling arithmetic says no neighbouring VMA can still use them: the PMD table when its
whole 1 GB is unused, the PUD table when its whole 512 GB is (the p4d level is folded on x86-64
4-level paging).

Not modelled: splitting a VMA (munmap of part of one raises NotModelled), hugetlb, uprobes,
accounting other than nr_ptes/nr_pmds/nr_puds and rss. A file VMA leaves the model's rmap view
(mm.vmas) when it is detached; the kernel's i_mmap tree keeps it until free_pgtables'
unlink_file_vma, whose i_mmap write lock the model does take.
"""

from __future__ import annotations

__kernel_file__ = "mm/vma.c"  # where the kernel functions below live (reports cite it)
__kernel_files__ = {  # the ones that live elsewhere
    "free_pte_range": "mm/memory.c",
    "free_pmd_range": "mm/memory.c",
    "free_pud_range": "mm/memory.c",
    "free_pgd_range": "mm/memory.c",
    "free_pgtables": "mm/memory.c",
    "unmap_vmas": "mm/memory.c",
    "unlink_file_vma": "mm/mmap.c",
}

from ptsim.kernel_model.errors import NotModelled
from ptsim.kernel_model.filemap import mapping_of
from ptsim.kernel_model.locks import down_write, up_write
from ptsim.kernel_model.mmu_gather import (
    pmd_free_tlb,
    pte_free_tlb,
    pud_free_tlb,
    tlb_finish_mmu,
    tlb_gather_mmu,
)
from ptsim.kernel_model.pagetable import (
    PGDIR_SHIFT,
    PMD_SIZE,
    PUD_SIZE,
    entry_pfn,
    index,
    leaf,
    present,
)
from ptsim.kernel_model.pgtable import pmd_clear, read_entry, write_entry
from ptsim.kernel_model.registry import Addr, Size, kfunc, op

from .zap import ZapDetails, unmap_page_range

_U64 = (1 << 64) - 1
PGDIR_SIZE = 1 << PGDIR_SHIFT
P4D_SIZE = PGDIR_SIZE  # p4d folded into the pgd (4-level paging)
PMD_MASK = _U64 & ~(PMD_SIZE - 1)
PUD_MASK = _U64 & ~(PUD_SIZE - 1)
P4D_MASK = _U64 & ~(P4D_SIZE - 1)

FIRST_USER_ADDRESS = 0
USER_PGTABLES_CEILING = 0  # "may be 0: this will underflow and is okay"


def _dec(x: int) -> int:
    """x - 1 as unsigned long: the free_pgd_range arithmetic depends on 0 - 1 == ULONG_MAX."""
    return (x - 1) & _U64


def _addr_end(addr: int, end: int, size: int) -> int:
    """pgd_addr_end / pud_addr_end / pmd_addr_end."""
    boundary = (addr + size) & _U64 & ~(size - 1)
    return boundary if _dec(boundary) < _dec(end) else end


# -- mm/memory.c: free_pgtables ------------------------------------------------------------------

@kfunc
async def free_pte_range(cpu, tlb, pmdp, addr: int) -> None:
    """Note: no lock. The VMA is detached; nobody may map this table any more (R4)."""
    token = entry_pfn(await read_entry(cpu, pmdp, "pmd_pgtable"))
    await pmd_clear(cpu, pmdp)
    await pte_free_tlb(cpu, tlb, token, addr)
    tlb.mm.nr_ptes -= 1  # mm_dec_nr_ptes


async def _none_or_clear_bad(cpu, ptr, what: str) -> int | None:
    """p?d_none_or_clear_bad: the entry's table pfn, or None if the entry is none."""
    val = await read_entry(cpu, ptr, what)
    if val == 0:
        return None
    if not present(val) or leaf(val):
        # unmap_vmas zapped every huge or special entry already; a bad one would be cleared
        # with a pr_err (p?d_clear_bad). Nothing in the model produces one.
        raise NotModelled(f"free_pgtables met a non-table entry {val:#x} ({what})")
    return entry_pfn(val)


@kfunc
async def free_pmd_range(cpu, tlb, pudp, pmd_table: int, addr: int, end: int, floor: int,
                         ceiling: int) -> None:
    start = addr
    while True:
        nxt = _addr_end(addr, end, PMD_SIZE)
        pmdp = (pmd_table, index(2, addr))
        if await _none_or_clear_bad(cpu, pmdp, "pmd_none_or_clear_bad") is not None:
            await free_pte_range(cpu, tlb, pmdp, addr)
        addr = nxt
        if addr == end:
            break
    start &= PUD_MASK
    if start < floor:
        return
    if ceiling:
        ceiling &= PUD_MASK
        if not ceiling:
            return
    if _dec(end) > _dec(ceiling):
        return
    await write_entry(cpu, pudp, 0, "pud_clear")
    cpu.m.remember(("pt", pmd_table), cpu, f"pud_clear unlinked it from pud {pudp[0]:#x}:{pudp[1]}")
    await pmd_free_tlb(cpu, tlb, pmd_table, start)
    tlb.mm.nr_pmds -= 1  # mm_dec_nr_pmds


@kfunc
async def free_pud_range(cpu, tlb, p4dp, pud_table: int, addr: int, end: int, floor: int,
                         ceiling: int) -> None:
    start = addr
    while True:
        nxt = _addr_end(addr, end, PUD_SIZE)
        pudp = (pud_table, index(3, addr))
        pmd_table = await _none_or_clear_bad(cpu, pudp, "pud_none_or_clear_bad")
        if pmd_table is not None:
            await free_pmd_range(cpu, tlb, pudp, pmd_table, addr, nxt, floor, ceiling)
        addr = nxt
        if addr == end:
            break
    start &= P4D_MASK
    if start < floor:
        return
    if ceiling:
        ceiling &= P4D_MASK
        if not ceiling:
            return
    if _dec(end) > _dec(ceiling):
        return
    await write_entry(cpu, p4dp, 0, "p4d_clear")  # the folded p4d is the pgd entry
    cpu.m.remember(("pt", pud_table), cpu, f"p4d_clear unlinked it from pgd {p4dp[0]:#x}:{p4dp[1]}")
    await pud_free_tlb(cpu, tlb, pud_table, start)
    tlb.mm.nr_puds -= 1  # mm_dec_nr_puds


@kfunc
async def free_pgd_range(cpu, tlb, addr: int, end: int, floor: int, ceiling: int) -> None:
    # "The next few lines have given us lots of grief..." -- the floor/ceiling trimming that
    # keeps a PMD-sized slot shared with a neighbouring VMA.
    addr &= PMD_MASK
    if addr < floor:
        addr = (addr + PMD_SIZE) & _U64
        if not addr:
            return
    if ceiling:
        ceiling &= PMD_MASK
        if not ceiling:
            return
    if _dec(end) > _dec(ceiling):
        end -= PMD_SIZE
    if addr > _dec(end):
        return
    mm = tlb.mm
    while True:
        nxt = _addr_end(addr, end, PGDIR_SIZE)
        pgdp = (mm.pgd, index(4, addr))
        # pgd_none_or_clear_bad() is constant 0 with p4d folded; free_p4d_range reads the
        # real entry (p4d_none_or_clear_bad) and its own free step is a no-op when folded.
        pud_table = await _none_or_clear_bad(cpu, pgdp, "p4d_none_or_clear_bad")
        if pud_table is not None:
            await free_pud_range(cpu, tlb, pgdp, pud_table, addr, nxt, floor, ceiling)
        addr = nxt
        if addr == end:
            break


@kfunc
async def unlink_file_vma(cpu, vma) -> None:
    """"Hide vma from rmap and truncate_pagecache before freeing pgtables": i_mmap_lock_write,
    vma_interval_tree_remove, i_mmap_unlock_write. Taking the lock for writing waits for rmap
    walkers that hold it for reading and no mmap_lock (retract_page_tables), so none of them
    is still working on this VMA's tables when free_pgd_range frees them."""
    if vma.file is None:
        return
    mapping = mapping_of(cpu.m, vma.file)
    await down_write(cpu, mapping.i_mmap_rwsem)
    cpu.m.ev(cpu, "vma_interval_tree_remove", file=vma.file, vma=f"{vma.start:#x}-{vma.end:#x}")
    await up_write(cpu, mapping.i_mmap_rwsem)


@kfunc
async def free_pgtables(cpu, tlb, vmas: list, floor: int, ceiling: int) -> None:
    """The detached VMAs, in address order. mm_wr_locked is false for munmap(2): the VMAs were
    write-locked (vma_start_write) when they were gathered. unlink_anon_vmas has nothing to do
    in the model."""
    i = 0
    while i < len(vmas):
        vma = vmas[i]
        addr = vma.start
        nxt = vmas[i + 1] if i + 1 < len(vmas) else None
        await unlink_file_vma(cpu, vma)  # unlink_file_vma_batch_add (+ _final)
        # "Optimization: gather nearby vmas into one call down"
        while nxt is not None and nxt.start <= vma.end + PMD_SIZE:
            i += 1
            vma = nxt
            nxt = vmas[i + 1] if i + 1 < len(vmas) else None
            await unlink_file_vma(cpu, vma)
        await free_pgd_range(cpu, tlb, addr, vma.end, floor, nxt.start if nxt else ceiling)
        i += 1


@kfunc
async def unmap_vmas(cpu, tlb, vmas: list, start: int, end: int) -> None:
    details = ZapDetails(reclaim_pt=False, even_cows=True)  # + ZAP_FLAG_DROP_MARKER
    for vma in vmas:
        # unmap_single_vma
        s, e = max(start, vma.start), min(end, vma.end)
        if s < e:
            await unmap_page_range(cpu, tlb, vma, s, e, details)


@kfunc
async def vms_clear_ptes(cpu, mm, vmas: list, start: int, end: int, unmap_start: int,
                         unmap_end: int) -> None:
    """"We can free page tables without write-locking mmap_lock because VMAs were isolated"."""
    tlb = tlb_gather_mmu(cpu, mm)
    await unmap_vmas(cpu, tlb, vmas, start, end)
    await free_pgtables(cpu, tlb, vmas, unmap_start, unmap_end)
    await tlb_finish_mmu(cpu, tlb)


@kfunc
async def do_vmi_align_munmap(cpu, mm, start: int, end: int) -> None:
    m = cpu.m
    vmas = mm.vmas_in(start, end)
    for vma in vmas:
        if vma.start < start or vma.end > end:
            raise NotModelled("munmap of part of a VMA (vma split)")
    prev = next((v for v in reversed(mm.vmas) if v.end <= start), None)
    nxt = next((v for v in mm.vmas if v.start >= end), None)
    unmap_start = prev.end if prev is not None else FIRST_USER_ADDRESS
    unmap_end = nxt.start if nxt is not None else USER_PGTABLES_CEILING
    # vms_gather_munmap_vmas: vma_start_write (waits for the VMA's readers), vma_mark_detached.
    for vma in vmas:
        await down_write(cpu, vma.vm_lock)
    # vma_iter_clear_gfp: the range leaves the mm's VMA tree ("Point of no return").
    await m.point(cpu)
    for vma in vmas:
        mm.vmas.remove(vma)
    m.ev(cpu, "vmas_detached", vmas=[f"{v.start:#x}-{v.end:#x}" for v in vmas])
    # vms_complete_munmap_vmas. __vm_munmap passes unlock=true, so the kernel downgrades
    # mmap_lock to read here (mmap_write_downgrade); the model keeps it for writing (see below).
    await vms_clear_ptes(cpu, mm, vmas, start, end, unmap_start, unmap_end)
    # remove_vma: the VMAs are freed; their write locks end with mmap_write_unlock
    # (vma_end_write_all).
    for vma in vmas:
        await up_write(cpu, vma.vm_lock)


@op("munmap")
async def munmap(cpu, *, addr: Addr, len: Size) -> None:
    """munmap(addr, len): __vm_munmap -> do_vmi_align_munmap: the vmas are detached, then
    unmap_vmas and free_pgtables free their pages and page tables.

    The model holds mmap_lock for writing throughout. The kernel downgrades it to read after
    detaching the VMAs; readers that then come in cannot find the detached VMAs. The model's
    pte_walker walks by address without a VMA lookup, so holding the write lock keeps it out
    the way a VMA lookup would."""
    mm = cpu.mm
    await down_write(cpu, mm.mmap_lock)
    if mm.vmas_in(addr, addr + len):  # do_vmi_munmap: find the first overlapping VMA
        await do_vmi_align_munmap(cpu, mm, addr, addr + len)
    await up_write(cpu, mm.mmap_lock)
